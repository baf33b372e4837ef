#!/usr/bin/env bash
# Pre-registered 2026-12-06 15:45 UTC (issue 27), before any teacher encoder was probed and before probe sets 201-203
# existed. Committed with the teacher runs' code; the outcome goes to docs/log/2026-12-06-teachers.md.
#
# Protocol (issue 27's "probe that sees a 2 % change", chosen on probe sets 100-111, which no teacher ever sees): each
# probe set 1,920 views (960 scenes, 2 views each; every 2nd scene a test scene: 960 training and 960 test views),
# object crops from its first 480 views only, and the lin.1 / lin.4 depth maps averaged over 3 heads (--depth-heads 3);
# everything else eval.py's defaults (fp32 features at 224 px, --seed 0).
# Probe sets: probe seeds 201, 202, 203.
# Encoders: the baseline DINOv2-S/14; experiments/teachers.sh's depth-points and depth-dense arms (dual channel,
# p1's 128 stage-3 images (data/b15/spatial, seed 301), 16 steps of 8, lr 2e-4, seeds 1-3, the head first fitted on
# 256 other images, seed 302: amended 15:55, before any teacher encoder was probed, after the first run showed the
# head overfitting stage 3's own images); the llm arm as far as it
# exists: p1's seed-1 boosted encoder (results/p1/p1-boost-s1-encoder.safetensors; p1's stage 2, needed for its
# seeds 2-3, was lost with runs/).
# Primary: depth lin.1 RMSE, each arm minus the baseline, mean over (seed, probe set) ± 2 se (se from the spread over
# seeds and over probe sets). Questions: does depth-dense (the ceiling of these images) move lin.1 by more than 2 se;
# by how much does depth-points trail it; where does the llm arm fall. Beside it: lin.4, mIoU, linear, k-NN.
#
#   bash experiments/prereg/issue27-teachers.sh
source "$(dirname "$0")/../usage.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${TAG:-teach}     # experiments/teachers.sh's runs: runs/$TAG-{depth-points,depth-dense}-dual-s{1,2,3}
LLM=${LLM:-runs/enc/p1-boost-s1}   # the llm arm's encoders (tools/boosted_encoder.py unpack of p1's seed 1)

[ -d "$LLM" ] || python tools/boosted_encoder.py unpack weights/dinov2-s14 results/p1/p1-boost-s1-encoder.safetensors \
  "$LLM"
encoders="--vision weights/dinov2-s14 --vision $LLM"
for arm in depth-points depth-dense; do
  for seed in 1 2 3; do encoders="$encoders --vision runs/$TAG-$arm-dual-s$seed/stage3/vision"; done
done
for p in 201 202 203; do
  python eval.py $encoders --probes "data/probes-1920-seed$p" --probe-seed "$p" --n-images 1920 --test-every 2 \
    --object-views 480 --depth-heads 3 --per-image --threads 2 --out "runs/$TAG-eval-seed$p" 2>&1 \
    | tee "runs/$TAG-eval-seed$p.log"
done
python experiments/boost_report.py runs/$TAG-eval-seed{201,202,203}/report.json --across-probe-sets \
  --arm baseline=dinov2-s14 --arm "llm=$(basename "$LLM")" \
  --arm "depth-points=$TAG-depth-points-dual-s1,$TAG-depth-points-dual-s2,$TAG-depth-points-dual-s3" \
  --arm "depth-dense=$TAG-depth-dense-dual-s1,$TAG-depth-dense-dual-s2,$TAG-depth-dense-dual-s3" \
  --control depth-dense --out results/teachers/teachers-dual-128
