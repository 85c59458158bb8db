"""A/B of the text tower: `jaxmol/models/bert.py` at a git revision against the working tree, in
one process, interleaved on the same batches (a shared, loaded machine drifts too much between
two separate runs for a before/after of a few tens of percent).

    python bench/bench_ab.py --rev 98f5894 [--config default] [--steps 3] [--texts 256]

For the run config it builds the model twice, once with the revision's `BertEncoder` (loaded
from `git show REV:jaxmol/models/bert.py`) and once with today's, from the same initial state;
compiles the train step of each on the epoch's most common batch shape; then times them
alternately (A, B, A, B, ...) on the same real PCdes batches, with a matmul probe before each
pair. Then the same for eval-mode text embedding (`evaluation.Embedder`) on ChEBI-20 test
texts. Prints the medians and B/A ratios; `--json` writes them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_throughput as bt
import jax
import numpy as np

from jaxmol import builders, train_step
from jaxmol.data import datasets
from jaxmol.evaluation import Embedder
from jaxmol.models import retrieval
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices


def load_bert_at(rev: str):
    """The `jaxmol/models/bert.py` module of a git revision, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{rev}:jaxmol/models/bert.py"],
        cwd=bt.ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"bert_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"bert_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def text_tower(module):
    """Models traced inside use `module.BertEncoder` (None: today's) as their text tower."""
    today = retrieval.BertEncoder
    if module is not None:
        retrieval.BertEncoder = module.BertEncoder
    try:
        yield
    finally:
        retrieval.BertEncoder = today


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="git revision of the A side")
    parser.add_argument("--config", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per side")
    parser.add_argument("--texts", type=int, default=256, help="ChEBI-20 test texts per side")
    parser.add_argument("--skip", default="", help="'train' or 'embed'")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    command = "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    print(f"$ {command}")
    sides = {"A": load_bert_at(args.rev), "B": None}
    config = bt.load_config(args.config, args.set)
    runner = DataParallel(config.parallel, select_devices(config.num_devices))
    report: dict = {"command": command, "rev": args.rev, "config": args.config}
    probes: list[float] = []

    def probe():
        probes.append(bt.matmul_probe(repeats=3)["gflops_median"])

    if args.skip != "train":
        batcher = builders.train_batcher(config, builders.split_encoder(config), runner.num_devices)
        split = batcher.split
        by_shape = collections.defaultdict(list)
        for rows in batcher.epoch_batches(0):
            if len(rows) == config.batch_size:
                by_shape[bt._shape_of(batcher, rows)].append(rows)
        shape = max(by_shape, key=lambda k: len(by_shape[k]))
        batches = [runner.shard(batcher.make_batch(r)) for r in by_shape[shape][: args.steps + 1]]
        model = RetrievalModel(builders.model_config_for(config))
        state, tx, critic_tx = train_step.init_state(
            config,
            model,
            jax.tree.map(lambda x: x[0], batcher.make_batch(by_shape[shape][0])),
            10_000,
        )
        host_state = jax.device_get(state)
        steps, states, times = {}, {}, {s: [] for s in sides}
        for side, module in sides.items():
            steps[side] = train_step.compile_train_step(runner, config, model, tx, critic_tx)
            states[side] = runner.replicate(host_state)
            with text_tower(module):
                start = time.perf_counter()
                states[side], m = steps[side](states[side], batches[0])
                jax.block_until_ready(m["loss"])
                seconds = time.perf_counter() - start
                print(f"train {side}: compiled L={shape[0]} g{shape[1]} in {seconds:.0f} s")
        for batch in batches[1:]:
            probe()
            for side in sides:

                def run(side=side, batch=batch):
                    states[side], m = steps[side](states[side], batch)
                    return m["loss"]

                times[side].append(timed(run))
        report["train"] = {
            "shape": shape,
            "step_s": times,
            "median_s": {s: statistics.median(t) for s, t in times.items()},
        }
        med = report["train"]["median_s"]
        print(
            f"train L={shape[0]}: A {med['A']:.2f} s, B {med['B']:.2f} s per step "
            f"(B/A {med['B'] / med['A']:.3f}; steps A {times['A']}, B {times['B']})"
        )

    if args.skip != "embed":
        split = builders.split_encoder(config)(datasets.load_split("chebi20/test"))
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(split.rows, min(args.texts, len(split.rows)), replace=False))
        _, abstract = builders.abstract_variables(config)
        variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
        if args.skip != "train":
            variables = {"params": host_state.params, "batch_stats": host_state.batch_stats}
        eval_model = RetrievalModel(builders.model_config_for(config, axis_name=None))
        embedders = {s: Embedder(eval_model, runner) for s in sides}
        replicated = embedders["B"].replicate(variables)
        B = config.eval_batch_size
        outputs, times = {}, {s: [] for s in sides}
        for side, module in sides.items():  # compile every text shape
            with text_tower(module):
                outputs[side] = embedders[side].embed_texts(
                    replicated, split.tokens, rows, batch_size=B
                )
        for _ in range(2):
            probe()
            for side in sides:
                times[side].append(
                    timed(
                        lambda side=side: embedders[side].embed_texts(
                            replicated, split.tokens, rows, batch_size=B
                        )
                    )
                )
        diff = float(np.abs(outputs["A"] - outputs["B"]).max())
        report["embed"] = {
            "texts": len(rows),
            "texts_per_s": {s: len(rows) / statistics.median(t) for s, t in times.items()},
            "max_abs_diff": diff,
        }
        tps = report["embed"]["texts_per_s"]
        print(
            f"embed {len(rows)} texts: A {tps['A']:.1f}, B {tps['B']:.1f} texts/s "
            f"(B/A {tps['B'] / tps['A']:.3f}); max |z_A - z_B| {diff:.2e}"
        )
    report["probe_gflops"] = probes
    print(f"probes (GFLOP/s): {', '.join(f'{p:.0f}' for p in probes)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
