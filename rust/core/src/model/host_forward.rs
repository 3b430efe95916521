//! The forward pass on the CPU with f32 activations, written over plain host buffers.
//!
//! Same model, same batch semantics as the candle path in `llama.rs` (rows of different lengths,
//! each with its own cache and positions), but a decode step of a small model is hundreds of tiny
//! operations, and going through a tensor library costs more per operation than the arithmetic.
//! Here each layer is a handful of parallel regions on the engine's thread team (q/k/v together,
//! attention, o, gate/up together, down), and the small operations between them (norms, RoPE,
//! SiLU, residuals) run inline on the calling thread unless the input is large (prefill, wide
//! batches).

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use half::f16;

use super::linear::{project_many, project_many_into, Linear, LoraUse};
use super::llama::{Layer, Model, RowInput, RowPlan};
use crate::config::{ModelConfig, RopeLayout};
use crate::error::{Error, Result};
use crate::kernels::cpu::attention::{attend, merge_partials, Tile, LANES, PARTIAL_HEADER};
use crate::kernels::cpu::attention_few::{self, attend_few, KvHead, FEW};
use crate::kernels::cpu::dense::{narrow_f16, silu_mul, sum_of_squares, widen_f16};
use crate::kernels::cpu::host_f32;
use crate::kernels::cpu::parallel::{map_parallel, par_chunks_mut, team, DisjointOut};
use crate::kv::SeqStore;
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
    let depth = model.layers.len();
    // The layer each row enters at: 0 (its embeddings), or the one its entry names.
    let entries = plan
        .rows
        .iter()
        .zip(&plan.spans)
        .map(|(row, &(_, n))| match row.entry {
            None => Ok(0),
            Some(e) if e.layer > depth => Err(Error::invalid(format!(
                "a row enters at layer {} of a {depth}-layer model",
                e.layer
            ))),
            Some(e) if e.hidden.len() != n * h => Err(Error::invalid(format!(
                "a row entering at layer {} brings {} hidden values for {n} tokens of width {h}",
                e.layer,
                e.hidden.len()
            ))),
            Some(e) => Ok(e.layer),
        })
        .collect::<Result<Vec<usize>>>()?;
    // Stages of layers between entry points: a stage runs the rows that have entered so far.
    let mut bounds = entries.clone();
    bounds.sort_unstable();
    bounds.dedup();
    let mut x: Vec<f32> = Vec::new();
    let mut active: Vec<usize> = Vec::new();
    for (s, &from) in bounds.iter().enumerate() {
        let to = bounds.get(s + 1).copied().unwrap_or(depth);
        let next: Vec<usize> = (0..plan.rows.len())
            .filter(|&r| entries[r] <= from)
            .collect();
        x = if from == 0 {
            let ids: Vec<u32> = next
                .iter()
                .flat_map(|&r| {
                    let (off, n) = plan.spans[r];
                    plan.ids[off..off + n].iter().copied()
                })
                .collect();
            let ids = Tensor::from_slice(&ids, ids.len(), &Device::Cpu)?;
            model
                .embed
                .forward(&ids, DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
        } else {
            enter_rows(plan, &entries, &active, &next, &x, h)?
        };
        active = next;
        if active.len() == plan.rows.len() {
            run_layers(model, host, store, plan, from..to, &mut x)?;
        } else {
            let rows: Vec<RowInput<'_>> = active.iter().map(|&r| plan.rows[r].clone()).collect();
            let stage = RowPlan::new(cfg, store, &rows)?;
            run_layers(model, host, store, &stage, from..to, &mut x)?;
        }
    }
    plan.commit(store)?;

    let kept: Vec<f32> = plan
        .logit_positions()
        .flat_map(|i| x[i * h..(i + 1) * h].iter().copied())
        .collect();
    let n_keep = kept.len() / h;
    let mut normed = vec![0f32; kept.len()];
    rms_norm_into(
        &kept,
        &host.final_norm,
        cfg.rms_norm_eps as f32,
        &mut normed,
    );
    let vocab = plan.vocab_positions();
    let logits = if vocab.is_empty() {
        None
    } else {
        let lm_input: std::borrow::Cow<'_, [f32]> = if vocab.len() == n_keep {
            normed.as_slice().into()
        } else {
            vocab
                .iter()
                .flat_map(|&i| normed[i * h..(i + 1) * h].iter().copied())
                .collect::<Vec<f32>>()
                .into()
        };
        let [logits]: [Vec<f32>; 1] = project_many(&lm_input, vocab.len(), [&model.lm_head], &[])?;
        // Each row's logits are a view of one buffer, not a copy (a vocabulary row is ~200 kB).
        Some(Tensor::from_vec(
            logits,
            (vocab.len(), cfg.vocab_size),
            &Device::Cpu,
        )?)
    };
    plan.split_outputs(
        |i| Ok(normed[i * h..(i + 1) * h].into()),
        logits,
        &Device::Cpu,
    )
}

