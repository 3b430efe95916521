//! The hand-written kernels of the repository's `cuda/` on candle's CUDA tensors (feature
//! `cuda`; `build.rs` compiles them to PTX, which the driver loads at first use):
//!
//! - [`BgmvDelta`], a candle custom op: the batched per-row LoRA delta (shrink `x·Aᵀ`, expand
//!   `·Bᵀ·scale`), rows whose slot is negative left at zero;
//! - [`cold_top_k`]: fused CoLD scoring of (expert, base) row pairs, only the best k per pair
//!   (and both rows' log-sum-exp) copied back to the host;
//! - [`sample_tokens`]: temperature, top-k, top-p, min-p and the draw, one token id per row
//!   copied back.
//!
//! The CPU path (`logits::cold_top_k`, `logits::draw`, candle's matmuls) is the reference they
//! are checked against (`scripts/gpu-check.sh`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys::CUdevice_attribute, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

const COLD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cold.ptx"));
const BGMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bgmv.ptx"));
const SAMPLE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sample.ptx"));

/// Threads per block of the CoLD kernel (a multiple of 32, at most 256: its launch bounds).
const COLD_THREADS: u32 = 256;
/// Plausible entries a CoLD block leaves per chunk (`kChunkHeld` in `cuda/cold.cu`).
const COLD_CHUNK_HELD: usize = 64;
/// The CoLD kernel's largest k.
pub const COLD_MAX_K: usize = 16;

/// An element type the kernels are built for, with the suffix of its kernels' names.
trait KernelFloat: CudaDType + DeviceRepr + ValidAsZeroBits {
    const SUFFIX: &'static str;
}

impl KernelFloat for f32 {
    const SUFFIX: &'static str = "f32";
}

impl KernelFloat for f16 {
    const SUFFIX: &'static str = "f16";
}

impl KernelFloat for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// `$body` with `$t` the [`KernelFloat`] of `$dtype`; any other dtype is an error.
macro_rules! with_kernel_float {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            other => candle_core::bail!("the CUDA kernels take f32, f16 or bf16, not {other:?}"),
        }
    };
}

/// The contiguous elements of a CUDA storage under `layout`.
fn view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => candle_core::bail!("{what} must be contiguous for the CUDA kernel"),
    }
}

/// Runs `f` on the CUDA storage behind `t` and its layout (held for the call, not copied).
fn with_cuda<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(s, layout),
        _ => candle_core::bail!("{what} is not on a CUDA device"),
    }
}

/// `scale[slot] · (x · Aᵀ) · Bᵀ` per row of `x` (`[rows, in]`), zero for rows whose slot is
/// negative: applied as `x.apply_op3_no_bwd(a, b, &op)` with `a` `[rank, in]` and `b`
/// `[out, rank]` (one adapter slot; `cuda/bgmv.cu` takes stacked slots the same way).
pub struct BgmvDelta {
    /// `[rows]` i32: 0 for rows that take the adapter, -1 for the others.
    pub slots: Tensor,
    /// `[1]` f32: the adapter's scale.
    pub scales: Tensor,
}

impl CustomOp3 for BgmvDelta {
    fn name(&self) -> &'static str {
        "peftscale-bgmv"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "the BGMV kernel runs on CUDA tensors (the CPU applies adapters with its own kernels)"
        )
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, d_in) = lx.shape().dims2()?;
        let (rank, a_in) = la.shape().dims2()?;
        let (d_out, b_rank) = lb.shape().dims2()?;
        if a_in != d_in || b_rank != rank || rank == 0 {
            candle_core::bail!(
                "BGMV shapes do not fit: x [{rows}, {d_in}], A [{rank}, {a_in}], B [{d_out}, {b_rank}]"
            );
        }
        if x.dtype() != a.dtype() || x.dtype() != b.dtype() {
            candle_core::bail!("BGMV takes x, A and B in one dtype");
        }
        let dims = BgmvDims {
            rows,
            d_in,
            rank,
            d_out,
        };
        let y = with_kernel_float!(x.dtype(), T => CudaStorage::wrap_cuda_slice(
            self.launch::<T>(x, lx, a, la, b, lb, dims)?,
            x.device().clone(),
        ));
        Ok((y, Shape::from((rows, d_out))))
    }
}

#[derive(Clone, Copy)]
struct BgmvDims {
    rows: usize,
    d_in: usize,
    rank: usize,
    d_out: usize,
}

