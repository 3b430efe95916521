//! A llama-family decoder (Llama, SmolLM2, Mistral, Qwen2) that runs a batch of rows per call.
//!
//! Every row belongs to its own sequence, with its own cache and position. The projections run
//! once over the tokens of all rows stacked together; attention runs per row over that row's
//! cache pieces, so rows of different lengths never need padding and give exactly what each
//! would give alone.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::host_forward::{self, HostParams};
use super::linear::{Embedding, Linear};
use super::weights::TensorSource;
use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::kernels::cpu::Rng;
use crate::kv::{KvPiece, KvShape, SeqId, SeqStore};
use crate::lora::{group_by_adapter, DeviceLora, DevicePair, LoraAdapter, Proj, ValueHead};

/// Which positions of a row need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    Last,
    All,
}

/// One row of a forward pass: append `tokens` to sequence `seq`, through the base model or with
/// a LoRA adapter's updates.
#[derive(Debug, Clone)]
pub struct RowInput<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub logits: LogitsFor,
    pub adapter: Option<&'a LoraAdapter>,
    /// A verifier's value head: the row's output is the head's score `[positions, 1]` in place
    /// of vocabulary logits (and the LM head does not run for it).
    pub head: Option<&'a ValueHead>,
    /// Keep the hidden states entering this layer in the store (host path): a verifier whose
    /// adapter computes what this row's does on the layers below enters there.
    pub capture: Option<usize>,
    /// Enter the model at a layer instead of the embeddings (host path).
    pub entry: Option<Entry<'a>>,
}

/// A row that starts at `layer`: the tokens' hidden states entering it, their keys and values
/// below it already in the sequence's reserved positions
/// ([`crate::kv::SeqStore::adopt_lower_layers`]). The tokens still name the row's text: a
/// forward pass without this shortcut (the tensor path) computes them from the embeddings.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub layer: usize,
    /// `[tokens, hidden_size]`, row-major.
    pub hidden: &'a [f32],
}

impl<'a> RowInput<'a> {
    /// A row through the base model.
    pub fn new(seq: SeqId, tokens: &'a [u32], logits: LogitsFor) -> Self {
        Self {
            seq,
            tokens,
            logits,
            adapter: None,
            head: None,
            capture: None,
            entry: None,
        }
    }

    pub fn with_adapter(self, adapter: Option<&'a LoraAdapter>) -> Self {
        Self { adapter, ..self }
    }

    pub fn with_head(self, head: Option<&'a ValueHead>) -> Self {
        Self { head, ..self }
    }

    pub fn with_capture(self, capture: Option<usize>) -> Self {
        Self { capture, ..self }
    }

    pub fn with_entry(self, entry: Option<Entry<'a>>) -> Self {
        Self { entry, ..self }
    }
}

#[derive(Clone)]
pub(super) struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
}

#[derive(Clone)]
pub(super) struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

#[derive(Clone)]
pub(super) struct Layer {
    pub input_norm: Tensor,
    pub attn: Attention,
    pub post_attn_norm: Tensor,
    pub mlp: Mlp,
}

impl Layer {
    fn proj_mut(&mut self, proj: Proj) -> &mut Linear {
        match proj {
            Proj::Q => &mut self.attn.q,
            Proj::K => &mut self.attn.k,
            Proj::V => &mut self.attn.v,
            Proj::O => &mut self.attn.o,
            Proj::Gate => &mut self.mlp.gate,
            Proj::Up => &mut self.mlp.up,
            Proj::Down => &mut self.mlp.down,
        }
    }
}

/// Seed of the stochastic rounding when an adapter is merged into quantized weights.
const MERGE_SEED: u64 = 0x5eed;

/// Cloning shares the weights (candle tensors and packed blocks are reference-counted).
#[derive(Clone)]
pub struct Model {
    cfg: ModelConfig,
    pub(super) embed: Embedding,
    pub(super) layers: Vec<Layer>,
    norm: Tensor,
    pub(super) lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    /// The dtype of the key/value cache (see [`Model::set_kv_dtype`]).
    kv_dtype: DType,
    device: Device,
    /// Set when the model runs on the CPU with f32 activations: the host forward pass is used.
    host: Option<HostParams>,
}

