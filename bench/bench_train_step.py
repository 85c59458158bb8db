"""Times the fused train step (compile and steady state) on real PCdes batches.

    python bench/bench_train_step.py --config configs/quickstart.py --lengths 64,128 \
        [--config.optim.freeze_bert_layers=3] [--steps 5]

For each text length bucket it builds one batch of `batch_size` PCdes train pairs whose texts
fit that bucket, compiles the step (first call) and reports the median of `--steps` further
calls, with the minor page faults and the kernel (system) CPU seconds per step of this process
(`getrusage`). Numbers depend on the machine load: run it on an idle machine.
"""

import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jaxmol import allocator

# As the CLI does: glibc defaults unless JAXMOL_KEEP_FREED_MEMORY=1 (jaxmol.allocator).
KEEPS_FREED_MEMORY = allocator.keep_freed_memory()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxmol import builders, train_step  # noqa: E402
from jaxmol.data.batching import PairBatcher  # noqa: E402
from jaxmol.data.datasets import load_split  # noqa: E402
from jaxmol.models.retrieval import RetrievalModel  # noqa: E402
from jaxmol.parallel import DataParallel, select_devices  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Run config.", lock_config=True)
flags.DEFINE_string("lengths", "64,128", "Text buckets to time.")
flags.DEFINE_integer("steps", 5, "Timed steps per bucket after the compiling call.")


def main(argv):
    del argv
    config = FLAGS.config
    runner = DataParallel(config.parallel, select_devices(config.num_devices))
    split = builders.split_encoder(config)(load_split("pcdes/train"))
    batcher = PairBatcher(
        split,
        batch_size=config.batch_size,
        num_devices=runner.num_devices,
        text_buckets=config.data.text_buckets,
        single_graph_budget=config.data.single_graph_budget,
    )
    model = RetrievalModel(builders.model_config_for(config))
    lengths = split.tokens.lengths
    first = batcher.make_batch(split.rows[: config.batch_size])
    state, tx, critic_tx = train_step.init_state(
        config, model, jax.tree.map(lambda x: x[0], first), total_steps=10_000
    )
    step = train_step.compile_train_step(runner, config, model, tx, critic_tx)
    state = runner.replicate(state)
    print(
        f"devices={runner.num_devices} batch={config.batch_size} "
        f"freeze_bert_layers={config.optim.freeze_bert_layers} "
        f"keep_freed_memory={KEEPS_FREED_MEMORY}"
    )
    for bucket in (int(x) for x in FLAGS.lengths.split(",")):
        smaller = [b for b in config.data.text_buckets if b < bucket]
        low = max(smaller) if smaller else 0
        rows = [r for r in split.rows if low < lengths[r] <= bucket][: config.batch_size]
        batch = runner.shard(batcher.make_batch(rows))
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        compile_s = time.perf_counter() - start
        times = []
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(FLAGS.steps):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults = (after.ru_minflt - usage.ru_minflt) / FLAGS.steps
        kernel_s = (after.ru_stime - usage.ru_stime) / FLAGS.steps
        user_s = (after.ru_utime - usage.ru_utime) / FLAGS.steps
        print(
            f"L={bucket:4d} nodes={batch['graphs'].nodes.shape[-2]:6d} "
            f"first call {compile_s:6.1f} s  step median {statistics.median(times):6.2f} s "
            f"(min {min(times):.2f})  pairs/s {config.batch_size / statistics.median(times):.1f}  "
            f"per step: {faults / 1e3:.0f} k minor faults, kernel {kernel_s:.2f} s, "
            f"user {user_s:.2f} s"
        )


if __name__ == "__main__":
    app.run(main)
