#!/usr/bin/env bash
# Teachers on equal terms (issue 27; the paper's Table 6 in miniature): stage 3 on the same images, in the same order,
# with the same steps, rates and trainable set, taught by a linear depth head on the encoder instead of the frozen
# LLM -- at the pixels the conversations ask about (depth-points: the information the language carries) or at every
# pixel with ground truth (depth-dense: the ceiling of what these images can teach). train.py --teacher; no LLM is
# loaded. The llm arm is boost.sh's stage 3 on the same data (NAME=p1 DATA=b15): pass its encoders in LLM= to probe
# them beside.
#
#   bash experiments/teachers.sh                                   # both depth arms, dual channel, 3 seeds, p1's data
#   ARMS=depth-dense TUNES="full lora dual-qk" bash experiments/teachers.sh     # forgetting where the teacher works
#   N=1024 GB=32 DATA=data/teachers/spatial-1024 TAG=teach1k bash experiments/teachers.sh   # >= 1,000 images
#   LLM="runs/p1-boost-s1/stage3/vision" bash experiments/teachers.sh          # the llm arm probed beside
#   PROBE=0 bash experiments/teachers.sh                           # train only
#
# Each run: runs/$TAG-$ARM-$TUNE-s$SEED/stage3 (resumable: a rerun skips finished runs and resumes interrupted ones).
# Probes: probe_sets.sh on PROBE_SEEDS (the protocol of issue 27), one report per probe set, pooled by
# boost_report.py --across-probe-sets into results/teachers/$TAG.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/usage.sh
source experiments/probe_sets.sh

SEEDS=${SEEDS:-"1 2 3"}
ARMS=${ARMS:-"depth-points depth-dense"}   # train.py --teacher
TUNES=${TUNES:-dual}                       # train.py --vision-tune: dual, dual-qk, full, lora
N=${N:-128}                                # stage-3 images per run (128: the llm arm's, 16 steps of 8)
GB=${GB:-8}                                # global batch
LR=${LR:-2e-4}                             # Attn+ (boost.sh's LR3); gates 100x, the head 1/10 (train.py's defaults)
DATA=${DATA:-data/b15/spatial}             # p1's stage-3 conversations (made if missing: seed 301, 224 px)
DATA_SEED=${DATA_SEED:-301}
TEACHER_DATA=${TEACHER_DATA:-data/teachers/warm-256}   # the head's first fit, encoder frozen: other images (seed 302)
LLM=${LLM:-}                               # the llm arm's encoder directories, probed beside the depth arms
PROBE=${PROBE:-1}                          # 0: train only
TAG=${TAG:-teach}                          # names runs, evals and results
PROBE_SEEDS=${PROBE_SEEDS:-"201 202 203"}  # probe sets, fixed before the teachers were probed (experiments/prereg/)

python tools/offline_weights.py
[ -f "$DATA/data.jsonl" ] || python data.py spatial --n "$N" --out "$DATA" --seed "$DATA_SEED" --size 224 --workers 2
[ -f "$TEACHER_DATA/data.jsonl" ] || python data.py spatial --n 256 --out "$TEACHER_DATA" --seed 302 --size 224 \
  --workers 2
mkdir -p runs results/teachers
encoders="--vision weights/dinov2-s14" arms=()
for arm in $ARMS; do
  for tune in $TUNES; do
    names=""
    for seed in $SEEDS; do
      name=$TAG-$arm-$tune-s$seed
      if [ ! -f "runs/$name/stage3/config.json" ]; then
        resume=$([ -d "runs/$name/stage3" ] && echo --resume || true)
        python train.py --preset small --stage 3 --teacher "$arm" --vision-tune "$tune" --data "$DATA" \
          --teacher-data "$TEACHER_DATA" --data-size "$N" --global-batch "$GB" --batch-size 4 --lr "$LR" --seed "$seed" --name "$name" \
          --save-every 20 --no-probe --dtype bf16 --workers 1 $resume 2>&1 | tee -a "runs/$name.log"
      fi
      encoders="$encoders --vision runs/$name/stage3/vision" names="$names,$name"
    done
    arms+=(--arm "$arm-$tune=${names#,}")
  done
done
for dir in $LLM; do encoders="$encoders --vision $dir"; done
[ "$PROBE" = 1 ] || exit 0
probe_sets "runs/$TAG-eval" $encoders
python experiments/boost_report.py "${REPORTS[@]}" --across-probe-sets --arm baseline=dinov2-s14 "${arms[@]}" \
  --out "results/teachers/$TAG"
