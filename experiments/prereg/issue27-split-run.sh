#!/usr/bin/env bash
# How issue 27's pre-registered probing was run on a 2-core CPU (2026-12-06): the eval.py commands of
# experiments/prereg/issue27-teachers.sh and issue27-forgetting.sh, the encoders split over two one-thread workers
# (an encoder's report does not depend on which others share its eval.py call; boost_report.py merges the reports
# of one probe set). Nothing here changes the protocol.
#
#   bash experiments/prereg/issue27-split-run.sh 1 & bash experiments/prereg/issue27-split-run.sh 2 &   # then:
#   bash experiments/prereg/issue27-split-run.sh report
source "$(dirname "$0")/../usage.sh"
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
TAG=${TAG:-teach}
OUT=${OUT:-runs/q27}    # the split reports: $OUT/{base,points,dense}-seed$p
mkdir -p "$OUT"

probe() {  # probe OUT_DIR PROBE_SEED ENCODER...: one eval.py call of the protocol, skipped when its report exists
  local out=$1 p=$2; shift 2
  [ -f "$out/report.json" ] && return 0
  local enc=""; for e in "$@"; do enc="$enc --vision $e"; done
  python eval.py $enc --probes "data/probes-1920-seed$p" --probe-seed "$p" --n-images 1920 --test-every 2 \
    --object-views 480 --depth-heads 3 --per-image --threads 1 --out "$out" > "$out.log" 2>&1
}
dual() { echo runs/$TAG-depth-$1-dual-s{1,2,3}/stage3/vision; }
forget() {  # seed k of full, lora and dual-qk on probe set 200 + k (issue27-forgetting.sh)
  local k=$1 p=$((200 + $1))
  while [ ! -f "runs/$TAG-depth-dense-dual-qk-s$k/stage3/config.json" ]; do sleep 30; done
  probe "runs/$TAG-forget-seed$p" "$p" runs/$TAG-depth-dense-{full,lora,dual-qk}-s$k/stage3/vision
}
case "${1:-}" in
  1) for p in 201 202 203; do probe "$OUT/points-seed$p" "$p" $(dual points); done
     forget 1; forget 3 ;;
  2) for p in 201 202 203; do probe "$OUT/base-seed$p" "$p" weights/dinov2-s14 runs/enc/p1-boost-s1; done
     for p in 201 202 203; do probe "$OUT/dense-seed$p" "$p" $(dual dense); done
     forget 2 ;;
  report)
    python experiments/boost_report.py $OUT/{base,points,dense}-seed{201,202,203}/report.json --across-probe-sets \
      --arm baseline=dinov2-s14 --arm llm=p1-boost-s1 \
      --arm "depth-points=$TAG-depth-points-dual-s1,$TAG-depth-points-dual-s2,$TAG-depth-points-dual-s3" \
      --arm "depth-dense=$TAG-depth-dense-dual-s1,$TAG-depth-dense-dual-s2,$TAG-depth-dense-dual-s3" \
      --control depth-dense --out results/teachers/teachers-dual-128
    DUAL_REPORTS="$OUT/base-seed%p/report.json $OUT/dense-seed%p/report.json" \
      bash experiments/prereg/issue27-forgetting.sh ;;
  *) echo "usage: $0 1|2|report" >&2; exit 2 ;;
esac
