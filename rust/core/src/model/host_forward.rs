//! The forward pass on the CPU with f32 activations, written over plain host buffers.
//!
//! Same model, same batch semantics as the candle path in `llama.rs` (rows of different lengths,
//! each with its own cache and positions), but a decode step of a small model is hundreds of tiny
//! operations, and going through a tensor library costs more per operation than the arithmetic.
//! Here each layer is four parallel regions (q/k/v together, attention, o, gate/up together, down
//! makes five) on the engine's thread team, and the small operations between them (norms, RoPE,
//! SiLU, residuals) run inline on the calling thread.

use candle_core::{DType, Device, Layout, Storage, Tensor};

use super::linear::{project_many, LoraUse};
use super::llama::{Layer, Model, RowPlan};
use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::kernels::cpu::dense::{exp_in_place, scaled_matvec, weighted_row_sum};
use crate::kernels::cpu::host_f32;
use crate::kernels::cpu::parallel::{team, DisjointOut};
use crate::kv::{KvPiece, SeqStore};
use crate::lora::{group_by_adapter, LoraAdapter, Proj};

/// Host copies of the small per-layer vectors and the RoPE tables.
#[derive(Clone)]
pub(crate) struct HostParams {
    input_norms: Vec<Vec<f32>>,
    post_norms: Vec<Vec<f32>>,
    final_norm: Vec<f32>,
    /// `[max_positions, head_dim / 2]` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl HostParams {
    pub fn new(layers: &[Layer], norm: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        Ok(Self {
            input_norms: layers
                .iter()
                .map(|l| host_f32(&l.input_norm))
                .collect::<Result<_>>()?,
            post_norms: layers
                .iter()
                .map(|l| host_f32(&l.post_attn_norm))
                .collect::<Result<_>>()?,
            final_norm: host_f32(norm)?,
            cos: host_f32(cos)?,
            sin: host_f32(sin)?,
        })
    }
}

pub(crate) fn forward(
    model: &Model,
    host: &HostParams,
    store: &mut SeqStore,
    plan: &RowPlan<'_>,
) -> Result<Vec<Tensor>> {
    let cfg = model.config();
    let h = cfg.hidden_size;
    let n = plan.ids.len();
    let ids = Tensor::from_slice(&plan.ids, n, &Device::Cpu)?;
    let mut x = model
        .embed
        .forward(&ids, DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let eps = cfg.rms_norm_eps as f32;
    let adapter_tokens = tokens_by_adapter(plan);
    let uses = |li: usize, projs: &[Proj]| -> Vec<LoraUse<'_>> {
        let mut uses = Vec::new();
        for (output, &proj) in projs.iter().enumerate() {
            for (adapter, tokens) in &adapter_tokens {
                if let Some(pair) = adapter.pair(li, proj) {
                    uses.push(LoraUse {
                        output,
                        pair,
                        tokens,
                    });
                }
            }
        }
        uses
    };
    for (li, layer) in model.layers.iter().enumerate() {
        let normed = rms_norm(&x, &host.input_norms[li], eps);
        let [mut q, mut k, v]: [Vec<f32>; 3] = project_many(
            &normed,
            n,
            [&layer.attn.q, &layer.attn.k, &layer.attn.v],
            &uses(li, &[Proj::Q, Proj::K, Proj::V]),
        )?;
        rope(&mut q, cfg.num_heads, cfg, host, &plan.positions);
        rope(&mut k, cfg.num_kv_heads, cfg, host, &plan.positions);
        let attn = attention(cfg, li, &q, &k, &v, store, plan)?;
        let [o]: [Vec<f32>; 1] = project_many(&attn, n, [&layer.attn.o], &uses(li, &[Proj::O]))?;
        add_into(&mut x, &o);

        let normed = rms_norm(&x, &host.post_norms[li], eps);
        let [gate, up]: [Vec<f32>; 2] = project_many(
            &normed,
            n,
            [&layer.mlp.gate, &layer.mlp.up],
            &uses(li, &[Proj::Gate, Proj::Up]),
        )?;
        let act = silu_mul(&gate, &up);
        let [down]: [Vec<f32>; 1] =
            project_many(&act, n, [&layer.mlp.down], &uses(li, &[Proj::Down]))?;
        add_into(&mut x, &down);
    }
    plan.commit(store)?;

    let kept: Vec<f32> = plan
        .logit_positions()
        .flat_map(|i| x[i * h..(i + 1) * h].iter().copied())
        .collect();
    let n_keep = kept.len() / h;
    let normed = rms_norm(&kept, &host.final_norm, eps);
    let [logits]: [Vec<f32>; 1] = project_many(&normed, n_keep, [&model.lm_head], &[])?;
    // Each row's logits are a view of one buffer, not a copy (a vocabulary row is ~200 kB).
    let logits = Tensor::from_vec(logits, (n_keep, cfg.vocab_size), &Device::Cpu)?;
    let mut out = Vec::with_capacity(plan.rows.len());
    let mut at = 0;
    for len in plan.logit_counts() {
        out.push(logits.narrow(0, at, len)?);
        at += len;
    }
    Ok(out)
}

