#!/usr/bin/env bash
# Stage-3 ablations on the mini run (experiments/mini.sh must have run first): how the encoder is tuned (the dual
# channel vs full fine-tuning vs LoRA; "frozen" leaves the encoder as the baseline, so it needs no run) and how much
# data. Each variant starts from runs/mini/stage2 and trains on the first SIZE samples of the mini run's stage-3 data
# with the same settings; one eval.py call then probes the baseline, the mini run and every variant side by side.
#
#   bash experiments/ablate.sh                              # dual and full on 128 samples (8 steps), ~45 min on 2 CPU cores
#   VARIANTS=lora bash experiments/ablate.sh               # one more variant; the table keeps the earlier ones
#   SIZE=256 VARIANTS="dual full lora" bash experiments/ablate.sh
source "$(dirname "$0")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE=${SIZE:-128}            # stage-3 samples, of the mini run's 512
VARIANTS=${VARIANTS:-"dual full"}  # --vision-tune values to train: dual, full, lora
COMMON="--preset small --stage 3 --init runs/mini/stage2 --batch-size 4 --global-batch 16 --workers 2 --save-every 10
        --no-probe --data-root data/mini --gen-samples 256 --data-size $SIZE"

for v in $VARIANTS; do
  name="mini-$v-$SIZE"
  [ -f "runs/$name/stage3/config.json" ] && continue  # finished; an interrupted run resumes
  resume=$([ -d "runs/$name/stage3" ] && echo --resume || true)
  python train.py $COMMON --name "$name" --vision-tune "$v" $resume 2>&1 | tee -a "runs/$name-stage3.log"
done
encoders="--vision weights/dinov2-s14 --vision runs/mini/stage3/vision"
for v in dual full lora; do  # every variant trained at this size so far, this call's or an earlier one's
  if [ -f "runs/mini-$v-$SIZE/stage3/vision/config.json" ]; then
    encoders="$encoders --vision runs/mini-$v-$SIZE/stage3/vision"
  fi
done
python eval.py $encoders --threads 2 --out "runs/mini-ablations-$SIZE/eval" 2>&1 | tee "runs/mini-ablations-$SIZE-eval.log"
mkdir -p results/mini-ablations
for f in report.json report.md report.png; do
  cp "runs/mini-ablations-$SIZE/eval/$f" \
    "results/mini-ablations/mini-ablations-$SIZE.${f#report.}"
done
