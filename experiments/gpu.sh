#!/usr/bin/env bash
# The one-GPU recipe (docs/gpu.md): from a fresh machine with one CUDA GPU to a boosted, probed DINOv2-S/14.
#   1. data: N1 captions (stage 1), N2 grounding samples plus instruct and multiview QA (stage 2), N3 spatial
#      conversations (stage 3), each kind from its own seed, so that stage 3's images are new to the VLM
#   2. stages 1 and 2 on DINOv2-S/14 + SmolLM2-135M-Instruct (weights/, made by tools/offline_weights.py)
#   3. stage 3 per seed of SEEDS: the boost, and its control (--shuffle-images: each conversation with another
#      sample's image; same data, steps and rates)
#   4. the frozen-encoder probes of the baseline and every stage-3 encoder on each probe set of PROBE_SEEDS
#   5. the report: experiments/boost_report.py --across-probe-sets -> OUT/results/NAME.md and .json
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
  G1=4 G2=4 G3=4 BASE=$OUT/runs/$NAME/base/vision
  PROBE_ROOT=$OUT/data/probes-dry PROBE_IMAGES=16 PROBE_ARGS="--image-size 32 --crop-size 32 --quick"
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
             'experiments/gpu.sh: no CUDA GPU visible to torch (docs/gpu.md: installing a CUDA torch); --dry runs on CPU')"
  SEEDS=${SEEDS:-"1 2 3"} PROBE_SEEDS=${PROBE_SEEDS:-"0 1 2"}
  N1=${N1:-50000} N2=${N2:-10000} N2QA=${N2QA:-3000} N3=${N3:-10000} BATCH=${BATCH:-8} WORKERS=${WORKERS:-8}
  SIZE=224 MODEL="--preset small" G1=256 G2=64 G3=32 BASE=weights/dinov2-s14
  PROBE_ROOT=$OUT/data/probes-1920
  python tools/offline_weights.py
fi
export PROBE_SEEDS PROBE_ROOT PROBE_IMAGES PROBE_ARGS
D=$OUT/data/$NAME
RUNS=$OUT/runs
COMMON="$MODEL --runs-dir $RUNS --data-root $OUT/data --batch-size $BATCH --workers $WORKERS --save-every 500
        --no-probe $TRAIN_ARGS"

gen() {  # gen KIND N DIR SEED: a dataset, unless it is there already
  [ -f "$D/$3/data.jsonl" ] || python data.py "$1" --n "$2" --out "$D/$3" --seed "$4" --size "$SIZE" \
    --workers "$WORKERS" > /dev/null
}
gen captions "$N1" captions 101
gen grounding "$N2" grounding 203
gen instruct "$N2QA" instruct 202
gen multiview "$N2QA" multiview 204
gen spatial "$N3" spatial 301

stage() {  # stage NAME K ARGS...: train unless that stage already finished; an interrupted one resumes
  local name=$1 k=$2; shift 2
  if [ ! -f "$RUNS/$name/stage$k/config.json" ]; then
    local resume=$([ -d "$RUNS/$name/stage$k" ] && echo --resume || true)
    python train.py $COMMON --name "$name" --stage "$k" $resume "$@" 2>&1 | tee -a "$RUNS/$name-stage$k.log"
  fi
}
mkdir -p "$RUNS" "$OUT/results"
stage "$NAME" 1 --global-batch "$G1" --data "$D/captions"
stage "$NAME" 2 --global-batch "$G2" --data "$D/grounding,$D/instruct,$D/multiview" --lr "${LR2:-1e-4}"
encoders="--vision $BASE" boost="" control=""
for seed in $SEEDS; do
  for arm in boost control; do
    extra=$([ "$arm" = control ] && echo "--shuffle-images" || true)
    stage "$NAME-$arm-s$seed" 3 --init "$RUNS/$NAME/stage2" --global-batch "$G3" --data "$D/spatial" \
      --seed "$seed" --lr "${LR3:-2e-4}" $extra
    encoders="$encoders --vision $RUNS/$NAME-$arm-s$seed/stage3/vision"
  done
  boost="$boost,$NAME-boost-s$seed" control="$control,$NAME-control-s$seed"
done

probe_sets "$RUNS/$NAME-eval" $encoders
python experiments/boost_report.py "${REPORTS[@]}" --across-probe-sets --arm "baseline=$(basename "$BASE")" \
  --arm "boost=${boost#,}" --arm "control=${control#,}" --out "$OUT/results/$NAME"
echo "experiments/gpu.sh: done; the report is $OUT/results/$NAME.md"
