"""Draws the figures of a training workdir: training curves and every saved evaluation.

    python tools/plot_run.py WORKDIR [--out DIR] [--png_only] [--palette N]

Reads WORKDIR/metrics.jsonl (training curves) and each WORKDIR/eval/<stem>.npz with its
<stem>.json (rank distribution, modality gap, embedding PCA), and writes PNGs with their CSV /
JSON data to DIR (default WORKDIR/plots/). Needs matplotlib; see `jaxmol.plots`.

For a repository (the README's figures): `--png_only` writes the pictures without their data
files, and `--palette N` stores each PNG with an N-colour palette (Pillow, which matplotlib
itself needs): a third of the size, and these flat-colour plots look the same.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

# Runnable as a plain script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmol import plots

MAX_PALETTE = 256  # a PNG palette holds at most 256 colours


def draw(workdir: Path, out_dir: Path) -> list[Path]:
    """Every figure of `workdir` with its data files, into `out_dir`; the paths written."""
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
    return [Path(p) for p in written]


def to_palette(path: Path, colours: int) -> None:
    """Rewrites the PNG at `path` with a `colours`-colour palette (no dithering, so flat areas
    and lines stay flat)."""
    from PIL import Image  # a matplotlib dependency

    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(
            colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    reduced.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, help="training workdir (metrics.jsonl, eval/)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (WORKDIR/plots)")
    parser.add_argument(
        "--png_only", action="store_true", help="write the PNGs only, not their CSV/JSON data"
    )
    parser.add_argument(
        "--palette",
        type=int,
        default=0,
        help=f"store PNGs with this many colours (2..{MAX_PALETTE}); 0 = full colour",
    )
    args = parser.parse_args(argv)
    workdir: Path = args.workdir
    if not workdir.is_dir():
        print(f"error: {workdir} is not a directory", file=sys.stderr)
        return 2
    if args.palette and not 2 <= args.palette <= MAX_PALETTE:
        print(
            f"error: --palette must be from 2 to {MAX_PALETTE}, got {args.palette}", file=sys.stderr
        )
        return 2
    out_dir = args.out or workdir / "plots"
    if args.png_only:
        # The plots functions always write their data; draw into a scratch folder, keep the PNGs.
        with tempfile.TemporaryDirectory(prefix="plot_run_") as scratch:
            pngs = [p for p in draw(workdir, Path(scratch)) if p.suffix == ".png"]
            if pngs:
                out_dir.mkdir(parents=True, exist_ok=True)
            written = [Path(shutil.copyfile(p, out_dir / p.name)) for p in pngs]
    else:
        written = draw(workdir, out_dir)
    if not written:
        print(f"error: nothing to plot in {workdir}", file=sys.stderr)
        return 2
    for path in written:
        if args.palette and path.suffix == ".png":
            to_palette(path, args.palette)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