/// The tokens of each adapter used in this pass (rows sharing an adapter share one update).
fn tokens_by_adapter<'a>(plan: &RowPlan<'a>) -> Vec<(&'a LoraAdapter, Vec<usize>)> {
    group_by_adapter(plan.rows.iter().map(|r| r.adapter))
        .into_iter()
        .filter_map(|(adapter, rows)| {
            let tokens = rows.iter().flat_map(|&r| {
                let (off, n) = plan.spans[r];
                off..off + n
            });
            Some((adapter?, tokens.collect()))
        })
        .collect()
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// `silu(gate) · up`, with `silu(g) = g / (1 + e^-g)`.
fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut e: Vec<f32> = gate.iter().map(|g| -g).collect();
    exp_in_place(&mut e);
    e.iter()
        .zip(gate)
        .zip(up)
        .map(|((e, g), u)| g / (1.0 + e) * u)
        .collect()
}

/// RMSNorm of every row, computed in f32 as transformers does.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, w)| w * (v * inv)));
    }
    out
}

/// Rotates every head of every token (`[tokens, heads * head_dim]`) by the token's position.
fn rope(x: &mut [f32], heads: usize, cfg: &ModelConfig, host: &HostParams, positions: &[u32]) {
    let hd = cfg.head_dim;
    let half = hd / 2;
    for (t, &pos) in positions.iter().enumerate() {
        let cos = &host.cos[pos as usize * half..(pos as usize + 1) * half];
        let sin = &host.sin[pos as usize * half..(pos as usize + 1) * half];
        for head in x[t * heads * hd..(t + 1) * heads * hd].chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = match cfg.rope_layout {
                    RopeLayout::Halves => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let (xa, xb) = (head[a], head[b]);
                head[a] = xa * cos[i] - xb * sin[i];
                head[b] = xb * cos[i] + xa * sin[i];
            }
        }
    }
}

/// How many query heads of one KV group an attention task takes: the whole group (its keys and
/// values are then read once) unless that leaves fewer than two tasks per thread to balance.
fn heads_per_task(row_kv_heads: usize, groups: usize, threads: usize) -> usize {
    (1..=groups)
        .rev()
        .find(|&h| row_kv_heads * groups.div_ceil(h) >= 2 * threads)
        .unwrap_or(1)
}

/// One cache piece of one layer, readable as host f32: head `h`, position `p` starts at
/// `h * head_stride + p * head_dim` of `k` and `v`.
struct PieceView<'a> {
    k: &'a [f32],
    v: &'a [f32],
    len: usize,
    head_stride: usize,
}

/// The host f32 values of a `[kv_heads, len, head_dim]` cache piece, its length and head stride.
fn host_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<(&'a [f32], usize, usize)> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::invalid("the host forward pass needs a CPU cache"));
    };
    let all = cpu.as_slice::<f32>()?;
    let dims = layout.dims();
    let stride = layout.stride();
    if dims.len() != 3 || stride[2] != 1 || stride[1] != dims[2] {
        return Err(Error::invalid("cache piece has an unexpected layout"));
    }
    let start = layout.start_offset();
    let end = start + (dims[0] - 1) * stride[0] + dims[1] * dims[2];
    Ok((&all[start..end], dims[1], stride[0]))
}

