//! CPU matrix-vector kernels for the GGML block formats of the packaged models (Q4_0, Q4_1, Q8_0).
//!
//! Activations are quantized to 8-bit blocks of 32 (as llama.cpp does) and dotted with the weight
//! blocks in integer arithmetic: AVX2 where the CPU has it (detected at run time), portable Rust
//! elsewhere. Output rows are split across threads. Other formats go through candle's QMatMul.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use std::ops::Range;

use super::parallel::{row_chunks, team, DisjointOut};
use crate::error::{Error, Result};

const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }
}

/// A quantized `[rows, cols]` weight matrix in GGML block layout, one row after another.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: Kind,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

/// One activation block: `x ≈ d · qs`, with `s = d · Σ qs` for the formats with an offset.
#[derive(Clone, Copy)]
struct Q8Block {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

impl QuantMatrix {
    /// Wraps `t` when its format has a kernel here and it lives on the CPU.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        if !matches!(t.device(), Device::Cpu) {
            return Ok(None);
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?.into_owned();
        if data.len() != rows * (cols / QK) * kind.block_bytes() {
            return Err(Error::invalid(
                "quantized tensor data has an unexpected size",
            ));
        }
        Ok(Some(Self {
            kind,
            data,
            rows,
            cols,
        }))
    }

    /// Rows `rows` of `x · Wᵀ` for every row of `acts`, written into `out` (`[m, self.rows]`).
    ///
    /// # Safety
    /// No other task of the same parallel region writes these rows of `out`.
    pub(crate) unsafe fn compute_rows(
        &self,
        acts: &QuantizedActs,
        rows: Range<usize>,
        out: &DisjointOut<'_>,
    ) {
        let nb = self.cols / QK;
        let row_bytes = nb * self.kind.block_bytes();
        let dot = select_dot(self.kind);
        let dot2 = select_dot2(self.kind);
        let weight_row = |r: usize| &self.data[r * row_bytes..(r + 1) * row_bytes];
        let mut r = rows.start;
        while r + 1 < rows.end {
            let (w0, w1) = (weight_row(r), weight_row(r + 1));
            for j in 0..acts.m {
                let (a, b) = dot2(w0, w1, acts.row(j));
                out.set(j * self.rows + r, a);
                out.set(j * self.rows + r + 1, b);
            }
            r += 2;
        }
        if r < rows.end {
            for j in 0..acts.m {
                out.set(j * self.rows + r, dot(weight_row(r), acts.row(j)));
            }
        }
    }

    /// `x · Wᵀ` for `x` of shape `[m, cols]` (f32), giving `[m, rows]`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            return Err(Error::invalid(format!(
                "quantized matmul: input has {k} columns, weight expects {}",
                self.cols
            )));
        }
        let xs = x
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let acts = QuantizedActs::new(&xs, k);
        let mut out = vec![0f32; m * self.rows];
        let writer = DisjointOut::new(&mut out);
        let team = team();
        let chunks = row_chunks(self.rows, team.threads());
        // SAFETY: the chunks are disjoint row ranges.
        team.run(chunks.len(), &|t| unsafe {
            self.compute_rows(&acts, chunks[t].clone(), &writer)
        });
        Ok(Tensor::from_vec(out, (m, self.rows), x.device())?)
    }
}

/// Activations `[m, cols]` quantized to the kernels' 8-bit blocks.
pub(crate) struct QuantizedActs {
    blocks: Vec<Q8Block>,
    per_row: usize,
    m: usize,
}

impl QuantizedActs {
    /// `x` holds `m` rows of `cols` values; `cols` is a multiple of 32.
    pub fn new(x: &[f32], cols: usize) -> Self {
        let blocks: Vec<Q8Block> = x.chunks_exact(QK).map(quantize_block).collect();
        Self {
            blocks,
            per_row: cols / QK,
            m: x.len() / cols.max(1),
        }
    }

    fn row(&self, j: usize) -> &[Q8Block] {
        &self.blocks[j * self.per_row..(j + 1) * self.per_row]
    }
}

fn quantize_block(x: &[f32]) -> Q8Block {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    Q8Block {
        d,
        s: d * sum as f32,
        qs,
    }
}

type DotFn = fn(&[u8], &[Q8Block]) -> f32;
/// Two weight rows against the same activations: shares the activation loads and gives the CPU
/// two independent accumulation chains.
type Dot2Fn = fn(&[u8], &[u8], &[Q8Block]) -> (f32, f32);

