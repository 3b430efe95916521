//! Projection and embedding layers whose weights are either quantized (GGML blocks) or dense.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};
use crate::kernels::cpu::dense;
use crate::kernels::cpu::float::FloatMatrix;
use crate::kernels::cpu::parallel::{row_chunks, team, DisjointOut, StealingRuns};
use crate::kernels::cpu::qmatmul::{QuantMatrix, QuantizedActs};
use crate::kernels::cpu::{host_f32, requantize, Rng};
use crate::lora::LoraPair;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A weight matrix `[out, in]`, applied as `x · Wᵀ (+ b)` to a `[rows, in]` input.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// The bias as f32 on the host, for the CPU forward pass.
    bias_host: Option<Vec<f32>>,
    out_features: usize,
    in_features: usize,
    bytes: usize,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Blocks(QuantMatrix),
    /// Float weights (F16, BF16 or F32) for the host pass (f32 activations on the CPU).
    Float(FloatMatrix),
    Quantized(QMatMul),
    Dense(Tensor),
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let bytes = weight.elem_count() * weight.dtype().size_in_bytes();
        Ok(Self {
            bytes,
            weight: LinearWeight::Dense(weight),
            bias_host: host_bias(bias.as_ref())?,
            bias,
            out_features,
            in_features,
        })
    }

    /// A dense weight for a forward pass computing in `compute`. On the CPU under f32
    /// activations (the host pass) an F16, BF16 or F32 weight goes to the float kernels in its
    /// own precision ([`FloatMatrix`]: half-precision weights stay two bytes each); anything else
    /// is a candle tensor in the compute dtype.
    pub fn dense_for(weight: Tensor, bias: Option<Tensor>, compute: DType) -> Result<Self> {
        let host = compute == DType::F32 && matches!(weight.device(), Device::Cpu);
        let matrix = if host {
            FloatMatrix::from_tensor(&weight)?
        } else {
            None
        };
        let Some(matrix) = matrix else {
            return Self::dense(weight.to_dtype(compute)?, bias);
        };
        let (out_features, in_features) = weight.dims2()?;
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        Ok(Self {
            bytes: matrix.bytes(),
            weight: LinearWeight::Float(matrix),
            bias_host: host_bias(bias.as_ref())?,
            bias,
            out_features,
            in_features,
        })
    }

    pub fn quantized(weight: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self {
            bytes: weight.storage_size_in_bytes(),
            weight: match QuantMatrix::from_qtensor(&weight)? {
                Some(m) => LinearWeight::Blocks(m),
                None => LinearWeight::Quantized(QMatMul::from_arc(weight)?),
            },
            bias_host: host_bias(bias.as_ref())?,
            bias,
            out_features,
            in_features,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Whether the weight is held in a quantized GGML format (not a float one read from GGUF).
    pub fn is_quantized(&self) -> bool {
        matches!(
            self.weight,
            LinearWeight::Blocks(_) | LinearWeight::Quantized(QMatMul::QTensor(_))
        )
    }

    /// Bytes of the weight matrix as held in memory.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Blocks(_) | LinearWeight::Float(_) => {
                // The CPU kernels, which add the bias themselves.
                let (m, _) = x.dims2()?;
                let [y] = project_many(&host_f32(x)?, m, [self], &[])?;
                return Ok(Tensor::from_vec(y, (m, self.out_features), x.device())?);
            }
            LinearWeight::Quantized(w) => w.forward(x)?,
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// This projection with the LoRA update `scale · B · A` added to its weight, stored as the
    /// weight was: a float weight in its dtype (exact up to that dtype's rounding), a quantized
    /// one in its GGML format, rounded stochastically with `rng` (see [`requantize`]).
    pub(crate) fn merged(&self, pair: &LoraPair, rng: &mut Rng) -> Result<Linear> {
        if pair.in_features() != self.in_features || pair.out_features() != self.out_features {
            return Err(Error::invalid(format!(
                "LoRA update [{}, {}] does not fit a [{}, {}] projection",
                pair.out_features(),
                pair.in_features(),
                self.out_features,
                self.in_features
            )));
        }
        let cpu = Device::Cpu;
        let a = Tensor::from_slice(&pair.a, (pair.rank, self.in_features), &cpu)?;
        let b = Tensor::from_slice(&pair.b, (self.out_features, pair.rank), &cpu)?;
        let delta = (b.matmul(&a)? * f64::from(pair.scale))?;
        let quantized = |w: &QTensor, rng: &mut Rng| -> Result<Linear> {
            let sum = requantize::add_update(w, &host_f32(&delta)?, rng)?;
            Linear::quantized(Arc::new(sum), self.bias.clone())
        };
        let float = |weight: LinearWeight| Linear {
            weight,
            ..self.clone()
        };
        match &self.weight {
            LinearWeight::Blocks(q) => quantized(&q.to_qtensor()?, rng),
            LinearWeight::Float(f) => {
                let sum = float_sum(&f.to_tensor()?, &delta)?;
                Linear::dense_for(sum, self.bias.clone(), DType::F32)
            }
            LinearWeight::Quantized(QMatMul::QTensor(q)) => quantized(q, rng),
            LinearWeight::Dense(w) => Ok(float(LinearWeight::Dense(float_sum(w, &delta)?))),
            LinearWeight::Quantized(QMatMul::Tensor(w)) => Ok(float(LinearWeight::Quantized(
                QMatMul::Tensor(float_sum(w, &delta)?),
            ))),
            LinearWeight::Quantized(QMatMul::TensorF16(w)) => Ok(float(LinearWeight::Quantized(
                QMatMul::TensorF16(float_sum(w, &delta)?),
            ))),
        }
    }
}

