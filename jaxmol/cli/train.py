"""Train a CMTMR retrieval model, then evaluate it (resumes when the workdir has a checkpoint).

python train.py --config configs/quickstart.py --workdir runs/quickstart [--config.key=value]
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub

from absl import app, flags
from ml_collections import config_flags

from jaxmol import train_lib
from jaxmol.cli import setup_logging

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (a get_config() module).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
    """Entry point (`jaxmol-train`, `python train.py`)."""
    app.run(main)


if __name__ == "__main__":
    run()