/// The hidden states of the rows in `next` (row order) as the stage starting at layer `from`
/// takes them: those of the rows in `active` from `x`, and the entry states of the rows entering.
fn enter_rows(
    plan: &RowPlan<'_>,
    entries: &[usize],
    active: &[usize],
    next: &[usize],
    x: &[f32],
    h: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(next.iter().map(|&r| plan.spans[r].1).sum::<usize>() * h);
    let mut at = 0;
    let mut offsets = std::collections::HashMap::new();
    for &r in active {
        offsets.insert(r, at);
        at += plan.spans[r].1 * h;
    }
    for &r in next {
        let n = plan.spans[r].1;
        match (offsets.get(&r), plan.rows[r].entry) {
            (Some(&o), _) => out.extend_from_slice(&x[o..o + n * h]),
            (None, Some(e)) if entries[r] > 0 => out.extend_from_slice(e.hidden),
            (None, _) => {
                return Err(Error::invalid(
                    "a row that enters at the embeddings is missing from a later stage",
                ))
            }
        }
    }
    Ok(out)
}

/// Runs `layers` over `x` (`[tokens, hidden]` of the rows of `plan`), keeping the hidden states
/// of the rows that ask for them on the way.
fn run_layers(
    model: &Model,
    host: &HostParams,
    store: &mut SeqStore,
    plan: &RowPlan<'_>,
    layers: std::ops::Range<usize>,
    x: &mut [f32],
) -> Result<()> {
    let cfg = model.config();
    let n = plan.ids.len();
    let depth = model.layers.len();
    let h = cfg.hidden_size;
    let keep = |store: &mut SeqStore, li: usize, x: &[f32]| -> Result<()> {
        for (row, &(off, len)) in plan.rows.iter().zip(&plan.spans) {
            let start = plan.positions[off] as usize;
            // A prompt's states are not kept: a verifier reads its prompt itself.
            if row.capture == Some(li) && start > 0 {
                let (tokens, hidden) = (&plan.ids[off..off + len], &x[off * h..(off + len) * h]);
                store.keep_trunk(row.seq, li, start, tokens, hidden)?;
            }
        }
        Ok(())
    };
    if layers.is_empty() {
        return keep(store, layers.start, x);
    }
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
    // One set of buffers serves every layer: each step below overwrites all of its output, so
    // nothing is cleared between layers (a prefill's activations are megabytes per layer).
    let first = &model.layers[layers.start];
    let sized = |l: &Linear| vec![0f32; n * l.out_features()];
    let mut normed = vec![0f32; x.len()];
    let (mut q, mut k, mut v) = (
        sized(&first.attn.q),
        sized(&first.attn.k),
        sized(&first.attn.v),
    );
    let mut attn = AttentionBuffers {
        out: vec![0f32; q.len()],
        partials: Vec::new(),
    };
    let mut o = sized(&first.attn.o);
    let (mut gate, mut up) = (sized(&first.mlp.gate), sized(&first.mlp.up));
    let mut act = vec![0f32; gate.len()];
    let mut down = sized(&first.mlp.down);
    let layout = AttentionPlan::new(cfg, store, plan)?;
    for li in layers.clone() {
        let layer = &model.layers[li];
        keep(store, li, x)?;
        rms_norm_into(x, &host.input_norms[li], eps, &mut normed);
        project_many_into(
            &normed,
            n,
            [&layer.attn.q, &layer.attn.k, &layer.attn.v],
            &uses(li, &[Proj::Q, Proj::K, Proj::V]),
            &mut [&mut q, &mut k, &mut v],
        )?;
        rope(&mut q, cfg.num_heads, cfg, host, &plan.positions);
        rope(&mut k, cfg.num_kv_heads, cfg, host, &plan.positions);
        attention(cfg, li, [&q, &k, &v], store, plan, &layout, &mut attn)?;
        project_many_into(
            &attn.out,
            n,
            [&layer.attn.o],
            &uses(li, &[Proj::O]),
            &mut [&mut o],
        )?;
        add_into(x, &o);

        rms_norm_into(x, &host.post_norms[li], eps, &mut normed);
        project_many_into(
            &normed,
            n,
            [&layer.mlp.gate, &layer.mlp.up],
            &uses(li, &[Proj::Gate, Proj::Up]),
            &mut [&mut gate, &mut up],
        )?;
        silu_mul_into(&gate, &up, &mut act);
        project_many_into(
            &act,
            n,
            [&layer.mlp.down],
            &uses(li, &[Proj::Down]),
            &mut [&mut down],
        )?;
        add_into(x, &down);
    }
    if layers.end == depth {
        keep(store, depth, x)?;
    }
    Ok(())
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

/// `silu(gate) · up` into `out`, with `silu(g) = g / (1 + e^-g)`.
fn silu_mul_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
    par_chunks_mut(out, ELEMENTWISE_CHUNK, PARALLEL_MIN, |c, e| {
        let at = c * ELEMENTWISE_CHUNK;
        silu_mul(&gate[at..], &up[at..], e);
    });
}

