"""Evaluation text buckets: power-of-two lengths against a bucket every 32 (or --step) tokens.

`Embedder.embed_texts` sorts texts by length and pads each batch to the smallest bucket that
fits it. This script embeds the same texts of a split with both bucket sets, alternating A and B
round by round in one process (so a shared machine's load drifts over both alike), and prints:

* the text padding of each bucket set (padded positions / all positions);
* the first pass of each set (it compiles every shape it meets) and the steady texts/s of every
  round, with their ratio B / A;
* the largest difference between the two sets' embeddings (padding is masked: it must be
  float32 rounding only).

The model is the default one (MiniLM + GIN 5 x 300 + memory projector) with random weights:
throughput does not depend on the values. Run from the repository root:

    python bench/bench_eval_buckets.py [--split chebi20/test] [--max-text-length 128]
        [--batch-size 128] [--num-texts 1024] [--rounds 3] [--step 32]
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.bench_embedding import _init_variables
from jaxmol import evaluation
from jaxmol.data import batching, datasets
from jaxmol.data.encoding import SplitEncoder
from jaxmol.data.tokenize import default_model_dir, load_tokenizer
from jaxmol.models.retrieval import ModelConfig, RetrievalModel
from jaxmol.parallel import DataParallel, select_devices


def padding_fraction(lengths: np.ndarray, buckets: tuple[int, ...], batch_size: int) -> float:
    """Padded share of the text positions when `lengths` are sorted and batched like
    `Embedder.embed_texts` does (padded slots of the last batch not counted)."""
    ordered = np.sort(lengths)
    padded = 0
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        padded += batching.text_bucket(int(chunk.max()), buckets) * len(chunk)
    return 1.0 - ordered.sum() / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="chebi20/test")
    parser.add_argument("--max-text-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-texts", type=int, default=1024, help="-1: every text")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step", type=int, default=batching.EVAL_TEXT_BUCKET_STEP)
    args = parser.parse_args()

    tokenizer = load_tokenizer(default_model_dir(), max_length=args.max_text_length)
    split = SplitEncoder(tokenizer, "ogb", on_invalid="skip")(datasets.load_split(args.split))
    model = RetrievalModel(ModelConfig())
    variables = _init_variables(model, split)
    embedder = evaluation.Embedder(model, DataParallel("shard_map", select_devices(-1)))
    replicated = embedder.replicate(variables)
    rng = np.random.default_rng(0)
    rows = split.rows
    if 0 < args.num_texts < len(rows):
        rows = np.sort(rng.choice(rows, args.num_texts, replace=False))
    lengths = split.tokens.lengths[rows]
    sets = {
        "A powers of two": batching.buckets_up_to(args.max_text_length),
        f"B every {args.step}": batching.eval_text_buckets(args.max_text_length, args.step),
    }
    print(
        f"{args.split}: {len(rows)} texts, mean {lengths.mean():.1f} tokens (max length "
        f"{args.max_text_length}), batch {args.batch_size}, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )

    def embed(buckets):
        start = time.perf_counter()
        out = embedder.embed_texts(
            replicated, split.tokens, rows, batch_size=args.batch_size, buckets=buckets
        )
        return out, time.perf_counter() - start

    outputs, rates = {}, {name: [] for name in sets}
    for name, buckets in sets.items():
        outputs[name], first_s = embed(buckets)
        pad = padding_fraction(lengths, buckets, args.batch_size)
        print(f"{name}: buckets {buckets}; padding {100 * pad:.1f} %; first pass {first_s:.1f} s")
    for round_index in range(args.rounds):
        for name, buckets in sets.items():
            _, seconds = embed(buckets)
            rates[name].append(len(rows) / seconds)
        print(
            f"round {round_index + 1}: "
            + ", ".join(f"{n} {r[-1]:.1f} texts/s" for n, r in rates.items())
        )
    (name_a, rate_a), (name_b, rate_b) = rates.items()
    ratios = [b / a for a, b in zip(rate_a, rate_b, strict=True)]
    print(
        f"median texts/s: {name_a} {np.median(rate_a):.1f}, {name_b} {np.median(rate_b):.1f}; "
        f"B / A per round {', '.join(f'{r:.2f}' for r in ratios)} (median {np.median(ratios):.2f})"
    )
    difference = np.abs(outputs[name_a] - outputs[name_b]).max()
    print(f"max |z_A - z_B| = {difference:.2e}")


if __name__ == "__main__":
    main()
