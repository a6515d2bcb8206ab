#!/usr/bin/env bash
# The 5-minute budget on one GPU: the shipped recipe's train.py command (make train-lite's) on the full
# exports' masks, timed from start to end, on stand-in photos (bench/standin_photos.py: the photos cannot
# reach a GPU machine; the times are the recipe's, the scores mean nothing).
# Needs data/full (preprocess_masks.py --data-root ../shared/data --out data/full); from the device tool
# pass carry ["data/full"] and timeout_s 590. Extra arguments go to train.py, e.g.
#   bash bench/gpu_budget.sh --cuda-graphs --augment-workers 8
# It prints each epoch's times (metrics.csv) and the wall time; LIMIT (default 540 s) stops train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RUN=${RUN:-/tmp/gpu-budget-run}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_budget.log") 2>&1; fi

"$PY" bench/standin_photos.py --data data/full
rm -rf "$RUN"  # an earlier run's metrics.csv is never printed as this one's
start=$(date +%s) rc=0
timeout -k 10 "${LIMIT:-540}" "$PY" train.py --data data/full --model lite-ctx --out "$RUN" --epochs 24 \
    --batch-size 16 --lr 2e-3 --low-res-epochs 14 --low-res-size 256 --train-sizes 384 448 --patience 0 --overwrite "$@" \
    || rc=$?
echo "wall: $(( $(date +%s) - start )) s for: train.py ... $* (exit $rc; 124: stopped at ${LIMIT:-540} s)"
"$PY" - "$RUN/metrics.csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print("epoch  train_s  epoch_s (validation and saving included)")
for r in rows:
    print(f"{r['epoch']:>5}  {float(r['train_seconds']):7.1f}  {float(r['seconds']):7.1f}")
print(f"sum of the {len(rows)} epochs: {sum(float(r['seconds']) for r in rows):.1f} s")
PYEOF
if [ -n "${OUT:-}" ]; then exec >&- 2>&-; wait; fi
[ "$rc" = 0 ] || [ "$rc" = 124 ]  # a crash (not the time limit) fails the script