/// Elements per chunk of the element-wise steps, and the fewest per parallel task: below that, a
/// hand-off between threads costs more than the arithmetic (decode steps of a few rows).
const ELEMENTWISE_CHUNK: usize = 1024;
const PARALLEL_MIN: usize = 16 * 1024;

/// RMSNorm of every row into `out`, computed in f32 as transformers does.
fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    par_chunks_mut(out, w.len(), PARALLEL_MIN, |r, out| {
        let row = &x[r * w.len()..(r + 1) * w.len()];
        let mean_sq = sum_of_squares(row) / w.len() as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(row).zip(w) {
            *o = w * (v * inv);
        }
    });
}

/// Rotates every head of every token (`[tokens, heads * head_dim]`) by the token's position.
fn rope(x: &mut [f32], heads: usize, cfg: &ModelConfig, host: &HostParams, positions: &[u32]) {
    let hd = cfg.head_dim;
    let half = hd / 2;
    par_chunks_mut(x, heads * hd, PARALLEL_MIN, |t, token| {
        let pos = positions[t] as usize;
        let cos = &host.cos[pos * half..(pos + 1) * half];
        let sin = &host.sin[pos * half..(pos + 1) * half];
        let turn = |(xa, xb): (&mut f32, &mut f32), (c, s): (&f32, &f32)| {
            let (a, b) = (*xa, *xb);
            *xa = a * c - b * s;
            *xb = b * c + a * s;
        };
        // One loop per layout, so that the compiler vectorises the rotation.
        for head in token.chunks_exact_mut(hd) {
            match cfg.rope_layout {
                RopeLayout::Halves => {
                    let (lo, hi) = head.split_at_mut(half);
                    lo.iter_mut()
                        .zip(hi.iter_mut())
                        .zip(cos.iter().zip(sin))
                        .for_each(|(x, cs)| turn(x, cs));
                }
                RopeLayout::Interleaved => head
                    .chunks_exact_mut(2)
                    .zip(cos.iter().zip(sin))
                    .for_each(|(pair, cs)| {
                        let (a, b) = pair.split_at_mut(1);
                        turn((&mut a[0], &mut b[0]), cs)
                    }),
            }
        }
    });
}

/// The attention layer's output `[tokens, heads * head_dim]` and its partial-softmax slots,
/// reused from one layer to the next.
struct AttentionBuffers {
    out: Vec<f32>,
    partials: Vec<f32>,
}

/// Buffers an attention task reuses from one call to the next on the same thread.
#[derive(Default)]
struct TaskScratch {
    transposed: Vec<f32>,
    outs: Vec<f32>,
    scores: Vec<f32>,
    merged: Vec<f32>,
    widened: WidenedHead,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<TaskScratch> = std::cell::RefCell::new(TaskScratch::default());
}

/// A run of cached keys and values that one or more rows read: a shared block (read once for
/// every row that descends from it) or one row's private tail.
struct Run {
    /// A row that reads it and the run's place among that row's pieces, which name it on
    /// every layer (see [`SeqStore::piece`]).
    row: usize,
    piece: usize,
    /// Positions in use.
    len: usize,
}

