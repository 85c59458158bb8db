#!/usr/bin/env bash
# Accelerator check in one command: the utilisation benchmark in float32 and in bfloat16, and the
# tiny training run, on whatever accelerator JAX sees; one JSON report.
#
#   bench/accelerator_check.sh [--out DIR] [--configs default,quickstart] [--cpu]
#
# Run it from a checkout whose venv has the accelerator's JAX build (README "Accelerators"):
# it stops at once, saying so, when JAX sees no GPU or TPU, unless --cpu is given (then it runs
# on the CPU, by default with the tiny config and a few steps, to check the script itself).
# Writes DIR/report.json (default runs/accelerator_check/report.json) with: the devices, the two
# benchmark reports (probe GFLOP/s, pairs/s, texts/s, molecules/s, ratios to the probe), the
# bfloat16 / float32 speed-ups, and the tiny run's exit status, wall time and last metrics; the
# logs of every part lie beside it.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=runs/accelerator_check
CONFIGS=""
CPU=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --cpu) CPU=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $CPU == 1 ]]; then
  export JAX_PLATFORMS=cpu
  CONFIGS=${CONFIGS:-tiny}
  BENCH_ARGS=(--train_steps 2 --embed_texts 64 --embed_molecules 256)
else
  if ! "$PYTHON" -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")'; then
    echo "JAX sees no GPU or TPU (backend: cpu). Install the accelerator's JAX build" \
      "(README, Accelerators) or pass --cpu to check this script on the CPU." >&2
    exit 1
  fi
  CONFIGS=${CONFIGS:-default,quickstart}
  BENCH_ARGS=(--train_steps 24 --embed_texts -1 --embed_molecules -1)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "accelerator check -> $OUT (configs: $CONFIGS)"

"$PYTHON" -m jaxmol.devices > "$OUT/devices.txt" 2>&1 || true
for DTYPE in float32 bfloat16; do
  echo "benchmark, $DTYPE ..."
  "$PYTHON" bench/bench_throughput.py --configs "$CONFIGS" "${BENCH_ARGS[@]}" \
    --set model.dtype=$DTYPE --rss_every 1 --json "$OUT/bench_$DTYPE.json" \
    > "$OUT/bench_$DTYPE.log" 2>&1 || echo "benchmark $DTYPE failed: see $OUT/bench_$DTYPE.log"
done

echo "tiny training ..."
rm -rf "$OUT/tiny_run"
START=$(date +%s.%N)
set +e
"$PYTHON" train.py --config configs/tiny.py --workdir "$OUT/tiny_run" > "$OUT/tiny_run.log" 2>&1
TINY_STATUS=$?
set -e
TINY_S=$("$PYTHON" -c "import time; print(round(time.time() - $START, 1))")

"$PYTHON" - "$OUT" "$TINY_STATUS" "$TINY_S" <<'EOF'
import json, sys
from pathlib import Path

out, status, seconds = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
report = {"devices": (out / "devices.txt").read_text(), "bench": {}}
for dtype in ("float32", "bfloat16"):
    path = out / f"bench_{dtype}.json"
    report["bench"][dtype] = json.loads(path.read_text()) if path.exists() else None
speedup = {}
f32, b16 = report["bench"]["float32"], report["bench"]["bfloat16"]
if f32 and b16:
    for name, entry in f32["configs"].items():
        other = b16["configs"].get(name, {})
        for part, key in (("train", "pairs_per_s"), ("embed", "texts_per_s"),
                          ("embed", "molecules_per_s")):
            if part in entry and part in other:
                speedup[f"{name}/{part}/{key}"] = other[part][key] / entry[part][key]
report["bfloat16_over_float32"] = speedup
metrics = out / "tiny_run" / "metrics.jsonl"
lines = metrics.read_text().splitlines() if metrics.exists() else []
report["tiny_run"] = {
    "exit_status": status,
    "wall_s": seconds,
    "last_metrics": json.loads(lines[-1]) if lines else None,
    "log_tail": (out / "tiny_run.log").read_text().splitlines()[-5:],
}
(out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"wrote {out / 'report.json'}")
for dtype, bench in report["bench"].items():
    if not bench:
        print(f"{dtype}: no benchmark result")
        continue
    print(f"{dtype}: probe at the start {bench['probe_start']['gflops_median']:.0f} GFLOP/s")
    for name, entry in bench["configs"].items():
        t, e = entry.get("train", {}), entry.get("embed", {})
        print(
            f"  {name}: train {t.get('pairs_per_s', float('nan')):.1f} pairs/s "
            f"(text util {t.get('text_util', float('nan')):.2f}); embed "
            f"{e.get('texts_per_s', float('nan')):.1f} texts/s "
            f"(util {e.get('text_util', float('nan')):.2f}), "
            f"{e.get('molecules_per_s', float('nan')):.0f} molecules/s"
        )
for key, value in speedup.items():
    print(f"bfloat16 / float32 {key}: {value:.2f}")
print(f"tiny training: exit status {status}, {seconds:.0f} s")
EOF
exit "$TINY_STATUS"