fn select_dot2(kind: Kind) -> Dot2Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            return match kind {
                Kind::Q4_0 => |w0, w1, a| unsafe { avx2::dot2_q4(w0, w1, a, false) },
                Kind::Q4_1 => |w0, w1, a| unsafe { avx2::dot2_q4(w0, w1, a, true) },
                Kind::Q8_0 => |w0, w1, a| unsafe { avx2::dot2_q8_0(w0, w1, a) },
            };
        }
    }
    match kind {
        Kind::Q4_0 => |w0, w1, a| (dot_q4_scalar(w0, a, false), dot_q4_scalar(w1, a, false)),
        Kind::Q4_1 => |w0, w1, a| (dot_q4_scalar(w0, a, true), dot_q4_scalar(w1, a, true)),
        Kind::Q8_0 => |w0, w1, a| (dot_q8_0_scalar(w0, a), dot_q8_0_scalar(w1, a)),
    }
}

fn select_dot(kind: Kind) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::available() {
            return match kind {
                Kind::Q4_0 => |w, a| unsafe { avx2::dot_q4(w, a, false) },
                Kind::Q4_1 => |w, a| unsafe { avx2::dot_q4(w, a, true) },
                Kind::Q8_0 => |w, a| unsafe { avx2::dot_q8_0(w, a) },
            };
        }
    }
    match kind {
        Kind::Q4_0 => |w, a| dot_q4_scalar(w, a, false),
        Kind::Q4_1 => |w, a| dot_q4_scalar(w, a, true),
        Kind::Q8_0 => dot_q8_0_scalar,
    }
}

/// Whether the AVX2 kernels run on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_available() -> bool {
    avx2::available()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_0 (`d`, 16 bytes of nibbles, value `d·(q-8)`) or Q4_1 (`d`, `m`, nibbles, value `d·q+m`).
fn dot_q4_scalar(w: &[u8], acts: &[Q8Block], with_min: bool) -> f32 {
    let bb = if with_min { 20 } else { 18 };
    let qs_at = if with_min { 4 } else { 2 };
    let mut sum = 0f32;
    for (blk, a) in w.chunks_exact(bb).zip(acts) {
        let d = f16_at(blk, 0);
        let qs = &blk[qs_at..qs_at + 16];
        let mut isum = 0i32;
        for (j, &q) in qs.iter().enumerate() {
            isum += (q & 0x0F) as i32 * a.qs[j] as i32 + (q >> 4) as i32 * a.qs[j + 16] as i32;
        }
        sum += if with_min {
            d * a.d * isum as f32 + f16_at(blk, 2) * a.s
        } else {
            d * (a.d * isum as f32 - 8.0 * a.s)
        };
    }
    sum
}

