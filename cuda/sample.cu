// Sampling filters and the draw, one row per block: temperature, top-k, top-p, min-p, then the
// token a uniform number u in [0, 1) picks. Only token ids leave the GPU.
//
// The same distribution as the CPU's `logits::draw` (rust/core/src/logits/mod.rs), walked in the
// same order: tokens ranked by x / temperature, highest first, the smaller id first on ties;
// weights w = exp(key - max), so the best token weighs 1.
//   - top-k keeps the first k ranks (0 keeps all); `total` is their weight.
//   - top-p keeps ranks up to and including the first whose cumulative weight reaches
//     top_p * total; min-p keeps the ranks whose weight is at least min_p (a prefix, since
//     weights fall along the ranks); at least the best token stays.
//   - the draw takes the first kept rank whose cumulative weight exceeds u * (kept weight).
// No sort: each "first rank whose cumulative weight passes a target" is a radix select over a
// 64-bit rank key (the order-preserving bits of the scaled logit, then the token id), eight
// passes of 8 bits with a 256-bin histogram of weights (or counts) in shared memory. Sums are
// in f64, as the CPU's; they add in another order, so a draw within rounding of a boundary
// (about 1e-7 of the mass) may fall on the neighbouring token.

#include <stdint.h>

#include "common.cuh"

using namespace peftscale;

namespace {

constexpr int kBins = 256;
constexpr uint64_t kAll = ~0ull;

// Rank key: ascending key = descending scaled logit, then ascending token id.
__device__ __forceinline__ uint64_t rank_key(float key, int index) {
    uint32_t bits = __float_as_uint(key);
    // Order-preserving map of floats to unsigned ints, then reversed (higher logit first).
    bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    return (static_cast<uint64_t>(~bits) << 32) | static_cast<uint32_t>(index);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -CUDART_INF_F;
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ double block_sum(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename T>
struct RowView {
    const T* x;
    int vocab;
    float temperature;
    float max_key;
    float min_p;

    __device__ __forceinline__ float key(int i) const { return load_f32(x, i) / temperature; }
    __device__ __forceinline__ float weight(float key) const { return expf(key - max_key); }
    // Taking part: ranked at or before `limit`, and (min-p) weighing at least min_p.
    __device__ __forceinline__ bool kept(uint64_t rank, float w, uint64_t limit) const {
        return rank <= limit && w >= min_p;
    }
};

// The rank key of the first element (in rank order, among the kept ones up to `limit`) whose
// cumulative weight (counts when `by_count`) passes `target`: reaches it when `reach`, exceeds
// it otherwise. When rounding leaves the target above the total, the last kept element.
template <typename T>
__device__ uint64_t select_rank(const RowView<T>& row, uint64_t limit, bool by_count, double target, bool reach,
                                double* hist, uint64_t* chosen) {
    uint64_t prefix = 0, mask = 0;
    bool take_last = false;  // thread 0's: once set, every later pass takes its last bin
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < kBins; b += blockDim.x) hist[b] = 0.0;
        __syncthreads();
        for (int i = threadIdx.x; i < row.vocab; i += blockDim.x) {
            const float key = row.key(i);
            const uint64_t rank = rank_key(key, i);
            if ((rank & mask) != prefix) continue;
            const float w = row.weight(key);
            if (!row.kept(rank, w, limit)) continue;
            atomicAdd(&hist[(rank >> shift) & 0xff], by_count ? 1.0 : static_cast<double>(w));
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double before = 0.0, before_last = 0.0;
            int pick = -1, last = 0;
            for (int b = 0; b < kBins; ++b) {
                if (hist[b] <= 0.0) continue;
                const double after = before + hist[b];
                if (!take_last && (reach ? after >= target : after > target)) {
                    pick = b;
                    break;
                }
                before_last = before;
                last = b;
                before = after;
            }
            if (pick < 0) {  // rounding left the target above the total: the last element
                take_last = true;
                pick = last;
                before = before_last;
            }
            target -= before;
            *chosen = static_cast<uint64_t>(pick);
        }
        __syncthreads();
        prefix |= *chosen << shift;
        mask |= 0xffull << shift;
        __syncthreads();  // *chosen is rewritten by the next pass
    }
    return prefix;
}

template <typename T>
__device__ void sample_row(const T* __restrict__ logits, int vocab, float temperature, int top_k, float top_p,
                           float min_p, const float* __restrict__ uniforms, int* __restrict__ out_token) {
    __shared__ double hist[kBins];
    __shared__ float scratch_f[32];
    __shared__ double scratch_d[32];
    __shared__ uint64_t chosen;
    __shared__ double shared_target;
    const int row_index = blockIdx.x;
    RowView<T> row{logits + static_cast<size_t>(row_index) * vocab, vocab, temperature, 0.0f, 0.0f};

    float m = -CUDART_INF_F;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, row.key(i));
    row.max_key = block_max(m, scratch_f);

    // top-k: the k-th rank bounds the candidates.
    uint64_t limit = kAll;
    if (top_k > 0 && top_k < vocab) limit = select_rank(row, kAll, true, top_k - 1.0, false, hist, &chosen);

    double total = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float key = row.key(i);
        if (rank_key(key, i) <= limit) total += row.weight(key);
    }
    total = block_sum(total, scratch_d);

    // top-p: up to and including the first rank whose cumulative weight reaches top_p * total.
    if (top_p < 1.0f) limit = select_rank(row, limit, false, static_cast<double>(top_p) * total, true, hist, &chosen);
    // min-p from here on: RowView::kept drops weights below it (never the best token's, 1).
    row.min_p = min_p;

    double kept = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float key = row.key(i);
        const float w = row.weight(key);
        if (row.kept(rank_key(key, i), w, limit)) kept += w;
    }
    kept = block_sum(kept, scratch_d);
    if (threadIdx.x == 0) shared_target = static_cast<double>(uniforms[row_index]) * kept;
    __syncthreads();
    const uint64_t pick = select_rank(row, limit, false, shared_target, false, hist, &chosen);
    if (threadIdx.x == 0) out_token[row_index] = static_cast<int>(pick & 0xffffffffu);
}

}  // namespace

// Launch: grid (rows), block 1024 (any multiple of 32 up to 1024). temperature > 0, top_k >= 0
// (0 keeps all), 0 < top_p <= 1, 0 <= min_p <= 1, one uniform in [0, 1) per row. Rows
// contiguous (`vocab` apart), finite.
#define PEFTSCALE_SAMPLE_KERNEL(SUFFIX, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(1024)                                                       \
        peftscale_sample_##SUFFIX(const T* logits, int vocab, float temperature, int top_k, float top_p,      \
                                  float min_p, const float* uniforms, int* out_token) {                        \
        sample_row<T>(logits, vocab, temperature, top_k, top_p, min_p, uniforms, out_token);                  \
    }

PEFTSCALE_SAMPLE_KERNEL(f32, float)
PEFTSCALE_SAMPLE_KERNEL(f16, __half)
PEFTSCALE_SAMPLE_KERNEL(bf16, __nv_bfloat16)