/// Writes each row's new keys and values into its cache and attends over the whole cache.
/// `q` is `[tokens, heads * hd]`, `k`/`v` are `[tokens, kv_heads * hd]`; returns
/// `[tokens, heads * hd]`.
fn attention(
    cfg: &ModelConfig,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    store: &mut SeqStore,
    plan: &RowPlan<'_>,
) -> Result<Vec<f32>> {
    let hd = cfg.head_dim;
    let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
    let kv_dim = kv_heads * hd;
    let mut pieces: Vec<Vec<KvPiece>> = Vec::with_capacity(plan.rows.len());
    for (row, &(off, n)) in plan.rows.iter().zip(&plan.spans) {
        // [n, kv_heads, hd] -> the cache's [kv_heads, n, hd].
        let by_head = |src: &[f32]| -> Vec<f32> {
            let mut out = Vec::with_capacity(n * kv_dim);
            for head in 0..kv_heads {
                for t in off..off + n {
                    out.extend_from_slice(
                        &src[t * kv_dim + head * hd..t * kv_dim + (head + 1) * hd],
                    );
                }
            }
            out
        };
        let kt = Tensor::from_vec(by_head(k), (kv_heads, n, hd), &Device::Cpu)?;
        let vt = Tensor::from_vec(by_head(v), (kv_heads, n, hd), &Device::Cpu)?;
        pieces.push(store.append_and_view(row.seq, layer, &kt, &vt)?);
    }
    let guards: Vec<Vec<_>> = pieces
        .iter()
        .map(|ps| {
            ps.iter()
                .map(|p| (p.k.storage_and_layout(), p.v.storage_and_layout()))
                .collect()
        })
        .collect();
    let views: Vec<Vec<PieceView<'_>>> = guards
        .iter()
        .map(|gs| {
            gs.iter()
                .map(|(gk, gv)| {
                    let (k, len, head_stride) = host_slice(&gk.0, gk.1)?;
                    let (v, _, _) = host_slice(&gv.0, gv.1)?;
                    Ok(PieceView {
                        k,
                        v,
                        len,
                        head_stride,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;

    let mut out = vec![0f32; q.len()];
    let writer = DisjointOut::new(&mut out);
    let groups = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_task = heads_per_task(plan.rows.len() * kv_heads, groups, team().threads());
    let slices = groups.div_ceil(per_task);
    team().run(plan.rows.len() * kv_heads * slices, &|task| {
        let (r, kvh, slice) = (
            task / (kv_heads * slices),
            task / slices % kv_heads,
            task % slices,
        );
        let (off, n) = plan.spans[r];
        let row_views = &views[r];
        let total: usize = row_views.iter().map(|p| p.len).sum();
        let past = total - n;
        let mut probs = vec![0f32; total];
        let mut acc = vec![0f32; hd];
        let first = kvh * groups + slice * per_task;
        // The query heads of one KV head run back to back, so its keys and values come from
        // memory once and from the core's cache after that.
        for head in first..(first + per_task).min((kvh + 1) * groups) {
            for i in 0..n {
                let t = off + i;
                let qv = &q[t * heads * hd + head * hd..t * heads * hd + (head + 1) * hd];
                // Causal: query i sees the cache and the new positions up to its own.
                let visible = past + i + 1;
                let mut at = 0;
                for p in row_views {
                    let count = p.len.min(visible.saturating_sub(at));
                    let keys = &p.k[kvh * p.head_stride..kvh * p.head_stride + count * hd];
                    scaled_matvec(keys, qv, scale, &mut probs[at..at + count]);
                    at += p.len;
                }
                let s = &mut probs[..visible];
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                s.iter_mut().for_each(|v| *v -= max);
                exp_in_place(s);
                let sum: f32 = s.iter().sum();
                s.iter_mut().for_each(|v| *v /= sum);
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut at = 0;
                for p in row_views {
                    let count = p.len.min(visible.saturating_sub(at));
                    let values = &p.v[kvh * p.head_stride..kvh * p.head_stride + count * hd];
                    weighted_row_sum(values, &probs[at..at + count], &mut acc);
                    at += p.len;
                }
                let dst = t * heads * hd + head * hd;
                for (d, &a) in acc.iter().enumerate() {
                    // SAFETY: each task writes only its own heads of its own row's tokens.
                    unsafe { writer.set(dst + d, a) };
                }
            }
        }
    });
    Ok(out)
}