fn dot_q8_0_scalar(w: &[u8], acts: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (blk, a) in w.chunks_exact(34).zip(acts) {
        let isum: i32 = blk[2..34]
            .iter()
            .zip(&a.qs)
            .map(|(&q, &y)| (q as i8) as i32 * y as i32)
            .sum();
        sum += f16_at(blk, 0) * a.d * isum as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Q8Block;
    use std::arch::x86_64::*;

    /// Whether this CPU runs the kernels below.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_at(b: &[u8], at: usize) -> f32 {
        let h = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Sum of u8 × i8 products of 32 lanes, as 8 f32 partial sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(x, y);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds `acts.len()` Q4_0/Q4_1 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4(w: &[u8], acts: &[Q8Block], with_min: bool) -> f32 {
        let bb = if with_min { 20 } else { 18 };
        let qs_at = if with_min { 4 } else { 2 };
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for (i, a) in acts.iter().enumerate() {
            let blk = &w[i * bb..(i + 1) * bb];
            let d = f16_at(blk, 0);
            let raw = _mm_loadu_si128(blk.as_ptr().add(qs_at) as *const __m128i);
            // Low nibbles are elements 0..16, high nibbles 16..32.
            let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
            let x = _mm256_and_si256(both, mask);
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), dot_u8_i8(x, y), acc);
            offset += if with_min {
                f16_at(blk, 2) * a.s
            } else {
                -8.0 * d * a.s
            };
        }
        hsum(acc) + offset
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w0`, `w1` hold `acts.len()` Q4_0/Q4_1 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot2_q4(w0: &[u8], w1: &[u8], acts: &[Q8Block], with_min: bool) -> (f32, f32) {
        let bb = if with_min { 20 } else { 18 };
        let qs_at = if with_min { 4 } else { 2 };
        let mask = _mm256_set1_epi8(0x0F);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut off0, mut off1) = (0f32, 0f32);
        let nibbles = |blk: &[u8]| {
            let raw = _mm_loadu_si128(blk.as_ptr().add(qs_at) as *const __m128i);
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask)
        };
        for (i, a) in acts.iter().enumerate() {
            let b0 = &w0[i * bb..(i + 1) * bb];
            let b1 = &w1[i * bb..(i + 1) * bb];
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let (d0, d1) = (f16_at(b0, 0), f16_at(b1, 0));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * a.d), dot_u8_i8(nibbles(b0), y), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * a.d), dot_u8_i8(nibbles(b1), y), acc1);
            if with_min {
                off0 += f16_at(b0, 2) * a.s;
                off1 += f16_at(b1, 2) * a.s;
            } else {
                off0 -= 8.0 * d0 * a.s;
                off1 -= 8.0 * d1 * a.s;
            }
        }
        (hsum(acc0) + off0, hsum(acc1) + off1)
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w0`, `w1` hold `acts.len()` Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot2_q8_0(w0: &[u8], w1: &[u8], acts: &[Q8Block]) -> (f32, f32) {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (i, a) in acts.iter().enumerate() {
            let b0 = &w0[i * 34..(i + 1) * 34];
            let b1 = &w1[i * 34..(i + 1) * 34];
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            let x0 = _mm256_loadu_si256(b0.as_ptr().add(2) as *const __m256i);
            let x1 = _mm256_loadu_si256(b1.as_ptr().add(2) as *const __m256i);
            let p0 = dot_u8_i8(_mm256_sign_epi8(x0, x0), _mm256_sign_epi8(y, x0));
            let p1 = dot_u8_i8(_mm256_sign_epi8(x1, x1), _mm256_sign_epi8(y, x1));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b0, 0) * a.d), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(b1, 0) * a.d), p1, acc1);
        }
        (hsum(acc0), hsum(acc1))
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds `acts.len()` Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(w: &[u8], acts: &[Q8Block]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (i, a) in acts.iter().enumerate() {
            let blk = &w[i * 34..(i + 1) * 34];
            let x = _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i);
            let y = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            // maddubs needs an unsigned left operand: move x's sign onto y.
            let prod = dot_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_at(blk, 0) * a.d), prod, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(dtype: GgmlDType) {
        // An odd row count exercises both the two-row kernel and the single-row tail.
        let (rows, cols, m) = (41, 96, 3);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let x = Tensor::from_vec(x, (m, cols), &Device::Cpu).unwrap();
        let ours = QuantMatrix::from_qtensor(&q)
            .unwrap()
            .unwrap()
            .matmul(&x)
            .unwrap();
        let exact = x.matmul(&deq.t().unwrap()).unwrap();
        let diff = (ours - &exact)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = exact
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Only the 8-bit activation rounding separates the two.
        assert!(diff / scale < 1e-2, "{dtype:?}: rel diff {}", diff / scale);
        let scalar = {
            let qm = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let acts: Vec<Q8Block> = xs.chunks_exact(QK).map(quantize_block).collect();
            let nb = cols / QK;
            let rb = nb * qm.kind.block_bytes();
            match qm.kind {
                Kind::Q4_0 => dot_q4_scalar(&qm.data[..rb], &acts[..nb], false),
                Kind::Q4_1 => dot_q4_scalar(&qm.data[..rb], &acts[..nb], true),
                Kind::Q8_0 => dot_q8_0_scalar(&qm.data[..rb], &acts[..nb]),
            }
        };
        let simd = QuantMatrix::from_qtensor(&q)
            .unwrap()
            .unwrap()
            .matmul(&x)
            .unwrap();
        let first = simd
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (first - scalar).abs() <= 1e-4 * scalar.abs().max(1.0),
            "{first} vs {scalar}"
        );
    }

    #[test]
    fn kernels_match_dequantized_matmul() {
        check(GgmlDType::Q4_0);
        check(GgmlDType::Q4_1);
        check(GgmlDType::Q8_0);
    }
}
