"""Data-pipeline figures: featurisation speed, cache-hit load time, padding of an epoch.

    python bench/bench_data.py [--batch_size 32] [--max_length 256]

Featurises PCdes train into a fresh temporary cache (molecules/s), loads it again (cache hit),
then reports the fraction of padded text positions and graph nodes over one epoch of PCdes
train with random and with length-grouped batches, and the host time to build a batch.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from jaxmol.data.batching import PairBatcher, padding_fractions
from jaxmol.data.datasets import load_split
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.featurize import featurize_split
from jaxmol.data.tokenize import load_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 32, "Pairs per batch.")
flags.DEFINE_integer("num_devices", 1, "Device chunks per batch.")
flags.DEFINE_integer("max_length", 256, "Tokenizer truncation length.")
flags.DEFINE_string("buckets", "32,64,128,256", "Text length buckets.")


def main(argv):
    del argv
    dataset = load_split("pcdes/train")
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        featurize_split(dataset.ids, dataset.smiles, on_invalid="skip", cache_dir=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        cached = featurize_split(dataset.ids, dataset.smiles, on_invalid="skip", cache_dir=cache)
        warm = time.perf_counter() - start
        assert cached.cache_hit
        print(
            f"featurise PCdes train: {len(dataset)} molecules in {cold:.2f} s "
            f"({len(dataset) / cold:.0f} molecules/s); cache-hit load {warm:.3f} s; "
            f"skipped ids {list(cached.skipped_ids)}"
        )

        tokenizer = load_tokenizer(max_length=FLAGS.max_length)
        split = SplitEncoder(tokenizer, on_invalid="skip", cache_dir=cache)(dataset)
    buckets = tuple(int(b) for b in FLAGS.buckets.split(","))
    lengths = split.tokens.lengths[split.rows]
    print(f"texts: mean {lengths.mean():.1f} tokens, truncated {split.tokens.num_truncated}")
    for grouped in (False, True):
        batcher = PairBatcher(
            split,
            batch_size=FLAGS.batch_size,
            num_devices=FLAGS.num_devices,
            seed=0,
            group_by_length=grouped,
            text_buckets=buckets,
        )
        fractions = padding_fractions(batcher)
        start = time.perf_counter()
        batches = batcher.epoch_batches(0)
        for rows in batches:
            batcher.make_batch(rows)
        per_batch = (time.perf_counter() - start) / len(batches)
        print(
            f"{'length-grouped' if grouped else 'random':>14} batches of {FLAGS.batch_size}: "
            f"text padding {100 * fractions['text_padding']:.1f}%, "
            f"node padding {100 * fractions['node_padding']:.1f}% "
            f"(node budgets {batcher.graph_budgets.nodes}); {1000 * per_batch:.2f} ms per batch"
        )


if __name__ == "__main__":
    app.run(main)
