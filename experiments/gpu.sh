#!/usr/bin/env bash
# The one-GPU recipe (docs/gpu.md): from a fresh machine with one CUDA GPU to a boosted, probed DINOv2-S/14.
#   1. data: N1 captions (stage 1), N2 grounding samples plus instruct and multiview QA (stage 2), N3 spatial
#      conversations (stage 3), each kind from its own seed, so that stage 3's images are new to the VLM
#   2. stages 1 and 2 on DINOv2-S/14 + SmolLM2-135M-Instruct (weights/, made by tools/offline_weights.py)
#   3. stage 3 per seed of SEEDS: the boost, and its control (--shuffle-images: each conversation with another
#      sample's image; same data, steps and rates)
#   4. the frozen-encoder probes of the baseline and every stage-3 encoder on each probe set of PROBE_SEEDS
#   5. the report: experiments/boost_report.py --across-probe-sets -> OUT/results/NAME.md and .json
# The critic experiment (issue 29) is the same recipe with S2_SPATIAL (stage 2 learns to read depth), LOSS_ON=image,
# GATES=1 (measured after stage 2; the run stops at a failed gate unless FORCE=1) and TEACHER=1 (the depth-points
# teacher on stage 3's images and steps, and the language efficiency in the report):
#   S2_SPATIAL=10000 K=4 LOSS_ON=image GATES=1 TEACHER=1 TRAIN_ARGS=--point-tokens bash experiments/gpu.sh
# Finished stages and runs are skipped on a rerun; an interrupted stage resumes from its last checkpoint.
#
#   bash experiments/gpu.sh              # one CUDA GPU: ~2-3 h on an H100, ~4-6 h on a 24 GB GPU (estimates)
#   bash experiments/gpu.sh --dry        # the same script on the CPU: tiny preset, tiny data, 2 steps a stage
#   bash experiments/gpu.sh --help       # this text; starts nothing
#
# Variables (environment), defaults in brackets:
#   OUT [.]             data/, runs/ and results/ go under OUT
#   NAME [gpu]          the run: OUT/runs/NAME/stage{1,2}, OUT/runs/NAME-{boost,control}-sSEED/stage3
#   N1 [50000] N2 [10000] N3 [10000]    captions, grounding samples, spatial conversations
#   N2QA [3000]         instruct and multiview samples each, beside stage 2's grounding
#   SEEDS ["1 2 3"; --dry "1 2"]        stage-3 seeds, each a boost and a control
#   PROBE_SEEDS ["0 1 2"; --dry "0 1"]  probe sets (experiments/probe_sets.sh: 1,920 views each)
#   BATCH [8]           micro-batch per step (8 x 1,536 tokens: ~13 GiB in stage 2, ~8 GiB in stage 3)
#   LR2 [1e-4] LR3 [2e-4]   stage 2's rate and stage 3's Attn+ rate (gates 100x, projector 1/10)
#   WORKERS [8]         data-generation and data-loader processes
#   TRAIN_ARGS [""]     more train.py flags for every stage, e.g. "--compile off" or "--pack"
#   S2_SPATIAL [0]      spatial conversations (seed 305, images disjoint from stage 3's) in stage 2's mix
#   K [1]               data.py spatial --points-per-turn of every spatial set (stage 2's, stage 3's, held-out)
#   LOSS_ON [answers]   stage 3's train.py --loss-on (image: only the answer tokens the image decides)
#   GATES [0]           1: after stage 2, the critic's reading (tools/critic_reading.py, 64 held-out conversations,
#                       the first probe set) and the gradient at stage 3's start (tools/gradient_noise.py, 48
#                       samples) -> OUT/results/NAME-gates.md (experiments/critic_gates.py); FORCE=1 goes on past a
#                       failed gate
#   TEACHER [0]         1: also the depth-points teacher (train.py --teacher) per seed, probed beside, and the report's
#                       efficiency (boost - baseline) / (depth-points - baseline)
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
DRY=0
for arg in "$@"; do
  case $arg in
    -h|--help) usage; exit 0 ;;
    --dry) DRY=1 ;;
    *) echo "experiments/gpu.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
