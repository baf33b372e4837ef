# Sourced by boost.sh and gradient_step.sh. probe_sets OUT ENCODER_ARGS...: eval.py on each probe set of PROBE_SEEDS
# (0: data/probes-240; k: data/probes-240-seedk, made if missing; 480 views, 240 of them test views), with per-image
# results, one report each at OUT (probe seed 0) or OUT-seedk; their paths end up in REPORTS for boost_report.py.
# Run on its own (bash experiments/probe_sets.sh), it prints this and starts nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then sed -n '1,/^# Run on its own/s/^# \{0,1\}//p' "$0"; exit 0; fi
probe_sets() {
  local out=$1 p suffix
  shift
  REPORTS=()
  for p in ${PROBE_SEEDS:-0}; do
    suffix=$([ "$p" = 0 ] || echo "-seed$p")
    python eval.py "$@" --probes "data/probes-240$suffix" --probe-seed "$p" --n-images 480 --test-every 2 \
      --per-image --threads 2 --out "$out$suffix" 2>&1 | tee "$out$suffix.log"
    REPORTS+=("$out$suffix/report.json")
  done
}
