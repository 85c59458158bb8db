"""Evaluate a trained checkpoint on one split with one retrieval protocol.

python evaluate.py --workdir runs/quickstart --split chebi20/test --protocol pool
python evaluate.py --workdir runs/quickstart --split chebi20/test --protocol text2mol
python evaluate.py --workdir runs/quickstart --split pcdes_momu/test --protocol momu

Restores the model and its config from the workdir's checkpoint (best by default) onto whatever
devices exist, without the optimiser state; prints a table and writes
WORKDIR/eval/<split with / as _>__<protocol>.json and the .npz of embeddings beside it.
Protocols are described in docs/evaluation.md.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub

from absl import app, flags

from jaxmol import allocator, evaluation
from jaxmol.cli import run_guarded, setup_logging, use_data_dir
from jaxmol.scoring import MOMU_INBATCH_SIZE, MOMU_SHUFFLE_SEED

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/; results go to eval/).")
flags.DEFINE_string("split", None, "Split to evaluate, e.g. pcdes/test, chebi20/test, tsv:PATH.")
flags.DEFINE_enum("protocol", "pool", list(evaluation.PROTOCOLS), "Retrieval protocol.")
flags.DEFINE_string("step", "best", "Checkpoint: 'best', 'latest' or a step number.")
flags.DEFINE_integer("batch_size", 0, "Embedding batch size; 0 = the run's eval_batch_size.")
flags.DEFINE_integer("num_devices", -1, "Devices to embed on; -1 = all local devices.")
flags.DEFINE_enum("parallel", "shard_map", ["shard_map", "pmap"], "Multi-device runner.")
flags.DEFINE_integer(
    "max_pairs", -1, "> 0: only the first N rows of every split involved (smoke tests)."
)
flags.DEFINE_integer("inbatch_size", MOMU_INBATCH_SIZE, "Batch of MoMu's in-batch accuracy.")
flags.DEFINE_integer(
    "inbatch_seed",
    MOMU_SHUFFLE_SEED,
    "Seed of the shuffle before MoMu's in-batch batches (the official procedure shuffles); "
    "-1 = file order.",
)
flags.DEFINE_bool(
    "plots", False, "Also draw the evaluation pictures (PNG + CSV/JSON) into WORKDIR/plots/."
)
flags.DEFINE_bool(
    "distributed",
    False,
    "Join the other processes of a multi-process evaluation (jax.distributed; set up as for "
    "training: $JAXMOL_COORDINATOR_ADDRESS/... or `python -m jaxmol.launch`); embeds over all "
    "devices of all processes, process 0 prints and writes the results.",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "Folder of the shipped splits (holds MANIFEST.json). Default: $JAXMOL_DATA_DIR, else the "
    "checkout's data/ (an installed jaxmol carries no data).",
)
flags.mark_flags_as_required(["workdir", "split"])


def _parse_step(value: str) -> int | str:
    if value in ("best", "latest"):
        return value
    from jaxmol.config import ConfigError  # exit status 2, like every usage error

    try:
        return int(value)
    except ValueError as error:
        message = f"--step must be 'best', 'latest' or an integer, got {value!r}"
        raise ConfigError(message) from error


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_logging()
    reports = []
    from jaxmol import distributed

    run_guarded("evaluate", lambda: use_data_dir(FLAGS.data_dir, [FLAGS.split]))
    joined = FLAGS.distributed or distributed.requested()
    if joined:
        run_guarded("evaluate", _join_processes)
    run_guarded(
        "evaluate",
        lambda: reports.append(
            evaluation.evaluate_checkpoint(
                FLAGS.workdir,
                FLAGS.split,
                protocol=FLAGS.protocol,
                step=_parse_step(FLAGS.step),
                batch_size=FLAGS.batch_size,
                num_devices=FLAGS.num_devices,
                parallel=FLAGS.parallel,
                max_pairs=FLAGS.max_pairs,
                inbatch_size=FLAGS.inbatch_size,
                inbatch_seed=FLAGS.inbatch_seed if FLAGS.inbatch_seed >= 0 else None,
            )
        ),
    )
    report = reports[0]
    if joined and not distributed.is_primary():
        return  # process 0 prints the table and wrote the files
    print(f"weights: {report['weights']}")
    print(f"tie policy: {report['tie_policy']}")
    if report["num_skipped"]:
        ids = ", ".join(f"{s['split']}:{s['id']}" for s in report["skipped"])
        print(f"{report['num_skipped']} pairs excluded (molecule not featurisable): {ids}")
    if report["protocol"] == "text2mol":
        print(
            f"t2m pool: {', '.join(report['t2m_pool_splits'])}; "
            f"m2t pool: {', '.join(report['m2t_pool_splits'])}"
        )
    print(evaluation.format_table({report["split"]: report}))
    for path in report["files"].values():
        print(f"wrote {os.path.join(FLAGS.workdir, path)}")
    if FLAGS.plots:
        from jaxmol import plots  # matplotlib only when pictures are asked for

        out_dir = os.path.join(FLAGS.workdir, "plots")
        files = plots.plot_evaluation(
            os.path.join(FLAGS.workdir, report["files"]["npz"]),
            os.path.join(FLAGS.workdir, report["files"]["json"]),
            out_dir,
        )
        for path in _flat_paths(files):
            print(f"wrote {path}")


def _join_processes() -> None:
    from jaxmol import distributed
    from jaxmol.config import default_config

    distributed.initialize(default_config())  # reads $JAXMOL_* or detects the cluster
    distributed.quiet_unless_primary()


def _flat_paths(files) -> list[str]:
    """Every path in what a plots function returned (a path, or nested lists/dicts of them)."""
    if isinstance(files, dict):
        return [p for value in files.values() for p in _flat_paths(value)]
    if isinstance(files, list | tuple):
        return [p for value in files for p in _flat_paths(value)]
    return [str(files)]


def run() -> None:
    """Entry point (`jaxmol-evaluate`, `python evaluate.py`)."""
    allocator.keep_freed_memory()  # opt-in (jaxmol.allocator); before JAX starts its threads
    app.run(main)


if __name__ == "__main__":
    run()
