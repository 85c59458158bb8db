"""Train a CMTMR retrieval model, then evaluate it (resumes when the workdir has a checkpoint).

python train.py --config configs/quickstart.py --workdir runs/quickstart [--config.key=value]

A thin shim over `jaxmol.cli.train` (also installed as `jaxmol-train`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub

from jaxmol.cli.train import run

if __name__ == "__main__":
    run()
