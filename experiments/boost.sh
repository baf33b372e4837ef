#!/usr/bin/env bash
# The controlled stage-3 experiment of the README's Results, end to end on 2 CPU cores (bf16): does the boost make
# the pretrained DINOv2-S/14 better, against a shuffled-answer control, over training seeds?
#
#   bash experiments/boost.sh                       # everything; finished stages and runs are skipped on a rerun
#   SEEDS="1 2 3 4 5" N3=256 bash experiments/boost.sh
#   NAME=p1 DATA=b15 POINTS=1 MORE_CAPTIONS=3200 bash experiments/boost.sh   # the README's point-token run
#
# 1. Data, each kind from its own seed so that stage 3's images are disjoint from stages 1-2's: captions (stage 1);
#    instruct, grounding (the coordinate interface) and multiview (stage 2); concise spatial conversations (stage 3);
#    held-out spatial and grounding sets for QA and the diagnostics.
# 2. Stages 1 and 2 once, shared by every arm.
# 3. Stage 3 per seed: the boost, and the shuffled-answer control (the same conversations, steps and rates, each
#    conversation paired with another sample's image).
# 4. One eval.py call probes the baseline and every stage-3 encoder on the same held-out probe set (240 test views),
#    with per-image results; boost_report.py tables mean ± sd over seeds and paired bootstrap intervals.
# 5. Grounding accuracy and the diagnostics (image dependence, localization gap) after stage 2 and after the boost.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=${NAME:-b15}
SEEDS=${SEEDS:-"1 2 3"}
N3=${N3:-128}           # stage-3 samples per run: 16 steps of 8
LR3=${LR3:-2e-4}        # Attn+; the gates train at 100x, the projector at 1/10 (train.py's stage-3 defaults)
POINTS=${POINTS:-0}     # 1: stages 2-3 with point tokens (train.py --point-tokens)
MORE_CAPTIONS=${MORE_CAPTIONS:-0}   # > 0: stage 1 also reads this many fresh captions (seed 111)
D=data/${DATA:-$NAME}    # DATA=b15: another run's data, the same images
COMMON="--preset small --batch-size 4 --workers 2 --save-every 20 --no-probe --dtype bf16"
PT=$([ "$POINTS" = 1 ] && echo --point-tokens || true)

python tools/offline_weights.py
gen() { python data.py "$1" --n "$2" --out "$D/$3" --seed "$4" --size 224 --workers 2 > /dev/null; }
gen captions 1600 captions 101
gen instruct 300 instruct 202
gen grounding 800 grounding 203
gen multiview 300 multiview 204
gen spatial "$N3" spatial 301
gen spatial 24 heldout 777
gen grounding 48 heldout-grounding 778
CAPTIONS=$D/captions
if [ "$MORE_CAPTIONS" -gt 0 ]; then gen captions "$MORE_CAPTIONS" captions-more 111; CAPTIONS=$CAPTIONS,$D/captions-more; fi

stage() {  # stage NAME K ARGS...: train unless that stage already finished; an interrupted one resumes
  local name=$1 k=$2; shift 2
  if [ ! -f "runs/$name/stage$k/config.json" ]; then
    local resume=$([ -d "runs/$name/stage$k" ] && echo --resume || true)
    python train.py $COMMON --name "$name" --stage "$k" $resume "$@" 2>&1 | tee -a "runs/$name-stage$k.log"
  fi
}
mkdir -p runs
stage "$NAME" 1 --global-batch 16 --data "$CAPTIONS"
stage "$NAME" 2 --global-batch 16 --data "$D/instruct,$D/grounding,$D/multiview" --lr 1e-4 $PT
encoders="--vision weights/dinov2-s14" boost="" control=""
for seed in $SEEDS; do
  for arm in boost control; do
    extra=$([ "$arm" = control ] && echo "--shuffle-images" || true)
    stage "$NAME-$arm-s$seed" 3 --init "runs/$NAME/stage2" --global-batch 8 --data "$D/spatial" --seed "$seed" \
      --lr "$LR3" $extra $PT
    encoders="$encoders --vision runs/$NAME-$arm-s$seed/stage3/vision"
  done
  boost="$boost,$NAME-boost-s$seed" control="$control,$NAME-control-s$seed"
done

python eval.py $encoders --probes data/probes-240 --n-images 480 --test-every 2 --per-image --threads 2 \
  --out "runs/$NAME-eval" 2>&1 | tee "runs/$NAME-eval.log"
mkdir -p results
cp "runs/$NAME-eval/report.json" "results/$NAME-eval.json"
cp "runs/$NAME-eval/report.md" "results/$NAME-eval.md"
cp "runs/$NAME-eval/report.png" "results/$NAME.png"
python experiments/boost_report.py "runs/$NAME-eval/report.json" --arm baseline=dinov2-s14 \
  --arm "boost=${boost#,}" --arm "control=${control#,}" --out "results/$NAME"
first=$(echo $SEEDS | cut -d' ' -f1)
python eval.py --qa "$D/heldout-grounding" --qa-samples 32 --vlm "runs/$NAME/stage2" --qa-max-new 24 \
  --out "runs/$NAME-grounding" 2>&1 | tee "runs/$NAME-grounding.log"
python eval.py --qa "$D/heldout" --qa-samples 12 --vlm "runs/$NAME/stage2" --vlm "runs/$NAME-boost-s$first/stage3" \
  --diagnose --qa-max-new 48 --out "runs/$NAME-qa" 2>&1 | tee "runs/$NAME-qa.log"
cp "runs/$NAME-grounding/report.json" "results/$NAME-grounding.json"
cp "runs/$NAME-qa/report.json" "results/$NAME-qa.json"
python tools/boosted_encoder.py pack "runs/$NAME-boost-s$first/stage3/vision" "results/$NAME-boost-s$first-encoder.safetensors"
