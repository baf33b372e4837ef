#!/usr/bin/env bash
# Pre-registered 2026-12-06 18:30 UTC (issue 27, item 3), before any encoder trained with --vision-tune full, lora or
# dual-qk was probed. The outcome goes to docs/log/2026-12-06-teachers.md.
#
# Question: where the teacher is known to work (depth-dense), does the dual channel forget less than full
# fine-tuning (the paper's Figure 6), and how do LoRA and dual-qk fall? Depth beside segmentation, linear and k-NN.
# Encoders: experiments/teachers.sh's depth-dense arm with --vision-tune full, lora (rank 8), dual-qk, seeds 1-3
# (same data, steps, rates as the dual arm: p1's 128 images, 16 steps of 8, lr 2e-4, head first fitted on 256 other
# images); the dual arm and the baseline from experiments/prereg/issue27-teachers.sh.
# Design (a third of the probing of the full cross, which this CPU cannot afford beside the dual table: 8 min per
# encoder and set): seed k of each new arm is probed on probe set 200 + k only (the protocol of issue 27: 1,920 views,
# objects from the first 480, 3 depth heads). Each set's difference is then one seed against the baseline on that
# set; the mean over the three (seed, set) pairs is unbiased and its se = sd / sqrt(3) holds both the seed and the
# set spread (experiments/boost_report.py --some-seeds-per-set). The dual arm enters with its full cross (all three
# seeds on every set, from the dual table), so its se here leaves out its seed spread: the dual table has its full se.
# Primary: each arm minus the baseline, mean +- 2 se, for depth lin.1 RMSE, mIoU, linear and k-NN accuracy; and
# full minus dual per set (paired on the set). Reading: "the dual channel forgets less" if dual's mIoU, linear and
# k-NN differences from the baseline are each higher than full's, with full - dual outside 2 se on at least one.
#
#   bash experiments/prereg/issue27-forgetting.sh
source "$(dirname "$0")/../usage.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${TAG:-teach}
THREADS=${THREADS:-1}
DUAL_REPORTS=${DUAL_REPORTS:-"runs/$TAG-eval-seed%p/report.json"}  # the dual table's reports (%p: the probe seed)
[ -f "runs/$TAG-depth-dense-full-s3/stage3/config.json" ] || ARMS=depth-dense TUNES="full lora dual-qk" PROBE=0 \
  bash experiments/teachers.sh
reports=()
for k in 1 2 3; do
  p=$((200 + k)) encoders=""
  for tune in full lora dual-qk; do encoders="$encoders --vision runs/$TAG-depth-dense-$tune-s$k/stage3/vision"; done
  out="runs/$TAG-forget-seed$p"
  [ -f "$out/report.json" ] || python eval.py $encoders --probes "data/probes-1920-seed$p" --probe-seed "$p" \
    --n-images 1920 --test-every 2 --object-views 480 --depth-heads 3 --per-image --threads "$THREADS" --out "$out" \
    2>&1 | tee "$out.log"
  reports+=("$out/report.json")
  for r in $DUAL_REPORTS; do reports+=("${r//%p/$p}"); done  # the baseline and the dual arm (issue27-teachers.sh)
done
seeds() { echo "$TAG-depth-dense-$1-s1,$TAG-depth-dense-$1-s2,$TAG-depth-dense-$1-s3"; }
python experiments/boost_report.py "${reports[@]}" --across-probe-sets --some-seeds-per-set --arm baseline=dinov2-s14 \
  --arm "dual=$(seeds dual)" --arm "full=$(seeds full)" --arm "lora=$(seeds lora)" --arm "dual-qk=$(seeds dual-qk)" \
  --control dual --out results/teachers/teachers-forgetting-128
