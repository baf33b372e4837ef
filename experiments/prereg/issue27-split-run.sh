#!/usr/bin/env bash
# How issue 27's pre-registered probing was run on a 2-core CPU (2026-12-06): the eval.py commands of
# experiments/prereg/issue27-teachers.sh and issue27-forgetting.sh, the encoders split over two one-thread workers
# (an encoder's report does not depend on which others share its eval.py call; boost_report.py merges the reports
# of one probe set). Nothing here changes the protocol. $OUT/claim-* mark the tasks taken (remove them to rerun).
#
#   bash experiments/prereg/issue27-split-run.sh worker & bash experiments/prereg/issue27-split-run.sh worker &
#   bash experiments/prereg/issue27-split-run.sh report       # when both are done
source "$(dirname "$0")/../usage.sh"
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
TAG=${TAG:-teach}
OUT=${OUT:-runs/q27}    # the split reports: $OUT/{base,points,dense}-seed$p, $OUT/forget-TUNE-seed$p
mkdir -p "$OUT"

probe() {  # probe OUT_DIR PROBE_SEED ENCODER...: one eval.py call of the protocol, skipped when its report exists
  local out=$1 p=$2; shift 2
  [ -f "$out/report.json" ] && return 0
  local enc=""; for e in "$@"; do enc="$enc --vision $e"; done
  python eval.py $enc --probes "data/probes-1920-seed$p" --probe-seed "$p" --n-images 1920 --test-every 2 \
    --object-views 480 --depth-heads 3 --per-image --threads 1 --out "$out" > "$out.log" 2>&1
}
dual() { echo runs/$TAG-depth-$1-dual-s{1,2,3}/stage3/vision; }
# The tasks in order, each NAME:PROBE_SEED:ENCODERS; a worker claims the next unclaimed one (mkdir is atomic), so
# two workers share the list whatever each task costs. Item 3 goes one encoder per call, full first (full against
# dual is its question), so that what is done when time runs out is a whole arm.
tasks() {
  for p in 201 202 203; do
    echo "base-seed$p:$p:weights/dinov2-s14 runs/enc/p1-boost-s1"
    echo "points-seed$p:$p:$(dual points)"
    echo "dense-seed$p:$p:$(dual dense)"
  done
  for tune in full lora dual-qk; do
    for k in 1 2 3; do echo "forget-$tune-seed$((200 + k)):$((200 + k)):runs/$TAG-depth-dense-$tune-s$k/stage3/vision"; done
  done
}
case "${1:-}" in
  worker)
    tasks | while IFS=: read -r name p encoders; do
      mkdir "$OUT/claim-$name" 2>/dev/null || continue
      probe "$OUT/$name" "$p" $encoders
    done ;;
  report)
    python experiments/boost_report.py $OUT/{base,points,dense}-seed{201,202,203}/report.json --across-probe-sets \
      --arm baseline=dinov2-s14 --arm llm=p1-boost-s1 \
      --arm "depth-points=$TAG-depth-points-dual-s1,$TAG-depth-points-dual-s2,$TAG-depth-points-dual-s3" \
      --arm "depth-dense=$TAG-depth-dense-dual-s1,$TAG-depth-dense-dual-s2,$TAG-depth-dense-dual-s3" \
      --control depth-dense --out results/teachers/teachers-dual-128
    reports=()
    for p in 201 202 203; do reports+=($OUT/{base,dense}-seed$p/report.json); done
    python experiments/boost_report.py "${reports[@]}" $OUT/forget-*-seed*/report.json --across-probe-sets \
      --some-seeds-per-set --arm baseline=dinov2-s14 --control dual \
      $(for t in dual full lora dual-qk; do echo --arm "$t=$TAG-depth-dense-$t-s1,$TAG-depth-dense-$t-s2,$TAG-depth-dense-$t-s3"; done) \
      --out results/teachers/teachers-forgetting-128 ;;
  *) echo "usage: $0 worker|report" >&2; exit 2 ;;
esac
