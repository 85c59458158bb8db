"""Where a train step's (or an embedding batch's) time goes: a `jax.profiler` trace of real
train steps, every XLA op's time attributed to the part of the model that emitted it.

    python bench/bench_profile.py [--config default] [--steps 3] [--top 15] [--json OUT]
        [--set key=value ...]
    python bench/bench_profile.py --embed [--config quickstart] [--steps 3]

With `--embed`, the same for evaluation's text embedding instead (`evaluation.Embedder`, eval
mode, the config's `eval_batch_size`): `--steps` batches of ChEBI-20 test texts of the longest
evaluation bucket (the most common one at the quickstart's 128 tokens), the FLOPs those texts'
real tokens cost forward; the weights are zeros (the time of these ops does not depend on
values).

In one process: the config's train step (as `bench_throughput.py` builds it: pretrained MiniLM,
donation, real PCdes train batches) is compiled on the batch shape that is most common in a
PCdes epoch, run once more to warm up, then `--steps` steps run under `jax.profiler.trace`.
XLA's CPU runtime records one event per executed op (a fusion, a matmul, a copy); the optimised
HLO of the step, dumped by XLA (`--xla_dump_to`), gives each op's `op_name` metadata, i.e. the
JAX source path (`.../bert/layer_3/attention/...`, `transpose(jvp(...))` in the backward pass),
and whether the op contains a matmul (`dot`). The report:

* the step's wall time and the matmul probe (`bench_throughput.matmul_probe`) around it;
* op time per component (`COMPONENTS`: dropout, LayerNorm, GELU, the molecule tower, projector
  and losses, the text attention, the rest of the text tower, the optimizer), split into
  matmul and other ops, forward and backward;
* the top `--top` ops;
* the text tower's useful FLOPs (the `bench_throughput` count) divided by the time of the text
  tower's ops that hold a matmul (a fused op counts whole): the utilisation the step would reach
  if every other op took no time (the ceiling left for the non-matmul levers).

Op times are summed over the threads that run ops; with XLA running independent ops
concurrently the sum can exceed the wall time (the report prints both).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

# Run as a script, before JAX starts: XLA writes every module's optimised HLO (text) here.
# Imported (by the tests), nothing is dumped.
DUMP_DIR = tempfile.mkdtemp(prefix="jaxmol_profile_hlo_") if __name__ == "__main__" else ""
if DUMP_DIR:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR} --xla_dump_hlo_as_text"
    )

import bench_throughput as bt  # noqa: E402  (sets up sys.path, the allocator and JAX)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxmol import builders  # noqa: E402
from jaxmol.data import batching, datasets  # noqa: E402
from jaxmol.evaluation import Embedder  # noqa: E402
from jaxmol.models.retrieval import RetrievalModel  # noqa: E402
from jaxmol.parallel import DataParallel, select_devices  # noqa: E402

# (component, pattern on the op's JAX source path): the first that matches names the op. The
# "text" components hold the BERT's matmuls (QKV, scores, context, output, feed-forward).
COMPONENTS = (
    ("dropout draws and masks", r"(?i)dropout|threefry|random_bits|bernoulli"),
    ("LayerNorm", r"(?i)layernorm|layer_norm"),
    ("GELU", r"(?i)erf|gelu"),
    ("molecule tower", r"embed_molecules|/mol/"),
    ("projector, head, losses", r"(?i)projector|memory|loss|triplet|kl|adversar|discrim|/head/"),
    ("text attention", r"/attention/"),
    ("text, other (feed-forward)", r"embed_text|/txt/"),
    ("model, other", r"RetrievalModel"),
    ("optimizer, rest of the step", r"."),
)
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPCODE = re.compile(r"\s([\w\-]+)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> dict[str, dict]:
    """Instruction name -> {opcode, op_name, matmul} of an optimised HLO module's text.

    `matmul` is true for a `dot`/`convolution`, and for a fusion or call whose computation (or
    one it calls) contains one.
    """
    computations: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            match = _COMPUTATION.match(line)
            current = match.group(1) if match else None
            continue
        match = _INSTRUCTION.match(line)
        if current is not None and match:
            computations[current].append((match.group(1), match.group(2)))

    memo: dict[str, bool] = {}

    def has_matmul(computation: str, depth: int = 0) -> bool:
        if computation not in memo:
            memo[computation] = False  # cycles (while bodies) end here
            found = False
            for _, rest in computations.get(computation, ()):
                opcode = _OPCODE.search(" " + rest.split("metadata=")[0])
                if opcode and opcode.group(1) in ("dot", "convolution"):
                    found = True
                    break
                called = _CALLS.search(rest)
                if called and depth < 8 and has_matmul(called.group(1), depth + 1):
                    found = True
                    break
            memo[computation] = found
        return memo[computation]

    ops = {}
    for instructions in computations.values():
        for name, rest in instructions:
            opcode = _OPCODE.search(" " + rest.split("metadata=")[0])
            opcode = opcode.group(1) if opcode else "?"
            called = _CALLS.search(rest)
            op_name = _OP_NAME.search(rest)
            ops[name] = {
                "opcode": opcode,
                "op_name": op_name.group(1) if op_name else "",
                "matmul": opcode in ("dot", "convolution")
                or bool(called and has_matmul(called.group(1))),
            }
    return ops


def component_of(op_name: str) -> str:
    for component, pattern in COMPONENTS:
        if re.search(pattern, op_name):
            return component
    return "no source path"


def _in_text(name: str, ops: dict[str, dict]) -> bool:
    """Whether op `name` comes from the BERT text tower (its source path passes through it)."""
    return "/txt/" in ops[name]["op_name"]


def optimised_modules(dump_dir: str) -> set[Path]:
    """The optimised-HLO text files XLA has written to `dump_dir` so far."""
    return set(Path(dump_dir).glob("*after_optimizations.txt"))


def largest(paths: set[Path]) -> str:
    """The text of the largest of `paths` (of the modules compiled for the first step, the
    train step itself; the others are small helpers)."""
    if not paths:
        raise SystemExit(f"XLA wrote no optimised HLO to {DUMP_DIR}")
    return max(paths, key=lambda p: p.stat().st_size).read_text()


def op_times(trace_dir: str, known: dict[str, dict]) -> tuple[dict[str, float], int]:
    """Summed seconds per op name of the ops in `known`, over every thread of the trace, and
    the number of threads that ran them."""
    from jax.profiler import ProfileData

    paths = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not paths:
        raise SystemExit(f"the profiler wrote no trace to {trace_dir}")
    seconds: dict[str, float] = collections.defaultdict(float)
    threads = set()
    for plane in ProfileData.from_file(str(paths[-1])).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in known:
                    seconds[event.name] += event.duration_ns / 1e9
                    threads.add((plane.name, line.name))
    return seconds, len(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default", help="configs/<name>.py")
    parser.add_argument("--steps", type=int, default=3, help="profiled train steps (or batches)")
    parser.add_argument("--top", type=int, default=15, help="ops listed by time")
    parser.add_argument("--set", action="append", default=[], help="config key=value")
    parser.add_argument("--embed", action="store_true", help="profile text embedding instead")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()

    config = bt.load_config(args.config, args.set)
    runner = DataParallel(config.parallel, select_devices(config.num_devices))
    profiled = (
        profile_embedding(config, runner, args)
        if args.embed
        else profile_train(config, runner, args)
    )
    report_and_print(args, **profiled)


def profile_train(config, runner, args) -> dict:
    """Traces `args.steps` train steps of the epoch's most common batch shape."""
    batcher = builders.train_batcher(config, builders.split_encoder(config), runner.num_devices)
    full = [rows for rows in batcher.epoch_batches(0) if len(rows) == config.batch_size]
    by_shape = collections.defaultdict(list)
    for rows in full:
        by_shape[bt._shape_of(batcher, rows)].append(rows)
    shape, batches = max(by_shape.items(), key=lambda item: len(item[1]))
    if len(batches) < args.steps + 2:
        raise SystemExit(f"only {len(batches)} batches of the most common shape {shape}")

    model_config, step, state = bt.compiled_train_step(config, runner, batcher, batches[0])
    host_batches = [batcher.make_batch(rows) for rows in batches[: args.steps + 2]]

    def run(batch):
        nonlocal state
        start = time.perf_counter()
        state, metrics = step(state, runner.shard(batch))
        float(metrics["loss"])  # blocks
        return time.perf_counter() - start

    traced = trace(run, host_batches)
    profiled = batches[2 : 2 + args.steps]
    lengths = np.concatenate([batcher.split.tokens.lengths[rows] for rows in profiled])
    flops = bt.bert_train_flops(lengths, model_config.bert, config.optim.freeze_bert_layers)
    title = (
        f"{args.config}: train step, shape L={shape[0]} graph level {shape[1]} rows {shape[2]} "
        f"({100 * len(batches) / len(full):.0f} % of an epoch's batches)"
    )
    shape_info = {"text_length": shape[0], "graph_level": shape[1], "text_rows": shape[2]}
    return dict(
        traced,
        title=title,
        text_flops=flops / args.steps,
        shape=shape_info,
        share_of_epoch=len(batches) / len(full),
        unit="step",
    )


