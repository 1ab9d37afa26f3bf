#!/usr/bin/env bash
# The checks that need a CUDA GPU, prepared as one short job for a session lent one (not yet run on a GPU; its
# steps were run on a CPU in a bare venv holding only packages the GPU image has, plus the carried wheels).
#
#   bash benchmarks/gpu_checks.sh prepare   # here, where pip reaches PyPI: the wheels the GPU image lacks, into
#                                           # .whl/ (git-ignored): pydantic and its parts, for its Python 3.12
#   bash benchmarks/gpu_checks.sh run [STEP,...]   # there (the device tool's `run`, carrying .whl); default: all
#
# One device command may run 10 minutes: all four steps fit when they run as expected; to be safe, run
# `run tests,doge` and `run engine,frontier` as two commands while the machine is warm.
# The GPU image has torch, safetensors, scipy, transformers and pytest; it lacks pydantic, Prefect and MLflow, so
# the library and its CLI run there from this checkout (on PYTHONPATH). Each step has its own time limit and
# writes its log to $OUT (or ./gpu-out); a failed step does not stop the others:
#   tests     every CUDA test: each merge method on the GPU gives the CPU's result (tests/test_cuda_methods.py),
#             the streaming engine's GPU path, the batched CG on the device
#   engine    benchmarks/engine_speed.py --only llama --device cuda (1.1 B bf16 x 4, generated there): Mergeflow's
#             GPU throughput for TA, TIES and DARE, and the 7B x 8 projection
#   doge      benchmarks/doge_speed.py --device cuda: DOGE TA on the GPU beside the reference implementation
#   frontier  `mergeflow merge --device cuda` for TSV-M, Iso-C, Iso-CTS and WUDI (400 steps) on doge's inputs
set -u
mode=${1:-}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "$mode" = prepare ]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0
fi
if [ "$mode" != run ]; then
  echo "usage: bash benchmarks/gpu_checks.sh prepare | run [tests,engine,doge,frontier]" >&2
  exit 2
fi

out=${OUT:-$root/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c 'import pydantic' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "the wheels in .whl/ did not install (run 'prepare' here, carry .whl)" >&2; exit 1; }
fi
export PYTHONPATH=/tmp/site:$root
python=$(python3 -c 'import sys; print(sys.executable)')
cat >"$(dirname "$python")/mergeflow" <<EOF || exit 1
#!$python
import sys
from mergeflow_app.cli import main
sys.exit(main())
EOF
chmod +x "$(dirname "$python")/mergeflow"  # the CLI beside python3, where the benchmarks look for it
nvidia-smi -L | tee "$out/device.log"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$out/device.log"

steps=",${2:-tests,engine,doge,frontier},"
status=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ $steps == *",$name,"* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  status+=("$name: exit $rc, $((SECONDS - start)) s")
  echo "== $name: exit $rc, $((SECONDS - start)) s"
  tail -n 25 "$out/$name.log"
}

step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_methods.py \
  tests/test_engine_streaming.py::test_cuda_merge_equals_the_cpu_merge tests/test_cg.py::test_runs_on_the_tensors_device
step engine 240 python3 benchmarks/engine_speed.py --only llama --tools mergeflow --device cuda
step doge 180 python3 benchmarks/doge_speed.py --device cuda
frontier() {  # on doge_speed.py's inputs (generated there by the doge step, else here first)
  local w=benchmarks/out/doge_speed experts=() m
  [ -f "$w/expert_7.safetensors" ] || python3 benchmarks/doge_speed.py --steps 0 --skip-reference || return 1
  for i in 0 1 2 3 4 5 6 7; do experts+=(--expert "$w/expert_$i.safetensors"); done
  for m in tsv iso_c iso_cts wudi; do
    TIMEFORMAT="$m on cuda: %R s wall (the whole command)"
    time mergeflow merge --method "$m" --base "$w/base.safetensors" "${experts[@]}" --out "/tmp/frontier-$m" \
      --overwrite --device cuda || return 1
  done
}
export -f frontier
step frontier 150 bash -c frontier

printf '%s\n' "${status[@]}" | tee "$out/summary.log"
