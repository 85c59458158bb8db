"""Search costs on this machine: index build vs the bare molecule tower, query latency, memory.

1. Molecule tower alone: the library's molecules, featurised beforehand, embedded by the
   evaluation `Embedder` (what `bench/bench_embedding.py` times) and by the index build's encoder
   (`LibraryMoleculeEncoder`, graph budgets kept across chunks), after a warm-up pass.
2. Index build, end to end (`Index.build_from_source`: read, parse, featurise, embed, write
   shards): once cold (compiles its graph shapes) and once warm; molecules/s of each and the
   ratio to (1).
3. Query latency against that index (on the devices, as the server keeps it): one text query end
   to end (encode + top-k) and the top-k alone, p50/p95 over `--repeats`; 1,000 query vectors
   (top-k alone) and the encoding of 1,000 texts.
4. The same top-k latencies against a synthetic index of `--synthetic-rows` random unit vectors
   (written as a real index directory), kept on the devices and streamed from the memory-mapped
   shard files.

Peak resident memory (ru_maxrss, the whole process so far) is printed after every phase. The
default model is the quickstart config with random weights (speed does not depend on the
values); `--workdir` uses a trained checkpoint instead. Run from the repository root:

    python bench/bench_search.py [--workdir runs/quickstart] [--num-molecules -1]
        [--synthetic-rows 1000000] [--repeats 20] [--out /tmp/bench_search]
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from jaxmol import builders, cli
from jaxmol.data import datasets
from jaxmol.evaluation import TEXT2MOL_MOLECULE_SPLITS
from jaxmol.search import Index, Retriever, readers
from jaxmol.search import index as index_lib
from jaxmol.search.retriever import LibraryMoleculeEncoder


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def percentiles(seconds: list[float]) -> dict:
    ms = 1000 * np.asarray(seconds)
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up (compiles)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return percentiles(seconds)


def random_retriever(config_name: str) -> Retriever:
    """The config's model with random weights (step 0, no workdir)."""
    config = cli.load_config_file(config_name)
    model, _ = builders.abstract_variables(config)
    chunk = builders.dummy_chunk(config)
    variables = jax.jit(
        lambda key: model.init(
            {"params": key, "dropout": key},
            chunk["text_ids"],
            chunk["text_mask"],
            chunk["graphs"],
            train=False,
        )
    )(jax.random.PRNGKey(0))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return Retriever(model, variables, config, step=0, weights=f"random {config_name} weights")


