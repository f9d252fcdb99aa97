#!/usr/bin/env bash
# The prepared GPU check (one GPU, under 8 minutes on an H200 by its section limits): kernels per step
# (fake tensors), every method's step time against the floor eager and compiled (floor img/s and % of the
# bf16 peak), one VTAB-1K-sized task end to end against the naive loop (30 epochs), and a 19-task
# VTAB-1K-shaped sweep of convpass (synthetic 1,000-image tasks, 10 epochs, extrapolated to 100).
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]      (default: $OUT if set, else ./gpu-check)
# Each section has a time limit (timeout) so the whole stays within budget; what a section printed before
# its limit is kept. On a bare machine with torch, timm and peft the project installs with --no-deps.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python -c "import petl_bench" 2>/dev/null || python -m pip install -q --no-deps --no-build-isolation -e "$root"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> "$out/gpu.txt"
cd "$root/benchmarks"
export PYTHONUNBUFFERED=1
section() {  # section NAME SECONDS COMMAND...: run with a limit, output to the terminal and NAME.txt
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  echo "[$name: $((SECONDS - start)) s of its $limit s limit]" | tee -a "$out/$name.txt"
}
section op_count 45 python op_count.py --csv "$out/op_count.csv"
section method_overhead_eager 75 python method_overhead.py --device cuda --execution eager --steps 8 --warmup 2 \
  --csv "$out/method_overhead_eager.csv"
section method_overhead_compiled 120 python method_overhead.py --device cuda --execution compiled --steps 8 \
  --warmup 2 --budget-seconds 100 --csv "$out/method_overhead_compiled.csv"
section vtab_end_to_end 100 python vtab_end_to_end.py --device cuda --epochs 30 --csv "$out/vtab_end_to_end.csv"
section vtab_sweep 120 python vtab_sweep.py --device cuda --epochs 10 --csv "$out/vtab_sweep.csv"