def profile_embedding(config, runner, args) -> dict:
    """Traces `args.steps` eval-mode text-embedding batches of ChEBI-20 test texts that fill the
    longest evaluation bucket."""
    split = builders.split_encoder(config)(datasets.load_split("chebi20/test"))
    tokens = split.tokens
    buckets = batching.eval_text_buckets(tokens.max_length)
    lower = buckets[-2] if len(buckets) > 1 else 0
    rows = split.rows[tokens.lengths[split.rows] > lower]  # [n] texts of the longest bucket
    B = config.eval_batch_size
    if len(rows) < (args.steps + 2) * B:
        raise SystemExit(f"only {len(rows)} texts in the bucket ({lower}, {buckets[-1]}]")
    model = RetrievalModel(builders.model_config_for(config, axis_name=None))
    embedder = Embedder(model, runner)
    _, abstract = builders.abstract_variables(config)
    variables = embedder.replicate(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
    host_batches = [rows[i * B : (i + 1) * B] for i in range(args.steps + 2)]

    def run(batch_rows):
        start = time.perf_counter()
        embedder.embed_texts(variables, tokens, batch_rows, batch_size=B)  # returns host arrays
        return time.perf_counter() - start

    traced = trace(run, host_batches)
    lengths = tokens.lengths[np.concatenate(host_batches[2:])]
    flops = bt.bert_forward_flops(lengths, model.config.bert)
    title = (
        f"{args.config}: text embedding, batches of {B} ChEBI-20 test texts at L={buckets[-1]} "
        f"({float(lengths.mean()):.1f} real tokens per text)"
    )
    shape_info = {"text_length": buckets[-1], "batch_size": B}
    return dict(
        traced,
        title=title,
        text_flops=flops / args.steps,
        shape=shape_info,
        share_of_epoch=None,
        unit="batch",
    )


def trace(run, host_batches: list) -> dict:
    """Compiles on the first batch (dumping its optimised HLO), warms up on the second and
    traces the others; the probe is measured around the trace."""
    before_compile = optimised_modules(DUMP_DIR)
    compile_s = run(host_batches[0])
    hlo = largest(optimised_modules(DUMP_DIR) - before_compile)
    run(host_batches[1])  # warm-up
    probe_before = bt.matmul_probe()["gflops_median"]
    trace_dir = tempfile.mkdtemp(prefix="jaxmol_profile_trace_")
    with jax.profiler.trace(trace_dir):
        step_s = [run(batch) for batch in host_batches[2:]]
    probe_after = bt.matmul_probe()["gflops_median"]
    ops = parse_hlo(hlo)
    seconds, threads = op_times(trace_dir, ops)
    return dict(
        compile_s=compile_s,
        step_s=step_s,
        probe=(probe_before + probe_after) / 2,
        ops=ops,
        seconds=seconds,
        threads=threads,
    )


def report_and_print(
    args,
    *,
    title,
    text_flops,
    shape,
    share_of_epoch,
    unit,
    compile_s,
    step_s,
    probe,
    ops,
    seconds,
    threads,
) -> None:
    """The component table, the utilisation and its matmul-only ceiling, the top ops."""
    steps = len(step_s)
    table: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.Counter())
    for name, total in seconds.items():
        info = ops[name]
        kind = "matmul" if info["matmul"] else "other"
        direction = "bwd" if "transpose(" in info["op_name"] else "fwd"
        table[component_of(info["op_name"])][f"{direction} {kind}"] += total / steps
    op_total = sum(seconds.values()) / steps
    # Every op of the text tower that holds a matmul, whatever component its name gives it: XLA
    # fuses a dense layer with what follows it (in eval mode the output projection, the residual
    # add and the LayerNorm become one op named after the LayerNorm).
    text_matmul_s = (
        sum(total for name, total in seconds.items() if ops[name]["matmul"] and _in_text(name, ops))
        / steps
    )
    wall = statistics.median(step_s)
    report = {
        "config": args.config,
        "mode": "embed" if args.embed else "train",
        "shape": shape,
        "share_of_epoch": share_of_epoch,
        "compile_s": compile_s,
        "step_s": step_s,
        "probe_gflops": probe,
        "op_s_per_step": op_total,
        "op_threads": threads,
        "text_util": text_flops / wall / 1e9 / probe,
        "text_matmul_s_per_step": text_matmul_s,
        "text_util_if_only_matmuls": text_flops / max(text_matmul_s, 1e-9) / 1e9 / probe,
        "components": {k: dict(v) for k, v in table.items()},
        "ops": [
            {
                "op": name,
                "s_per_step": total / steps,
                "matmul": ops[name]["matmul"],
                "op_name": ops[name]["op_name"],
            }
            for name, total in sorted(seconds.items(), key=lambda kv: -kv[1])
        ],
    }

    print(f"{title}; compile {compile_s:.1f} s")
    print(
        f"{unit} wall {wall:.2f} s (median of {steps}: {', '.join(f'{s:.2f}' for s in step_s)}); "
        f"op time {op_total:.2f} s per {unit} on {threads} thread(s); probe {probe:.1f} GFLOP/s"
    )
    kinds = ("fwd matmul", "fwd other", "bwd matmul", "bwd other")
    print(f"\n{'component':<28}" + "".join(f"{k:>12}" for k in kinds) + f"{'total':>9}{'%':>6}")
    for component, row in sorted(table.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(row.values())
        cells = "".join(f"{row.get(k, 0.0):>12.3f}" for k in kinds)
        print(f"{component:<28}{cells}{total:>9.3f}{100 * total / op_total:>6.1f}")
    matmul_s = sum(row[k] for row in table.values() for k in kinds if "matmul" in k)
    print(
        f"{'all':<28}"
        + "".join(f"{sum(r.get(k, 0.0) for r in table.values()):>12.3f}" for k in kinds)
        + f"{op_total:>9.3f}{100.0:>6.1f}"
    )
    print(
        f"\nmatmul ops {matmul_s:.2f} s ({100 * matmul_s / op_total:.0f} % of op time); "
        f"text util {report['text_util']:.2f} of the probe; the text tower's matmuls alone "
        f"run its useful FLOPs at {report['text_util_if_only_matmuls']:.2f} of the probe"
    )
    print(f"\ntop {args.top} ops (s per {unit}, matmul?, JAX source path):")
    for op in report["ops"][: args.top]:
        print(
            f"  {op['s_per_step']:7.3f}  {'M' if op['matmul'] else ' '}  {op['op']:<28} "
            f"{op['op_name'][-110:]}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
