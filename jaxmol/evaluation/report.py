"""Result files and tables of an evaluation: where they go, what they hold, how they print."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxmol.checkpointing import write_json
from jaxmol.scoring import MOMU_RECALL_K


def result_stem(split_name: str, protocol: str) -> str:
    """File stem of a result: ``<split with '/' and ':' as '_'>__<protocol>``."""
    return f"{split_name.replace('/', '_').replace(':', '_')}__{protocol}"


def write_result(
    workdir: str | Path, split_name: str, protocol: str, report: dict, arrays: dict
) -> dict:
    """Writes ``workdir/eval/<stem>.npz`` (the arrays) and ``<stem>.json`` (the report, with its
    'files' entry set to the two paths relative to `workdir`).

    Returns:
      {'json': path, 'npz': path}, relative to `workdir`.
    """
    stem = result_stem(split_name, protocol)
    out_dir = Path(workdir) / "eval"
    files = {"json": f"eval/{stem}.json", "npz": f"eval/{stem}.npz"}
    if jax.process_index() != 0:  # several processes: process 0 writes the one copy
        return files
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / f"{stem}.npz", **arrays)
    write_json(out_dir / f"{stem}.json", {**report, "files": files})
    return files


def format_table(results: dict) -> str:
    """A plain-text table, one row per (result, direction), metrics in %.

    Args:
      results: {label: report of `evaluate_split`}; the label names the row.
    """
    inbatch_keys = sorted(
        {k for report in results.values() for k in report["t2m"] if k.startswith("inbatch_acc@")}
    )
    label_width = max([len(str(label)) for label in results] + [5]) + 2
    header = (
        f"{'split':<{label_width}}{'protocol':<15}{'dir':<5}{'queries':>8}{'pool':>7}"
        f"{'H@1':>8}{'H@10':>8}{'MRR':>8}{'MeanR':>9}"
    )
    for key in inbatch_keys:
        header += f"{'Acc@' + key.split('@')[1]:>9}"
    if inbatch_keys:
        header += f"{'R@20':>8}"
    lines = [header, "-" * len(header)]
    for label, report in results.items():
        for direction in ("t2m", "m2t"):
            m = report[direction]
            line = (
                f"{label!s:<{label_width}}{report.get('protocol', 'pool'):<15}{direction:<5}"
                f"{m['num_queries']:>8}{m['pool_size']:>7}"
                f"{100 * m['hits@1']:>8.2f}{100 * m['hits@10']:>8.2f}{100 * m['mrr']:>8.2f}"
                f"{m['mean_rank']:>9.1f}"
            )
            for key in inbatch_keys:
                line += f"{100 * m[key]:>9.2f}" if key in m else f"{'-':>9}"
            if inbatch_keys:
                recall = m.get(f"recall@{MOMU_RECALL_K}")
                line += f"{100 * recall:>8.2f}" if recall is not None else f"{'-':>8}"
            lines.append(line)
    return "\n".join(lines)
