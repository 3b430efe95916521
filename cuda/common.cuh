// Shared device helpers of the peftscale kernels: loads of f32 / f16 / bf16 as f32, and the
// (max, sum of exp) pairs that give a row's log-sum-exp in one pass.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

namespace peftscale {

__device__ __forceinline__ float load_f32(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load_f32(const __half* p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }

__device__ __forceinline__ void store_f32(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f32(__half* p, size_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// Running max `m` and sum of exp(x - m) over the values seen: log-sum-exp = m + log(s).
struct Online {
    float m;
    float s;
};

__device__ __forceinline__ Online online_empty() { return {-CUDART_INF_F, 0.0f}; }

__device__ __forceinline__ void online_add(Online& o, float x) {
    if (x > o.m) {
        o.s = o.s * expf(o.m - x) + 1.0f;
        o.m = x;
    } else if (x > -CUDART_INF_F) {
        o.s += expf(x - o.m);
    }
}

__device__ __forceinline__ Online online_merge(Online a, Online b) {
    if (b.m > a.m) {
        Online t = a;
        a = b;
        b = t;
    }
    if (b.m > -CUDART_INF_F) a.s += b.s * expf(b.m - a.m);
    return a;
}

__device__ __forceinline__ Online warp_merge(Online o) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        Online other = {__shfl_xor_sync(0xffffffffu, o.m, offset), __shfl_xor_sync(0xffffffffu, o.s, offset)};
        o = online_merge(o, other);
    }
    return o;
}

// Merges every thread's pair; every thread gets the block's. `scratch` holds one per warp.
__device__ __forceinline__ Online block_merge(Online o, Online* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    o = warp_merge(o);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = o;
    __syncthreads();
    o = lane < warps ? scratch[lane] : online_empty();
    return warp_merge(o);
}

}  // namespace peftscale
