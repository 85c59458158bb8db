"""Evaluate a trained checkpoint on one split with one retrieval protocol.

python evaluate.py --workdir runs/quickstart --split chebi20/test --protocol pool

A thin shim over `jaxmol.cli.evaluate` (also installed as `jaxmol-evaluate`); the protocols are
described in docs/evaluation.md.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub

from jaxmol.cli.evaluate import run

if __name__ == "__main__":
    run()
