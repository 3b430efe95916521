#!/usr/bin/env bash
# Builds the core crate and the Python extension with the `cuda` feature on a machine with no GPU
# and no system CUDA toolkit: CUDA 13.0's compiler and libraries from PyPI, unversioned links for
# the linker, and a link-only libcuda stub (the driver's library comes with the GPU). Output: an
# abi3 wheel in dist/cuda/. Takes ~10 minutes on two cores; separate target folder build/cuda-target.
# At run time the wheel needs libcuda.so.1 (the driver), libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10 and libnvrtc.so.13 (torch cu130's nvidia wheels carry them).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
toolkit=build/cuda-toolkit-full
if [ ! -x "$toolkit/nvidia/cu13/bin/nvcc" ]; then
    mkdir -p build
    python -m pip install -q --disable-pip-version-check --target "$toolkit" \
        "cuda-toolkit[nvcc,nvvm,crt,cudart,cccl,cublas,curand,nvrtc]==13.0.2" >build/cuda-toolkit-full.log 2>&1 \
        || { cat build/cuda-toolkit-full.log >&2; exit 1; }
fi
cu=$root/$toolkit/nvidia/cu13
links=$root/build/cuda-link
mkdir -p "$links"
for lib in cublas cublasLt curand nvrtc cudart; do
    ln -sf "$(ls "$cu"/lib/lib$lib.so.* | head -1)" "$links/lib$lib.so"
done
cudarc=$(cargo metadata --format-version 1 --features peftscale-core/cuda \
    | python -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
python scripts/cuda_stub.py "$cudarc" >"$links/libcuda_stub.c"
# The driver's library is libcuda.so.1 on GPU machines: the stub carries that soname.
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/libcuda_stub.c"
export PATH="$cu/bin:$PATH" CUDA_HOME="$cu" CUDA_PATH="$cu" CUDA_ROOT="$cu"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
export LIBRARY_PATH="$links:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="-L native=$links -L native=$cu/lib"
export CARGO_TARGET_DIR=$root/build/cuda-target
cargo build -p peftscale-core --release --features cuda
cargo clean -p peftscale-python --release  # relink the extension against the current stub
# The rpath finds torch cu130's CUDA libraries beside an installed peftscale (site-packages/nvidia/cu13).
maturin build --release --features peftscale-core/cuda --auditwheel skip -o dist/cuda \
    -- -C 'link-arg=-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib'
ls -la dist/cuda
