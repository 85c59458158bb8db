"""End-to-end evaluation rate: `evaluate.py` on a finished run, as a fraction of a matmul probe.

    python bench/bench_evaluate.py --workdir runs/quickstart [--split chebi20/test] [--json OUT]

The run's checkpoints and config are copied to a temporary workdir (so the run's own eval/
files are left alone), then `python evaluate.py --workdir COPY --split SPLIT --protocol pool`
runs as a child process: restore, featurisation (from the cache when warm), compiles, text and
molecule embedding, ranking, writing the results. Its wall time is the measurement; this process
measures the matmul probe (`bench_throughput.matmul_probe`) right before and right after it.

FLOPs (`bench_throughput`'s count): the split's texts tokenized as the run does (truncated to its
`data.max_text_length`), BERT forward on their real tokens; the molecule tower on their real
atoms. "text util" = real-token text GFLOP/s over the whole wall time / probe, the issue's
end-to-end embedding figure (restore and compile included); "all util" adds the molecules.
The child's log line splits its evaluation time (texts, molecules, other; XLA programs built and
their seconds, `jaxmol.compile_stats`); "text embed util" is the text FLOPs over the text
embedding seconds alone (their compiles included).

`--compilation_cache DIR` runs the child with JAX's persistent compilation cache in DIR (every
program cached, however quick its compile) and `--repeat 2` runs it twice: the second run reads
the programs the first one wrote, as a repeated evaluation on one machine would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_throughput as bt  # sets up sys.path (jaxmol, configs) and JAX

from jaxmol import builders
from jaxmol.data import datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished training run")
    parser.add_argument("--split", default="chebi20/test")
    parser.add_argument("--step", default="latest", help="evaluate.py --step")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--repeat", type=int, default=1, help="evaluate.py runs, one by one")
    parser.add_argument(
        "--compilation_cache", help="JAX_COMPILATION_CACHE_DIR for the child (default: none)"
    )
    args = parser.parse_args()

    workdir = Path(args.workdir)
    config = builders.run_config_from_saved(json.loads((workdir / "config.json").read_text()))
    split = builders.split_encoder(config)(datasets.load_split(args.split))
    lengths = split.tokens.lengths[split.rows]
    atoms = float(split.graphs.n_node[split.rows].sum())
    bert_cfg = builders.model_config_for(config).bert
    text_flops = bt.bert_forward_flops(lengths, bert_cfg)
    mol_flops = bt.molecule_forward_flops(atoms, config)

    env = dict(os.environ)
    if args.compilation_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(args.compilation_cache).resolve())
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    runs = []
    for attempt in range(args.repeat):
        run = _run_once(workdir, args, env)
        run.update(_utilisation(run, len(split.rows), text_flops, mol_flops))
        runs.append(run)
        split_line = run.get("split_line", "(no time split in the log)")
        print(
            f"run {attempt + 1}: {args.split} ({len(split.rows)} pairs, "
            f"{float(lengths.mean()):.1f} real tokens per text): evaluate.py {run['wall_s']:.1f} s "
            f"end to end, {run['texts_per_s']:.1f} texts/s; probe {run['probes'][0]:.0f} / "
            f"{run['probes'][1]:.0f} GFLOP/s; {run['texts_per_s_per_100_probe_gflops']:.1f} "
            f"texts/s per 100 GFLOP/s of probe; text util {run['text_util']:.2f}, with molecules "
            f"{run['all_util']:.2f}; text embed util {run.get('text_embed_util', float('nan')):.2f}"
            f"\n  {split_line}"
        )
    report = {
        "workdir": str(workdir),
        "split": args.split,
        "pairs": len(split.rows),
        "mean_real_tokens": float(lengths.mean()),
        "compilation_cache": args.compilation_cache,
        "runs": runs,
        **{k: v for k, v in runs[0].items() if k != "split_line"},  # the first run, as before
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


# "chebi20/test (pool) evaluated in 114.2 s: texts 80.1 s, molecules 10.2 s, other 23.9 s;
# 9 XLA programs built in 31.0 s of it" (jaxmol.evaluation.protocols.evaluate_split)
_SPLIT_LINE = re.compile(
    r"evaluated in (?P<eval_s>[0-9.]+) s: texts (?P<texts_s>[0-9.]+) s, molecules "
    r"(?P<molecules_s>[0-9.]+) s, other (?P<other_s>-?[0-9.]+) s; (?P<programs>\d+) XLA programs "
    r"built in (?P<compile_s>[0-9.]+) s"
)


def _run_once(workdir: Path, args, env: dict) -> dict:
    """One `evaluate.py` child on a copy of the run; its wall time, probes and time split."""
    with tempfile.TemporaryDirectory(prefix="jaxmol_bench_eval_") as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("eval", "plots"))
        command = [
            sys.executable,
            str(bt.ROOT / "evaluate.py"),
            f"--workdir={copy}",
            f"--split={args.split}",
            "--protocol=pool",
            f"--step={args.step}",
        ]
        probe_before = bt.matmul_probe()["gflops_median"]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        wall = time.perf_counter() - start
        probe_after = bt.matmul_probe()["gflops_median"]
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"evaluate.py exited with {done.returncode}")
    run: dict = {"wall_s": wall, "probes": [probe_before, probe_after]}
    found = _SPLIT_LINE.search(done.stdout + done.stderr)
    if found:
        run["split_line"] = found.group(0)
        run.update({k: float(v) for k, v in found.groupdict().items()})
    return run


def _utilisation(run: dict, pairs: int, text_flops: float, mol_flops: float) -> dict:
    probe = statistics.mean(run["probes"])
    wall = run["wall_s"]
    out = {
        "texts_per_s": pairs / wall,
        "texts_per_s_per_100_probe_gflops": pairs / wall / probe * 100,
        "text_util": text_flops / wall / 1e9 / probe,
        "all_util": (text_flops + mol_flops) / wall / 1e9 / probe,
    }
    if run.get("texts_s"):
        out["text_embed_util"] = text_flops / run["texts_s"] / 1e9 / probe
    return out


if __name__ == "__main__":
    main()
