#!/usr/bin/env bash
# Pre-registered 2026-12-06 18:25 UTC (issue 27), before any teacher encoder was probed on MuJoCo scenes and before
# these MuJoCo probe sets existed. The outcome goes to docs/log/2026-12-06-teachers.md.
#
# Question: a teacher trained on our renderer may only have learned our renderer. Do the depth teachers' gains (and
# the llm arm's losses) carry to scenes none of it was built from: MetaWorld rendered by MuJoCo
# (evaluation/mujoco_probes.py: metric depth, 6-class segmentation, no object crops)?
# Protocol: three MuJoCo probe sets, seeds 201, 202, 203, 480 views each (160 scenes x 3 cameras; every 2nd scene a
# test scene: 240 training and 240 test views), 224 px; the dense probes of eval.py (lin.1 / lin.4 averaged over 3
# heads, segmentation), fp32 features, --seed 0.
# Encoders: those of experiments/prereg/issue27-teachers.sh (baseline, llm = p1-boost-s1, depth-points and
# depth-dense dual s1-s3).
# Primary: MuJoCo depth lin.1 RMSE, each arm minus the baseline, pooled over seeds and sets, mean +- 2 se; beside it
# lin.4 and mIoU. Reading: a depth-dense gain outside 2 se in the same direction as on our probe sets says the
# teacher taught depth, not only our renderer; a gain within 2 se of 0 says it did not carry (or the probe cannot see
# it: the set-to-set sd is reported beside).
#
#   bash experiments/prereg/issue27-mujoco.sh
#   SETS="202 203" bash experiments/prereg/issue27-mujoco.sh   # some sets only (a set with a report is skipped)
#   bash experiments/prereg/issue27-mujoco.sh 1k                # the amendment below (POINTS=1: the second)
#
# Amendment, 2026-12-07 03:30 UTC (commit 095e2c4), before any 1,024-image encoder was probed on MuJoCo scenes and
# before sets 202-203 existed (set 201 of the protocol above was probed on 2026-12-06 and is a lead): the depth-dense
# dual teacher on 1,024 images (runs/teach1k-depth-dense-dual-s1..3, experiments/prereg/issue27-llm-1k.sh) on the same
# three MuJoCo sets, one eval.py call per set (runs/teach1k-mujoco-seedP), its deltas against the protocol's baseline
# report of the same set; the same primary (lin.1 RMSE minus the baseline, mean +- 2 se over seeds x sets), lin.4 and
# mIoU beside. Reading as above; in addition, dense-1,024 minus dense-128 says whether more images carry beyond our
# renderer.
# Second amendment, 2026-12-07 05:23 UTC (commit 0b46014), before any depth-points-1,024 encoder met a MuJoCo scene
# (the dense ones had): the same for the point teacher on 1,024 images, `POINTS=1 bash ... 1k`
# (runs/teach1k-points-mujoco-seedP, results/teachers/teachers-points-1024-mujoco): points-1,024 minus the baseline
# and minus dense-1,024.
source "$(dirname "$0")/../usage.sh"
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${TAG:-teach}
LLM=${LLM:-runs/enc/p1-boost-s1}
THREADS=${THREADS:-1}

[ -d "$LLM" ] || python tools/boosted_encoder.py unpack weights/dinov2-s14 results/p1/p1-boost-s1-encoder.safetensors \
  "$LLM"
encoders="--vision weights/dinov2-s14 --vision $LLM"
for arm in depth-points depth-dense; do
  for seed in 1 2 3; do encoders="$encoders --vision runs/$TAG-$arm-dual-s$seed/stage3/vision"; done
done
if [ "${1:-}" = 1k ]; then
  arm=$([ "${POINTS:-0}" = 1 ] && echo points || echo dense)
  out=runs/teach1k$([ "$arm" = points ] && echo -points || true)-mujoco-seed
  for p in ${SETS:-201 202 203}; do
    [ -f "$out$p/report.json" ] && continue
    python eval.py $(for s in 1 2 3; do echo --vision runs/teach1k-depth-$arm-dual-s$s/stage3/vision; done) \
      --probes "data/mujoco-480-seed$p" --depth-heads 3 --per-image --threads "$THREADS" --out "$out$p" \
      2>&1 | tee "$out$p.log"
  done
  [ -n "${SETS:-}" ] && exit 0
  if [ "$arm" = points ]; then
    python experiments/boost_report.py runs/{$TAG,teach1k,teach1k-points}-mujoco-seed{201,202,203}/report.json \
      --across-probe-sets --arm baseline=dinov2-s14 \
      --arm "depth-dense-1024=teach1k-depth-dense-dual-s1,teach1k-depth-dense-dual-s2,teach1k-depth-dense-dual-s3" \
      --arm "depth-points-1024=teach1k-depth-points-dual-s1,teach1k-depth-points-dual-s2,teach1k-depth-points-dual-s3" \
      --control depth-dense-1024 --out results/teachers/teachers-points-1024-mujoco
    exit 0
  fi
  python experiments/boost_report.py runs/{$TAG,teach1k}-mujoco-seed{201,202,203}/report.json --across-probe-sets \
    --arm baseline=dinov2-s14 \
    --arm "depth-dense-128=$TAG-depth-dense-dual-s1,$TAG-depth-dense-dual-s2,$TAG-depth-dense-dual-s3" \
    --arm "depth-dense-1024=teach1k-depth-dense-dual-s1,teach1k-depth-dense-dual-s2,teach1k-depth-dense-dual-s3" \
    --control depth-dense-128 --out results/teachers/teachers-dual-1024-mujoco
  exit 0
fi
for p in ${SETS:-201 202 203}; do
  [ -f "runs/$TAG-mujoco-seed$p/report.json" ] && continue   # (added 2026-12-07: a set already probed is kept)
  [ -f "data/mujoco-480-seed$p/index.json" ] || python -c "import sys; from evaluation.mujoco_probes import \
make_mujoco_probe_set as make; make(sys.argv[1], n_images=480, seed=int(sys.argv[2]), test_every=2)" \
    "data/mujoco-480-seed$p" "$p"
  python eval.py $encoders --probes "data/mujoco-480-seed$p" --depth-heads 3 --per-image --threads "$THREADS" \
    --out "runs/$TAG-mujoco-seed$p" 2>&1 | tee "runs/$TAG-mujoco-seed$p.log"
done
[ -n "${SETS:-}" ] && exit 0   # the table once every set is probed (run without SETS)
python experiments/boost_report.py runs/$TAG-mujoco-seed{201,202,203}/report.json --across-probe-sets \
  --arm baseline=dinov2-s14 --arm "llm=$(basename "$LLM")" \
  --arm "depth-points=$TAG-depth-points-dual-s1,$TAG-depth-points-dual-s2,$TAG-depth-points-dual-s3" \
  --arm "depth-dense=$TAG-depth-dense-dual-s1,$TAG-depth-dense-dual-s2,$TAG-depth-dense-dual-s3" \
  --control depth-dense --out results/teachers/teachers-dual-128-mujoco