OUT=$(mkdir -p "${OUT:-.}" && cd "${OUT:-.}" && pwd)
cd "$(dirname "$0")/.."
source experiments/probe_sets.sh

NAME=${NAME:-gpu}
TRAIN_ARGS=${TRAIN_ARGS:-}
if [ "$DRY" = 1 ]; then  # the same steps, sized for a CPU in CI: random tiny models, 32 px, 2 steps a stage
  SEEDS=${SEEDS:-"1 2"} PROBE_SEEDS=${PROBE_SEEDS:-"0 1"}
  N1=${N1:-16} N2=${N2:-8} N2QA=${N2QA:-4} N3=${N3:-8} BATCH=${BATCH:-2} WORKERS=${WORKERS:-1} SIZE=32
  MODEL="--preset tiny --image-size 32 --vit-patch 8 --vit-dim 32 --vit-depth 2 --vit-heads 2 --llm-dim 32
         --llm-layers 2 --llm-heads 2 --max-len 768 --device cpu --dtype fp32 --compile off --max-steps 2"
  G1=4 G2=4 G3=4 BASE=$OUT/runs/$NAME/base/vision N_HELD=4 N_GRAD=4 N_WARM=8 READ_ARGS="--image-size 32 --quick"
  PROBE_ROOT=$OUT/data/probes-dry PROBE_IMAGES=16 PROBE_ARGS="--image-size 32 --crop-size 32 --quick"
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
             'experiments/gpu.sh: no CUDA GPU visible to torch (docs/gpu.md: installing a CUDA torch); --dry runs on CPU')"
  SEEDS=${SEEDS:-"1 2 3"} PROBE_SEEDS=${PROBE_SEEDS:-"0 1 2"}
  N1=${N1:-50000} N2=${N2:-10000} N2QA=${N2QA:-3000} N3=${N3:-10000} BATCH=${BATCH:-8} WORKERS=${WORKERS:-8}
  SIZE=224 MODEL="--preset small" G1=256 G2=64 G3=32 BASE=weights/dinov2-s14
  N_HELD=64 N_GRAD=48 N_WARM=256 READ_ARGS=""
  PROBE_ROOT=$OUT/data/probes-1920
  python tools/offline_weights.py
fi
export PROBE_SEEDS PROBE_ROOT PROBE_IMAGES PROBE_ARGS
D=$OUT/data/$NAME
RUNS=$OUT/runs
COMMON="$MODEL --runs-dir $RUNS --data-root $OUT/data --batch-size $BATCH --workers $WORKERS --save-every 500
        --no-probe $TRAIN_ARGS"

gen() {  # gen KIND N DIR SEED [ARGS]: a dataset, unless it is there already
  [ -f "$D/$3/data.jsonl" ] || python data.py "$1" --n "$2" --out "$D/$3" --seed "$4" --size "$SIZE" \
    --workers "$WORKERS" "${@:5}" > /dev/null
}
gen captions "$N1" captions 101
gen grounding "$N2" grounding 203
gen instruct "$N2QA" instruct 202
gen multiview "$N2QA" multiview 204
S2_SPATIAL=${S2_SPATIAL:-0} K=${K:-1} LOSS_ON=${LOSS_ON:-answers} GATES=${GATES:-0} TEACHER=${TEACHER:-0}
gen spatial "$N3" spatial 301 --points-per-turn "$K"
MIX2="$D/grounding,$D/instruct,$D/multiview"
if [ "$S2_SPATIAL" -gt 0 ]; then
  gen spatial "$S2_SPATIAL" spatial-stage2 305 --points-per-turn "$K" && MIX2="$MIX2,$D/spatial-stage2"
fi
if [ "$GATES" = 1 ]; then gen spatial "$N_HELD" heldout-critic 779 --points-per-turn "$K"; fi
if [ "$TEACHER" = 1 ]; then gen spatial "$N_WARM" teacher-warm 302; fi