/// The shape of one step's attention, the same on every layer: which rows read which cache
/// pieces, and the tasks over them. Built once per forward pass, not once per layer (with
/// beams or tree branches a row's cache is several pieces, some shared, and walking them costs
/// more than a small model's attention arithmetic).
struct AttentionPlan {
    /// Per row: where its new positions start in its tail.
    starts: Vec<usize>,
    /// Per row, the pieces of its cache in order (its tail last): (run, where the run starts in
    /// the row's sequence).
    row_runs: Vec<Vec<(usize, usize)>>,
    runs: Vec<Run>,
    queries: Vec<Query>,
    /// Up to [`LANES`] queries of one KV head over one run: (run, KV head, queries); in per-row
    /// mode, a row's queries of one KV head: (row, KV head, queries).
    tasks: Vec<(usize, usize, std::ops::Range<usize>)>,
    /// Partial-softmax slots, for rows whose cache is in several pieces: query (token t, head h)
    /// of row r has one per piece, at `slot_base[r] + ((t - off) * heads + h) * pieces + k`. A
    /// row in one piece gets its output straight from its task.
    slot_base: Vec<usize>,
    slots: usize,
    /// Per-row mode (see [`PER_ROW_MAX_REREAD`]): a task is `(row, KV head, queries)` and walks
    /// the row's pieces, merging their partials itself.
    per_row: bool,
}

/// When every row decodes a token whose queries fit the few-query kernel, and the positions
/// that rows would read again instead of sharing (each shared run's length times its readers
/// beyond the first) are at most this many, a task takes one row's queries of one KV head over
/// every piece of its cache and merges the partial softmaxes itself. Beams, branches and
/// samples of a short prompt share little; a task per shared run plus a second region to merge
/// then cost more than reading the shared blocks again from the cache. Paired against the run
/// layout in one process: 4 beams 1.06x, 16 samples of a 42-token prompt 1.04x, 64 of them
/// 1.03x, 4 samples of a 1,000-token prompt (3,000 positions read again) 1.03x, but 8 samples of
/// it (7,000) 0.92x and 16 samples of a 300-token prompt (4,500) 0.93x.
const PER_ROW_MAX_REREAD: usize = 3000;

