#!/usr/bin/env bash
# Screen one quality technique against the de-en recipe at a fixed number of updates (issue 16):
# a fixed update count makes the result independent of how busy the machine is (only the time
# changes), so two screens may share the two cores (THREADS=1 each).
#
#   bench/screen.sh NAME [key=value ...]     e.g. bench/screen.sh ema train.ema_decay=0.999
#
# Every screen shares these settings on top of recipes/de-en.yaml: STEPS updates (default 1824, the
# 12 epochs of the recipe before EMA became its default: the screens of 2026-12-02 ran without it,
# so with the recipe of then (lr 0.002 or 0.001, sizes 256/256/512, dropout 0.3, no sampling: the
# recipes changed on 2026-12-08, README "The recipes now") `bench/screen.sh baseline
# train.ema_decay=0` repeats their baseline and `ema train.ema_decay=0.999` their EMA screen), validation every 200 updates with the plateau patience doubled to match
# (the recipe's 1 validation of 400 updates), and the 5 newest validation checkpoints kept, so
# that checkpoint averaging is screened in every run for free. Outputs go to bench/out/screen/NAME:
# the experiment, eval/ (best.pt's scores) and eval-avg5/ (the 5 newest checkpoints averaged).
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
STEPS=${STEPS:-1824}
THREADS=${THREADS:-1}
RECIPE=${RECIPE:-de-en}
export NMT_DATA_MIRROR=${NMT_DATA_MIRROR:-$(cd .. && pwd)/shared/data}
exp=bench/out/screen/$name
nmt=.venv/bin/nmt
sets=(--set train.max_steps="$STEPS" --set train.max_epochs=1000 --set train.valid_every=200
      --set train.plateau_patience=2 --set train.patience=8 --set train.threads="$THREADS"
      --set train.keep_checkpoints=5)
for kv in "$@"; do sets+=(--set "$kv"); done
mkdir -p "$exp"
echo "$name: $RECIPE ${sets[*]}" > "$exp/screen.txt"
[ -f "$exp/data/stats.json" ] || $nmt data "$RECIPE" --exp "$exp" "${sets[@]}"
[ -f "$exp/spm/manifest.json" ] || $nmt spm "$RECIPE" --exp "$exp" "${sets[@]}"
start=$(date +%s)
[ -f "$exp/model/summary.json" ] || $nmt train "$RECIPE" --exp "$exp" "${sets[@]}"
echo "train_seconds $(( $(date +%s) - start ))" >> "$exp/screen.txt"
[ -f "$exp/eval/scores.json" ] || $nmt evaluate "$RECIPE" --exp "$exp" "${sets[@]}" --device cpu
if [ ! -f "$exp/eval-avg5/scores.json" ]; then
  $nmt average "$exp" --last 5 -o "$exp/model/avg5.pt"
  # evaluate writes eval/: decode with the average there, then put best.pt's scores back
  rm -rf "$exp/eval-best" && cp -r "$exp/eval" "$exp/eval-best"
  $nmt evaluate "$RECIPE" --exp "$exp" "${sets[@]}" --device cpu --model "$exp/model/avg5.pt"
  rm -rf "$exp/eval-avg5" && mv "$exp/eval" "$exp/eval-avg5" && mv "$exp/eval-best" "$exp/eval"
fi
echo "$name done"
