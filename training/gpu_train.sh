#!/usr/bin/env bash
# Train the default model on one GPU within a wall-clock budget (device machine).
#   bash training/gpu_train.sh OUT_DIR BUDGET_S [extra train.py args...]
# A 40-step probe measures seconds per step; the run then gets as many steps as fit in
# BUDGET_S, so its learning-rate schedule completes. The chosen step count is printed
# and is what the model card records (re-running with --steps N reproduces the run).
set -eu
out=$1; budget=$2; shift 2
mkdir -p "$out"
python3 -m training.train --device cuda --out /tmp/probe_$$ --steps 40 --log-every 20 \
  --eval-every 100000 --save-every 100000 "$@" > "$out/probe.log" 2>&1
per_step=$(grep "^step 40 loss" "$out/probe.log" | sed 's/.* \([0-9.]*\) s\/step.*/\1/')
steps=$(python3 -c "print(int(($budget) / ($per_step) / 100) * 100)")
echo "probe: $per_step s/step -> $steps steps in ${budget}s" | tee "$out/steps.txt"
python3 -m training.train --device cuda --out "$out/model" --steps "$steps" \
  --eval-every 500 --log-every 100 "$@" > "$out/log.txt" 2>&1
