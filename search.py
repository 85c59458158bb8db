"""Search a library by description, or a text corpus by molecule (docs/search.md).

python search.py build --workdir runs/quickstart --molecules library.smi --index DIR
python search.py query --index DIR --text "an aromatic amine that is a dopamine ligand" -k 10
python search.py serve --index DIR [--port 8000]

A thin shim over `jaxmol.cli.search` (also installed as `jaxmol-search`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub

from jaxmol.cli.search import run

if __name__ == "__main__":
    run()
