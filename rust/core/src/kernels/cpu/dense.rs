//! f32 vector kernels for the CPU forward pass: matrix-vector products against dense weights
//! and LoRA factors, the dot products and weighted sums of small attention tiles, and the
//! vectorised exponential. AVX2+FMA where the CPU has it
//! (detected at run time), portable Rust elsewhere.

use std::ops::Range;

use super::parallel::DisjointOut;

/// Rows `rows` of `x · Wᵀ` for the `m` rows of `x` (`[m, cols]`), with `w` a row-major
/// `[out_rows, cols]` matrix, written into `out` (`[m, out_rows]`).
///
/// # Safety
/// No other task of the same parallel region writes these rows of `out`.
pub(crate) unsafe fn compute_rows(
    w: &[f32],
    cols: usize,
    x: &[f32],
    rows: Range<usize>,
    out: &DisjointOut<'_>,
) {
    let out_rows = w.len() / cols;
    let m = x.len() / cols;
    let row = |r: usize| &w[r * cols..(r + 1) * cols];
    let mut r = rows.start;
    while r + 4 <= rows.end {
        let ws = [row(r), row(r + 1), row(r + 2), row(r + 3)];
        for j in 0..m {
            let v = dot4(ws, &x[j * cols..(j + 1) * cols]);
            for (i, &v) in v.iter().enumerate() {
                out.set(j * out_rows + r + i, v);
            }
        }
        r += 4;
    }
    for r in r..rows.end {
        for j in 0..m {
            out.set(
                j * out_rows + r,
                dot4([row(r); 4], &x[j * cols..(j + 1) * cols])[0],
            );
        }
    }
}

/// `out[i] = Σ_k coefs[k] · rows[k * stride + i]` for `k` in `0..coefs.len()`, summed in that
/// order: the LoRA up-projection of one token over a range of outputs, with `rows` the rows of
/// `Bᵀ` (starting at the range) and `coefs` the token's scaled `x · Aᵀ`. Each output reads
/// `coefs.len()` contiguous rows, so the products vectorise across outputs.
pub(crate) fn weighted_rows(rows: &[f32], stride: usize, coefs: &[f32], out: &mut [f32]) {
    if let Some(k) = coefs.len().checked_sub(1) {
        assert!(rows.len() >= k * stride + out.len());
    }
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and FMA; the bounds were checked above.
        return unsafe { avx2::weighted_rows(rows, stride, coefs, out) };
    }
    out.fill(0.0);
    for (k, &c) in coefs.iter().enumerate() {
        let row = &rows[k * stride..k * stride + out.len()];
        out.iter_mut().zip(row).for_each(|(o, &r)| *o += c * r);
    }
}

/// `dst[i] = src[i]` widened to f32 (a half-precision cache read by the f32 kernels).
pub(crate) fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and F16C; the lengths match.
        return unsafe { avx2::widen_f16(src, dst) };
    }
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
}

/// `dst[i] = src[i]` rounded to half precision, to nearest with ties to even as `half` does (new
/// keys and values written into a half-precision cache).
pub(crate) fn narrow_f16(src: &[f32], dst: &mut [half::f16]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and F16C; the lengths match.
        return unsafe { avx2::narrow_f16(src, dst) };
    }
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &s)| *d = half::f16::from_f32(s));
}

