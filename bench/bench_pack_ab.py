"""Interleaved A/B of text packing: the same train step on the same batches, padded (A) and
packed (B, ``data.pack_texts``), alternated in one process so that both see the same load.

    python bench/bench_pack_ab.py [--config default] [--steps 4] [--set KEY=VALUE ...]

The batches are the first full batches of a PCdes train epoch whose packed shape is the epoch's
most common one (text bucket, graph level, packed rows R). Each side compiles on the first batch,
then the sides alternate on the others, A then B per batch, each starting from its own copy of
the same initial state. Prints per-step seconds, the medians, B / A, and the two final losses
(equal within float rounding with dropout off; with dropout on, the draws are laid out
differently, so the losses differ slightly).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_throughput as bt
import jax

from jaxmol import builders, train_step
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    print("$ python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), flush=True)
    config = bt.load_config(args.config, args.set)
    runner = DataParallel(config.parallel, select_devices(config.num_devices))
    encoder = builders.split_encoder(config)
    batchers = {}
    for side, pack in (("A", False), ("B", True)):
        config.data.pack_texts = pack
        batchers[side] = builders.train_batcher(config, encoder, runner.num_devices)
    by_shape = collections.defaultdict(list)
    for rows in batchers["B"].epoch_batches(0):
        if len(rows) == config.batch_size:
            by_shape[bt._shape_of(batchers["B"], rows)].append(rows)
    shape = max(by_shape, key=lambda k: len(by_shape[k]))
    picked = by_shape[shape][: args.steps + 1]
    model = RetrievalModel(builders.model_config_for(config))
    host_state = None
    steps, states, batches, times, losses = {}, {}, {}, {}, {}
    for side, batcher in batchers.items():
        batches[side] = [runner.shard(batcher.make_batch(rows)) for rows in picked]
        example = jax.tree.map(lambda x: x[0], batcher.make_batch(picked[0]))
        state, tx, critic_tx = train_step.init_state(config, model, example, 10_000)
        if host_state is None:  # B starts from A's very state
            host_state = jax.device_get(state)
        steps[side] = train_step.compile_train_step(runner, config, model, tx, critic_tx)
        states[side] = runner.replicate(host_state)
        start = time.perf_counter()
        states[side], metrics = steps[side](states[side], batches[side][0])
        losses[side] = [float(metrics["loss"])]
        print(f"{side}: compiled and ran in {time.perf_counter() - start:.0f} s", flush=True)
        times[side] = []
    probes = [bt.matmul_probe(repeats=3)["gflops_median"]]
    for i in range(1, len(picked)):
        for side in batchers:
            start = time.perf_counter()
            states[side], metrics = steps[side](states[side], batches[side][i])
            losses[side].append(float(metrics["loss"]))  # blocks
            times[side].append(time.perf_counter() - start)
        probes.append(bt.matmul_probe(repeats=3)["gflops_median"])
        print(f"batch {i}: A {times['A'][-1]:.2f} s, B {times['B'][-1]:.2f} s", flush=True)
    median = {side: statistics.median(t) for side, t in times.items()}
    report = {
        "shape": {"text_length": shape[0], "graph_level": shape[1], "text_rows": shape[2]},
        "batch_size": config.batch_size,
        "step_s": times,
        "median_s": median,
        "b_over_a": median["B"] / median["A"],
        "losses": losses,
        "probes": probes,
    }
    print(
        f"L={shape[0]} R={shape[2]} g{shape[1]}: median step A (padded) {median['A']:.2f} s, "
        f"B (packed) {median['B']:.2f} s, B / A {report['b_over_a']:.3f}; probes "
        f"{min(probes):.0f}-{max(probes):.0f} GFLOP/s; last losses A {losses['A'][-1]:.5f}, "
        f"B {losses['B'][-1]:.5f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
