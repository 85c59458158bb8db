"""Embedding throughput of the default model, and the ranking time of a split, on this machine.

The default model (all-MiniLM-L6-v2 text tower, GIN 5 x 300, memory projector, d = 300) with
random weights (throughput does not depend on the values) embeds the texts and the molecules of
a split through `jaxmol.evaluation.Embedder` (the model's text-only and molecule-only paths,
one jit program per batch shape, all local devices). Compilation is excluded: every batch shape
is compiled by a warm-up pass first. Then the full-pool ranking of the split in both directions
is timed on the embeddings just computed.

Run from the repository root (texts are ChEBI-20 descriptions tokenised to at most 256 tokens):

    python bench/bench_embedding.py [--split chebi20/test] [--batch-size 64] [--num-texts -1]
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from jaxmol import evaluation, scoring
from jaxmol.data import batching, datasets
from jaxmol.data.encoding import EncodedSplit, SplitEncoder
from jaxmol.data.tokenize import default_model_dir, load_tokenizer
from jaxmol.models.retrieval import ModelConfig, RetrievalModel, count_params
from jaxmol.parallel import DataParallel, select_devices


def _init_variables(model: RetrievalModel, split: EncodedSplit) -> dict:
    """Random variables of the full model (both towers), from one small batch."""
    batcher = batching.PairBatcher(split, batch_size=2, shuffle=False)
    batch = batcher.make_batch(split.rows[:2])
    chunk = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    return jax.jit(
        lambda key: model.init(
            key, chunk["text_ids"], chunk["text_mask"], chunk["graphs"], train=False
        )
    )(jax.random.PRNGKey(0))


def _warm_text_rows(split: EncodedSplit, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Up to one batch of rows per text length bucket (compiles every text shape)."""
    buckets = batching.eval_text_buckets(split.tokens.max_length)
    bucket_of = np.searchsorted(np.asarray(buckets), split.tokens.lengths[rows])
    return np.concatenate([rows[bucket_of == b][:batch_size] for b in np.unique(bucket_of)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="chebi20/test")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-texts", type=int, default=-1, help="-1: every text of the split")
    parser.add_argument("--num-molecules", type=int, default=-1, help="-1: every molecule")
    parser.add_argument("--max-text-length", type=int, default=256)
    args = parser.parse_args()

    tokenizer = load_tokenizer(default_model_dir(), max_length=args.max_text_length)
    encoder = SplitEncoder(tokenizer, "ogb", on_invalid="skip")
    split = encoder(datasets.load_split(args.split))
    model = RetrievalModel(ModelConfig())  # MiniLM + GIN 5x300 + memory projector, d = 300
    variables = _init_variables(model, split)
    devices = select_devices(-1)
    embedder = evaluation.Embedder(model, DataParallel("shard_map", devices))
    replicated = embedder.replicate(variables)
    print(
        f"{args.split}: {len(split.rows)} pairs; model {count_params(variables['params']):,} "
        f"parameters; {len(devices)} x {devices[0].device_kind}; batch {args.batch_size}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )

    text_rows = split.rows if args.num_texts < 0 else split.rows[: args.num_texts]
    mol_rows = split.rows if args.num_molecules < 0 else split.rows[: args.num_molecules]
    lengths = split.tokens.lengths[text_rows]
    embedder.embed_texts(
        replicated,
        split.tokens,
        _warm_text_rows(split, text_rows, args.batch_size),
        batch_size=args.batch_size,
    )
    start = time.perf_counter()
    text_emb = embedder.embed_texts(replicated, split.tokens, text_rows, batch_size=args.batch_size)
    text_s = time.perf_counter() - start
    print(
        f"texts:     {len(text_rows) / text_s:8.1f} texts/s     ({len(text_rows)} texts, "
        f"mean {lengths.mean():.0f} tokens, max {lengths.max()}, {text_s:.1f} s)"
    )

    embedder.embed_molecules(replicated, split.graphs, mol_rows, batch_size=args.batch_size)
    start = time.perf_counter()
    mol_emb = embedder.embed_molecules(
        replicated, split.graphs, mol_rows, batch_size=args.batch_size
    )
    mol_s = time.perf_counter() - start
    atoms = split.graphs.n_node[mol_rows]
    print(
        f"molecules: {len(mol_rows) / mol_s:8.1f} molecules/s ({len(mol_rows)} molecules, "
        f"mean {atoms.mean():.0f} atoms, max {atoms.max()}, {mol_s:.1f} s)"
    )

    if len(text_rows) == len(mol_rows):
        start = time.perf_counter()
        result = scoring.pool_metrics_from_embeddings(text_emb, mol_emb)
        rank_s = time.perf_counter() - start
        print(
            f"ranking:   {rank_s:.3f} s for {len(text_rows)} texts x {len(mol_rows)} molecules, "
            f"both directions (t2m MRR {result['t2m']['mrr']:.4f} with random weights)"
        )


if __name__ == "__main__":
    main()
