"""Utilisation benchmark: training pairs/s and embedding texts/s, molecules/s, as a fraction of
this process's own matmul rate.

    python bench/bench_throughput.py [--configs default,quickstart] [--train_steps 8]
        [--embed_texts 512] [--embed_molecules -1] [--set model.dtype=bfloat16] [--json OUT]
        [--rss_every 0.5]

In one process:

1. **Matmul probe**: a `jax.jit` float32 matmul 2048 x 2048 x 2048 (2 * 2048^3 = 17.18 GFLOP),
   median of 5 calls after a warm-up, measured right before and right after each timed part
   (after its compilation); the mean of those medians is "the probe" that the part's rates are
   divided by. The machine this project is built on
   is shared (2 cores, other work running), so an absolute rate says little; the ratio to a
   matmul measured in the same process at the same time carries across machines and loads.
2. **Training** per config: the real train step (`train_step.compile_train_step` over
   `builders.model_config_for(config)`, pretrained MiniLM, donation on) on real batches of a
   PCdes train epoch from `batching.PairBatcher` with the config's shuffle, length grouping,
   buckets and graph budgets. Each batch of that epoch has a shape (text bucket L, graph budget
   level); every shape that holds at least 1 % of the epoch's batches is compiled with one
   untimed step, then timed on `--train_steps` steps spread over the shapes in proportion to
   their share of the epoch (at least one each). The epoch estimate weighs each timed step by
   (batches of its shape) / (timed steps of its shape): a stratified sample of the epoch in its
   real bucket proportions, compile excluded. Batches are built on the host and put on the
   device before the timer starts (training overlaps that work with a prefetch thread).
3. **Embedding** per config on ChEBI-20 test with `evaluation.Embedder` (eval mode, the run's
   `eval_batch_size`, texts ordered by length and padded per bucket): `--embed_texts` texts drawn
   at random (seeded, so their lengths follow the split's distribution) and `--embed_molecules`
   molecules (-1: all), every shape compiled first.

FLOP counts (multiply-add = 2 FLOP; only the useful work on real tokens and real atoms)
-------------------------------------------------------------------------------------
BERT with hidden size H, intermediate size I, A layers; per layer and per real token of a text
with n real tokens:

* Q, K, V and output projections: 4 x 2·H·H = 8·H²
* feed-forward H -> I -> H: 2 x 2·H·I = 4·H·I
* scores QKᵀ and context PV over the text's own n real keys: 2 x 2·n·H = 4·n·H

so a text of n tokens costs A·(n·(8H² + 4HI) + 4·n²·H) forward. MiniLM (H = 384, I = 1536,
A = 6): 8H² + 4HI = 3,538,944, i.e. 21.23 MFLOP per token for the dense layers, plus
6·4·384·n = 9,216·n for attention: 22.27 MFLOP per token at n = 113 (PCdes mean), 22.41 at
n = 128 (the issue's "≈ 22.4"). Embedding lookups, LayerNorm, softmax and GELU are not counted.
The projector (Linear 384->300 and the memory keys/values, 2·H·d + 4·d² ≈ 0.59 MFLOP per token)
and the head are not counted either: the ratio is the BERT's work only (a slight
under-estimate, ≈ 2.6 %).

Training = forward + backward, backward = 2 x forward (the input and the weight gradients):
3 x forward for a fully trained BERT. With `optim.freeze_bert_layers = k` the model stops the
gradient at the output of layer k-1, so only the top A - k layers run backward:
fwd(A layers) + 2·fwd(A - k layers) (the quickstart, k = 3: 2 x forward, not 3 x).

Molecules (GIN with width d, G layers): per real atom per layer the MLP d -> 2d -> d,
2 x 2·d·2d = 8·d², plus the projector's per-node MLP (2 x 2·d²) and the memory keys/values
(2 x 2·d²): 8·d²·G + 8·d² per atom = 3.6 + 0.72 = 4.32 MFLOP at d = 300, G = 5 (messages and
bond embeddings are sums and are not counted).

The printed "text util" is real-token text GFLOP/s / probe GFLOP/s (the issue's "model FLOPs
utilisation on real tokens"); "all util" adds the molecule tower's FLOPs to the training
figure. `--rss_every S` samples this process's resident memory every S seconds (VmRSS) and
reports the peak and the curve per phase.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout; configs import `configs.default`

from jaxmol import allocator  # noqa: E402

# As the CLI does: glibc defaults unless JAXMOL_KEEP_FREED_MEMORY=1 (jaxmol.allocator).
KEEPS_FREED_MEMORY = allocator.keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmol import builders, train_step  # noqa: E402
from jaxmol.data import batching, datasets  # noqa: E402
from jaxmol.evaluation import Embedder  # noqa: E402
from jaxmol.models.retrieval import RetrievalModel  # noqa: E402
from jaxmol.parallel import DataParallel, select_devices  # noqa: E402

PROBE_N = 2048
MIN_SHAPE_SHARE = 0.01


# ----------------------------------------------------------------------------------------------
# FLOP counts (see the module docstring).


def bert_forward_flops(lengths: np.ndarray, bert_cfg, layers: int | None = None) -> float:
    """Forward FLOPs of `layers` BERT layers (default all) over texts of `lengths` real tokens."""
    layers = bert_cfg.num_hidden_layers if layers is None else layers
    H, inner = bert_cfg.hidden_size, bert_cfg.intermediate_size
    n = np.asarray(lengths, np.float64)
    per_layer = n.sum() * (8 * H * H + 4 * H * inner) + 4 * H * (n * n).sum()
    return float(layers * per_layer)


def bert_train_flops(lengths: np.ndarray, bert_cfg, frozen_layers: int) -> float:
    """Forward over every layer plus backward (2 x forward) over the trained layers."""
    trained = bert_cfg.num_hidden_layers - max(frozen_layers, 0)
    return bert_forward_flops(lengths, bert_cfg) + 2 * bert_forward_flops(
        lengths, bert_cfg, trained
    )


def molecule_forward_flops(num_atoms: float, config) -> float:
    """GIN MLPs + the projector's per-node MLP and memory keys/values, per real atom."""
    d = config.model.gin_dim
    return float(num_atoms) * (8 * d * d * config.model.gin_layers + 8 * d * d)


