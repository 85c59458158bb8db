"""Peak RSS of paper-config train steps on packed batches of one row count R.

    python bench/pack_rows_rss.py R [--config default] [--steps 1]

Finds the full batches of PCdes train epochs 0-2 whose packed row count (``data.pack_texts``)
is R, initialises the run's state, compiles the train step and runs `--steps` + 1 steps on them,
then prints each step's peak resident memory (VmHWM reset before the step; the first step's
includes its compilation; the data and weights are loaded before). One shape per process.

`--trim` hands the malloc arenas' idle memory back before every step
(`allocator.return_idle_memory`, what train.py does at every logged step), as a real run would
have it; without it the process keeps glibc's untrimmed arenas, as before that change.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_throughput as bt
import jax

from jaxmol import allocator, builders, train_step
from jaxmol.data import batching
from jaxmol.models.retrieval import RetrievalModel
from jaxmol.parallel import DataParallel, select_devices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=int, help="R, the packed rows per device chunk")
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--trim", action="store_true", help="return idle memory before each step")
    args = parser.parse_args()
    config = bt.load_config(args.config, ["data.pack_texts=true"])
    runner = DataParallel(config.parallel, select_devices(config.num_devices))
    batcher = builders.train_batcher(config, builders.split_encoder(config), runner.num_devices)
    lengths = batcher.split.tokens.lengths
    picked = []
    for epoch in range(3):
        for rows in batcher.epoch_batches(epoch):
            if len(rows) < config.batch_size:
                continue
            L = batching.text_bucket(int(lengths[rows].max()), batcher.text_buckets)
            chunks = rows.reshape(batcher.num_devices, -1)
            if batching.packed_row_level(lengths, chunks, L, batcher.text_row_levels) == args.rows:
                picked.append(rows)
    if not picked:
        raise SystemExit(f"no full batch of epochs 0-2 packs into {args.rows} rows")
    print(f"R={args.rows}: {len(picked)} full batches in epochs 0-2", flush=True)
    model = RetrievalModel(builders.model_config_for(config))
    example = jax.tree.map(lambda x: x[0], batcher.make_batch(picked[0]))
    state, tx, critic_tx = train_step.init_state(config, model, example, total_steps=10_000)
    step = train_step.compile_train_step(runner, config, model, tx, critic_tx)
    state = runner.replicate(state)
    peaks = []
    for i in range(args.steps + 1):
        batch = runner.shard(batcher.make_batch(picked[i % len(picked)]))
        if args.trim:
            allocator.return_idle_memory()
        _reset_peak()  # so that "peak" below is this step's own
        before = allocator.resident_memory_mb()
        start = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])  # blocks
        after = allocator.resident_memory_mb()
        peaks.append(after["peak_rss_mb"])
        print(
            f"step {i}: loss {loss:.4f}, {time.perf_counter() - start:.1f} s; RSS before "
            f"{before['rss_mb']:.0f} MB, after {after['rss_mb']:.0f} MB, peak during the step "
            f"{after['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    print(f"peak RSS of the steps (the first includes its compile): {max(peaks):.0f} MB")


def _reset_peak() -> None:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux `clear_refs` 5)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


if __name__ == "__main__":
    main()
