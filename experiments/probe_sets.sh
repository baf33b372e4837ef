# Sourced by boost.sh, gradient_step.sh, teachers.sh and gpu.sh. probe_sets OUT ENCODER_ARGS...: eval.py on each
# probe set of PROBE_SEEDS (0: $PROBE_ROOT; k: $PROBE_ROOT-seedk, made if missing), with per-image results, one report
# each at OUT (probe seed 0) or OUT-seedk; their paths end up in REPORTS for boost_report.py (--across-probe-sets).
# The protocol (issue 27, docs/log/2026-12-06-probe-protocol.md): 1,920 views a set (960 training, 960 test), object
# crops from the first 480, lin.1 / lin.4 averaged over 3 heads. PROBE_ROOT, PROBE_IMAGES and PROBE_ARGS (eval.py
# flags) change it (gpu.sh --dry; the earlier 480-view sets: PROBE_ROOT=data/probes-240 PROBE_IMAGES=480
# PROBE_ARGS=" ").
# Run on its own (bash experiments/probe_sets.sh), it prints this and starts nothing.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then sed -n '1,/^# Run on its own/s/^# \{0,1\}//p' "$0"; exit 0; fi
probe_sets() {
  local out=$1 p suffix
  shift
  REPORTS=()
  for p in ${PROBE_SEEDS:-0}; do
    suffix=$([ "$p" = 0 ] || echo "-seed$p")
    python eval.py "$@" --probes "${PROBE_ROOT:-data/probes-1920}$suffix" --probe-seed "$p" \
      --n-images "${PROBE_IMAGES:-1920}" --test-every 2 --per-image --threads 2 \
      ${PROBE_ARGS:---object-views 480 --depth-heads 3} --out "$out$suffix" 2>&1 | tee "$out$suffix.log"
    REPORTS+=("$out$suffix/report.json")
  done
}
