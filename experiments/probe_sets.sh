# Sourced by boost.sh, gradient_step.sh and gpu.sh. probe_sets OUT ENCODER_ARGS...: eval.py on each probe set of
# PROBE_SEEDS (0: data/probes-240; k: data/probes-240-seedk, made if missing; 480 views, 240 of them test views), with
# per-image results, one report each at OUT (probe seed 0) or OUT-seedk; their paths end up in REPORTS for
# boost_report.py. PROBE_ROOT, PROBE_IMAGES and PROBE_ARGS (more eval.py flags) change the sets (gpu.sh --dry).
# Run on its own (bash experiments/probe_sets.sh), it prints this and starts nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then sed -n '1,/^# Run on its own/s/^# \{0,1\}//p' "$0"; exit 0; fi
probe_sets() {
  local out=$1 p suffix
  shift
  REPORTS=()
  for p in ${PROBE_SEEDS:-0}; do
    suffix=$([ "$p" = 0 ] || echo "-seed$p")
    python eval.py "$@" --probes "${PROBE_ROOT:-data/probes-240}$suffix" --probe-seed "$p" \
      --n-images "${PROBE_IMAGES:-480}" --test-every 2 --per-image --threads 2 ${PROBE_ARGS:-} --out "$out$suffix" \
      2>&1 | tee "$out$suffix.log"
    REPORTS+=("$out$suffix/report.json")
  done
}
