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
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()

    workdir = Path(args.workdir)
    config = builders.run_config_from_saved(json.loads((workdir / "config.json").read_text()))
    split = builders.split_encoder(config)(datasets.load_split(args.split))
    lengths = split.tokens.lengths[split.rows]
    atoms = float(split.graphs.n_node[split.rows].sum())
    bert_cfg = builders.model_config_for(config).bert
    text_flops = bt.bert_forward_flops(lengths, bert_cfg)
    mol_flops = bt.molecule_forward_flops(atoms, config)

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
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        probe_after = bt.matmul_probe()["gflops_median"]
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"evaluate.py exited with {done.returncode}")
    probe = statistics.mean([probe_before, probe_after])
    pairs = len(split.rows)
    report = {
        "workdir": str(workdir),
        "split": args.split,
        "pairs": pairs,
        "mean_real_tokens": float(lengths.mean()),
        "wall_s": wall,
        "probes": [probe_before, probe_after],
        "texts_per_s": pairs / wall,
        "texts_per_s_per_100_probe_gflops": pairs / wall / probe * 100,
        "text_util": text_flops / wall / 1e9 / probe,
        "all_util": (text_flops + mol_flops) / wall / 1e9 / probe,
    }
    print(
        f"{args.split} ({pairs} pairs, {report['mean_real_tokens']:.1f} real tokens per text): "
        f"evaluate.py {wall:.1f} s end to end, {report['texts_per_s']:.1f} texts/s; probe "
        f"{probe_before:.0f} / {probe_after:.0f} GFLOP/s; "
        f"{report['texts_per_s_per_100_probe_gflops']:.1f} texts/s per 100 GFLOP/s of probe; "
        f"text util {report['text_util']:.2f}, with molecules {report['all_util']:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
