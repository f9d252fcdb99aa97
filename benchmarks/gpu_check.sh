#!/usr/bin/env bash
# The prepared GPU check: kernels per step (fake tensors, seconds), then both timing benchmarks on ViT-B/16
# with CUDA, their tables and CSVs into one folder.
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]      (default: $OUT if set, else ./gpu-check)
# About 5 minutes on one H100: method_overhead (batch 64, 10 steps per method) and a 30-epoch
# vtab_end_to_end (pass --epochs 100 through EXTRA_E2E for the full recipe, several times longer).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python -c "import petl_bench" 2>/dev/null || python -m pip install -q --no-deps --no-build-isolation -e "$root"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> "$out/gpu.txt"
cd "$root/benchmarks"
export PYTHONUNBUFFERED=1
python op_count.py --csv "$out/op_count.csv" 2>&1 | tee "$out/op_count.txt"
python method_overhead.py --device cuda --csv "$out/method_overhead.csv" 2>&1 | tee "$out/method_overhead.txt"
python vtab_end_to_end.py --device cuda --epochs 30 ${EXTRA_E2E:-} --csv "$out/vtab_end_to_end.csv" 2>&1 | tee "$out/vtab_end_to_end.txt"
