#!/usr/bin/env bash
# How issue 27's pre-registered probing was run on a 2-core CPU (2026-12-06): the eval.py commands of
# experiments/prereg/issue27-teachers.sh and issue27-forgetting.sh, the encoders split over two one-thread workers
# (an encoder's report does not depend on which others share its eval.py call; boost_report.py merges the reports
# of one probe set). Nothing here changes the protocol. $OUT/claim-* mark the tasks taken (remove them to rerun).
#
#   bash experiments/prereg/issue27-split-run.sh worker & bash experiments/prereg/issue27-split-run.sh worker &
#   bash experiments/prereg/issue27-split-run.sh report       # when both are done
#   WAIT=1 ... worker: wait for encoders still training (experiments/prereg/issue27-llm-1k.sh) instead of leaving
#   [POINTS_1K=1] bash experiments/prereg/issue27-split-run.sh report-llm-1k   # its tables (1: with depth-points,
#   and depth-points against depth-dense at 1,024)
source "$(dirname "$0")/../usage.sh"
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
TAG=${TAG:-teach}
OUT=${OUT:-runs/q27}    # the split reports: $OUT/<encoder>-seed$p
mkdir -p "$OUT"

probe() {  # probe OUT_DIR PROBE_SEED ENCODER...: one eval.py call of the protocol, skipped when its report exists
  local out=$1 p=$2; shift 2
  [ -f "$out/report.json" ] && return 0
  local enc=""; for e in "$@"; do enc="$enc --vision $e"; done
  python eval.py $enc --probes "data/probes-1920-seed$p" --probe-seed "$p" --n-images 1920 --test-every 2 \
    --object-views 480 --depth-heads 3 --per-image --threads 1 --out "$out" > "$out.log" 2>&1
}
# The tasks in order, one encoder each (an eval.py call with three held ~12 GiB at its peak: two at once ran this
# 24 GiB machine out of memory), each NAME PROBE_SEED ENCODER; a worker claims the next unclaimed one that no report
# in $OUT holds yet (mkdir is atomic), so two workers share the list whatever each task costs. Item 3 comes after the
# dual table, full first (full against dual is its question), so that what is done when time runs out is whole arms.
tasks() {
  for p in 201 202 203; do
    for e in weights/dinov2-s14 runs/enc/p1-boost-s1 runs/$TAG-depth-{points,dense}-dual-s{1,2,3}/stage3/vision; do
      echo "$(basename "${e%/stage3/vision}")-seed$p $p $e"
    done
  done
  for tune in full lora dual-qk; do seed_k_on_set_k "$TAG-depth-dense-$tune"; done
  # 2026-12-07, experiments/prereg/issue27-llm-1k.sh: the llm arm from c29's stage 2, then the depth teachers at 1,024
  on_every_set runs/$TAG-llm-c29-s{1,2,3} runs/teach1k-depth-dense-dual-s{1,2,3}
  seed_k_on_set_k "$TAG-llm-c29-control"
  on_every_set runs/teach1k-depth-points-dual-s{1,2,3}
}
on_every_set() {  # RUN_DIR...: each run's encoder on sets 201-203
  for e; do for p in 201 202 203; do echo "$(basename "$e")-seed$p $p $e/stage3/vision"; done; done
}
seed_k_on_set_k() {  # RUN: seeds 1-3 of runs/RUN-sK, seed k on set 200 + k
  for k in 1 2 3; do echo "$1-s$k-seed$((200 + k)) $((200 + k)) runs/$1-s$k/stage3/vision"; done
}
case "${1:-}" in
  worker)   # passes over the list until nothing is left to claim (WAIT=1: nor any encoder left to wait for)
    while :; do
      claimed=0 missing=0
      while read -r name p encoder; do
        grep -qs "\"path\": \"$encoder\"" "$OUT"/*-seed$p/report.json && continue   # probed already
        [ -f "$encoder/config.json" ] || { missing=1; continue; }                      # not trained (yet)
        mkdir "$OUT/claim-$name" 2>/dev/null || continue
        probe "$OUT/$name" "$p" "$encoder"; claimed=1
      done < <(tasks)
      [ "$claimed" = 1 ] && continue
      [ "$missing" = 1 ] && [ "${WAIT:-0}" = 1 ] && { sleep 60; continue; }
      break
    done ;;
  report)   # every report of $OUT: the dual table, then item 3 (seed k on set 200 + k)
    python experiments/boost_report.py $OUT/*-seed20[123]/report.json --across-probe-sets \
      --arm baseline=dinov2-s14 --arm llm=p1-boost-s1 \
      --arm "depth-points=$TAG-depth-points-dual-s1,$TAG-depth-points-dual-s2,$TAG-depth-points-dual-s3" \
      --arm "depth-dense=$TAG-depth-dense-dual-s1,$TAG-depth-dense-dual-s2,$TAG-depth-dense-dual-s3" \
      --control depth-dense --out results/teachers/teachers-dual-128
    python experiments/boost_report.py $OUT/*-seed20[123]/report.json --across-probe-sets --some-seeds-per-set \
      --arm baseline=dinov2-s14 --control dual \
      $(for t in dual full lora dual-qk; do echo --arm "$t=$TAG-depth-dense-$t-s1,$TAG-depth-dense-$t-s2,$TAG-depth-dense-$t-s3"; done) \
      --out results/teachers/teachers-forgetting-128 ;;
  report-llm-1k)   # experiments/prereg/issue27-llm-1k.sh: the table at 128 with the llm arm's 3 seeds, then 1,024
    dense="$TAG-depth-dense-dual-s1,$TAG-depth-dense-dual-s2,$TAG-depth-dense-dual-s3"
    llm="$TAG-llm-c29-s1,$TAG-llm-c29-s2,$TAG-llm-c29-s3"
    dense1k=teach1k-depth-dense-dual-s1,teach1k-depth-dense-dual-s2,teach1k-depth-dense-dual-s3
    points1k=teach1k-depth-points-dual-s1,teach1k-depth-points-dual-s2,teach1k-depth-points-dual-s3
    python experiments/boost_report.py $OUT/*-seed20[123]/report.json --across-probe-sets \
      --arm baseline=dinov2-s14 --arm "llm=$llm" \
      --arm "depth-points=$TAG-depth-points-dual-s1,$TAG-depth-points-dual-s2,$TAG-depth-points-dual-s3" \
      --arm "depth-dense=$dense" --control depth-dense --out results/teachers/teachers-table-128
    python experiments/boost_report.py $OUT/*-seed20[123]/report.json --across-probe-sets \
      --arm baseline=dinov2-s14 --arm "depth-dense-128=$dense" --arm "depth-dense-1024=$dense1k" \
      $([ "${POINTS_1K:-0}" = 1 ] && echo --arm "depth-points-1024=$points1k") \
      --control depth-dense-128 --out results/teachers/teachers-dual-1024
    [ "${POINTS_1K:-0}" = 1 ] && python experiments/boost_report.py $OUT/*-seed20[123]/report.json \
      --across-probe-sets --arm baseline=dinov2-s14 --arm "depth-dense-1024=$dense1k" \
      --arm "depth-points-1024=$points1k" --control depth-dense-1024 \
      --out results/teachers/teachers-points-vs-dense-1024
    python experiments/boost_report.py $OUT/*-seed20[123]/report.json --across-probe-sets --some-seeds-per-set \
      --arm baseline=dinov2-s14 --arm "llm=$llm" \
      --arm "control=$TAG-llm-c29-control-s1,$TAG-llm-c29-control-s2,$TAG-llm-c29-control-s3" --control control \
      --out results/teachers/teachers-llm-control-128 ;;
  *) echo "usage: $0 worker|report|report-llm-1k" >&2; exit 2 ;;
esac
