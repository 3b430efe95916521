#!/usr/bin/env bash
# Compiles every kernel in cuda/ for sm_90 (PTX, then ptxas to a cubin), and type-checks the core
# crate's `cuda` feature (candle's CUDA backend, kernels/cuda, build.rs's PTX step), so that a
# kernel or CUDA-path code that does not compile fails the test suite on machines without a GPU.
# Uses nvcc from PATH, else installs CUDA 13.0's compiler pieces from PyPI into
# build/cuda-toolkit (~300 MB, once).
# Pinned to 13.0.x: the GPU machines run driver 580, which cannot load PTX from a newer toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then
    toolkit=build/cuda-toolkit
    if [ ! -x "$toolkit/nvidia/cu13/bin/nvcc" ]; then
        # --target keeps it out of the environment; pip still reports that the environment's
        # torch wants another toolkit, which does not concern this folder.
        mkdir -p build
        python -m pip install -q --disable-pip-version-check --target "$toolkit" \
            "cuda-toolkit[nvcc,nvvm,crt,cudart,cccl]==13.0.2" >build/cuda-toolkit.log 2>&1 \
            || { cat build/cuda-toolkit.log >&2; exit 1; }
    fi
    export PATH="$PWD/$toolkit/nvidia/cu13/bin:$PATH"
fi
arch=${CUDA_COMPUTE_CAP:-90}
mkdir -p build/cuda
for src in cuda/*.cu; do
    name=build/cuda/$(basename "$src" .cu)
    nvcc -arch="sm_${arch}" -std=c++17 -O3 -ptx -o "$name.ptx" "$src"
    nvcc -arch="sm_${arch}" -std=c++17 -O3 -cubin -o "$name.cubin" "$src"
done
echo "compiled $(ls cuda/*.cu | wc -l) CUDA kernel files for sm_${arch}: build/cuda/" >&2

# Nothing links in a check, so no driver library is needed; candle's kernel build reads
# CUDAFORGE_THREADS and the toolkit root.
cu_root=$(dirname "$(dirname "$(command -v nvcc)")")
CUDA_ROOT=$cu_root CUDA_HOME=$cu_root CUDA_PATH=$cu_root CUDA_COMPUTE_CAP=$arch \
    CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2} \
    cargo clippy -p peftscale-core --all-targets --features cuda -- -D warnings
