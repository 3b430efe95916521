// Fused Contrastive LoRA Decoding (CoLD) scoring over a batch of (expert, base) logit rows.
//
// For each pair, with s_e = log_softmax(expert) and s_b = log_softmax(base):
//   plausible set  V = { i : s_e[i] >= log(alpha) + max(s_e) }
//   score          (1 + beta) * s_e[i] - beta * s_b[i] / base_temperature   on V, -inf elsewhere
// and the k best (index, score) pairs, best first, ties to the lower index (k = 1 is greedy's
// argmax), plus both rows' log-sum-exp. The CPU scorer (rust/core/src/logits/cold.rs) scores
// raw logits, which shifts every score of a row by the same constant: same order, same picks.
//
// Each row pair is cut into `splits` chunks, one block each, so that a few rows still keep the
// whole GPU reading. A block reads its chunk once: the running max and sum of exp of both rows
// and, per thread, the few entries within log(alpha) of its running expert max (a peaked expert
// row has a handful). It leaves its statistics and those entries in a workspace; the last block
// of the pair to finish merges them, scores the entries above the row's cut and picks the best k.
// Only when a chunk had more such entries than the workspace holds (a flat expert row) does that
// last block read the whole row a second time.

#include <climits>

#include "common.cuh"

using namespace peftscale;

namespace {

constexpr int kMaxK = 16;  // the most candidates a launch may ask for
constexpr int kHeld = 8;   // plausible entries a thread holds while it reads its chunk

struct Pick {
    float score;
    int index;
};

__device__ __forceinline__ bool better(Pick a, Pick b) {
    return a.score > b.score || (a.score == b.score && a.index < b.index);
}

__device__ __forceinline__ Pick no_pick() { return {-CUDART_INF_F, INT_MAX}; }

__device__ __forceinline__ Pick block_best(Pick p, Pick* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) {
        Pick other = {__shfl_xor_sync(0xffffffffu, p.score, offset), __shfl_xor_sync(0xffffffffu, p.index, offset)};
        if (better(other, p)) p = other;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = p;
    __syncthreads();
    p = lane < warps ? scratch[lane] : no_pick();
    for (int offset = 16; offset > 0; offset >>= 1) {
        Pick other = {__shfl_xor_sync(0xffffffffu, p.score, offset), __shfl_xor_sync(0xffffffffu, p.index, offset)};
        if (better(other, p)) p = other;
    }
    return p;
}

// A thread's best `k` (score, index), best first.
struct TopK {
    float score[kMaxK];
    int index[kMaxK];
    int len;
    int k;

    __device__ __forceinline__ void offer(float s, int i) {
        const Pick p = {s, i};
        if (len == k && !better(p, {score[len - 1], index[len - 1]})) return;
        int j = len < k ? len++ : k - 1;
        while (j > 0 && better(p, {score[j - 1], index[j - 1]})) {
            score[j] = score[j - 1];
            index[j] = index[j - 1];
            --j;
        }
        score[j] = s;
        index[j] = i;
    }
};

constexpr int kUnroll = 4;        // entries a thread loads before it uses them
constexpr int kChunkHeld = 64;    // plausible entries a chunk may leave in the workspace

// Workspace of one launch: `splits` chunks per pair. Floats: per chunk 4 statistics (expert max,
// sum, base max, sum), then per chunk kChunkHeld (expert, base) entries. Ints: one arrival
// counter per pair (zero before the first launch; the last block resets it), then per chunk the
// count of entries (-1: more than fit), then per chunk kChunkHeld vocabulary indices.
struct Workspace {
    float* stats;
    float* held;
    unsigned* arrivals;
    int* count;
    int* index;

