"""Draws the figures of a training workdir: training curves and every saved evaluation.

    python tools/plot_run.py WORKDIR [--out DIR]

Reads WORKDIR/metrics.jsonl (training curves) and each WORKDIR/eval/<stem>.npz with its
<stem>.json (rank distribution, modality gap, embedding PCA), and writes PNGs with their CSV /
JSON data to DIR (default WORKDIR/plots/). Needs matplotlib; see `jaxmol.plots`.
"""

import argparse
import sys
from pathlib import Path

# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmol import plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="training workdir (metrics.jsonl, eval/)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (WORKDIR/plots)")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir
    if not workdir.is_dir():
        print(f"error: {workdir} is not a directory", file=sys.stderr)
        return 2
    out_dir = args.out or workdir / "plots"
    written = []
    metrics_path = workdir / "metrics.jsonl"
    if metrics_path.is_file():
        written += plots.plot_training_curves(metrics_path, out_dir).values()
    else:
        print(f"note: no {metrics_path}; training curves skipped", file=sys.stderr)
    for npz_path in sorted((workdir / "eval").glob("*.npz")):
        json_path = npz_path.with_suffix(".json")
        if not json_path.is_file():
            print(f"note: {npz_path} has no {json_path.name}; skipped", file=sys.stderr)
            continue
        for paths in plots.plot_evaluation(npz_path, json_path, out_dir).values():
            written += paths.values()
    if not written:
        print(f"error: nothing to plot in {workdir}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