# ----------------------------------------------------------------------------------------------
# Measurement helpers.


def matmul_probe(repeats: int = 5) -> dict:
    """GFLOP/s of a jit-compiled float32 [n, n] @ [n, n] matmul (median and best of `repeats`)."""
    keys = jax.random.split(jax.random.key(0))
    a = jax.random.normal(keys[0], (PROBE_N, PROBE_N), jnp.float32)
    b = jax.random.normal(keys[1], (PROBE_N, PROBE_N), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    flops = 2.0 * PROBE_N**3
    return {
        "gflops_median": flops / statistics.median(times) / 1e9,
        "gflops_best": flops / min(times) / 1e9,
    }


class RssSampler:
    """Samples this process's VmRSS every `interval` seconds in a daemon thread."""

    def __init__(self, interval: float):
        self.interval = interval
        self.samples: list[tuple[float, str, float]] = []  # (seconds, phase, MB)
        self.phase = "start"
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        return allocator.resident_memory_mb().get("rss_mb", float("nan"))

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._start, self.phase, self.rss_mb()))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        phases: dict[str, list[float]] = collections.defaultdict(list)
        for _, phase, mb in self.samples:
            phases[phase].append(mb)
        return {
            "peak_mb": max((mb for _, _, mb in self.samples), default=float("nan")),
            "per_phase": {
                p: {"first_mb": v[0], "last_mb": v[-1], "peak_mb": max(v)}
                for p, v in phases.items()
            },
            "curve": [(round(t, 2), p, round(mb, 1)) for t, p, mb in self.samples],
        }