    __device__ Workspace(float* f, int* n, int pairs, int splits) {
        const size_t chunks = static_cast<size_t>(pairs) * splits;
        stats = f;
        held = f + 4 * chunks;
        arrivals = reinterpret_cast<unsigned*>(n);
        count = n + pairs;
        index = n + pairs + chunks;
    }
};

template <typename T>
__device__ void cold_score_rows(const T* __restrict__ expert, const T* __restrict__ base, int vocab, int k,
                                float log_alpha, float beta, float inv_base_temperature, int* __restrict__ out_index,
                                float* __restrict__ out_score, float* __restrict__ out_lse, float* workspace_f,
                                int* workspace_i) {
    __shared__ Online online_scratch[32];
    __shared__ Pick pick_scratch[32];
    __shared__ int chunk_count;
    __shared__ bool last;
    const int pair = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
    const Workspace ws(workspace_f, workspace_i, gridDim.y, splits);
    const size_t chunk_id = static_cast<size_t>(pair) * splits + split;
    const T* e_row = expert + static_cast<size_t>(pair) * vocab;
    const T* b_row = base + static_cast<size_t>(pair) * vocab;
    const int chunk = (vocab + splits - 1) / splits;
    const int begin = split * chunk, end = min(vocab, begin + chunk);

    if (threadIdx.x == 0) chunk_count = 0;
    Online oe = online_empty(), ob = online_empty();
    float held_e[kHeld], held_b[kHeld];
    int held_i[kHeld];
    int held = 0;
    bool overflow = false;
    for (int first = begin + threadIdx.x; first < end; first += kUnroll * blockDim.x) {
        float ev[kUnroll], bv[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = first + u * blockDim.x;
            ev[u] = i < end ? load_f32(e_row, i) : -CUDART_INF_F;
            bv[u] = i < end ? load_f32(b_row, i) : -CUDART_INF_F;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = first + u * blockDim.x;
            if (i >= end) continue;
            const float e = ev[u], b = bv[u];
            const bool new_max = e > oe.m;
            online_add(oe, e);
            online_add(ob, b);
            const float cut = oe.m + log_alpha;
            if (e < cut) continue;
            if (new_max) {  // entries the new max makes implausible can go
                int kept = 0;
                for (int j = 0; j < held; ++j) {
                    if (held_e[j] >= cut) {
                        held_e[kept] = held_e[j];
                        held_b[kept] = held_b[j];
                        held_i[kept] = held_i[j];
                        ++kept;
                    }
                }
                held = kept;
            }
            if (held < kHeld) {
                held_e[held] = e;
                held_b[held] = b;
                held_i[held] = i;
                ++held;
            } else {
                overflow = true;
            }
        }
    }
    const Online e_chunk = block_merge(oe, online_scratch);
    const Online b_chunk = block_merge(ob, online_scratch);
    // An entry within log(alpha) of the row's max is within it of the chunk's max, and was
    // within it of its thread's running max when read: it is held unless something overflowed.
    const float chunk_cut = e_chunk.m + log_alpha;
    for (int j = 0; j < held; ++j) {
        if (held_e[j] < chunk_cut) continue;
        const int slot = atomicAdd(&chunk_count, 1);
        if (slot < kChunkHeld) {
            ws.held[(chunk_id * kChunkHeld + slot) * 2] = held_e[j];
            ws.held[(chunk_id * kChunkHeld + slot) * 2 + 1] = held_b[j];
            ws.index[chunk_id * kChunkHeld + slot] = held_i[j];
        }
    }
    overflow = __syncthreads_or(overflow);
    if (threadIdx.x == 0) {
        ws.count[chunk_id] = overflow || chunk_count > kChunkHeld ? -1 : chunk_count;
        ws.stats[chunk_id * 4] = e_chunk.m;
        ws.stats[chunk_id * 4 + 1] = e_chunk.s;
        ws.stats[chunk_id * 4 + 2] = b_chunk.m;
        ws.stats[chunk_id * 4 + 3] = b_chunk.s;
        __threadfence();
        last = atomicAdd(&ws.arrivals[pair], 1u) == static_cast<unsigned>(splits - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();

    // The last block of the pair: the row's statistics, its cut, and the best k above it.
    const size_t first_chunk = static_cast<size_t>(pair) * splits;
    Online e_all = online_empty(), b_all = online_empty();
    bool reread = false;
    for (int c = threadIdx.x; c < splits; c += blockDim.x) {
        const float* st = ws.stats + (first_chunk + c) * 4;
        e_all = online_merge(e_all, {__ldcg(st), __ldcg(st + 1)});
        b_all = online_merge(b_all, {__ldcg(st + 2), __ldcg(st + 3)});
        reread |= __ldcg(ws.count + first_chunk + c) < 0;
    }
    e_all = block_merge(e_all, online_scratch);
    b_all = block_merge(b_all, online_scratch);
    reread = __syncthreads_or(reread);
    const float lse_e = e_all.m + logf(e_all.s), lse_b = b_all.m + logf(b_all.s);
    const float cut = e_all.m + log_alpha;
    const float keep = 1.0f + beta, contrast = beta * inv_base_temperature;

    TopK top;
    top.len = 0;
    top.k = k;
    if (!reread) {
        for (int c = 0; c < splits; ++c) {
            const size_t id = first_chunk + c;
            const int n = __ldcg(ws.count + id);
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                const float e = __ldcg(ws.held + (id * kChunkHeld + j) * 2);
                const float b = __ldcg(ws.held + (id * kChunkHeld + j) * 2 + 1);
                if (e >= cut) top.offer(keep * (e - lse_e) - contrast * (b - lse_b), __ldcg(ws.index + id * kChunkHeld + j));
            }
        }
    } else {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float e = load_f32(e_row, i);
            if (e >= cut) top.offer(keep * (e - lse_e) - contrast * (load_f32(b_row, i) - lse_b), i);
        }
    }
    int next = 0;
    for (int r = 0; r < k; ++r) {
        const Pick mine = next < top.len ? Pick{top.score[next], top.index[next]} : no_pick();
        const Pick best = block_best(mine, pick_scratch);
        if (next < top.len && top.index[next] == best.index) ++next;
        if (threadIdx.x == 0) {
            out_index[static_cast<size_t>(pair) * k + r] = best.index == INT_MAX ? -1 : best.index;
            out_score[static_cast<size_t>(pair) * k + r] = best.score;
        }
    }
    if (threadIdx.x == 0) {
        if (out_lse != nullptr) {
            out_lse[2 * pair] = lse_e;
            out_lse[2 * pair + 1] = lse_b;
        }
        ws.arrivals[pair] = 0;  // ready for the next launch
    }
}

}  // namespace

// Launch: grid (splits, pairs), block (a multiple of 32, at most 256), 1 <= k <= 16; rows
// contiguous (`vocab` apart). Workspace: pairs * splits * (4 + 2 * 64) floats and
// pairs * (1 + splits * 65) ints, the first `pairs` ints zero before the first launch (each
// launch leaves them zero). Fewer than k plausible tokens: the rest come back as index -1.
#define PEFTSCALE_COLD_KERNEL(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256)                                                    \
        NAME(const T* expert, const T* base, int vocab, int k, float log_alpha, float beta,               \
             float inv_base_temperature, int* out_index, float* out_score, float* out_lse,                \
             float* workspace_f, int* workspace_i) {                                                      \
        cold_score_rows<T>(expert, base, vocab, k, log_alpha, beta, inv_base_temperature, out_index,      \
                           out_score, out_lse, workspace_f, workspace_i);                                 \
    }

PEFTSCALE_COLD_KERNEL(peftscale_cold_score_f32, float)
PEFTSCALE_COLD_KERNEL(peftscale_cold_score_f16, __half)
PEFTSCALE_COLD_KERNEL(peftscale_cold_score_bf16, __nv_bfloat16)