/// The tokens of one forward call, laid out for the model.
pub(super) struct RowPlan<'a> {
    pub rows: &'a [RowInput<'a>],
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// Per row: offset of its first token among all tokens, and its token count.
    pub spans: Vec<(usize, usize)>,
}

impl<'a> RowPlan<'a> {
    /// Checks every row against the store and the model's limits.
    pub(super) fn new(
        cfg: &ModelConfig,
        store: &SeqStore,
        rows: &'a [RowInput<'a>],
    ) -> Result<Self> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(rows.len());
        for row in rows {
            if row.tokens.is_empty() {
                return Err(Error::invalid("a forward row has no tokens"));
            }
            let start = store.len(row.seq)?;
            let end = start + row.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(Error::ContextOverflow {
                    prompt_tokens: end,
                    context: cfg.max_position_embeddings,
                });
            }
            if let Some(&bad) = row.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::invalid(format!(
                    "token id {bad} is outside the vocabulary of {} tokens",
                    cfg.vocab_size
                )));
            }
            spans.push((ids.len(), row.tokens.len()));
            ids.extend_from_slice(row.tokens);
            positions.extend((start..end).map(|p| p as u32));
        }
        Ok(Self {
            rows,
            ids,
            positions,
            spans,
        })
    }

    /// Commits the positions every layer has written.
    pub fn commit(&self, store: &mut SeqStore) -> Result<()> {
        for (row, &(_, n)) in self.rows.iter().zip(&self.spans) {
            store.advance(row.seq, n)?;
        }
        Ok(())
    }

    /// Indices (among all tokens) of the positions that get logits, row after row.
    pub fn logit_positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.rows
            .iter()
            .zip(&self.spans)
            .flat_map(|(row, &(off, n))| match row.logits {
                LogitsFor::Last => off + n - 1..off + n,
                LogitsFor::All => off..off + n,
            })
    }

    /// Per row, how many positions get logits.
    pub fn logit_counts(&self) -> impl Iterator<Item = usize> + '_ {
        self.rows
            .iter()
            .zip(&self.spans)
            .map(|(row, &(_, n))| match row.logits {
                LogitsFor::Last => 1,
                LogitsFor::All => n,
            })
    }

    /// Whether any row reads a value head instead of the LM head.
    pub fn has_heads(&self) -> bool {
        self.rows.iter().any(|r| r.head.is_some())
    }

    /// Indices among the kept positions ([`Self::logit_positions`]) of the rows without a value
    /// head: the positions the LM head runs on.
    pub fn vocab_positions(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = 0;
        for (row, count) in self.rows.iter().zip(self.logit_counts()) {
            if row.head.is_none() {
                out.extend(at..at + count);
            }
            at += count;
        }
        out
    }

    /// Each row's output from the normed hidden states of the kept positions (`normed(i)` is
    /// kept position `i`) and the LM head's logits `[vocab positions, vocab]` of the rows
    /// without a value head, in order.
    pub fn split_outputs<'n>(
        &self,
        normed: impl Fn(usize) -> Result<std::borrow::Cow<'n, [f32]>>,
        vocab_logits: Option<Tensor>,
        device: &Device,
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(self.rows.len());
        let (mut kept, mut vocab_at) = (0, 0);
        for (row, count) in self.rows.iter().zip(self.logit_counts()) {
            match (row.head, &vocab_logits) {
                (Some(head), _) => {
                    let scores = (kept..kept + count)
                        .map(|i| Ok(head.score(&normed(i)?)))
                        .collect::<Result<Vec<f32>>>()?;
                    out.push(Tensor::from_vec(scores, (count, 1), device)?);
                }
                (None, Some(logits)) => {
                    out.push(logits.narrow(0, vocab_at, count)?);
                    vocab_at += count;
                }
                (None, None) => return Err(Error::invalid("no LM head logits for a row")),
            }
            kept += count;
        }
        Ok(out)
    }
}

