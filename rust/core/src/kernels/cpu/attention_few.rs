//! Attention of a few queries that read the same keys (the query heads of one KV head for one
//! new token: a decode step's own cache positions) straight from the cache in its stored
//! precision.
//!
//! The transposed tile of [`super::attention`] pays one instruction per key element whatever
//! the number of queries, and needs f32 keys: for the three or four query heads of a decode
//! step most of its lanes are idle and a half-precision cache must first be widened into a
//! buffer. Here each block of sixteen key rows is loaded (and widened) once and transposed in
//! registers, so that sixteen positions' dot products accumulate in the lanes of one vector in
//! the same order as the tile's: the partials are the same bits as the tile's, and a query's
//! result does not depend on how many other queries shared its task.

use super::attention::PARTIAL_HEADER;
use super::dense::{exp_in_place, max_value};
use super::isa::Isa;

/// The most queries one call takes.
pub(crate) const FEW: usize = 4;

/// The keys and values of one KV head as the cache stores them, `head_dim` values per position.
#[derive(Clone, Copy)]
pub(crate) enum KvHead<'a> {
    F32 {
        keys: &'a [f32],
        values: &'a [f32],
    },
    F16 {
        keys: &'a [half::f16],
        values: &'a [half::f16],
    },
}

impl KvHead<'_> {
    /// Asks for every cache line of the keys and values at once. A decode step's attention
    /// task reads a few kilobytes that the weights streamed since the last step have pushed out
    /// of the caches; found missing one line after another, they cost more than the arithmetic.
    pub fn prefetch(&self) {
        match self {
            KvHead::F32 { keys, values } => {
                super::prefetch(keys);
                super::prefetch(values);
            }
            KvHead::F16 { keys, values } => {
                super::prefetch(keys);
                super::prefetch(values);
            }
        }
    }

    /// Values stored per kind (keys and values alike): the shorter of the two.
    fn len(&self) -> usize {
        match self {
            KvHead::F32 { keys, values } => keys.len().min(values.len()),
            KvHead::F16 { keys, values } => keys.len().min(values.len()),
        }
    }
}

/// Whether [`attend_few`] runs for this head size (a multiple of sixteen, as the transposed
/// tile's vector columns are; on every CPU: AVX-512, AVX2 and portable paths).
pub(crate) fn available(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16)
}

/// Writes each query's partial softmax (`[max, sum, out[..head_dim]]`, as
/// [`super::attention::attend`] does) into `out`, one after another. Query `j` sees the first
/// `visible[j]` positions (at least one); `kv` holds at least the most any query sees.
/// `scores` is reused between calls.
///
/// # Panics
/// If [`available`] is false for `head_dim`, or the shapes disagree.
pub(crate) fn attend_few(
    queries: &[&[f32]],
    visible: &[usize],
    kv: KvHead<'_>,
    head_dim: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    // The transposed tile's instruction set, so that both give the same bits.
    let isa = super::isa::active();
    attend_few_on(isa, queries, visible, kv, head_dim, scale, scores, out)
}

/// [`attend_few`] on `path` (one the CPU has).
#[allow(clippy::too_many_arguments)]
fn attend_few_on(
    path: Isa,
    queries: &[&[f32]],
    visible: &[usize],
    kv: KvHead<'_>,
    head_dim: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = queries.len();
    assert!(n <= FEW && visible.len() == n && available(head_dim));
    let len = visible.iter().copied().max().unwrap_or(0);
    assert!(visible.iter().all(|&v| v > 0));
    assert!(kv.len() >= len * head_dim);
    assert!(queries.iter().all(|q| q.len() == head_dim));
    assert!(out.len() >= n * (PARTIAL_HEADER + head_dim));
    // Scores of whole blocks of sixteen positions (a block's scores are stored as one vector).
    let padded = len.next_multiple_of(16);
    if scores.len() < n * padded {
        scores.resize(n * padded, 0.0);
    }
    let scores = &mut scores[..n * padded];
    match kv {
        KvHead::F32 { keys, .. } => score(path, queries, keys, len, head_dim, scale, scores),
        KvHead::F16 { keys, .. } => score(path, queries, keys, len, head_dim, scale, scores),
    }
    let stride = PARTIAL_HEADER + head_dim;
    for (j, &seen) in visible.iter().enumerate() {
        let s = &mut scores[j * padded..j * padded + len];
        let max = max_value(&s[..seen]);
        s[..seen].iter_mut().for_each(|v| *v -= max);
        exp_in_place(&mut s[..seen]);
        // Positions this query does not see weigh nothing in the value pass.
        s[seen..].iter_mut().for_each(|v| *v = 0.0);
        out[j * stride] = max;
        out[j * stride + 1] = s[..seen].iter().sum();
    }
    match kv {
        KvHead::F32 { values, .. } => weigh(path, scores, padded, n, values, len, head_dim, out),
        KvHead::F16 { values, .. } => weigh(path, scores, padded, n, values, len, head_dim, out),
    }
}

