"""Resident memory (RSS) curve of any command, e.g. a short training run:

    python bench/rss_sample.py [--every 1] [--json OUT] -- \
        python train.py --config configs/default.py --workdir /tmp/rss --config.num_steps=6

Samples the summed VmRSS of the command and all its descendants every `--every` seconds from
/proc, then prints the peak, the time it was reached, and the curve at a coarse step (all
samples go to `--json`). Linux only. Exits with the command's status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def tree_rss_mb(pid: int) -> float:
    """Summed VmRSS (MB) of `pid` and its descendants (0 for processes already gone)."""
    total_kb, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
        stack.extend(_children(current))
    return total_kb / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--json", default="", help="write every sample here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command and arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    start = time.perf_counter()
    process = subprocess.Popen(command)
    samples: list[tuple[float, float]] = []  # (seconds, MB)
    while process.poll() is None:
        samples.append((round(time.perf_counter() - start, 2), round(tree_rss_mb(process.pid), 1)))
        time.sleep(args.every)
    status = process.returncode
    peak_t, peak = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0)
    print(
        f"rss_sample: {' '.join(command)}\n  exit status {status}, "
        f"{time.perf_counter() - start:.0f} s, peak RSS {peak:.0f} MB at {peak_t:.0f} s"
    )
    stride = max(1, len(samples) // 30)
    print("  curve (s: MB): " + ", ".join(f"{t:.0f}: {mb:.0f}" for t, mb in samples[::stride]))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"command": command, "exit_status": status, "peak_mb": peak, "samples": samples}
            )
            + "\n"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
