// Batched per-row LoRA delta (Punica's BGMV): every row gathers its own adapter slot.
//
//   shrink   u[r, j]  = sum_d x[r, d] * a[slot[r], j, d]                     (a: slots x rank x d_in)
//   expand   y[r, o] += scale[slot[r]] * sum_j u[r, j] * b[slot[r], o, j]    (b: slots x d_out x rank)
//
// Rows whose slot is negative (no adapter) are skipped: their u is not written and their y is
// left as it is. x, a, b and y are f32, f16 or bf16; u and the sums are f32. Decode passes one
// row per sequence, prefill one row per token.

#include "common.cuh"

using namespace peftscale;

namespace {

template <typename T>
__device__ void shrink(const T* __restrict__ x, const T* __restrict__ a, const int* __restrict__ slots,
                       float* __restrict__ u, int d_in, int rank) {
    const int row = blockIdx.x, slot = slots[row];
    if (slot < 0) return;
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const T* x_row = x + static_cast<size_t>(row) * d_in;
    for (int j = blockIdx.y * warps + (threadIdx.x >> 5); j < rank; j += gridDim.y * warps) {
        const T* a_row = a + (static_cast<size_t>(slot) * rank + j) * d_in;
        float acc = 0.0f;
        for (int d = lane; d < d_in; d += 32) acc += load_f32(x_row, d) * load_f32(a_row, d);
        for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (lane == 0) u[static_cast<size_t>(row) * rank + j] = acc;
    }
}

template <typename T>
__device__ void expand(const float* __restrict__ u, const T* __restrict__ b, const int* __restrict__ slots,
                       const float* __restrict__ scales, T* __restrict__ y, int d_out, int rank) {
    extern __shared__ float u_row[];
    const int row = blockIdx.x, slot = slots[row];
    if (slot < 0) return;
    for (int j = threadIdx.x; j < rank; j += blockDim.x) u_row[j] = u[static_cast<size_t>(row) * rank + j];
    __syncthreads();
    const float scale = scales[slot];
    for (int o = blockIdx.y * blockDim.x + threadIdx.x; o < d_out; o += gridDim.y * blockDim.x) {
        const T* b_row = b + (static_cast<size_t>(slot) * d_out + o) * rank;
        float acc = 0.0f;
        for (int j = 0; j < rank; ++j) acc += u_row[j] * load_f32(b_row, j);
        const size_t at = static_cast<size_t>(row) * d_out + o;
        store_f32(y, at, load_f32(y, at) + scale * acc);
    }
}

}  // namespace

// shrink launch: grid (rows, any), block (a multiple of 32); expand launch: grid (rows, any),
// block (any), dynamic shared memory rank * 4 bytes.
#define PEFTSCALE_BGMV_KERNELS(SUFFIX, T)                                                                   \
    extern "C" __global__ void peftscale_bgmv_shrink_##SUFFIX(const T* x, const T* a, const int* slots,      \
                                                              float* u, int d_in, int rank) {               \
        shrink<T>(x, a, slots, u, d_in, rank);                                                              \
    }                                                                                                       \
    extern "C" __global__ void peftscale_bgmv_expand_##SUFFIX(const float* u, const T* b, const int* slots,  \
                                                              const float* scales, T* y, int d_out,         \
                                                              int rank) {                                   \
        expand<T>(u, b, slots, scales, y, d_out, rank);                                                     \
    }

PEFTSCALE_BGMV_KERNELS(f32, float)
PEFTSCALE_BGMV_KERNELS(f16, __half)
PEFTSCALE_BGMV_KERNELS(bf16, __nv_bfloat16)