impl Model {
    pub(crate) fn load(
        cfg: ModelConfig,
        src: &mut dyn TensorSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let embed = src.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            layers.push(Layer {
                input_norm: src.vector(&format!("{p}.input_layernorm.weight"), h)?,
                attn: Attention {
                    q: src.linear(&format!("{p}.self_attn.q_proj.weight"), q_dim, h, bias)?,
                    k: src.linear(&format!("{p}.self_attn.k_proj.weight"), kv_dim, h, bias)?,
                    v: src.linear(&format!("{p}.self_attn.v_proj.weight"), kv_dim, h, bias)?,
                    o: src.linear(&format!("{p}.self_attn.o_proj.weight"), h, q_dim, false)?,
                },
                post_attn_norm: src.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                mlp: Mlp {
                    gate: src.linear(
                        &format!("{p}.mlp.gate_proj.weight"),
                        cfg.intermediate_size,
                        h,
                        false,
                    )?,
                    up: src.linear(
                        &format!("{p}.mlp.up_proj.weight"),
                        cfg.intermediate_size,
                        h,
                        false,
                    )?,
                    down: src.linear(
                        &format!("{p}.mlp.down_proj.weight"),
                        h,
                        cfg.intermediate_size,
                        false,
                    )?,
                },
            });
        }
        let norm = src.vector("model.norm.weight", h)?;
        let lm_head = if src.contains("lm_head.weight") {
            src.linear("lm_head.weight", cfg.vocab_size, h, false)?
        } else if cfg.tie_word_embeddings {
            embed.as_linear(dtype)?
        } else {
            return Err(Error::load(src.path(), "missing tensor lm_head.weight"));
        };
        let (cos, sin) = rope_tables(&cfg, dtype, device)?;
        let host = match (device, dtype) {
            (Device::Cpu, DType::F32) => Some(HostParams::new(&layers, &norm, &cos, &sin)?),
            _ => None,
        };
        // Quantized weights on the host pass: a half-precision cache, as llama.cpp keeps by
        // default. Its rounding (~1e-3 relative) sits far below the weights' own, and a wide
        // batch's attention reads half the bytes. Float weights keep their own dtype, so that an
        // f32 model stays exact against its reference.
        let quantized = layers.first().is_some_and(|l| l.attn.q.is_quantized());
        let kv_dtype = if host.is_some() && quantized {
            DType::F16
        } else {
            dtype
        };
        Ok(Self {
            host,
            kv_dtype,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            dtype,
            device: device.clone(),
        })
    }

    /// Adds `adapter`'s updates into the weights they apply to (float weights exactly, quantized
    /// ones by stochastic rounding: see `requantize`). Every merged projection is built before
    /// any is replaced, so an error leaves the model as it was.
    pub fn merge_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        let mut merged = Vec::new();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for proj in Proj::ALL {
                if let Some(pair) = adapter.pair(li, proj) {
                    // One fixed stream per projection: merging is reproducible.
                    let stream = (li * Proj::ALL.len() + proj.index()) as u64;
                    let mut rng = Rng::new(MERGE_SEED, stream);
                    merged.push((li, proj, layer.proj_mut(proj).merged(pair, &mut rng)?));
                }
            }
        }
        for (li, proj, linear) in merged {
            *self.layers[li].proj_mut(proj) = linear;
        }
        Ok(())
    }

    /// Bytes of the matrices one decode step reads (the embedding table only when it is tied).
    pub fn weight_bytes(&self) -> usize {
        let per_layer = |l: &Layer| {
            [
                &l.attn.q,
                &l.attn.k,
                &l.attn.v,
                &l.attn.o,
                &l.mlp.gate,
                &l.mlp.up,
                &l.mlp.down,
            ]
            .iter()
            .map(|x| x.bytes())
            .sum::<usize>()
        };
        self.layers.iter().map(per_layer).sum::<usize>() + self.lm_head.bytes()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Shape of the cache a sequence of this model needs.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.cfg.num_layers,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            dtype: self.kv_dtype,
        }
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Keeps the key/value cache of later generations in `dtype`: f32 or f16 on the host pass,
    /// any float dtype on the tensor pass.
    pub fn set_kv_dtype(&mut self, dtype: DType) -> Result<()> {
        let allowed: &[DType] = if self.host.is_some() {
            &[DType::F32, DType::F16]
        } else {
            &[DType::F32, DType::F16, DType::BF16]
        };
        if !allowed.contains(&dtype) {
            let names: Vec<&str> = allowed.iter().map(|d| d.as_str()).collect();
            return Err(Error::invalid(format!(
                "kv_dtype {} is not available for this model (choose from {})",
                dtype.as_str(),
                names.join(", ")
            )));
        }
        self.kv_dtype = dtype;
        Ok(())
    }

    /// Runs all rows through the model in one pass and returns, per row, f32 logits
    /// `[positions, vocab]` (one position for [`LogitsFor::Last`]).
    pub fn forward(&self, store: &mut SeqStore, rows: &[RowInput<'_>]) -> Result<Vec<Tensor>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let plan = RowPlan::new(&self.cfg, store, rows)?;
        match &self.host {
            Some(host) => host_forward::forward(self, host, store, &plan),
            None => self.forward_tensors(store, &plan),
        }
    }

    /// The same forward pass as candle tensor operations: the path for devices and dtypes the
    /// host pass does not cover, and on the CPU the reference the host pass is tested against.
    pub fn forward_with_tensors(
        &self,
        store: &mut SeqStore,
        rows: &[RowInput<'_>],
    ) -> Result<Vec<Tensor>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let plan = RowPlan::new(&self.cfg, store, rows)?;
        self.forward_tensors(store, &plan)
    }

    fn forward_tensors(&self, store: &mut SeqStore, plan: &RowPlan<'_>) -> Result<Vec<Tensor>> {
        let (rows, spans) = (plan.rows, &plan.spans);
        let n_total = plan.ids.len();
        let ids = Tensor::from_slice(&plan.ids, n_total, &self.device)?;
        let positions = Tensor::from_slice(&plan.positions, n_total, &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        let adapted = AdaptedTokens::new(plan, &self.device, self.dtype)?;

        let mut x = self.embed.forward(&ids, self.dtype)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let project =
                |proj: Proj, linear: &Linear, h: &Tensor| adapted.project(li, proj, linear, h);
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, self.cfg.rms_norm_eps as f32)?;
            let attn = self.attention(li, layer, &h, &cos, &sin, store, rows, spans, &project)?;
            x = (x + project(Proj::O, &layer.attn.o, &attn)?)?;
            let h =
                candle_nn::ops::rms_norm(&x, &layer.post_attn_norm, self.cfg.rms_norm_eps as f32)?;
            let gate = candle_nn::ops::silu(&project(Proj::Gate, &layer.mlp.gate, &h)?)?;
            let up = project(Proj::Up, &layer.mlp.up, &h)?;
            let mlp = project(Proj::Down, &layer.mlp.down, &(gate * up)?)?;
            x = (x + mlp)?;
        }
        plan.commit(store)?;

        let keep: Vec<u32> = plan.logit_positions().map(|i| i as u32).collect();
        let n_keep = keep.len();
        let keep = Tensor::from_vec(keep, n_keep, &self.device)?;
        let x = x.index_select(&keep, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        if !plan.has_heads() {
            let logits = self.lm_head.forward(&x)?.to_dtype(DType::F32)?;
            return plan.split_outputs(|_| Ok(Default::default()), Some(logits), &self.device);
        }
        let vocab = plan.vocab_positions();
        let logits = if vocab.is_empty() {
            None
        } else {
            let at = Tensor::from_vec(
                vocab.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
                vocab.len(),
                &self.device,
            )?;
            let x = x.index_select(&at, 0)?;
            Some(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
        };
        // The heads' inputs are few (one position per verifier row and step): read on the host.
        let hidden = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        plan.split_outputs(|i| Ok(hidden[i].as_slice().into()), logits, &self.device)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer_idx: usize,
        layer: &Layer,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        store: &mut SeqStore,
        rows: &[RowInput<'_>],
        spans: &[(usize, usize)],
        project: &dyn Fn(Proj, &Linear, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (n_total, _) = h.dims2()?;
        let hd = cfg.head_dim;
        // [n, heads*hd] -> [heads, n, hd], rotated by each token's own position.
        let to_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
            Ok(t.reshape((1, n_total, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let rotate = |t: &Tensor| -> Result<Tensor> {
            let r = match cfg.rope_layout {
                RopeLayout::Halves => candle_nn::rotary_emb::rope(t, cos, sin)?,
                RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(t, cos, sin)?,
            };
            Ok(r.squeeze(0)?)
        };
        let q = rotate(&to_heads(
            project(Proj::Q, &layer.attn.q, h)?,
            cfg.num_heads,
        )?)?;
        let k = rotate(&to_heads(
            project(Proj::K, &layer.attn.k, h)?,
            cfg.num_kv_heads,
        )?)?;
        let v = to_heads(project(Proj::V, &layer.attn.v, h)?, cfg.num_kv_heads)?.squeeze(0)?;

        let mut outs = Vec::with_capacity(rows.len());
        for (row, &(off, n)) in rows.iter().zip(spans) {
            let pieces = store.append_and_view(
                row.seq,
                layer_idx,
                &k.narrow(1, off, n)?,
                &v.narrow(1, off, n)?,
            )?;
            let q_row = q.narrow(1, off, n)?;
            let o = self.attend(&q_row, &pieces)?; // [heads, n, hd]
            outs.push(o.transpose(0, 1)?.reshape((n, cfg.num_heads * hd))?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Causal attention of `q` (`[heads, n, hd]`, the last `n` positions) over the cache pieces.
    fn attend(&self, q: &Tensor, pieces: &[KvPiece]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (heads, n, hd) = q.dims3()?;
        let groups = heads / cfg.num_kv_heads;
        // Query heads that share a kv head become extra rows, so keys are never repeated.
        let q = q
            .contiguous()?
            .reshape((cfg.num_kv_heads, groups * n, hd))?
            .to_dtype(DType::F32)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = Vec::with_capacity(pieces.len());
        for p in pieces {
            let k = p.k.to_dtype(DType::F32)?;
            scores.push(q.matmul(&k.t()?)?);
        }
        let scores = if scores.len() == 1 {
            scores.remove(0)
        } else {
            Tensor::cat(&scores, 2)?
        };
        let total = scores.dim(2)?;
        let mut scores = (scores * scale)?;
        if n > 1 {
            let past = total - n;
            let mask: Vec<f32> = (0..groups * n)
                .flat_map(|r| {
                    let i = r % n;
                    (0..total).map(move |j| {
                        if j <= past + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (groups * n, total), &self.device)?;
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let mut out: Option<Tensor> = None;
        let mut at = 0;
        for p in pieces {
            let len = p.v.dim(1)?;
            // Contiguous: cuBLAS takes no row stride wider than the row for a left operand.
            let part = probs
                .narrow(2, at, len)?
                .contiguous()?
                .matmul(&p.v.to_dtype(DType::F32)?)?;
            at += len;
            out = Some(match out {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        let out = out.ok_or_else(|| Error::invalid("attention over an empty cache"))?;
        Ok(out.reshape((heads, n, hd))?.to_dtype(self.dtype)?)
    }
}

/// The tokens of a forward call grouped by the adapter their rows use, for the tensor pass's
/// unmerged LoRA: the base projection runs once over all tokens, and each adapter's low-rank
/// update `scale · (x·Aᵀ)·Bᵀ` is added to its own tokens only.
struct AdaptedTokens {
    groups: Vec<AdapterGroup>,
}

struct AdapterGroup {
    lora: Arc<DeviceLora>,
    tokens: GroupTokens,
}

/// Which tokens an adapter group's update goes to, in the form its path reads them.
enum GroupTokens {
    /// Every token of the call (candle's matmuls over all of them).
    All,
    /// These token indices among all tokens (gathered, then added back by candle).
    Gathered(Tensor),
    /// On a CUDA device, per token: 0 when it is the group's, -1 otherwise (the BGMV kernel's
    /// slots).
    Slots(Tensor),
}

impl AdaptedTokens {
    fn new(plan: &RowPlan<'_>, device: &Device, dtype: DType) -> Result<Self> {
        let n_total = plan.ids.len();
        let mut groups = Vec::new();
        for (adapter, members) in group_by_adapter(plan.rows.iter().map(|r| r.adapter)) {
            let Some(adapter) = adapter else { continue };
            let indices: Vec<u32> = members
                .iter()
                .flat_map(|&i| {
                    let (off, n) = plan.spans[i];
                    (off as u32)..(off + n) as u32
                })
                .collect();
            let tokens = if cfg!(feature = "cuda") && device.is_cuda() {
                let mut slots = vec![-1i32; n_total];
                for &t in &indices {
                    slots[t as usize] = 0;
                }
                GroupTokens::Slots(Tensor::from_vec(slots, n_total, device)?)
            } else if indices.len() == n_total {
                GroupTokens::All
            } else {
                let n = indices.len();
                GroupTokens::Gathered(Tensor::from_vec(indices, n, device)?)
            };
            groups.push(AdapterGroup {
                lora: adapter.on_device(device, dtype)?,
                tokens,
            });
        }
        Ok(Self { groups })
    }

    /// `linear` applied to `x` (`[tokens, in]`), plus each group's update to its tokens.
    fn project(&self, layer: usize, proj: Proj, linear: &Linear, x: &Tensor) -> Result<Tensor> {
        let mut y = linear.forward(x)?;
        for group in &self.groups {
            let Some(pair) = group.lora.pair(layer, proj) else {
                continue;
            };
            y = match &group.tokens {
                GroupTokens::Slots(slots) => (y + bgmv_delta(x, pair, slots)?)?,
                GroupTokens::All => (y + lora_delta(x, pair)?)?,
                GroupTokens::Gathered(idx) => {
                    y.index_add(idx, &lora_delta(&x.index_select(idx, 0)?, pair)?, 0)?
                }
            };
        }
        Ok(y)
    }
}

/// `scale · (x·Aᵀ)·Bᵀ` by candle's matmuls.
fn lora_delta(x: &Tensor, pair: &DevicePair) -> Result<Tensor> {
    Ok((x.matmul(&pair.a.t()?)?.matmul(&pair.b.t()?)? * pair.scale)?)
}

/// The same through the BGMV kernel (`cuda/bgmv.cu`), zero on the rows whose slot is -1.
#[cfg(feature = "cuda")]
fn bgmv_delta(x: &Tensor, pair: &DevicePair, slots: &Tensor) -> Result<Tensor> {
    let op = crate::kernels::cuda::BgmvDelta {
        slots: slots.clone(),
        scales: pair.scales.clone(),
    };
    Ok(x.contiguous()?.apply_op3_no_bwd(&pair.a, &pair.b, &op)?)
}

#[cfg(not(feature = "cuda"))]
fn bgmv_delta(_x: &Tensor, _pair: &DevicePair, _slots: &Tensor) -> Result<Tensor> {
    Err(Error::invalid(
        "the BGMV kernel needs a build with the `cuda` feature",
    ))
}

fn rope_tables(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    // f32 throughout, as transformers computes it, so positions far into the context agree.
    let theta = cfg.rope_theta as f32;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / cfg.head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let positions: Vec<f32> = (0..cfg.max_position_embeddings).map(|p| p as f32).collect();
    let positions = Tensor::from_vec(positions, (cfg.max_position_embeddings, 1), device)?;
    let freqs = positions.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}