impl AttentionPlan {
    /// Reserves room for every row's new positions on every layer (serial: it may grow a
    /// buffer) and lays out the step's attention.
    fn new(cfg: &ModelConfig, store: &mut SeqStore, plan: &RowPlan<'_>) -> Result<Self> {
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        let groups = heads / kv_heads;
        let mut starts = Vec::with_capacity(plan.rows.len());
        for (row, &(_, n)) in plan.rows.iter().zip(&plan.spans) {
            starts.push(store.reserve_all(row.seq, n)?);
        }
        let mut runs: Vec<Run> = Vec::new();
        // Per run, the rows that read it: (row, piece, how many of the run's positions the row's
        // first new token sees; each later token sees one more, up to the run's length).
        let mut readers: Vec<Vec<(usize, usize, usize)>> = Vec::new();
        let mut row_runs: Vec<Vec<(usize, usize)>> = Vec::with_capacity(plan.rows.len());
        let mut run_of_block: HashMap<usize, usize> = HashMap::new();
        // Per row: positions cached before this step.
        let mut pasts = Vec::with_capacity(plan.rows.len());
        for (r, (row, &(_, n))) in plan.rows.iter().zip(&plan.spans).enumerate() {
            let blocks = store.blocks(row.seq)?;
            let tail = (None, starts[r] + n);
            let row_pieces = blocks
                .iter()
                .map(|&(id, len)| (Some(id), len))
                .chain([tail]);
            let past = blocks.iter().map(|b| b.1).sum::<usize>() + starts[r];
            pasts.push(past);
            let mut own = Vec::with_capacity(blocks.len() + 1);
            let mut at = 0;
            for (k, (block, len)) in row_pieces.enumerate() {
                let mut new_run = || {
                    runs.push(Run {
                        row: r,
                        piece: k,
                        len,
                    });
                    readers.push(Vec::new());
                    runs.len() - 1
                };
                let i = match block {
                    Some(id) => *run_of_block.entry(id).or_insert_with(new_run),
                    None => new_run(),
                };
                // Query i of the row sees positions up to `past + i` of its sequence.
                readers[i].push((r, k, (past + 1).saturating_sub(at)));
                own.push((i, at));
                at += len;
            }
            row_runs.push(own);
        }
        let reread: usize = runs
            .iter()
            .zip(&readers)
            .map(|(run, readers)| run.len * readers.len().saturating_sub(1))
            .sum();
        let per_row = reread <= PER_ROW_MAX_REREAD
            && attention_few::available(cfg.head_dim)
            && plan.spans.iter().all(|&(_, n)| n * groups <= FEW);
        let mut queries: Vec<Query> = Vec::new();
        let mut tasks = Vec::new();
        let mut slot_base = Vec::new();
        let mut slots = 0;
        if per_row {
            for (row, (&(off, n), &past)) in plan.spans.iter().zip(&pasts).enumerate() {
                for kvh in 0..kv_heads {
                    let start = queries.len();
                    for i in 0..n {
                        for h in kvh * groups..(kvh + 1) * groups {
                            queries.push(Query {
                                token: off + i,
                                head: h,
                                // Positions of the whole sequence it sees.
                                visible: past + 1 + i,
                                slot: None,
                            });
                        }
                    }
                    tasks.push((row, kvh, start..queries.len()));
                }
            }
        } else {
            for (own, &(_, n)) in row_runs.iter().zip(&plan.spans) {
                let count = own.len();
                slot_base.push(slots);
                if count > 1 {
                    slots += n * heads * count;
                }
            }
            for (ri, (run, readers)) in runs.iter().zip(&readers).enumerate() {
                for kvh in 0..kv_heads {
                    let start = queries.len();
                    for &(row, piece, first_visible) in readers {
                        let (off, n) = plan.spans[row];
                        let count = row_runs[row].len();
                        for i in 0..n {
                            let visible = (first_visible + i).min(run.len);
                            for h in kvh * groups..(kvh + 1) * groups {
                                queries.push(Query {
                                    token: off + i,
                                    head: h,
                                    visible,
                                    slot: (count > 1)
                                        .then(|| slot_base[row] + (i * heads + h) * count + piece),
                                });
                            }
                        }
                    }
                    for first in (start..queries.len()).step_by(LANES) {
                        tasks.push((ri, kvh, first..(first + LANES).min(queries.len())));
                    }
                }
            }
        }
        Ok(Self {
            starts,
            row_runs,
            runs,
            queries,
            tasks,
            slot_base,
            slots,
            per_row,
        })
    }
}

/// One query vector of one attention task.
struct Query {
    token: usize,
    head: usize,
    visible: usize,
    /// Where its partial softmax goes, when its row's cache is in several pieces.
    slot: Option<usize>,
}

/// One cache piece of one layer on the host: head `h`, position `p` starts at
/// `h * head_stride + p * head_dim` of its keys and values.
struct PieceView<'a> {
    kv: KvValues<'a>,
    head_stride: usize,
}

impl<'a> PieceView<'a> {
    /// The keys and values of KV head `kvh`'s first `len` positions, as stored.
    fn head(&self, kvh: usize, len: usize, hd: usize) -> KvHead<'a> {
        let at = kvh * self.head_stride..kvh * self.head_stride + len * hd;
        match self.kv {
            KvValues::F32 { k, v } => KvHead::F32 {
                keys: &k[at.clone()],
                values: &v[at],
            },
            KvValues::F16 { k, v } => KvHead::F16 {
                keys: &k[at.clone()],
                values: &v[at],
            },
        }
    }

    /// Where the piece's keys start: one piece, one address.
    fn kv_addr(&self) -> usize {
        match self.kv {
            KvValues::F32 { k, .. } => k.as_ptr() as usize,
            KvValues::F16 { k, .. } => k.as_ptr() as usize,
        }
    }
}

/// Cached keys and values as stored: f32, or f16 (half the memory traffic of a wide batch's
/// attention), widened to f32 per task.
#[derive(Clone, Copy)]
enum KvValues<'a> {
    F32 { k: &'a [f32], v: &'a [f32] },
    F16 { k: &'a [f16], v: &'a [f16] },
}

