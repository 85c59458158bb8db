"""Train a CMTMR retrieval model, then evaluate it (resumes when the workdir has a checkpoint).

python train.py --config configs/quickstart.py --workdir runs/quickstart [--config.key=value]
jaxmol-train --config quickstart --workdir runs/quickstart --data_dir /path/to/jaxmol/data

`--config` is a config file or the name of a shipped one (see `jaxmol.cli`); `--data_dir` the
folder of the shipped splits (default `$JAXMOL_DATA_DIR`, else the checkout's `data/`).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxmol import allocator, cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (a get_config() module), or a shipped config's name: "
    + ", ".join(cli.shipped_config_names()),
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation outputs.")
flags.DEFINE_string(
    "data_dir",
    None,
    "Folder of the shipped splits (holds MANIFEST.json). Default: $JAXMOL_DATA_DIR, else the "
    "checkout's data/. An installed jaxmol carries no data: point this at a checkout's data/.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _split_names(config) -> list[str]:
    return [config.data.train_split, config.data.val_split, *config.data.test_splits]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()

    def body():
        cli.use_data_dir(FLAGS.data_dir, _split_names(FLAGS.config))
        # Imported after the data folder is set: the split registry reads it at import.
        from jaxmol import train_lib

        train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)

    cli.run_guarded("train", body)


def run(argv=None) -> None:
    """Entry point (`jaxmol-train`, `python train.py`)."""
    allocator.keep_freed_memory()  # opt-in (jaxmol.allocator); before JAX starts its threads
    app.run(main, argv=cli.prepare_config_argv(sys.argv if argv is None else argv))


if __name__ == "__main__":
    run()