impl BgmvDelta {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: KernelFloat>(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        d: BgmvDims,
    ) -> candle_core::Result<CudaSlice<T>> {
        let dev: &CudaDevice = x.device();
        let (x, a, b) = (
            view::<T>(x, lx, "x")?,
            view::<T>(a, la, "A")?,
            view::<T>(b, lb, "B")?,
        );
        with_cuda(&self.slots, "the BGMV slots", |ss, sl| {
            with_cuda(&self.scales, "the BGMV scales", |cs, cl| {
                let slots = view::<i32>(ss, sl, "the BGMV slots")?;
                if slots.len() != d.rows {
                    candle_core::bail!("BGMV has {} slots for {} rows", slots.len(), d.rows);
                }
                let scales = view::<f32>(cs, cl, "the BGMV scales")?;
                bgmv_launch(dev, &x, &a, &b, &slots, &scales, d)
            })
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn bgmv_launch<T: KernelFloat>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    slots: &CudaView<'_, i32>,
    scales: &CudaView<'_, f32>,
    d: BgmvDims,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: the shrink writes u for every row the expand reads (rows with a slot).
    let u = unsafe { dev.alloc::<f32>(d.rows * d.rank)? };
    let y = dev.alloc_zeros::<T>(d.rows * d.d_out)?;
    let (d_in, rank, d_out) = (d.d_in as i32, d.rank as i32, d.d_out as i32);

    let shrink = dev.get_or_load_custom_func(
        &format!("peftscale_bgmv_shrink_{}", T::SUFFIX),
        "peftscale_bgmv",
        BGMV_PTX,
    )?;
    let mut args = shrink.builder();
    args.arg(x).arg(a).arg(slots).arg(&u).arg(&d_in).arg(&rank);
    let cfg = LaunchConfig {
        grid_dim: (d.rows as u32, (d.rank / 8).max(1) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature in cuda/bgmv.cu.
    unsafe { args.launch(cfg) }.w()?;

    let expand = dev.get_or_load_custom_func(
        &format!("peftscale_bgmv_expand_{}", T::SUFFIX),
        "peftscale_bgmv",
        BGMV_PTX,
    )?;
    let mut args = expand.builder();
    args.arg(&u)
        .arg(b)
        .arg(slots)
        .arg(scales)
        .arg(&y)
        .arg(&d_out)
        .arg(&rank);
    let cfg = LaunchConfig {
        grid_dim: (d.rows as u32, d.d_out.div_ceil(256) as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: (d.rank * 4) as u32,
    };
    // SAFETY: as above; the dynamic shared memory holds one row of u.
    unsafe { args.launch(cfg) }.w()?;
    Ok(y)
}

/// The best `k` CoLD candidates of each (expert, base) pair, best first, as the kernel leaves
/// them: token ids (-1 past the plausible set's end) and scores over log-softmaxed rows, plus
/// each row pair's log-sum-exps (expert, base).
#[derive(Debug, Clone)]
pub struct ColdTopK {
    pub pairs: usize,
    pub k: usize,
    /// `[pairs, k]`.
    pub index: Vec<i32>,
    /// `[pairs, k]`: `(1+beta)·log_softmax(e) - beta·log_softmax(b)/t`.
    pub score: Vec<f32>,
    /// `[pairs, 2]`.
    pub lse: Vec<f32>,
}

/// Fused CoLD scoring of `expert` and `base` (`[pairs, vocab]`, one dtype, on one CUDA device):
/// one pass over each pair's rows, only the results copied back.
pub fn cold_top_k(
    expert: &Tensor,
    base: &Tensor,
    k: usize,
    alpha: f32,
    beta: f32,
    base_temperature: f32,
) -> candle_core::Result<ColdTopK> {
    let (pairs, vocab) = expert.dims2()?;
    if base.dims() != expert.dims() || base.dtype() != expert.dtype() {
        candle_core::bail!("CoLD takes expert and base rows of one shape and dtype");
    }
    if !(1..=COLD_MAX_K).contains(&k) {
        candle_core::bail!("the CoLD kernel takes 1 <= k <= {COLD_MAX_K}, not {k}");
    }
    let (expert, base) = (expert.contiguous()?, base.contiguous()?);
    let p = ColdLaunch {
        pairs,
        vocab,
        k,
        alpha,
        beta,
        base_temperature,
    };
    let dtype = expert.dtype();
    with_cuda(&expert, "the expert logits", |es, el| {
        with_cuda(
            &base,
            "the base logits",
            |bs, bl| with_kernel_float!(dtype, T => launch_cold::<T>(es, el, bs, bl, p)),
        )
    })
}

#[derive(Clone, Copy)]
struct ColdLaunch {
    pairs: usize,
    vocab: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    base_temperature: f32,
}

fn launch_cold<T: KernelFloat>(
    es: &CudaStorage,
    el: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    p: ColdLaunch,
) -> candle_core::Result<ColdTopK> {
    let ColdLaunch {
        pairs,
        vocab,
        k,
        alpha,
        beta,
        base_temperature,
    } = p;
    let dev = es.device();
    let expert = view::<T>(es, el, "the expert logits")?;
    let base = view::<T>(bs, bl, "the base logits")?;
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()? as usize;
    // About two blocks per multiprocessor in all, chunks of at least 2,048 entries.
    let splits = vocab.div_ceil(2048).min((2 * sms).div_ceil(pairs)).max(1);
    // SAFETY: the kernel writes all k results of every pair and both log-sum-exps.
    let index = unsafe { dev.alloc::<i32>(pairs * k)? };
    let score = unsafe { dev.alloc::<f32>(pairs * k)? };
    let lse = unsafe { dev.alloc::<f32>(pairs * 2)? };
    // The arrival counters (the first `pairs` ints) start at zero.
    let ws_f = dev.alloc_zeros::<f32>(pairs * splits * (4 + 2 * COLD_CHUNK_HELD))?;
    let ws_i = dev.alloc_zeros::<i32>(pairs * (1 + splits * (1 + COLD_CHUNK_HELD)))?;
    let func = dev.get_or_load_custom_func(
        &format!("peftscale_cold_score_{}", T::SUFFIX),
        "peftscale_cold",
        COLD_PTX,
    )?;
    let (vocab_i, k_i) = (vocab as i32, k as i32);
    let (log_alpha, inv_t) = (alpha.ln(), 1.0 / base_temperature);
    let mut args = func.builder();
    args.arg(&expert)
        .arg(&base)
        .arg(&vocab_i)
        .arg(&k_i)
        .arg(&log_alpha)
        .arg(&beta)
        .arg(&inv_t);
    args.arg(&index).arg(&score).arg(&lse).arg(&ws_f).arg(&ws_i);
    let cfg = LaunchConfig {
        grid_dim: (splits as u32, pairs as u32, 1),
        block_dim: (COLD_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments and workspace sizes follow the launch contract in cuda/cold.cu.
    unsafe { args.launch(cfg) }.w()?;
    Ok(ColdTopK {
        pairs,
        k,
        index: dev.clone_dtoh(&index)?,
        score: dev.clone_dtoh(&score)?,
        lse: dev.clone_dtoh(&lse)?,
    })
}

/// The token each row of `logits` (`[rows, vocab]`, finite) draws with its uniform number in
/// `uniforms` after temperature (> 0), top-k (0 keeps all), top-p and min-p: the same
/// distribution and walk as the host's `logits::draw`.
pub fn sample_tokens(
    logits: &Tensor,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    uniforms: &[f32],
) -> candle_core::Result<Vec<u32>> {
    let (rows, vocab) = logits.dims2()?;
    if uniforms.len() != rows {
        candle_core::bail!("{} uniform numbers for {rows} rows", uniforms.len());
    }
    let logits = logits.contiguous()?;
    let p = SampleLaunch {
        rows,
        vocab,
        temperature,
        top_k,
        top_p,
        min_p,
    };
    let dtype = logits.dtype();
    with_cuda(
        &logits,
        "the logits",
        |s, l| with_kernel_float!(dtype, T => launch_sample::<T>(s, l, p, uniforms)),
    )
}

#[derive(Clone, Copy)]
struct SampleLaunch {
    rows: usize,
    vocab: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
}

fn launch_sample<T: KernelFloat>(
    storage: &CudaStorage,
    layout: &Layout,
    p: SampleLaunch,
    uniforms: &[f32],
) -> candle_core::Result<Vec<u32>> {
    let dev = storage.device();
    let x = view::<T>(storage, layout, "the logits")?;
    let uniforms = dev.clone_htod(uniforms)?;
    // SAFETY: the kernel writes one token per row.
    let tokens = unsafe { dev.alloc::<i32>(p.rows)? };
    let func = dev.get_or_load_custom_func(
        &format!("peftscale_sample_{}", T::SUFFIX),
        "peftscale_sample",
        SAMPLE_PTX,
    )?;
    let (vocab, top_k) = (p.vocab as i32, p.top_k.min(i32::MAX as usize) as i32);
    let mut args = func.builder();
    args.arg(&x).arg(&vocab).arg(&p.temperature).arg(&top_k);
    args.arg(&p.top_p).arg(&p.min_p).arg(&uniforms).arg(&tokens);
    let cfg = LaunchConfig {
        grid_dim: (p.rows as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature in cuda/sample.cu.
    unsafe { args.launch(cfg) }.w()?;
    Ok(dev
        .clone_dtoh(&tokens)?
        .into_iter()
        .map(|t| t as u32)
        .collect())
}
