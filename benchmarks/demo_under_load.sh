#!/usr/bin/env bash
# `make demo` on a fresh clone while every core is busy (one spinning process per core), as on a shared laptop.
# Prints the demo's wall time, its exit status and the machine's load; exits with the demo's status.
#   bash benchmarks/demo_under_load.sh [WORKDIR]   (default: a new temporary directory; needs ~3 GB)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
cores=$(nproc)
git clone --quiet "$repo" "$work/clone"
spinners=()
cleanup() { for pid in "${spinners[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for _ in $(seq "$cores"); do
  (while :; do :; done) &
  spinners+=($!)
done
echo "demo_under_load: $cores busy processes on $cores cores; running make demo in $work/clone"
start=$(date +%s)
set +e
(cd "$work/clone" && make demo) >"$work/demo.log" 2>&1
status=$?
set -e
seconds=$(( $(date +%s) - start ))
echo "demo_under_load: make demo exited $status after $((seconds / 60)) min $((seconds % 60)) s (install included);"
echo "  load average: $(cut -d' ' -f1-3 /proc/loadavg); log: $work/demo.log"
tail -n 25 "$work/demo.log"
exit "$status"