/// Scaled scores of positions `0..len` against every query, `len.next_multiple_of(16)` apart
/// in `scores`: each a sum of products in the order of the head's elements, as the transposed
/// tile sums them (fused multiply-adds on the x86 paths, a product then a sum on the portable
/// one), so a score is the same bits whichever kernel computed it.
fn score<E: Element>(
    path: Isa,
    queries: &[&[f32]],
    keys: &[E],
    len: usize,
    hd: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let padded = len.next_multiple_of(16);
    assert!(keys.len() >= len * hd && scores.len() >= queries.len() * padded);
    match path {
        // SAFETY: the CPU has the path's features (see `path`); the slices were checked above
        // and by `attend_few`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::score(queries, keys.as_ptr(), len, hd, scale, scores) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::score8(queries, keys.as_ptr(), len, hd, scale, scores) },
        Isa::Portable => {
            for p in 0..len {
                let key = &keys[p * hd..(p + 1) * hd];
                for (j, q) in queries.iter().enumerate() {
                    let acc = key
                        .iter()
                        .zip(q.iter())
                        .fold(0f32, |acc, (k, &q)| k.to_f32() * q + acc);
                    scores[j * padded + p] = acc * scale;
                }
            }
        }
    }
}

/// `out[j]`'s values part = `Σ_p probs[j][p] · values[p]` for each query `j < n` (`probs`
/// `padded` apart), summed in the order of the positions as the transposed tile does.
#[allow(clippy::too_many_arguments)]
fn weigh<E: Element>(
    path: Isa,
    probs: &[f32],
    padded: usize,
    n: usize,
    values: &[E],
    len: usize,
    hd: usize,
    out: &mut [f32],
) {
    let stride = PARTIAL_HEADER + hd;
    assert!(values.len() >= len * hd && out.len() >= n * stride);
    assert!(n == 0 || probs.len() >= (n - 1) * padded + len);
    match path {
        // SAFETY: as in `score`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::weigh(probs, padded, n, values.as_ptr(), len, hd, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::weigh8(probs, padded, n, values.as_ptr(), len, hd, out) },
        Isa::Portable => {
            for j in 0..n {
                let o = &mut out[j * stride + PARTIAL_HEADER..(j + 1) * stride];
                o.iter_mut().for_each(|o| *o = 0.0);
                for p in 0..len {
                    let w = probs[j * padded + p];
                    for (o, v) in o.iter_mut().zip(&values[p * hd..(p + 1) * hd]) {
                        *o += w * v.to_f32();
                    }
                }
            }
        }
    }
}

/// A cache element type: f32, or f16 widened as it is read.
pub(crate) trait Element: Copy {
    fn to_f32(self) -> f32;
    /// # Safety
    /// Sixteen elements are readable at `p`; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// # Safety
    /// Eight elements are readable at `p`; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Element for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Element, FEW, PARTIAL_HEADER};
    use std::arch::x86_64::*;

