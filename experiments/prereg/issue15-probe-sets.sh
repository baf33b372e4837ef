#!/usr/bin/env bash
# RECONSTRUCTED (2026-12-06, issue 28) from the issue-15 closing note of 2026-12-01: the original runs/gs3/prereg.sh,
# written at 11:35 that day before probe sets 3-5 existed, was lost with runs/ (never committed). The comparison, the
# probe sets and the eval.py and boost_report.py flags below are the note's; the encoder paths are that session's
# (made by experiments/gradient_step.sh, with and without ONLY='[qk]_proj' TAG=qk, from runs/p1/stage2).
#
# Fixed in advance: the q/k image step (Attn+'s q/k moved along E[g - h], 3 conversation sets) against the baseline
# and against its matched control (E[h] on q/k), and the all-tensor image step against the baseline, on three probe
# sets never looked at (probe seeds 3, 4, 5: other scenes, 480 views, 240 of them test views). Primary: depth lin.1
# and lin.4 RMSE, each difference as its mean over (conversation set, probe set) ± 2 se, se from the spread over
# conversation sets and over probe sets; forgetting: mIoU, linear, k-NN within 1 point.
# Outcome: docs/log/2026-12-01-prereg-probe-sets.md (no depth gain over the baseline).
#
#   bash experiments/prereg/issue15-probe-sets.sh
#   ONLY='[qk]_proj' TAG=qk PROBE_SEEDS="3 4 5" bash experiments/gradient_step.sh   # the same test, today's names
source "$(dirname "$0")/../usage.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."

GS=${GS:-runs/gs}     # the all-tensor image step's encoders: $GS/image-s{1,2,3}
GS2=${GS2:-runs/gs2}  # the q/k arms: $GS2/{image,control}-qk-s{1,2,3}
EARLIER=${EARLIER:-}  # report.json of probe sets 1 and 2 with image-s1..3 and the baseline (see the end)

encoders="--vision weights/dinov2-s14"
for k in 1 2 3; do
  encoders="$encoders --vision $GS/image-s$k --vision $GS2/image-qk-s$k --vision $GS2/control-qk-s$k"
done
for p in 3 4 5; do
  python eval.py $encoders --probes "data/probes-240-seed$p" --probe-seed "$p" --n-images 480 --test-every 2 \
    --per-image --threads 2 --out "runs/gs3-probes$p" 2>&1 | tee "runs/gs3-probes$p.log"
done
python experiments/boost_report.py runs/gs3-probes{3,4,5}/report.json --across-probe-sets --arm baseline=dinov2-s14 \
  --arm image-qk=image-qk-s1,image-qk-s2,image-qk-s3 --arm control-qk=control-qk-s1,control-qk-s2,control-qk-s3 \
  --control control-qk --out results/gradient-step/gradient-step-qk-probe-sets
# The all-tensor step over probe sets 1-5: sets 1 and 2 were probed by the session before (EARLIER: their report.json
# paths; the note does not name their folders); without EARLIER this pools sets 3-5 only.
python experiments/boost_report.py $EARLIER runs/gs3-probes{3,4,5}/report.json --across-probe-sets \
  --arm baseline=dinov2-s14 --arm image=image-s1,image-s2,image-s3 --out results/gradient-step/gradient-step-probe-sets
