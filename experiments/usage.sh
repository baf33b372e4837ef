# Sourced first by every experiments/*.sh: `bash experiments/X.sh --help` (or -h) prints the script's header comment
# and its variables (NAME=${NAME:-default}  # meaning) and exits before anything runs.
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
  sed -n '2,/^set -e/{/^#/s/^# \{0,1\}//p}' "$0"
  echo
  echo "Variables (set in the environment, e.g. NAME=x bash $0; default after :-):"
  grep -E '^[A-Z][A-Z0-9_]*=.*\$\{[A-Z][A-Z0-9_]*:-' "$0" | sed 's/^/  /'
  exit 0
fi