/// The f32 keys and values of one KV head of a half-precision piece, widened by the tasks of
/// one thread. A prefill's tiles of one run come to a thread one after another, each seeing a
/// few more positions than the last: each position is widened once, not once per tile.
#[derive(Default)]
struct WidenedHead {
    /// The attention call, piece and KV head they belong to; the buffers change only within
    /// one call, so nothing carries over from the last.
    tag: Option<(u64, usize, usize)>,
    len: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl WidenedHead {
    /// The first `need` positions of KV head `kvh` of `p`, as f32.
    fn get<'s>(
        &'s mut self,
        call: u64,
        p: &'s PieceView<'_>,
        kvh: usize,
        need: usize,
        hd: usize,
    ) -> (&'s [f32], &'s [f32]) {
        let (k, v) = match p.head(kvh, need, hd) {
            KvHead::F32 { keys, values } => return (keys, values),
            KvHead::F16 { keys, values } => (keys, values),
        };
        let tag = Some((call, p.kv_addr(), kvh));
        if self.tag != tag {
            self.tag = tag;
            self.len = 0;
        }
        if need > self.len {
            let (from, to) = (self.len * hd, need * hd);
            self.keys.resize(to, 0.0);
            self.values.resize(to, 0.0);
            widen_f16(&k[from..to], &mut self.keys[from..to]);
            widen_f16(&v[from..to], &mut self.values[from..to]);
            self.len = need;
        }
        (&self.keys[..need * hd], &self.values[..need * hd])
    }
}

/// Counts attention calls, to tell one call's [`WidenedHead`] from the next.
static ATTENTION_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The first `len` positions of a piece's `[kv_heads, capacity, head_dim]` key and value
/// buffers on the host.
fn piece_view<'a>(
    (k, k_layout): (&'a Storage, &Layout),
    (v, v_layout): (&'a Storage, &Layout),
    len: usize,
) -> Result<PieceView<'a>> {
    let (Storage::Cpu(k), Storage::Cpu(v)) = (k, v) else {
        return Err(Error::invalid("the host forward pass needs a CPU cache"));
    };
    if k_layout != v_layout {
        return Err(Error::invalid("cache keys and values differ in layout"));
    }
    let dims = k_layout.dims();
    let stride = k_layout.stride();
    if dims.len() != 3 || stride[2] != 1 || stride[1] != dims[2] {
        return Err(Error::invalid("cache piece has an unexpected layout"));
    }
    if len == 0 || len > dims[1] {
        return Err(Error::invalid("cache view longer than its buffer"));
    }
    let start = k_layout.start_offset();
    let used = start..start + (dims[0] - 1) * stride[0] + len * dims[2];
    let kv = match (k, v) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => KvValues::F32 {
            k: &k[used.clone()],
            v: &v[used],
        },
        (CpuStorage::F16(k), CpuStorage::F16(v)) => KvValues::F16 {
            k: &k[used.clone()],
            v: &v[used],
        },
        _ => {
            return Err(Error::invalid(
                "the host forward pass keeps its cache in f32 or f16",
            ))
        }
    };
    Ok(PieceView {
        kv,
        head_stride: stride[0],
    })
}

/// From this many rows on, their new keys and values are written on the team; below it a
/// hand-off costs more than the copies (one row, a CoLD pair). The writes miss the caches (the
/// step's weights have streamed through since the last): four rows took ~5 µs per layer on one
/// thread; on the team, paired in one process, 4 rows 1.02x, beam 4 1.005x.
const PARALLEL_WRITE_ROWS: usize = 3;

/// Copies tokens `first_token..first_token + n` of a `[tokens, kv_heads * head_dim]` projection
/// into positions `start..start + n` of a `[kv_heads, len, head_dim]` cache view, in place.
struct WriteNewPositions<'a> {
    src: &'a [f32],
    first_token: usize,
    n: usize,
    start: usize,
    head_dim: usize,
}

impl candle_core::InplaceOp1 for WriteNewPositions<'_> {
    fn name(&self) -> &'static str {
        "write-new-cache-positions"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (dims, stride) = (layout.dims(), layout.stride());
        let hd = self.head_dim;
        if dims.len() != 3 || dims[2] != hd || stride[2] != 1 || self.start + self.n > dims[1] {
            return Err(candle_core::Error::Msg(
                "cache view does not fit the new positions".into(),
            ));
        }
        let kv_dim = dims[0] * hd;
        let places = (0..dims[0]).flat_map(|head| {
            (0..self.n).map(move |i| {
                let at = layout.start_offset() + head * stride[0] + (self.start + i) * stride[1];
                let from = (self.first_token + i) * kv_dim + head * hd;
                (at..at + hd, &self.src[from..from + hd])
            })
        });
        match storage {
            CpuStorage::F32(buf) => places.for_each(|(to, src)| buf[to].copy_from_slice(src)),
            CpuStorage::F16(buf) => places.for_each(|(to, src)| narrow_f16(src, &mut buf[to])),
            _ => {
                return Err(candle_core::Error::Msg(
                    "the host forward pass keeps an f32 or f16 cache".into(),
                ))
            }
        }
        Ok(())
    }
}

