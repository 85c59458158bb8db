"""Times full-pool cosine ranking at ChEBI-20 test size (3,300 x 3,300, dim 300).

Both directions (text->molecule and molecule->text) go through
`jaxmol.metrics.retrieval_metrics_from_embeddings`; the script prints the median wall time of
`--repeats` runs of the pair. Target: < 1 s on CPU.

Run from the repository root:

    python bench/bench_ranking.py [--num-pairs 3300] [--dim 300] [--repeats 5] [--chunk-size 4096]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmol import metrics


def _unit_rows(rng: np.random.Generator, num_rows: int, dim: int) -> np.ndarray:
    rows = rng.normal(size=(num_rows, dim)).astype(np.float32)  # [N, D]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-pairs", type=int, default=3300)
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=4096)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    text_emb = _unit_rows(rng, args.num_pairs, args.dim)  # [N, D]
    mol_emb = _unit_rows(rng, args.num_pairs, args.dim)  # [N, D]
    gold = np.arange(args.num_pairs)  # pair i: text i <-> molecule i

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        t2m = metrics.retrieval_metrics_from_embeddings(
            text_emb, mol_emb, gold, chunk_size=args.chunk_size
        )
        m2t = metrics.retrieval_metrics_from_embeddings(
            mol_emb, text_emb, gold, chunk_size=args.chunk_size
        )
        times.append(time.perf_counter() - start)

    print(
        f"ranking {args.num_pairs} x {args.num_pairs}, dim {args.dim}, chunk {args.chunk_size}, "
        f"both directions: median {statistics.median(times):.3f} s over {args.repeats} runs "
        f"(min {min(times):.3f} s, max {max(times):.3f} s)"
    )
    # Random embeddings: the gold rank is uniform, so MRR ~ ln(N) / N and mean rank ~ N / 2.
    print(f"sanity: t2m mean_rank {t2m['mean_rank']:.1f}, m2t mean_rank {m2t['mean_rank']:.1f}")


if __name__ == "__main__":
    main()
