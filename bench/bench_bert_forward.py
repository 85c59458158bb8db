"""Forward time of the text tower under `jax.jit`, per batch, at several text lengths.

Usage (from the repository root)::

    python bench/bench_bert_forward.py                      # MiniLM BERT, batch 32, L = 128, 256
    python bench/bench_bert_forward.py --lengths 32 64 --repeats 10 --batch 8

Each (model, length) is compiled and run `--warmup` times, then timed `--repeats` times with
`jax.block_until_ready`; the table gives the first call (compile + run), the median and the
minimum. Timings depend on the machine and on what else runs on it: say so when quoting them.

To benchmark another forward pass, add a builder to `BENCHMARKS`: it takes (batch, length) and
returns a jitted function and the arguments to call it with.
"""

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmol.models import bert

Builder = Callable[[int, int], tuple[Callable, tuple]]


def _text_inputs(config: bert.BertConfig, batch: int, length: int, seed: int = 0):
    """Random token ids with [CLS]/[SEP]-like ends and random real lengths in [length/2, length]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, config.vocab_size, (batch, length), dtype=np.int32)  # [B, L]
    lengths = rng.integers(length // 2, length + 1, batch)  # [B]
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)  # [B, L]
    return jnp.asarray(ids * mask), jnp.asarray(mask)


@functools.cache
def _minilm():
    return bert.load_pretrained(bert.default_model_dir())


def bert_minilm(batch: int, length: int) -> tuple[Callable, tuple]:
    """The default text tower: all-MiniLM-L6-v2 BERT, last hidden state, eval mode."""
    module, params = _minilm()
    ids, mask = _text_inputs(module.config, batch, length)
    forward = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, deterministic=True))
    return forward, (params, ids, mask)


BENCHMARKS: dict[str, Builder] = {"bert_minilm": bert_minilm}


def time_call(fn: Callable, args: tuple, warmup: int, repeats: int) -> dict[str, float]:
    """Seconds of the first call, then median/min over `repeats` calls after `warmup` calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert_minilm"], choices=sorted(BENCHMARKS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--warmup", type=int, default=2, help="calls before timing (>= 1)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
        f"{os.cpu_count()} host CPUs, batch {args.batch}, warm-up {args.warmup}, "
        f"median of {args.repeats}"
    )
    header = (
        f"{'model':<14}{'length':>7}{'first call s':>14}{'median ms':>11}{'min ms':>9}{'seq/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in args.models:
        for length in args.lengths:
            fn, fn_args = BENCHMARKS[name](args.batch, length)
            t = time_call(fn, fn_args, max(args.warmup, 1), args.repeats)
            print(
                f"{name:<14}{length:>7}{t['first_s']:>14.2f}{t['median_s'] * 1e3:>11.1f}"
                f"{t['min_s'] * 1e3:>9.1f}{args.batch / t['median_s']:>8.1f}"
            )


if __name__ == "__main__":
    main()