def synthetic_index(path: Path, rows: int, dim: int, shard_size: int) -> None:
    """An index directory of random unit vectors (ids 's<row>', SMILES 'C')."""
    settings = {
        "kind": "molecules",
        "checkpoint": {"workdir": None, "step": 0, "params_sha256": "synthetic"},
        "model": {"featurizer": "ogb", "embed_dim": dim},
        "dtype": "float32",
        "dimension": dim,
        "normalized": True,
        "shard_size": shard_size,
        "source": {"type": "synthetic", "rows": rows, "seed": 0},
    }
    meta = index_lib._start_or_resume(path, settings, overwrite=True)
    rng = np.random.default_rng(0)
    for start in range(0, rows, shard_size):
        n = min(shard_size, rows - start)
        emb = rng.standard_normal((n, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        chunk = [readers.Record(start + i + 1, f"s{start + i}", "C") for i in range(n)]
        index_lib._write_shard(path, meta, chunk, chunk, emb, [])
    index_lib._finish(path, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="trained workdir (default: random)")
    parser.add_argument("--step", default="latest")
    parser.add_argument("--config", default="quickstart", help="model for random weights")
    parser.add_argument("--splits", default=",".join(TEXT2MOL_MOLECULE_SPLITS))
    parser.add_argument("--num-molecules", type=int, default=-1, help="-1: all of --splits")
    parser.add_argument("--shard-size", type=int, default=index_lib.DEFAULT_SHARD_SIZE)
    parser.add_argument("--synthetic-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--num-queries", type=int, default=1000, help="the batch of many queries")
    parser.add_argument("--out", default="/tmp/jaxmol_bench_search")
    parser.add_argument("--keep", action="store_true", help="keep the index directories")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"load_average": os.getloadavg()[0], "cpus": os.cpu_count()}

    if args.workdir:
        retriever = Retriever.from_workdir(args.workdir, args.step)
    else:
        retriever = random_retriever(args.config)
    print(
        f"model: {retriever.weights}; D = {retriever.embed_dim}; "
        f"{retriever.runner.num_devices} x {retriever.runner.devices[0].device_kind}; "
        f"batch {retriever.batch_size}; load average {report['load_average']:.1f} on "
        f"{report['cpus']} CPUs",
        flush=True,
    )

    # The library: registered splits (deduplicated by id), optionally cut.
    source = readers.split_source(args.splits)
    library = list(source.records())
    if args.num_molecules > 0:
        library = library[: args.num_molecules]
    ids = [r.id for r in library]
    smiles = [r.value for r in library]
    source = readers.sequence_source(list(zip(ids, smiles, strict=True)))
    n = len(library)
    report["library"] = {"splits": args.splits, "molecules": n}

    # 1. The molecule tower alone, on features computed beforehand.
    start = time.perf_counter()
    graphs = retriever.featurize(smiles, ids)
    featurise_s = time.perf_counter() - start
    rows = np.flatnonzero(graphs.valid)
    embedder = retriever.embedder
    embedder.embed_molecules(retriever.variables, graphs, rows, batch_size=retriever.batch_size)
    start = time.perf_counter()
    embedder.embed_molecules(retriever.variables, graphs, rows, batch_size=retriever.batch_size)
    tower_s = time.perf_counter() - start
    encoder = LibraryMoleculeEncoder(retriever)
    encoder.embed(encoder.prepare(graphs), len(rows))  # warm-up: compiles its levels
    start = time.perf_counter()
    encoder.embed(encoder.prepare(graphs), len(rows))
    encoder_s = time.perf_counter() - start
    report["tower"] = {
        "featurise_molecules_per_s": n / featurise_s,
        "embedder_molecules_per_s": len(rows) / tower_s,
        "library_encoder_molecules_per_s": len(rows) / encoder_s,
    }
    print(
        f"featurise alone: {n / featurise_s:7.1f} molecules/s ({n} molecules, {featurise_s:.1f} s)"
        f"\ntower alone:     {len(rows) / tower_s:7.1f} molecules/s (Embedder, {tower_s:.1f} s); "
        f"{len(rows) / encoder_s:.1f} molecules/s (build encoder incl. packing, {encoder_s:.1f} s)"
        f"\npeak RSS {peak_rss_gb():.2f} GiB",
        flush=True,
    )

    # 2. The index build, end to end, cold then warm.
    index_dir = out / "library"
    builds = []
    for label in ("cold", "warm"):
        start = time.perf_counter()
        Index.build_from_source(
            retriever, source, index_dir, shard_size=args.shard_size, overwrite=True
        )
        seconds = time.perf_counter() - start
        builds.append(n / seconds)
        print(
            f"index build ({label}): {n / seconds:7.1f} molecules/s ({seconds:.1f} s; "
            f"{n / seconds / (len(rows) / tower_s):.0%} of the tower alone); peak RSS "
            f"{peak_rss_gb():.2f} GiB",
            flush=True,
        )
    report["build"] = {"cold_molecules_per_s": builds[0], "warm_molecules_per_s": builds[1]}
    report["build"]["warm_vs_tower"] = builds[1] / (len(rows) / tower_s)

    # 3. Query latency against the library index, kept on the devices.
    searched = Index.load(index_dir, retriever)
    searched.place_on_device()
    texts = list(datasets.load_split("chebi20/test").texts)
    cursor = iter(range(10**9))
    single = timed(
        lambda: searched.search(texts[next(cursor) % len(texts)], k=10), args.repeats
    )  # a different text each time: encode + top-k
    query_vectors = retriever.encode_texts(texts[: args.num_queries])
    one = timed(lambda: searched.search_embeddings(query_vectors[:1], 10), args.repeats)
    many = max(3, args.repeats // 4)
    thousand = timed(lambda: searched.search_embeddings(query_vectors, 10), many)
    start = time.perf_counter()
    retriever.encode_texts(texts[-args.num_queries :])
    encode_s = time.perf_counter() - start
    report["library_queries"] = {
        "rows": len(searched),
        "one_text_end_to_end": single,
        "one_vector_topk": one,
        "thousand_vectors_topk": thousand,
        "encode_texts_s": encode_s,
        "num_queries": args.num_queries,
    }
    print(
        f"{len(searched):,}-row index: 1 text query end to end p50 {single['p50_ms']:.1f} ms, "
        f"p95 {single['p95_ms']:.1f} ms; top-k alone 1 query p50 {one['p50_ms']:.1f} / p95 "
        f"{one['p95_ms']:.1f} ms; {args.num_queries:,} queries p50 {thousand['p50_ms']:.0f} / "
        f"p95 {thousand['p95_ms']:.0f} ms; encoding {args.num_queries:,} texts "
        f"{encode_s:.1f} s; peak RSS {peak_rss_gb():.2f} GiB",
        flush=True,
    )
    searched = None

    # 4. A synthetic index of random unit vectors.
    if args.synthetic_rows > 0:
        synthetic_dir = out / "synthetic"
        start = time.perf_counter()
        synthetic_index(synthetic_dir, args.synthetic_rows, retriever.embed_dim, 131_072)
        write_s = time.perf_counter() - start
        synthetic = Index.load(synthetic_dir)
        rng = np.random.default_rng(1)
        queries = rng.standard_normal((args.num_queries, retriever.embed_dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        streamed = timed(
            lambda: synthetic.search_embeddings(queries[:1], 10), max(3, args.repeats // 4)
        )
        rss_streamed = peak_rss_gb()
        synthetic.place_on_device()
        one = timed(lambda: synthetic.search_embeddings(queries[:1], 10), args.repeats)
        thousand = timed(lambda: synthetic.search_embeddings(queries, 10), 3)
        report["synthetic_queries"] = {
            "rows": len(synthetic),
            "write_s": write_s,
            "one_vector_topk_streamed": streamed,
            "peak_rss_gb_streamed": rss_streamed,
            "one_vector_topk": one,
            "thousand_vectors_topk": thousand,
        }
        print(
            f"{len(synthetic):,}-row synthetic index (written in {write_s:.0f} s): top-k on the "
            f"devices 1 query p50 {one['p50_ms']:.1f} / p95 {one['p95_ms']:.1f} ms, "
            f"{args.num_queries:,} queries p50 {thousand['p50_ms']:.0f} / p95 "
            f"{thousand['p95_ms']:.0f} ms; streamed from the "
            f"shard files 1 query p50 {streamed['p50_ms']:.0f} / p95 {streamed['p95_ms']:.0f} ms "
            f"(peak RSS {rss_streamed:.2f} GiB before the device copy)",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(synthetic_dir)
    report["peak_rss_gb"] = peak_rss_gb()
    print(f"peak RSS {report['peak_rss_gb']:.2f} GiB", flush=True)
    if not args.keep:
        shutil.rmtree(index_dir)
    (out / "bench_search.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'bench_search.json'}")


if __name__ == "__main__":
    main()