stage() {  # stage NAME K ARGS...: train unless that stage already finished; an interrupted one resumes
  local name=$1 k=$2; shift 2
  if [ ! -f "$RUNS/$name/stage$k/config.json" ]; then
    local resume=$([ -d "$RUNS/$name/stage$k" ] && echo --resume || true)
    python train.py $COMMON --name "$name" --stage "$k" $resume "$@" 2>&1 | tee -a "$RUNS/$name-stage$k.log"
  fi
}
mkdir -p "$RUNS" "$OUT/results"
stage "$NAME" 1 --global-batch "$G1" --data "$D/captions"
stage "$NAME" 2 --global-batch "$G2" --data "$MIX2" --lr "${LR2:-1e-4}"
if [ "$GATES" = 1 ]; then  # issue 29: does the critic read, and does the image decide stage 3's gradient?
  p0=$(echo $PROBE_SEEDS | cut -d' ' -f1)
  P0=$PROBE_ROOT$([ "$p0" = 0 ] || echo "-seed$p0")
  [ -f "$P0/index.json" ] || python eval.py --make-probes --probes "$P0" --n-images "${PROBE_IMAGES:-1920}" \
    --probe-seed "$p0" --test-every 2 ${PROBE_ARGS:---object-views 480}   # as probe_sets.sh makes it
  python tools/critic_reading.py --qa "$D/heldout-critic" --vlm "$RUNS/$NAME/stage2" --probes "$P0" --vision "$BASE" \
    --limit "$N_HELD" --prior-data "$D/spatial" $READ_ARGS --out "$OUT/results/$NAME-critic.json"
  python tools/gradient_noise.py --init "$RUNS/$NAME/stage2" --data "$D/spatial" --n "$N_GRAD" --loss-on "$LOSS_ON" \
    $MODEL $TRAIN_ARGS --out "$OUT/results/$NAME-gradient.json" | tail -n 3
  if ! python experiments/critic_gates.py --critic "$OUT/results/$NAME-critic.json" \
      --gradient "$OUT/results/$NAME-gradient.json" --out "$OUT/results/$NAME-gates.md"; then
    [ "${FORCE:-0}" = 1 ] || { echo "experiments/gpu.sh: a gate failed ($OUT/results/$NAME-gates.md); FORCE=1 goes on"; exit 0; }
  fi
fi
encoders="--vision $BASE" boost="" control="" points=""
for seed in $SEEDS; do
  for arm in boost control; do
    extra=$([ "$arm" = control ] && echo "--shuffle-images" || true)
    stage "$NAME-$arm-s$seed" 3 --init "$RUNS/$NAME/stage2" --global-batch "$G3" --data "$D/spatial" \
      --seed "$seed" --lr "${LR3:-2e-4}" --loss-on "$LOSS_ON" $extra
    encoders="$encoders --vision $RUNS/$NAME-$arm-s$seed/stage3/vision"
  done
  boost="$boost,$NAME-boost-s$seed" control="$control,$NAME-control-s$seed"
  if [ "$TEACHER" = 1 ]; then  # the same images, steps and rates, taught by a depth head at the asked points
    stage "$NAME-points-s$seed" 3 --init "$RUNS/$NAME/stage2" --teacher depth-points --teacher-data \
      "$D/teacher-warm" --global-batch "$G3" --data "$D/spatial" --seed "$seed" --lr "${LR3:-2e-4}"
    encoders="$encoders --vision $RUNS/$NAME-points-s$seed/stage3/vision" points="$points,$NAME-points-s$seed"
  fi
done

probe_sets "$RUNS/$NAME-eval" $encoders
python experiments/boost_report.py "${REPORTS[@]}" --across-probe-sets --arm "baseline=$(basename "$BASE")" \
  --arm "boost=${boost#,}" --arm "control=${control#,}" \
  ${points:+--arm "depth-points=${points#,}" --efficiency boost,depth-points} --out "$OUT/results/$NAME"
echo "experiments/gpu.sh: done; the report is $OUT/results/$NAME.md"
