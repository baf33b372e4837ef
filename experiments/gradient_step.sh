#!/usr/bin/env bash
# Where would stage 3 take the encoder if each step saw unlimited data? docs/log's gradient-step entries' tables,
# end to end on 2 CPU cores (~25 min per conversation set, ~30 min of probes):
#
#   NAME=p1 DATA=b15 POINTS=1 MORE_CAPTIONS=3200 bash experiments/boost.sh    # first: runs/p1/stage2
#   bash experiments/gradient_step.sh                                         # every Attn+ tensor moves
#   ONLY='[qk]_proj' TAG=qk bash experiments/gradient_step.sh                 # only Attn+'s queries and keys move
#   PROBE_SEEDS="201 202 203 204" bash experiments/gradient_step.sh            # four probe sets (default three)
#
# 1. Three independent sets of N fresh spatial conversations (seeds 303-305, images disjoint from every stage's).
# 2. Per set, tools/gradient_step.py at the start of stage 3 (INIT): the mean gradient with the own image (boost),
#    with another sample's image (control) and their difference (image), and an encoder one step of REL along each.
#    Three random directions of the same size are the null. The mean gradients are computed once per set and reused.
# 3. One eval.py call per probe set (240 test views each); boost_report.py: mean ± sd over the three conversation
#    sets, paired bootstrap intervals over test images, and with several probe sets each difference pooled over them
#    (a depth difference moves ~3x more between probe sets than between conversation sets).
source "$(dirname "$0")/usage.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/probe_sets.sh

INIT=${INIT:-runs/p1/stage2}  # the stage-2 run whose stage 3 the step starts
D=data/${DATA:-b15}            # where the conversation sets are written
N=${N:-256}                    # conversations per set (the mean gradient is over them)
REL=${REL:-0.02}               # each Attn+ tensor moves by this fraction of its norm
ONLY=${ONLY:-}                 # a regular expression over Attn+ tensor names; empty: all of them
TAG=${TAG:-}                   # names this variant's encoders, runs and results
PROBE_SEEDS=${PROBE_SEEDS:-"201 202 203"}  # probe sets (probe_sets.sh: data/probes-1920-seedk, made if missing)
T=${TAG:+-$TAG}
OUT=runs/gs$T                  # one name per encoder for eval.py: <direction>-s<k>

mkdir -p "$OUT"
k=0
for seed in 303 304 305; do
  k=$((k + 1))
  python data.py spatial --n "$N" --out "$D/spatial-grad$seed" --seed "$seed" --size 224 --workers 2 > /dev/null
  common=(--init "$INIT" --data "$D/spatial-grad$seed" --rel "$REL" --preset small --point-tokens
          --out "runs/gradstep-$seed" --only "$ONLY" --tag "$TAG")
  if [ ! -f "runs/gradstep-$seed/mean.safetensors" ]; then
    python tools/gradient_step.py "${common[@]}" --n "$N" --directions boost,control,image \
      2>&1 | tee "runs/gradstep-$seed.log"
  else
    python tools/gradient_step.py "${common[@]}" --again --directions boost,control,image > /dev/null
  fi
  python tools/gradient_step.py "${common[@]}" --again --directions random --seed $((k - 1)) > /dev/null
  for w in boost control image random; do ln -sfn "../gradstep-$seed/$w$T-$REL" "$OUT/$w-s$k"; done
done

encoders="--vision weights/dinov2-s14"
for w in boost control image random; do for k in 1 2 3; do encoders="$encoders --vision $OUT/$w-s$k"; done; done
probe_sets "runs/gs$T-eval" $encoders
arm() { echo "$1=$1-s1,$1-s2,$1-s3"; }
python experiments/boost_report.py "${REPORTS[@]}" --across-probe-sets --arm baseline=dinov2-s14 --arm "$(arm image)" \
  --arm "$(arm boost)" --arm "$(arm random)" --arm "$(arm control)" --out "results/gradient-step/gradient-step$T"