def load_config(name: str, overrides: list[str]):
    """`configs/<name>.py`'s get_config() with `--set key=value` overrides (typed by default)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    for item in overrides:
        key, _, raw = item.partition("=")
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        if leaf not in node:
            raise SystemExit(f"--set {item}: config has no key {key!r}")
        old = node[leaf]
        if isinstance(old, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(old, tuple):
            value = tuple(type(old[0])(x) for x in raw.split(",")) if old else tuple()
        else:
            value = type(old)(raw)
        node[leaf] = value
    return config


def _shape_of(batcher: batching.PairBatcher, rows: np.ndarray) -> tuple[int, int, int]:
    """(text bucket L, graph budget level, text rows per chunk) of the batch `rows`, without
    building it; the rows are b unless the batcher packs texts (``data.pack_texts``)."""
    tokens, graphs = batcher.split.tokens, batcher.split.graphs
    L = batching.text_bucket(int(tokens.lengths[rows].max()), batcher.text_buckets)
    padded = np.full(batcher.batch_size, -1, np.int64)
    padded[: len(rows)] = rows
    chunks = padded.reshape(batcher.num_devices, batcher.pairs_per_chunk)
    level = 0
    for chunk in chunks:
        real = chunk[chunk >= 0]
        nodes, edges = int(graphs.n_node[real].sum()), int(graphs.n_edge[real].sum())
        level = max(level, batcher.graph_budgets.level_for(nodes, edges))
    text_rows = batcher.pairs_per_chunk
    if batcher.pack_texts:
        text_rows = batching.packed_row_level(tokens.lengths, chunks, L, batcher.text_row_levels)
    return L, level, text_rows


def _allocate(counts: dict, total_steps: int) -> dict:
    """Timed steps per shape: proportional to its batches, at least one each."""
    total = sum(counts.values())
    return {k: max(1, round(total_steps * c / total)) for k, c in counts.items()}


def compiled_train_step(config, runner, batcher: batching.PairBatcher, rows: np.ndarray):
    """(model config, the train step over `runner`'s devices, its replicated initial state) for
    batches shaped like the batch of `rows` (pretrained weights, donation on)."""
    model_config = builders.model_config_for(config)
    model = RetrievalModel(model_config)
    example = jax.tree.map(lambda x: x[0], batcher.make_batch(rows))
    state, tx, critic_tx = train_step.init_state(config, model, example, total_steps=10_000)
    step = train_step.compile_train_step(runner, config, model, tx, critic_tx)
    return model_config, step, runner.replicate(state)


# ----------------------------------------------------------------------------------------------
# The two measurements.


def bench_training(config, runner, train_steps: int, rss: RssSampler | None) -> tuple[dict, dict]:
    """Stratified timing of the train step over a PCdes epoch. Returns (results, eval vars)."""
    batcher = builders.train_batcher(config, builders.split_encoder(config), runner.num_devices)
    split = batcher.split
    epoch = batcher.epoch_batches(0)
    full = [rows for rows in epoch if len(rows) == config.batch_size]  # the partial one is rare
    by_shape: dict[tuple[int, int, int], list[np.ndarray]] = collections.defaultdict(list)
    for rows in full:
        by_shape[_shape_of(batcher, rows)].append(rows)
    counts = {k: len(v) for k, v in by_shape.items() if len(v) / len(full) >= MIN_SHAPE_SHARE}
    covered = sum(counts.values()) / len(full)
    plan = _allocate(counts, train_steps)

    model_config, step, state = compiled_train_step(config, runner, batcher, full[0])
    bert_cfg = model_config.bert

    est_time = est_pairs = est_text_flops = est_all_flops = 0.0
    probes = []
    shapes, compile_s, host_ms, faults, system_s = [], 0.0, [], [], []
    for shape in sorted(counts):
        candidates = by_shape[shape]
        n_timed = min(plan[shape], len(candidates) - 1) if len(candidates) > 1 else 1
        weight = counts[shape] / n_timed
        step_times = []
        for i in range(n_timed + 1):  # call 0 compiles
            rows = candidates[i % len(candidates)]
            if rss:
                rss.phase = f"train {config.name} compile" if i == 0 else f"train {config.name}"
            start = time.perf_counter()
            host_batch = batcher.make_batch(rows)
            host_ms.append(1e3 * (time.perf_counter() - start))
            batch = runner.shard(host_batch)
            jax.block_until_ready(batch)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            state, metrics = step(state, batch)
            loss = float(metrics["loss"])  # blocks
            elapsed = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            if not np.isfinite(loss):
                raise RuntimeError(f"non-finite loss {loss} at shape {shape}")
            if i == 0:
                compile_s += elapsed
                probes.append(matmul_probe()["gflops_median"])
                continue
            lengths = split.tokens.lengths[rows]
            text_flops = bert_train_flops(lengths, bert_cfg, config.optim.freeze_bert_layers)
            atoms = split.graphs.n_node[rows].sum()
            mol_flops = 3 * molecule_forward_flops(atoms, config)
            step_times.append(elapsed)
            # Page faults and kernel time of the step: buffers that the allocator returns to
            # the system after a step are faulted in (zeroed by the kernel) again next step.
            faults.append(after.ru_minflt - usage.ru_minflt)
            system_s.append(after.ru_stime - usage.ru_stime)
            est_time += weight * elapsed
            est_pairs += weight * len(rows)
            est_text_flops += weight * text_flops
            est_all_flops += weight * (text_flops + mol_flops)
        probes.append(matmul_probe()["gflops_median"])
        shapes.append(
            {
                "text_length": shape[0],
                "graph_level": shape[1],
                "text_rows": shape[2],
                "share": counts[shape] / len(full),
                "timed_steps": len(step_times),
                "step_s_median": statistics.median(step_times),
                "pairs_per_s": config.batch_size / statistics.median(step_times),
            }
        )
    real_tokens = split.tokens.lengths[np.concatenate(full)]
    padding = batching.padding_fractions(batcher)
    result = {
        "probe_gflops": statistics.mean(probes),
        "probes": probes,
        "pairs_per_s": est_pairs / est_time,
        "step_s_mean": est_time / sum(counts.values()),
        "text_gflops": est_text_flops / est_time / 1e9,
        "all_gflops": est_all_flops / est_time / 1e9,
        "epoch_share_covered": covered,
        "compile_s": compile_s,
        "host_batch_ms_median": statistics.median(host_ms),
        "minor_faults_per_step": statistics.median(faults),
        "system_s_per_step": statistics.median(system_s),
        "mean_real_tokens": float(real_tokens.mean()),
        "text_padding": padding["text_padding"],
        "node_padding": padding["node_padding"],
        "shapes": shapes,
    }
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return result, jax.device_get(runner.unreplicate(variables))


def bench_embedding(config, runner, variables, num_texts, num_molecules, rss) -> dict:
    """texts/s and molecules/s on ChEBI-20 test, compile excluded."""
    split = builders.split_encoder(config)(datasets.load_split("chebi20/test"))
    model = RetrievalModel(builders.model_config_for(config, axis_name=None))
    embedder = Embedder(model, runner)
    replicated = embedder.replicate(variables)
    B = config.eval_batch_size
    rng = np.random.default_rng(0)
    rows = split.rows
    text_rows = (
        rows if num_texts < 0 else np.sort(rng.choice(rows, min(num_texts, len(rows)), False))
    )
    mol_rows = rows if num_molecules < 0 else rows[:num_molecules]
    tokens = split.tokens
    buckets = batching.eval_text_buckets(tokens.max_length)
    bucket_of = np.searchsorted(np.asarray(buckets), tokens.lengths[text_rows])
    warm = np.concatenate([text_rows[bucket_of == b][:1] for b in np.unique(bucket_of)])
    if rss:
        rss.phase = f"embed {config.name} compile"
    start = time.perf_counter()
    for row in warm:  # one batch per bucket: every text shape compiled
        embedder.embed_texts(replicated, tokens, np.array([row]), batch_size=B)
    embedder.embed_molecules(replicated, split.graphs, mol_rows, batch_size=B)
    compile_s = time.perf_counter() - start
    probes = [matmul_probe()["gflops_median"]]
    if rss:
        rss.phase = f"embed {config.name}"
    start = time.perf_counter()
    embedder.embed_texts(replicated, tokens, text_rows, batch_size=B)
    text_s = time.perf_counter() - start
    start = time.perf_counter()
    embedder.embed_molecules(replicated, split.graphs, mol_rows, batch_size=B)
    mol_s = time.perf_counter() - start
    probes.append(matmul_probe()["gflops_median"])
    lengths = tokens.lengths[text_rows]
    atoms = split.graphs.n_node[mol_rows].sum()
    bert_cfg = model.config.bert
    return {
        "probe_gflops": statistics.mean(probes),
        "probes": probes,
        "texts": len(text_rows),
        "mean_real_tokens": float(lengths.mean()),
        "texts_per_s": len(text_rows) / text_s,
        "text_gflops": bert_forward_flops(lengths, bert_cfg) / text_s / 1e9,
        "molecules": len(mol_rows),
        "mean_atoms": float(atoms / len(mol_rows)),
        "molecules_per_s": len(mol_rows) / mol_s,
        "molecule_gflops": molecule_forward_flops(atoms, config) / mol_s / 1e9,
        "warm_compile_s": compile_s,
        "batch_size": B,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="default,quickstart", help="names under configs/")
    parser.add_argument("--train_steps", type=int, default=8, help="timed steps per config")
    parser.add_argument("--embed_texts", type=int, default=512, help="-1: all ChEBI-20 test")
    parser.add_argument("--embed_molecules", type=int, default=-1, help="-1: all ChEBI-20 test")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--skip", default="", help="'train' or 'embed' to leave one out")
    parser.add_argument("--json", default="", help="write the results to this file")
    parser.add_argument("--rss_every", type=float, default=0.0, help="> 0: sample RSS (seconds)")
    args = parser.parse_args()
    command = "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])

    rss = RssSampler(args.rss_every) if args.rss_every > 0 else None
    if rss:
        rss.__enter__()
    report: dict = {
        "command": command,
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "keep_freed_memory": KEEPS_FREED_MEMORY,
        "load_average_start": os.getloadavg(),
        "probe_start": matmul_probe(),
        "configs": {},
    }
    print(f"$ {command}")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; probe "
        f"{report['probe_start']['gflops_median']:.1f} GFLOP/s (fp32 {PROBE_N}^3 matmul, median)"
    )
    try:
        for name in args.configs.split(","):
            config = load_config(name, args.set)
            config.name = name  # for the RSS phases only; the config is not locked
            runner = DataParallel(config.parallel, select_devices(config.num_devices))
            entry: dict = {"dtype": config.model.get("dtype", "float32")}
            variables = None
            if args.skip != "train":
                entry["train"], variables = bench_training(config, runner, args.train_steps, rss)
            if args.skip != "embed":
                if variables is None:
                    _, abstract = builders.abstract_variables(config)
                    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
                entry["embed"] = bench_embedding(
                    config, runner, variables, args.embed_texts, args.embed_molecules, rss
                )
            report["configs"][name] = entry
    finally:
        if rss:
            rss.__exit__()
    report["probe_end"] = matmul_probe()
    report["load_average_end"] = os.getloadavg()
    print(
        f"probe at the end {report['probe_end']['gflops_median']:.1f} GFLOP/s; each ratio "
        "below uses the probes measured around its own timed part (printed as 'probe')"
    )
    for name, entry in report["configs"].items():
        if "train" in entry:
            t = entry["train"]
            probe = t["probe_gflops"]
            t["text_util"] = t["text_gflops"] / probe
            t["all_util"] = t["all_gflops"] / probe
            t["pairs_per_s_per_100_probe_gflops"] = 100 * t["pairs_per_s"] / probe
            shapes = ", ".join(
                f"L={s['text_length']} R={s['text_rows']} g{s['graph_level']} "
                f"{100 * s['share']:.0f}% "
                f"{s['step_s_median']:.2f} s"
                for s in t["shapes"]
            )
            print(
                f"{name:10s} [{entry['dtype']}] train: {t['pairs_per_s']:6.2f} pairs/s "
                f"(step {t['step_s_mean']:.2f} s; {t['text_gflops']:.1f} text GFLOP/s, "
                f"text util {t['text_util']:.2f}, all util {t['all_util']:.2f}; "
                f"{100 * t['text_padding']:.0f}% text padding; probe {probe:.0f}) [{shapes}]; "
                f"compile {t['compile_s']:.0f} s, host batch {t['host_batch_ms_median']:.0f} ms, "
                f"{t['minor_faults_per_step'] / 1e3:.0f}k page faults and "
                f"{t['system_s_per_step']:.1f} s kernel time per step"
            )
        if "embed" in entry:
            e = entry["embed"]
            probe = e["probe_gflops"]
            e["text_util"] = e["text_gflops"] / probe
            e["molecule_util"] = e["molecule_gflops"] / probe
            print(
                f"{name:10s} [{entry['dtype']}] embed: {e['texts_per_s']:6.1f} texts/s "
                f"({e['texts']} texts, mean {e['mean_real_tokens']:.0f} tokens; "
                f"{e['text_gflops']:.1f} GFLOP/s, text util {e['text_util']:.2f}), "
                f"{e['molecules_per_s']:6.0f} molecules/s ({e['molecule_gflops']:.1f} GFLOP/s, "
                f"util {e['molecule_util']:.2f}); batch {e['batch_size']}, probe {probe:.0f}"
            )
    if rss:
        report["rss"] = rss.summary()
        print(f"peak RSS {report['rss']['peak_mb']:.0f} MB; per phase:")
        for phase, v in report["rss"]["per_phase"].items():
            print(
                f"  {phase:28s} {v['first_mb']:7.0f} -> {v['last_mb']:7.0f} MB "
                f"(peak {v['peak_mb']:.0f})"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