/// `w + delta` computed in f32 and stored back in `w`'s dtype and device.
fn float_sum(w: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let sum = (w.to_device(&Device::Cpu)?.to_dtype(DType::F32)? + delta)?;
    Ok(sum.to_dtype(w.dtype())?.to_device(w.device())?)
}

fn host_bias(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    bias.map(host_f32).transpose()
}

/// Tasks for a projection of `m` input rows through `rows × cols` weights on `threads` threads.
/// A decode step's rows (up to [`STREAMING_ROWS`]) take one contiguous run per thread, which
/// keeps the prefetches ahead of the tiles for the whole run: against tasks of [`TASK_MACS`]
/// (five pairs of groups for a 576-column matrix at 16 rows, each starting cold), paired in one
/// process: 4 rows 1.11x, 16 rows 1.11x, 64 rows ~1.05x. A prefill's thousands of rows take
/// tasks of about [`TASK_MACS`] multiply-adds (at least four per thread), claimed as threads
/// free up, so that cores running at different speeds on a shared machine finish a long region
/// together instead of one waiting out the other's last large task.
fn task_count(m: usize, rows: usize, cols: usize, threads: usize) -> usize {
    if m <= STREAMING_ROWS {
        return threads;
    }
    (m * rows * cols).div_ceil(TASK_MACS).max(4 * threads)
}

/// Up to this many input rows (a decode step of a batch) a projection is one contiguous run of
/// weight rows per thread.
const STREAMING_ROWS: usize = 64;

/// From this many input rows up to [`STREAMING_ROWS`], each thread's run is cut into chunks of
/// about [`STEALING_CHUNK_MACS`] multiply-adds that a thread done with its own run takes from the
/// back of the other's ([`StealingRuns`]). Paired in one process against fixed runs: 16 rows
/// 1.08x, 64 rows 1.11x (the trace of a 16-row step: the threads' idle time in projections
/// 3.2 -> 0.9 ms per step). Fewer rows are bound by memory, where a thread that finishes early
/// leaves the other the whole bus and taking its work gains nothing (4 rows: 0.99-1.06x).
const STEALING_ROWS: usize = 8;
const STEALING_CHUNK_MACS: usize = 1 << 20;

/// Multiply-adds per task of a many-row projection: some tens of microseconds of kernel time,
/// against well under one of claiming it.
const TASK_MACS: usize = 4 << 20;

/// A weight the CPU kernels read directly during one parallel region.
enum RowSource<'a> {
    Blocks(&'a QuantMatrix),
    Float(&'a FloatMatrix),
}

/// A LoRA update to add to one projection's output, for some of the input rows.
pub(crate) struct LoraUse<'a> {
    /// Which of the projections passed to [`project_many`] it updates.
    pub output: usize,
    pub pair: &'a LoraPair,
    /// The input rows (tokens) that use it.
    pub tokens: &'a [usize],
}

/// Adds `scale · B[rows] · down_j` to output rows `rows` of each token `t_j` of `l`, with
/// `down` its `[tokens, rank]` values of `x · Aᵀ`.
///
/// # Safety
/// No other task of the same region touches those rows of `out`.
unsafe fn add_lora_rows(l: &LoraUse<'_>, down: &[f32], rows: Range<usize>, out: &DisjointOut<'_>) {
    let (rank, cols) = (l.pair.rank, l.pair.out_features());
    let bt = &l.pair.bt[rows.start..];
    let mut up = vec![0f32; rows.len()];
    let mut coefs = vec![0f32; rank];
    for (j, &t) in l.tokens.iter().enumerate() {
        for (c, &d) in coefs.iter_mut().zip(&down[j * rank..(j + 1) * rank]) {
            *c = d * l.pair.scale;
        }
        dense::weighted_rows(bt, cols, &coefs, &mut up);
        out.add_slice(t * cols + rows.start, &up);
    }
}