/// The largest value (NaN ignored; -inf for an empty or all-NaN slice), in sixteen lanes so that
/// the compiler vectorises it: a scan of a 49,152-value vocabulary row took ~18 µs one value at
/// a time. The maximum does not depend on the order, so this is the one-at-a-time result.
pub fn max_value(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            if x > *l {
                *l = x;
            }
        }
    }
    let tail = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `Σ x²` in sixteen interleaved partial sums (vectorised; one running sum would make every
/// addition wait for the last: a norm of 576 values took ~2,300 cycles that way).
pub(crate) fn sum_of_squares(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x * x;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `x[i] = e^x[i]` for every element, to within a few f32 ulps (NaN stays NaN, -inf gives 0,
/// and above 88.37, a hair below f32's limit, +inf).
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx512f_available() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::exp_in_place(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_in_place(x) };
    }
    x.iter_mut().for_each(|v| *v = v.exp());
}

/// `out[i] = silu(gate[i]) · up[i]`, with `silu(g) = g / (1 + e^-g)` (the same arithmetic on
/// every path, so the same bits as [`exp_in_place`] followed by the division).
pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() >= out.len() && up.len() >= out.len());
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx512f_available() {
        // SAFETY: the CPU has AVX-512F; both inputs are at least as long as `out`.
        return unsafe { avx512::silu_mul(gate, up, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and FMA; both inputs are at least as long as `out`.
        return unsafe { avx2::silu_mul(gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `Σ e^(x - shift)` over `xs`, summed as eight interleaved partial sums (element `i` into sum
/// `i % 8`, the sums then added in order, the last `len % 8` values summed apart and added
/// last): the same bits as [`exp_in_place`] on the shifted values followed by that sum, in one
/// pass without a buffer.
pub(crate) fn exp_shifted_sum(xs: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx512f_available() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::exp_shifted_sum(xs, shift) };
    }
    exp_shifted_sum_by_eights(xs, shift)
}

fn exp_shifted_sum_by_eights(xs: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    let mut buf = [0f32; 8];
    for c in &mut chunks {
        buf.iter_mut().zip(c).for_each(|(b, &x)| *b = x - shift);
        exp_in_place(&mut buf);
        lanes.iter_mut().zip(&buf).for_each(|(l, &e)| *l += e);
    }
    let rest = chunks.remainder();
    let tail = &mut buf[..rest.len()];
    tail.iter_mut().zip(rest).for_each(|(t, &x)| *t = x - shift);
    exp_in_place(tail);
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// Whether any value is NaN or +inf (-inf is a masked logit, not an error).
pub(crate) fn any_nan_or_pos_inf(xs: &[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx512f_available() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { avx512::any_nan_or_pos_inf(xs) };
    }
    any_nan_or_pos_inf_portable(xs)
}

fn any_nan_or_pos_inf_portable(xs: &[f32]) -> bool {
    // Without an early exit inside a chunk, so that the compiler vectorises the test.
    xs.chunks(1024).any(|chunk| {
        chunk.iter().fold(false, |bad, x| {
            let nan = (x.to_bits() & 0x7fff_ffff) > 0x7f80_0000;
            bad | nan | (x.to_bits() == 0x7f80_0000)
        })
    })
}

fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::dot4(w, x) };
    }
    w.map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX2 and FMA; `rows` holds `coefs.len()` rows of `out.len()` values, each
    /// `stride` after the one before.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_rows(rows: &[f32], stride: usize, coefs: &[f32], out: &mut [f32]) {
        let n = out.len();
        let (r, o) = (rows.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i + 32 <= n {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (k, &c) in coefs.iter().enumerate() {
                let c = _mm256_set1_ps(c);
                let p = r.add(k * stride + i);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(c, _mm256_loadu_ps(p.add(8 * j)), *a);
                }
            }
            for (j, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(i + 8 * j), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let mut acc = _mm256_setzero_ps();
            for (k, &c) in coefs.iter().enumerate() {
                acc = _mm256_fmadd_ps(
                    _mm256_set1_ps(c),
                    _mm256_loadu_ps(r.add(k * stride + i)),
                    acc,
                );
            }
            _mm256_storeu_ps(o.add(i), acc);
            i += 8;
        }
        for i in i..n {
            // The same order and fused products as the lanes above.
            let mut acc = 0f32;
            for (k, &c) in coefs.iter().enumerate() {
                acc = c.mul_add(*r.add(k * stride + i), acc);
            }
            *o.add(i) = acc;
        }
    }

    /// # Safety
    /// The CPU has AVX2 and F16C; `src` and `dst` have the same length.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn widen_f16(src: &[half::f16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        let (s, d) = (src.as_ptr() as *const __m128i, dst.as_mut_ptr());
        for i in (0..n).step_by(8) {
            _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(_mm_loadu_si128(s.add(i / 8))));
        }
        for i in n..src.len() {
            dst[i] = src[i].to_f32();
        }
    }

    /// # Safety
    /// The CPU has AVX2 and F16C; `src` and `dst` have the same length.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn narrow_f16(src: &[f32], dst: &mut [half::f16]) {
        let n = src.len() / 8 * 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr() as *mut __m128i);
        for i in (0..n).step_by(8) {
            let v = _mm256_loadu_ps(s.add(i));
            _mm_storeu_si128(
                d.add(i / 8),
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
            );
        }
        for i in n..src.len() {
            dst[i] = half::f16::from_f32(src[i]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// e^x for eight lanes: x = n·ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial
    /// (Cephes' expf coefficients), 2^n built in the exponent bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let hi = _mm256_set1_ps(88.376_26);
        let lo = _mm256_set1_ps(-87.336_55);
        let xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
        let n = _mm256_round_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
            _mm256_set1_ps(1.0),
        );
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        let y = _mm256_mul_ps(y, pow2);
        // Below the clamp e^x is (almost) zero, above it +inf; NaN passes through.
        let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
        let y = _mm256_blendv_ps(
            y,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps(x, hi, _CMP_GT_OQ),
        );
        _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr())));
        }
        // The tail through the same polynomial, so a value's exponential does not depend on
        // where it sits in the slice.
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mut lanes = [0f32; 8];
            lanes[..tail.len()].copy_from_slice(tail);
            _mm256_storeu_ps(lanes.as_mut_ptr(), exp8(_mm256_loadu_ps(lanes.as_ptr())));
            tail.copy_from_slice(&lanes[..tail.len()]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let one = _mm256_set1_ps(1.0);
        let silu = |g: __m256, u: __m256| {
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
        };
        let n = out.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let v = silu(
                _mm256_loadu_ps(gate.as_ptr().add(i)),
                _mm256_loadu_ps(up.as_ptr().add(i)),
            );
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        if n < out.len() {
            let (mut g, mut u) = ([0f32; 8], [0f32; 8]);
            let t = out.len() - n;
            g[..t].copy_from_slice(&gate[n..out.len()]);
            u[..t].copy_from_slice(&up[n..out.len()]);
            let mut o = [0f32; 8];
            _mm256_storeu_ps(
                o.as_mut_ptr(),
                silu(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr())),
            );
            out[n..].copy_from_slice(&o[..t]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(w: [&[f32]; 4], x: &[f32]) -> [f32; 4] {
        let n = x.len();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            for (acc, w) in acc.iter_mut().zip(&w) {
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(w.as_ptr().add(i)), xv, *acc);
            }
            i += 8;
        }
        let mut out = acc.map(|a| hsum(a));
        while i < n {
            for (o, w) in out.iter_mut().zip(&w) {
                *o += w[i] * x[i];
            }
            i += 1;
        }
        out
    }
}

