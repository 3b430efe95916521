#!/usr/bin/env bash
# The GPU half of the CUDA work, in one go on a machine with an NVIDIA GPU (sm_90 by default):
# compiles cuda/*.cu to cubins, checks the kernels against float64 references on random inputs,
# and times them against torch ops and the memory-bandwidth floor (benches/cuda_kernels.py).
#   scripts/gpu-check.sh [REPORT_DIR]        # default build/gpu-check; needs nvcc, torch, cupy
set -euo pipefail
cd "$(dirname "$0")/.."
report_dir=${1:-build/gpu-check}
arch=${CUDA_COMPUTE_CAP:-90}
mkdir -p build/cuda "$report_dir"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -1
for src in cuda/*.cu; do
    nvcc -arch="sm_${arch}" -cubin -O3 -std=c++17 -Xptxas -v -o "build/cuda/$(basename "$src" .cu).cubin" "$src" \
        2>&1 | grep -E "error|warning|spill" || true
done
PYTHONUNBUFFERED=1 python3 benches/cuda_kernels.py --cubin-dir build/cuda --out "$report_dir/cuda_kernels.md"