struct CountOnDrop<'a>(&'a AtomicUsize);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

enum Task {
    Base(usize, Range<usize>),
    /// Chunks of the base work from home run `h` of a [`StealingRuns`], then from the others.
    Walk(usize),
    LoraDown(usize),
}

/// [`project_many_into`] into new buffers: one `[m, out_i]` buffer per projection.
pub(crate) fn project_many<const N: usize>(
    x: &[f32],
    m: usize,
    linears: [&Linear; N],
    loras: &[LoraUse<'_>],
) -> Result<[Vec<f32>; N]> {
    let mut outs: [Vec<f32>; N] = linears.map(|l| vec![0f32; m * l.out_features]);
    let mut refs = outs.each_mut().map(|o| o.as_mut_slice());
    project_many_into(x, m, linears, loras, &mut refs)?;
    Ok(outs)
}

/// `x · Wᵢᵀ + bᵢ` for several projections that share the input `x` (`[m, in]`, f32 on the
/// host), all in one parallel region (the q/k/v or gate/up projections of a layer), plus the
/// LoRA updates `scale · (x_t · Aᵀ) · Bᵀ` of the rows `t` that use an adapter: their `x · Aᵀ`
/// runs in the same region, over those rows only. Every value of `outs[i]` (`[m, out_i]`) is
/// overwritten, so a caller may hand in a buffer from an earlier layer without clearing it.
pub(crate) fn project_many_into<const N: usize>(
    x: &[f32],
    m: usize,
    linears: [&Linear; N],
    loras: &[LoraUse<'_>],
    outs: &mut [&mut [f32]; N],
) -> Result<()> {
    let mut acts: Option<QuantizedActs> = None;
    for (lin, out) in linears.iter().zip(outs.iter()) {
        if x.len() != m * lin.in_features {
            return Err(Error::invalid(format!(
                "projection input has {} values, expected {m} rows of {}",
                x.len(),
                lin.in_features
            )));
        }
        if out.len() != m * lin.out_features {
            return Err(Error::invalid(format!(
                "projection output holds {} values, expected {m} rows of {}",
                out.len(),
                lin.out_features
            )));
        }
        if let (LinearWeight::Blocks(_), None) = (&lin.weight, &acts) {
            acts = Some(QuantizedActs::new(x, lin.in_features));
        }
    }
    for l in loras {
        let lin = linears
            .get(l.output)
            .ok_or_else(|| Error::invalid("LoRA update for a missing projection"))?;
        if l.pair.in_features() != lin.in_features || l.pair.out_features() != lin.out_features {
            return Err(Error::invalid("LoRA update does not fit its projection"));
        }
        if l.tokens.iter().any(|&t| t >= m) {
            return Err(Error::invalid("LoRA update for a row outside the input"));
        }
    }
    let mut sources: Vec<Option<RowSource<'_>>> = Vec::with_capacity(N);
    for (lin, out) in linears.iter().zip(outs.iter_mut()) {
        let source = match &lin.weight {
            LinearWeight::Blocks(q) => Some(RowSource::Blocks(q)),
            LinearWeight::Float(f) => Some(RowSource::Float(f)),
            _ => None,
        };
        if source.is_none() {
            // Formats without a kernel here go through candle as one call.
            let xt = Tensor::from_slice(x, (m, lin.in_features), &Device::Cpu)?;
            out.copy_from_slice(&host_f32(&lin.forward(&xt)?)?);
        }
        sources.push(source);
    }
    let lora_inputs: Vec<Vec<f32>> = loras
        .iter()
        .map(|l| {
            let cols = l.pair.in_features();
            let mut rows = Vec::with_capacity(l.tokens.len() * cols);
            for &t in l.tokens {
                rows.extend_from_slice(&x[t * cols..(t + 1) * cols]);
            }
            rows
        })
        .collect();
    let mut lora_down: Vec<Vec<f32>> = loras
        .iter()
        .map(|l| vec![0f32; l.tokens.len() * l.pair.rank])
        .collect();
    {
        let team = team();
        // The `x · Aᵀ` tasks come first: tasks are claimed in order, so every one of them has
        // been claimed (and will finish) before a base task starts waiting on them.
        let mut tasks: Vec<Task> = (0..loras.len()).map(Task::LoraDown).collect();
        let stealing = (STEALING_ROWS..=STREAMING_ROWS).contains(&m) && team.threads() > 1;
        let mut chunks: Vec<(usize, Range<usize>)> = Vec::new();
        for (i, (src, lin)) in sources.iter().zip(linears).enumerate() {
            if src.is_none() {
                continue;
            }
            if stealing {
                let per = (STEALING_CHUNK_MACS / (m * lin.in_features).max(1)).max(1);
                let parts = lin.out_features.div_ceil(per);
                chunks.extend(
                    row_chunks(lin.out_features, parts)
                        .into_iter()
                        .map(|r| (i, r)),
                );
            } else {
                tasks.extend(
                    row_chunks(
                        lin.out_features,
                        task_count(m, lin.out_features, lin.in_features, team.threads()),
                    )
                    .into_iter()
                    .map(|r| Task::Base(i, r)),
                );
            }
        }
        let runs = StealingRuns::new(chunks.len(), team.threads());
        if !chunks.is_empty() {
            tasks.extend((0..runs.homes()).map(Task::Walk));
        }
        let downs_done = AtomicUsize::new(0);
        let writers: Vec<DisjointOut<'_>> = outs.iter_mut().map(|o| DisjointOut::new(o)).collect();
        let down_writers: Vec<DisjointOut<'_>> =
            lora_down.iter_mut().map(|o| DisjointOut::new(o)).collect();
        let base = |i: usize, rows: &Range<usize>| {
            // SAFETY: every chunk of base work owns a distinct row range of one output.
            match &sources[i] {
                Some(RowSource::Blocks(q)) => unsafe {
                    if let Some(acts) = &acts {
                        q.compute_rows(acts, rows.clone(), &writers[i])
                    }
                },
                Some(RowSource::Float(f)) => unsafe {
                    f.compute_rows(x, rows.clone(), &writers[i])
                },
                None => {}
            }
            let mut mine = loras
                .iter()
                .zip(&down_writers)
                .filter(|(l, _)| l.output == i)
                .peekable();
            if mine.peek().is_some() {
                while downs_done.load(Ordering::Acquire) < loras.len() {
                    std::hint::spin_loop();
                }
            }
            for (l, down) in mine {
                // SAFETY: every `x · Aᵀ` task has finished writing; the rows are this
                // chunk's own rows of its output, as in the base work above.
                unsafe {
                    let down = down.read(0, l.tokens.len() * l.pair.rank);
                    add_lora_rows(l, down, rows.clone(), &writers[i])
                };
            }
        };
        team.run(tasks.len(), &|t| match &tasks[t] {
            Task::Base(i, rows) => base(*i, rows),
            Task::Walk(home) => {
                while let Some(c) = runs.next(*home) {
                    base(chunks[c].0, &chunks[c].1);
                }
            }
            Task::LoraDown(k) => {
                // Counted even if it panics, so that no base task waits forever.
                let _done = CountOnDrop(&downs_done);
                let pair = loras[*k].pair;
                // SAFETY: this task alone writes the `x · Aᵀ` of LoRA update `k`.
                unsafe {
                    dense::compute_rows(
                        &pair.a,
                        pair.in_features(),
                        &lora_inputs[*k],
                        0..pair.rank,
                        &down_writers[*k],
                    )
                }
            }
        });
    }
    for ((lin, src), out) in linears.iter().zip(&sources).zip(outs.iter_mut()) {
        if let (Some(_), Some(b)) = (src, &lin.bias_host) {
            for row in out.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        }
    }
    // Outputs that went through candle had no base task to add their updates.
    for (l, down) in loras.iter().zip(&lora_down) {
        if sources[l.output].is_none() {
            let writer = DisjointOut::new(&mut *outs[l.output]);
            // SAFETY: no parallel region is running.
            unsafe { add_lora_rows(l, down, 0..l.pair.out_features(), &writer) };
        }
    }
    Ok(())
}

/// Token embedding table `[vocab, hidden]`.
#[derive(Debug, Clone)]
pub enum Embedding {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    /// Rows of the table for `ids` (`[n]`), as `[n, hidden]` in `dtype`.
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let rows = match self {
            Embedding::Quantized(t) => t.embedding(ids)?,
            Embedding::Dense(t) => t.index_select(ids, 0)?,
        };
        Ok(rows.to_dtype(dtype)?)
    }

    /// The same table as an output projection (tied embeddings) for a pass computing in
    /// `compute` (see [`Linear::dense_for`]).
    pub fn as_linear(&self, compute: DType) -> Result<Linear> {
        match self {
            Embedding::Quantized(t) => Linear::quantized(t.clone(), None),
            Embedding::Dense(t) => Linear::dense_for(t.clone(), None, compute),
        }
    }
}