/// The same exponential as [`avx2`]'s, sixteen lanes at a time: the same operations in the same
/// order, so both give a value the same result bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let hi = _mm512_set1_ps(88.376_26);
        let lo = _mm512_set1_ps(-87.336_55);
        let xc = _mm512_max_ps(_mm512_min_ps(x, hi), lo);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        )));
        let y = _mm512_mul_ps(y, pow2);
        let y = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo),
            y,
            _mm512_setzero_ps(),
        );
        let y = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi),
            y,
            _mm512_set1_ps(f32::INFINITY),
        );
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x), y, x)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_sum(xs: &[f32], shift: f32) -> f32 {
        let s = _mm512_set1_ps(shift);
        let high = |e: __m512| _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
        let mut acc = _mm256_setzero_ps();
        let n = xs.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(xs.as_ptr().add(i)), s));
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            acc = _mm256_add_ps(acc, high(e));
        }
        let rest = xs.len() - n;
        let mut tail = 0f32;
        if rest > 0 {
            let live = ((1u32 << rest) - 1) as u16;
            let e = exp16(_mm512_sub_ps(
                _mm512_maskz_loadu_ps(live, xs.as_ptr().add(n)),
                s,
            ));
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), e);
            let from = if rest >= 8 {
                acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
                8
            } else {
                0
            };
            tail = lanes[from..rest].iter().sum();
        }
        let mut sums = [0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), acc);
        sums.iter().sum::<f32>() + tail
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn any_nan_or_pos_inf(xs: &[f32]) -> bool {
        let inf = _mm512_set1_ps(f32::INFINITY);
        let bad = |v: __m512| {
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) | _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, inf)
        };
        let n = xs.len() / 16 * 16;
        for chunk in (0..n).step_by(1024) {
            let mut found = 0u16;
            for i in (chunk..(chunk + 1024).min(n)).step_by(16) {
                found |= bad(_mm512_loadu_ps(xs.as_ptr().add(i)));
            }
            if found != 0 {
                return true;
            }
        }
        let live = ((1u32 << (xs.len() - n)) - 1) as u16;
        bad(_mm512_maskz_loadu_ps(live, xs.as_ptr().add(n))) & live != 0
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let one = _mm512_set1_ps(1.0);
        let silu = |g: __m512, u: __m512| {
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u)
        };
        let n = out.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let v = silu(
                _mm512_loadu_ps(gate.as_ptr().add(i)),
                _mm512_loadu_ps(up.as_ptr().add(i)),
            );
            _mm512_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        if n < out.len() {
            let live = ((1u32 << (out.len() - n)) - 1) as u16;
            let g = _mm512_maskz_loadu_ps(live, gate.as_ptr().add(n));
            let u = _mm512_maskz_loadu_ps(live, up.as_ptr().add(n));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(n), live, silu(g, u));
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_in_place(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            _mm512_storeu_ps(c.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr())));
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mut lanes = [0f32; 16];
            lanes[..tail.len()].copy_from_slice(tail);
            _mm512_storeu_ps(lanes.as_mut_ptr(), exp16(_mm512_loadu_ps(lanes.as_ptr())));
            tail.copy_from_slice(&lanes[..tail.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_half_floats_is_exact() {
        let src: Vec<half::f16> = (0..1038)
            .map(|i| half::f16::from_f32((i as f32 - 500.0) * 0.37))
            .chain([
                half::f16::INFINITY,
                half::f16::NEG_INFINITY,
                half::f16::MIN_POSITIVE_SUBNORMAL,
            ])
            .collect();
        let mut dst = vec![0f32; src.len()];
        widen_f16(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(s.to_f32().to_bits(), d.to_bits());
        }
    }

    #[test]
    fn silu_mul_matches_silu_in_f64_on_every_path() {
        let gate: Vec<f32> = (0..1043)
            .map(|i| ((i * 7919) % 2003) as f32 * 0.013 - 13.0)
            .chain([-100.0, 100.0, 0.0, -0.0, f32::NAN])
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| (i % 17) as f32 * 0.25 - 2.0)
            .collect();
        let check = |out: &[f32], path: &str| {
            for ((o, &g), &u) in out.iter().zip(&gate).zip(&up) {
                let want = (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32;
                if g.is_nan() {
                    assert!(o.is_nan(), "{path}");
                } else {
                    // Below e^-88 the exponential overflows to infinity and the product is 0.
                    let tol = (4.0 * f32::EPSILON * want.abs()).max(1e-30);
                    assert!(
                        (o - want).abs() <= tol,
                        "{path}: silu({g})·{u} = {o}, want {want}"
                    );
                }
            }
        };
        for n in [0, 1, 7, 8, 15, 16, 17, gate.len()] {
            let mut out = vec![0f32; n];
            silu_mul(&gate, &up, &mut out);
            check(&out, "dispatched");
            #[cfg(target_arch = "x86_64")]
            if super::super::qmatmul::avx2_available() {
                let mut avx2_out = vec![0f32; n];
                // SAFETY: the CPU has AVX2 and FMA; the inputs are longer than the output.
                unsafe { avx2::silu_mul(&gate, &up, &mut avx2_out) };
                check(&avx2_out, "avx2");
            }
        }
    }

    #[test]
    fn exp_shifted_sum_is_exp_then_eight_lane_sum() {
        let xs: Vec<f32> = (0..1024)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.03 - 20.0)
            .collect();
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 24, 31, 1000, 1024] {
            let mut e: Vec<f32> = xs[..n].iter().map(|&x| x - 3.5).collect();
            exp_in_place(&mut e);
            let mut lanes = [0f32; 8];
            let mut it = e.chunks_exact(8);
            for c in &mut it {
                lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v);
            }
            let want = lanes.iter().sum::<f32>() + it.remainder().iter().sum::<f32>();
            assert_eq!(
                exp_shifted_sum(&xs[..n], 3.5).to_bits(),
                want.to_bits(),
                "{n}"
            );
        }
    }

    #[test]
    fn nan_and_positive_infinity_are_found_anywhere() {
        for n in [0usize, 1, 15, 16, 17, 1023, 1024, 1025, 49_152] {
            let mut xs: Vec<f32> = (0..n).map(|i| (i % 97) as f32 - 50.0).collect();
            if n > 0 {
                xs[n / 3] = f32::NEG_INFINITY;
            }
            assert!(!any_nan_or_pos_inf(&xs), "{n}");
            assert!(!any_nan_or_pos_inf_portable(&xs), "{n}");
            for at in [0, n / 2, n.saturating_sub(1)] {
                for bad in [f32::NAN, f32::INFINITY, -f32::NAN] {
                    if n == 0 {
                        continue;
                    }
                    let keep = xs[at];
                    xs[at] = bad;
                    assert!(any_nan_or_pos_inf(&xs), "{n} at {at}: {bad}");
                    assert!(any_nan_or_pos_inf_portable(&xs), "{n} at {at}: {bad}");
                    xs[at] = keep;
                }
            }
        }
    }

    #[test]
    fn max_value_is_the_largest_and_ignores_nan() {
        for n in [0usize, 1, 15, 16, 17, 100, 49152] {
            let mut xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 - 500.0).collect();
            let want = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_value(&xs), want, "{n}");
            if n > 3 {
                xs[n / 2] = f32::NAN;
                xs[n - 1] = f32::NAN;
                assert_eq!(
                    max_value(&xs),
                    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                );
                xs[1] = f32::INFINITY;
                assert_eq!(max_value(&xs), f32::INFINITY);
            }
        }
        assert_eq!(max_value(&[f32::NAN; 20]), f32::NEG_INFINITY);
    }

    #[test]
    fn sum_of_squares_matches_a_double_precision_sum() {
        for n in [0, 1, 15, 16, 17, 576, 1000] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.11)
                .collect();
            let exact: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
            let ours = sum_of_squares(&xs) as f64;
            assert!(
                (ours - exact).abs() <= 1e-6 * exact.max(1.0),
                "{n}: {ours} vs {exact}"
            );
        }
    }

    #[test]
    fn narrowing_rounds_as_half_does() {
        // Ties, values that round up into the next binade or to infinity, subnormals, signed
        // zeros and a tail shorter than one vector.
        let mut src: Vec<f32> = (0..2003).map(|i| (i as f32 - 1000.0) * 0.0173).collect();
        src.extend([
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            2047.5,
            65519.0,
            65520.0,
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            5.9604645e-8,
            2.9802322e-8,
            1e-10,
            -0.0,
            0.0,
        ]);
        let mut dst = vec![half::f16::ZERO; src.len()];
        narrow_f16(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert_eq!(half::f16::from_f32(*s).to_bits(), d.to_bits(), "{s}");
        }
        let mut nan = [half::f16::ZERO];
        narrow_f16(&[f32::NAN], &mut nan);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn exp_is_accurate_and_keeps_special_values() {
        let mut x: Vec<f32> = (-2000..=1960).map(|i| i as f32 * 0.045).collect();
        x.extend([
            f32::NEG_INFINITY,
            -1e30,
            1e-8,
            0.0,
            f32::NAN,
            88.0,
            89.0,
            f32::INFINITY,
        ]);
        let mut y = x.clone();
        exp_in_place(&mut y);
        for (&x, &y) in x.iter().zip(&y) {
            let e = x.exp();
            if x.is_nan() {
                assert!(y.is_nan());
            } else if x > 88.38 {
                assert_eq!(y, f32::INFINITY);
            } else if e < 1e-37 {
                assert!(y < 1e-37, "e^{x} = {y}");
            } else {
                assert!((y - e).abs() <= 2e-7 * e, "e^{x}: {y} vs {e}");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn both_vector_exponentials_agree_bit_for_bit() {
        if !(crate::kernels::cpu::qmatmul::avx512f_available()
            && crate::kernels::cpu::qmatmul::avx2_available())
        {
            eprintln!("skipped: this CPU lacks AVX-512F or AVX2");
            return;
        }
        let mut x: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.0227).collect();
        x.extend([
            f32::NEG_INFINITY,
            -1e30,
            89.0,
            f32::INFINITY,
            f32::NAN,
            -0.0,
        ]);
        let (mut a, mut b) = (x.clone(), x.clone());
        // SAFETY: both instruction sets were checked above.
        unsafe {
            avx2::exp_in_place(&mut a);
            avx512::exp_in_place(&mut b);
        }
        for ((x, a), b) in x.iter().zip(&a).zip(&b) {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "e^{x}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn exp_of_a_value_does_not_depend_on_its_place() {
        // Sampling weighs its top candidates in a short slice and the whole vocabulary in a long
        // one; a token must get the same weight in both.
        let x: Vec<f32> = (0..37).map(|i| -0.37 * i as f32 + 0.011).collect();
        let mut whole = x.clone();
        exp_in_place(&mut whole);
        for start in 0..x.len() {
            for len in 1..=(x.len() - start).min(11) {
                let mut part = x[start..start + len].to_vec();
                exp_in_place(&mut part);
                assert_eq!(part, whole[start..start + len], "slice {start}..+{len}");
            }
        }
    }

    #[test]
    fn matches_naive_products() {
        let (rows, cols, m) = (7, 37, 2);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 - 6.0).collect();
        let x: Vec<f32> = (0..m * cols).map(|i| (i % 5) as f32 * 0.5).collect();
        let mut out = vec![0f32; m * rows];
        let writer = DisjointOut::new(&mut out);
        // SAFETY: a single task writes every row.
        unsafe { compute_rows(&w, cols, &x, 0..rows, &writer) };
        for j in 0..m {
            for r in 0..rows {
                let naive: f32 = (0..cols).map(|c| w[r * cols + c] * x[j * cols + c]).sum();
                assert!((out[j * rows + r] - naive).abs() < 1e-3);
            }
        }
    }

    #[test]
    fn weighted_rows_sum_the_scaled_rows() {
        // Every vector width and tail: 32-wide blocks, 8-wide, and single outputs.
        for n in [1, 7, 8, 9, 31, 32, 33, 70] {
            for rank in [1, 4, 16] {
                let stride = n + 5;
                let rows: Vec<f32> = (0..rank * stride)
                    .map(|i| ((i * 37) % 19) as f32 * 0.25 - 2.0)
                    .collect();
                let coefs: Vec<f32> = (0..rank).map(|k| 0.5 - k as f32 * 0.125).collect();
                let mut out = vec![f32::NAN; n];
                weighted_rows(&rows, stride, &coefs, &mut out);
                for (i, &o) in out.iter().enumerate() {
                    let want: f64 = (0..rank)
                        .map(|k| coefs[k] as f64 * rows[k * stride + i] as f64)
                        .sum();
                    assert!((o as f64 - want).abs() < 1e-4, "n {n} rank {rank} at {i}");
                }
            }
        }
    }
}