/// Writes each row's new keys and values into its cache and attends over the whole cache, as
/// laid out by `layout`. `q` is `[tokens, heads * hd]`, `k`/`v` are `[tokens, kv_heads * hd]`;
/// writes `[tokens, heads * hd]` into `buffers.out`.
fn attention(
    cfg: &ModelConfig,
    layer: usize,
    [q, k, v]: [&[f32]; 3],
    store: &SeqStore,
    plan: &RowPlan<'_>,
    layout: &AttentionPlan,
    buffers: &mut AttentionBuffers,
) -> Result<()> {
    let hd = cfg.head_dim;
    let heads = cfg.num_heads;
    let AttentionPlan {
        starts,
        row_runs,
        runs,
        queries,
        tasks,
        slot_base,
        slots,
        per_row,
    } = layout;
    let slots = *slots;
    // Every row's keys and values written into its cache (on the team for wide batches); the
    // cache is then read in place: no tensor is made per row and layer.
    let write = |r: usize| -> Result<()> {
        let (first_token, n) = plan.spans[r];
        let (tail_k, tail_v) = store.piece(plan.rows[r].seq, layer, row_runs[r].len() - 1)?;
        for (buffer, src) in [(tail_k, k), (tail_v, v)] {
            buffer.inplace_op1(&WriteNewPositions {
                src,
                first_token,
                n,
                start: starts[r],
                head_dim: hd,
            })?;
        }
        Ok(())
    };
    if plan.rows.len() >= PARALLEL_WRITE_ROWS {
        map_parallel((0..plan.rows.len()).collect(), write)
            .into_iter()
            .collect::<Result<()>>()?;
    } else {
        (0..plan.rows.len()).try_for_each(write)?;
    }
    // Each run's keys and values on this layer, with the positions in use.
    let guards = runs
        .iter()
        .map(|run| {
            let (k, v) = store.piece(plan.rows[run.row].seq, layer, run.piece)?;
            Ok((k.storage_and_layout(), v.storage_and_layout(), run.len))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = guards
        .iter()
        .map(|(gk, gv, len)| piece_view((&gk.0, gk.1), (&gv.0, gv.1), *len))
        .collect::<Result<Vec<_>>>()?;
    let scale = 1.0 / (hd as f32).sqrt();
    let stride = PARTIAL_HEADER + hd;
    // Every slot and every query's output below is written by exactly one task before anything
    // reads it, so neither buffer is cleared first.
    let AttentionBuffers { out, partials } = buffers;
    if partials.len() < slots * stride {
        partials.resize(slots * stride, 0.0);
    }
    let partials = &mut partials[..slots * stride];
    let partial_writer = DisjointOut::new(partials);
    if out.len() != q.len() {
        return Err(Error::invalid("attention output buffer has the wrong size"));
    }
    let writer = DisjointOut::new(out);
    let call = ATTENTION_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let few_kernel = attention_few::available(hd);
    team().run(tasks.len(), &|task| {
        let (ri, kvh, ref range) = tasks[task];
        let mine = &queries[range.clone()];
        if *per_row {
            // Task `ri` is a row: every piece of its cache, then the merge.
            let pieces = &row_runs[ri];
            let n = mine.len();
            let mut qs: [&[f32]; FEW] = [&[]; FEW];
            for (q_ref, qy) in qs.iter_mut().zip(mine) {
                *q_ref = &q[qy.token * heads * hd + qy.head * hd..][..hd];
            }
            let kvs: Vec<(KvHead<'_>, [usize; FEW])> = pieces
                .iter()
                .map(|&(run, at)| {
                    let mut visible = [0usize; FEW];
                    for (seen, qy) in visible.iter_mut().zip(mine) {
                        *seen = qy.visible.saturating_sub(at).min(runs[run].len);
                    }
                    let need = visible[..n].iter().copied().max().unwrap_or(0);
                    let kv = views[run].head(kvh, need, hd);
                    kv.prefetch();
                    (kv, visible)
                })
                .collect();
            SCRATCH.with_borrow_mut(|scratch| {
                let TaskScratch {
                    outs,
                    scores,
                    merged,
                    ..
                } = scratch;
                outs.resize(pieces.len() * n * stride, 0.0);
                for ((kv, visible), outs) in kvs.iter().zip(outs.chunks_exact_mut(n * stride)) {
                    attend_few(&qs[..n], &visible[..n], *kv, hd, scale, scores, outs);
                }
                merged.resize(hd, 0.0);
                for (j, qy) in mine.iter().enumerate() {
                    let parts = (0..pieces.len()).map(|k| {
                        let at = (k * n + j) * stride;
                        &outs[at..at + stride]
                    });
                    merge_partials(parts, merged);
                    // SAFETY: each query of the step is in exactly one task.
                    unsafe { writer.set_slice(qy.token * heads * hd + qy.head * hd, merged) };
                }
            });
            return;
        }
        let p = &views[ri];
        let need = mine.iter().map(|qy| qy.visible).max().unwrap_or(0);
        p.head(kvh, need, hd).prefetch();
        SCRATCH.with_borrow_mut(|scratch| {
            let TaskScratch {
                transposed,
                outs,
                scores,
                merged,
                widened,
            } = scratch;
            // Each query's partial, then its output or its slot.
            let finish = |outs: &[f32], merged: &mut Vec<f32>| {
                merged.resize(hd, 0.0);
                for (qy, o) in mine.iter().zip(outs.chunks_exact(stride)) {
                    match qy.slot {
                        // SAFETY: every slot belongs to one query of one task.
                        Some(slot) => unsafe { partial_writer.set_slice(slot * stride, o) },
                        None => {
                            merge_partials(std::iter::once(o), merged);
                            // SAFETY: a query of a row in one piece is in exactly one task.
                            unsafe {
                                writer.set_slice(qy.token * heads * hd + qy.head * hd, merged)
                            };
                        }
                    }
                }
            };
            if few_kernel && mine.len() <= FEW {
                let mut qs: [&[f32]; FEW] = [&[]; FEW];
                let mut visible = [0usize; FEW];
                for ((q_ref, seen), qy) in qs.iter_mut().zip(&mut visible).zip(mine) {
                    *q_ref = &q[qy.token * heads * hd + qy.head * hd..][..hd];
                    *seen = qy.visible;
                }
                let n = mine.len();
                let need = visible[..n].iter().copied().max().unwrap_or(0);
                let kv = p.head(kvh, need, hd);
                outs.resize(n * stride, 0.0);
                attend_few(
                    &qs[..n],
                    &visible[..n],
                    kv,
                    hd,
                    scale,
                    scores,
                    &mut outs[..n * stride],
                );
                finish(&outs[..n * stride], merged);
                return;
            }
            transposed.clear();
            transposed.resize(hd * LANES, 0.0);
            let mut visible = [0usize; LANES];
            for (lane, qy) in mine.iter().enumerate() {
                let src = &q[qy.token * heads * hd + qy.head * hd..][..hd];
                for (d, &v) in src.iter().enumerate() {
                    transposed[d * LANES + lane] = v;
                }
                visible[lane] = qy.visible;
            }
            let need = visible.iter().copied().max().unwrap_or(0);
            let (keys, values) = widened.get(call, p, kvh, need, hd);
            let tile = Tile {
                queries: transposed,
                used: mine.len(),
                visible,
                keys,
                values,
                head_dim: hd,
                scale,
            };
            outs.clear();
            outs.resize(mine.len() * stride, 0.0);
            let mut refs: Vec<&mut [f32]> = outs.chunks_exact_mut(stride).collect();
            attend(&tile, scores, &mut refs);
            finish(outs, merged);
        });
    });

    let several: Vec<usize> = (0..plan.rows.len())
        .filter(|&r| !per_row && row_runs[r].len() > 1)
        .collect();
    team().run(several.len(), &|task| {
        let r = several[task];
        let (off, n) = plan.spans[r];
        let pieces = row_runs[r].len();
        let mut merged = vec![0f32; hd];
        for i in 0..n {
            for h in 0..heads {
                let base = slot_base[r] + (i * heads + h) * pieces;
                let parts = (base..base + pieces).map(|s| &partials[s * stride..(s + 1) * stride]);
                merge_partials(parts, &mut merged);
                // SAFETY: each task writes only its own row's tokens.
                unsafe { writer.set_slice((off + i) * heads * hd + h * hd, &merged) };
            }
        }
    });
    Ok(())
}