    /// The 16 × 16 block `rows` transposed: `out[d]` holds element `d` of every row.
    #[inline(always)]
    unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved by element, then pairs of pairs: in 128-bit lane L, u[4g + e]
        // holds element 4L + e of rows 4g..4g + 4.
        let t: [__m512; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        let u: [__m512; 16] = std::array::from_fn(|i| {
            let (g, e) = (i / 4, i % 4);
            let (a, b) = (
                _mm512_castps_pd(t[4 * g + e / 2]),
                _mm512_castps_pd(t[4 * g + e / 2 + 2]),
            );
            _mm512_castpd_ps(if e % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        // For each e, the 4 × 4 transpose of 128-bit lanes across u[e], u[4 + e], u[8 + e],
        // u[12 + e] gives elements e, 4 + e, 8 + e and 12 + e.
        let mut out = [_mm512_setzero_ps(); 16];
        for e in 0..4 {
            let a = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[e], u[4 + e]);
            let b = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[e], u[4 + e]);
            let c = _mm512_shuffle_f32x4::<0b01_00_01_00>(u[8 + e], u[12 + e]);
            let d = _mm512_shuffle_f32x4::<0b11_10_11_10>(u[8 + e], u[12 + e]);
            out[e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, c);
            out[4 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, c);
            out[8 + e] = _mm512_shuffle_f32x4::<0b10_00_10_00>(b, d);
            out[12 + e] = _mm512_shuffle_f32x4::<0b11_01_11_01>(b, d);
        }
        out
    }

    /// Scaled scores of positions `0..len` (rounded up to sixteen; the padding reads no keys)
    /// against every query, `padded` per query in `scores`. Sixteen positions at a time sit in
    /// the lanes of one vector, each summing its products in the order of the head's elements,
    /// as the transposed tile does: a score is the same bits whichever kernel computed it.
    ///
    /// # Safety
    /// The CPU has AVX-512F and F16C; `keys` holds `len` rows of `hd` (a multiple of sixteen);
    /// `scores` holds `queries.len() · len.next_multiple_of(16)`.
    #[target_feature(enable = "avx512f,avx2,f16c,fma")]
    pub unsafe fn score<E: Element>(
        queries: &[&[f32]],
        keys: *const E,
        len: usize,
        hd: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let padded = len.next_multiple_of(16);
        let scale = _mm512_set1_ps(scale);
        for block in (0..len).step_by(16) {
            let rows = (len - block).min(16);
            let mut acc = [_mm512_setzero_ps(); FEW];
            for col in (0..hd).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, r) in r.iter_mut().enumerate().take(rows) {
                    *r = E::load16(keys.add((block + i) * hd + col));
                }
                let t = transpose16(&r);
                for (acc, q) in acc.iter_mut().zip(queries) {
                    let q = q.as_ptr().add(col);
                    for (d, t) in t.iter().enumerate() {
                        *acc = _mm512_fmadd_ps(*t, _mm512_set1_ps(*q.add(d)), *acc);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate().take(queries.len()) {
                let dst = scores.as_mut_ptr().add(j * padded + block);
                _mm512_storeu_ps(dst, _mm512_mul_ps(*acc, scale));
            }
        }
    }

    /// `out[j]`'s values part = `Σ_p probs[j][p] · values[p]` for each query `j < n` (`probs`
    /// `padded` apart in `probs`), summed in the order of the positions as the transposed tile
    /// does.
    ///
    /// # Safety
    /// As [`score`]; `values` holds `len` rows of `hd`; `out` holds `n` partials.
    #[target_feature(enable = "avx512f,avx2,f16c,fma")]
    pub unsafe fn weigh<E: Element>(
        probs: &[f32],
        padded: usize,
        n: usize,
        values: *const E,
        len: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        const RUN: usize = 4;
        let stride = PARTIAL_HEADER + hd;
        // Four vectors (64 columns) per pass, so every query's sums stay in registers.
        for col in (0..hd).step_by(RUN * 16) {
            let vectors = ((hd - col) / 16).min(RUN);
            let mut acc = [[_mm512_setzero_ps(); RUN]; FEW];
            for p in 0..len {
                let mut v = [_mm512_setzero_ps(); RUN];
                for (c, v) in v.iter_mut().enumerate().take(vectors) {
                    *v = E::load16(values.add(p * hd + col + c * 16));
                }
                for (j, acc) in acc.iter_mut().enumerate().take(n) {
                    let w = _mm512_set1_ps(*probs.get_unchecked(j * padded + p));
                    for (a, v) in acc.iter_mut().zip(&v).take(vectors) {
                        *a = _mm512_fmadd_ps(w, *v, *a);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate().take(n) {
                let dst = out.as_mut_ptr().add(j * stride + PARTIAL_HEADER + col);
                for (c, a) in acc.iter().enumerate().take(vectors) {
                    _mm512_storeu_ps(dst.add(c * 16), *a);
                }
            }
        }
    }

    /// The 8 × 8 block `r` transposed: `out[d]` holds element `d` of every row.
    #[inline(always)]
    unsafe fn transpose8(r: &[__m256; 8]) -> [__m256; 8] {
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // u[4g + e]: in each 128-bit lane L, element 4L + e of rows 4g..4g + 4.
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (g, e) = (i / 4, i % 4);
            let (a, b) = (t[4 * g + e / 2], t[4 * g + e / 2 + 2]);
            if e % 2 == 0 {
                _mm256_shuffle_ps::<0b01_00_01_00>(a, b)
            } else {
                _mm256_shuffle_ps::<0b11_10_11_10>(a, b)
            }
        });
        std::array::from_fn(|d| {
            let e = d % 4;
            if d < 4 {
                _mm256_permute2f128_ps::<0x20>(u[e], u[4 + e])
            } else {
                _mm256_permute2f128_ps::<0x31>(u[e], u[4 + e])
            }
        })
    }

    /// [`score`] eight positions at a time in 256-bit vectors: the same products summed in the
    /// same order, so the same bits.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; otherwise as [`score`].
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn score8<E: Element>(
        queries: &[&[f32]],
        keys: *const E,
        len: usize,
        hd: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let padded = len.next_multiple_of(16);
        let scale = _mm256_set1_ps(scale);
        for block in (0..len).step_by(8) {
            let rows = (len - block).min(8);
            let mut acc = [_mm256_setzero_ps(); FEW];
            for col in (0..hd).step_by(8) {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, r) in r.iter_mut().enumerate().take(rows) {
                    *r = E::load8(keys.add((block + i) * hd + col));
                }
                let t = transpose8(&r);
                for (acc, q) in acc.iter_mut().zip(queries) {
                    let q = q.as_ptr().add(col);
                    for (d, t) in t.iter().enumerate() {
                        *acc = _mm256_fmadd_ps(*t, _mm256_set1_ps(*q.add(d)), *acc);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate().take(queries.len()) {
                let dst = scores.as_mut_ptr().add(j * padded + block);
                _mm256_storeu_ps(dst, _mm256_mul_ps(*acc, scale));
            }
        }
    }

    /// [`weigh`] in 256-bit vectors, the same sums in the same order.
    ///
    /// # Safety
    /// As [`score8`]; `values` holds `len` rows of `hd`; `out` holds `n` partials.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn weigh8<E: Element>(
        probs: &[f32],
        padded: usize,
        n: usize,
        values: *const E,
        len: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        // Two vectors (16 columns) per pass: four queries' sums and the values in registers.
        const RUN: usize = 2;
        let stride = PARTIAL_HEADER + hd;
        for col in (0..hd).step_by(RUN * 8) {
            let mut acc = [[_mm256_setzero_ps(); RUN]; FEW];
            for p in 0..len {
                let v: [__m256; RUN] =
                    std::array::from_fn(|c| E::load8(values.add(p * hd + col + c * 8)));
                for (j, acc) in acc.iter_mut().enumerate().take(n) {
                    let w = _mm256_set1_ps(*probs.get_unchecked(j * padded + p));
                    for (a, v) in acc.iter_mut().zip(&v) {
                        *a = _mm256_fmadd_ps(w, *v, *a);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate().take(n) {
                let dst = out.as_mut_ptr().add(j * stride + PARTIAL_HEADER + col);
                for (c, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(dst.add(c * 8), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::attention::{attend_on, Tile, LANES};
    use crate::kernels::cpu::isa::cpu_levels;

    fn pseudo(n: usize, seed: usize, magnitude: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1009) as f32 / 504.5 - 1.0) * magnitude)
            .collect()
    }

    /// The same partials, bit for bit, as the transposed tile gives the same queries (run there
    /// with other queries beside them, as in a wide batch), for f32 and f16 rows, every query
    /// count, lengths around the blocks of sixteen, queries seeing different prefixes, and
    /// magnitudes where a different order of summation would show; on every instruction set
    /// this CPU has.
    #[test]
    fn few_queries_give_the_tiles_bits() {
        for hd in [16, 64, 128] {
            for isa in cpu_levels() {
                for (len, magnitude) in [
                    (1, 1.5),
                    (5, 1.5),
                    (16, 40.0),
                    (17, 1.5),
                    (40, 40.0),
                    (70, 1.5),
                ] {
                    let keys = pseudo(len * hd, 1, magnitude);
                    let values = pseudo(len * hd, 2, magnitude);
                    let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
                        keys.iter().map(|&x| half::f16::from_f32(x)).collect(),
                        values.iter().map(|&x| half::f16::from_f32(x)).collect(),
                    );
                    for n in 1..=FEW {
                        // Five more queries make the tile take its transposed form.
                        let extra = 5;
                        let qs: Vec<Vec<f32>> = (0..n + extra)
                            .map(|j| pseudo(hd, 10 + j, magnitude))
                            .collect();
                        let visible: Vec<usize> = (0..n + extra).map(|j| len - j % len).collect();
                        let stride = PARTIAL_HEADER + hd;
                        let mut transposed = vec![0f32; hd * LANES];
                        let mut vis = [0usize; LANES];
                        for (j, q) in qs.iter().enumerate() {
                            for (d, &x) in q.iter().enumerate() {
                                transposed[d * LANES + j] = x;
                            }
                            vis[j] = visible[j];
                        }
                        for half_precision in [false, true] {
                            let widen = |x: &[half::f16]| {
                                x.iter().map(|x| x.to_f32()).collect::<Vec<f32>>()
                            };
                            let (kf, vf) = if half_precision {
                                (widen(&k16), widen(&v16))
                            } else {
                                (keys.clone(), values.clone())
                            };
                            let tile = Tile {
                                queries: &transposed,
                                used: n + extra,
                                visible: vis,
                                keys: &kf,
                                values: &vf,
                                head_dim: hd,
                                scale: 0.125,
                            };
                            let mut want = vec![0f32; (n + extra) * stride];
                            let mut refs: Vec<&mut [f32]> = want.chunks_exact_mut(stride).collect();
                            let len = vis.iter().copied().max().unwrap_or(0);
                            attend_on(isa, &tile, len, &mut Vec::new(), &mut refs);
                            let kv = if half_precision {
                                KvHead::F16 {
                                    keys: &k16,
                                    values: &v16,
                                }
                            } else {
                                KvHead::F32 {
                                    keys: &keys,
                                    values: &values,
                                }
                            };
                            let q_refs: Vec<&[f32]> = qs[..n].iter().map(|q| &q[..]).collect();
                            let mut got = vec![f32::NAN; n * stride];
                            let mut scores = vec![f32::NAN; 3];
                            attend_few_on(
                                isa,
                                &q_refs,
                                &visible[..n],
                                kv,
                                hd,
                                0.125,
                                &mut scores,
                                &mut got,
                            );
                            assert_eq!(
                                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                want[..n * stride]
                                    .iter()
                                    .map(|x| x.to_bits())
                                    .collect::<Vec<_>>(),
                                "{isa:?} hd {hd} len {len} n {n} f16 {half_precision}"
                            );
                        }
                    }
                }
            }
        }
    }
}
