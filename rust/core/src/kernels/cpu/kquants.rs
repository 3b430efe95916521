//! The K-quant super-block formats (Q4_K, Q5_K, Q6_K: 256 weights per block, with 6- or 8-bit
//! scales per sub-block of 32 or 16) in the engine's grouped layout, and their kernels against
//! the 8-bit activation blocks of [`super::qmatmul`].
//!
//! At load each super-block of eight rows is rewritten so that the kernels of the 32-blocks
//! formats apply sub-block by sub-block: the super-block's f16 scales (`d`, and `dmin`), then
//! each sub-block's integer scale (and minimum) for the eight rows as one byte each, then per
//! sub-block of 32 weights the 4-bit quants interleaved four bytes at a time as Q4_1's are
//! (byte `i` of a row holds weight `i` in its low nibble and `i + 16` in its high one), after a
//! plane of the fifth (Q5_K) or fifth and sixth (Q6_K) bits laid out so that one shift of the
//! plane puts a chunk's bits in place. A sub-block's scale `d · sc` is an f16 times an integer
//! of at most 8 bits, exact in f32: the kernels compute `Σ (d·sc)·a.d·(Σ q·a) + (dmin·m)·(-a.s)`
//! with nothing rounded but the float sums.
//!
//! Q6_K's scales cover 16 weights: its low nibbles (weights 0..16 of a sub-block) and its high
//! nibbles (16..32) have sums and scales of their own, and `-32` is folded in through the
//! activations' half sums.

use half::f16;

use super::qmatmul::{Q8Block, GROUP};

/// Weights in one super-block.
pub(crate) const QK_K: usize = 256;
const SUBS: usize = QK_K / 32;

/// The K-quant formats with kernels here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KFormat {
    Q4K,
    Q5K,
    Q6K,
}

impl KFormat {
    /// Bytes of one GGML block (256 weights of one row).
    pub fn raw_bytes(self) -> usize {
        match self {
            KFormat::Q4K => 144,
            KFormat::Q5K => 176,
            KFormat::Q6K => 210,
        }
    }

    /// Bytes of the header of one grouped super-block (eight rows).
    pub(crate) fn header_bytes(self) -> usize {
        match self {
            // d, dmin, then sc and m (a byte per sub-block and row).
            KFormat::Q4K | KFormat::Q5K => 2 * 2 * GROUP + 2 * SUBS * GROUP,
            // d, then sixteen i8 scales per row.
            KFormat::Q6K => 2 * GROUP + 2 * SUBS * GROUP,
        }
    }

    /// Bytes of one grouped sub-block (eight rows of 32 weights): bit planes, then quants.
    pub(crate) fn sub_bytes(self) -> usize {
        self.plane_bytes() + 16 * GROUP
    }

    pub(crate) fn plane_bytes(self) -> usize {
        match self {
            KFormat::Q4K => 0,
            KFormat::Q5K => 32,
            KFormat::Q6K => 64,
        }
    }

    /// Bytes of one grouped super-block (eight rows of 256 weights).
    pub fn group_block_bytes(self) -> usize {
        self.header_bytes() + SUBS * self.sub_bytes()
    }
}

/// One row's super-block, decoded: quants `q` (unsigned, 4 to 6 bits), the super-block scales,
/// and per sub-block scales (Q4_K/Q5_K: eight `sc` and `m`; Q6_K: sixteen signed `sc`).
#[derive(Clone)]
struct Decoded {
    d: [u8; 2],
    dmin: [u8; 2],
    sc: [u8; 16],
    m: [u8; 8],
    q: [u8; QK_K],
}

fn decode_ggml(f: KFormat, b: &[u8]) -> Decoded {
    let mut out = Decoded {
        d: [b[0], b[1]],
        dmin: [0; 2],
        sc: [0; 16],
        m: [0; 8],
        q: [0; QK_K],
    };
    match f {
        KFormat::Q4K | KFormat::Q5K => {
            out.dmin = [b[2], b[3]];
            let scales = &b[4..16];
            for j in 0..SUBS {
                let (sc, m) = scale_min_k4(j, scales);
                out.sc[j] = sc;
                out.m[j] = m;
            }
            let (qh, qs) = match f {
                KFormat::Q5K => (Some(&b[16..48]), &b[48..176]),
                _ => (None, &b[16..144]),
            };
            for j in 0..4 {
                for l in 0..32 {
                    let byte = qs[32 * j + l];
                    for h in 0..2 {
                        let s = 2 * j + h;
                        let mut q = (byte >> (4 * h)) & 0x0F;
                        if let Some(qh) = qh {
                            q |= ((qh[l] >> s) & 1) << 4;
                        }
                        out.q[32 * s + l] = q;
                    }
                }
            }
        }
        KFormat::Q6K => {
            let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
            out.d = [b[208], b[209]];
            out.sc.copy_from_slice(scales);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                for l in 0..32 {
                    let e = 128 * n + l;
                    out.q[e] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    out.q[e + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    out.q[e + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    out.q[e + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
    out
}

fn encode_ggml(f: KFormat, k: &Decoded, b: &mut [u8]) {
    b.iter_mut().for_each(|x| *x = 0);
    match f {
        KFormat::Q4K | KFormat::Q5K => {
            b[0..2].copy_from_slice(&k.d);
            b[2..4].copy_from_slice(&k.dmin);
            let scales = &mut b[4..16];
            for j in 0..4 {
                scales[j] = k.sc[j] | ((k.sc[j + 4] >> 4) << 6);
                scales[j + 4] = k.m[j] | ((k.m[j + 4] >> 4) << 6);
                scales[j + 8] = (k.sc[j + 4] & 0x0F) | ((k.m[j + 4] & 0x0F) << 4);
            }
            let qs_at = if f == KFormat::Q5K { 48 } else { 16 };
            for s in 0..SUBS {
                let (j, h) = (s / 2, s % 2);
                for l in 0..32 {
                    let q = k.q[32 * s + l];
                    b[qs_at + 32 * j + l] |= (q & 0x0F) << (4 * h);
                    if f == KFormat::Q5K {
                        b[16 + l] |= ((q >> 4) & 1) << s;
                    }
                }
            }
        }
        KFormat::Q6K => {
            for n in 0..2 {
                for l in 0..32 {
                    let e = 128 * n + l;
                    let q = [k.q[e], k.q[e + 32], k.q[e + 64], k.q[e + 96]];
                    b[64 * n + l] = (q[0] & 0x0F) | ((q[2] & 0x0F) << 4);
                    b[64 * n + l + 32] = (q[1] & 0x0F) | ((q[3] & 0x0F) << 4);
                    b[128 + 32 * n + l] =
                        (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
                }
            }
            b[192..208].copy_from_slice(&k.sc);
            b[208..210].copy_from_slice(&k.d);
        }
    }
}

/// GGML's 6-bit scale and minimum of sub-block `j` from the twelve packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Writes row `r`'s decoded super-block into the grouped super-block `g`.
fn put_row(f: KFormat, k: &Decoded, r: usize, g: &mut [u8]) {
    g[2 * r..2 * r + 2].copy_from_slice(&k.d);
    let scales_at = match f {
        KFormat::Q6K => 2 * GROUP,
        _ => {
            g[2 * GROUP + 2 * r..2 * GROUP + 2 * r + 2].copy_from_slice(&k.dmin);
            for s in 0..SUBS {
                g[4 * GROUP + SUBS * GROUP + s * GROUP + r] = k.m[s];
            }
            4 * GROUP
        }
    };
    let scales = if f == KFormat::Q6K { 16 } else { SUBS };
    for s in 0..scales {
        g[scales_at + s * GROUP + r] = k.sc[s];
    }
    for s in 0..SUBS {
        let sub = &mut g[f.header_bytes() + s * f.sub_bytes()..][..f.sub_bytes()];
        let e = &k.q[32 * s..32 * s + 32];
        let (planes, quants) = sub.split_at_mut(f.plane_bytes());
        for c in 0..4 {
            for t in 0..4 {
                let (lo, hi) = (e[4 * c + t], e[16 + 4 * c + t]);
                quants[c * GROUP * 4 + r * 4 + t] = (lo & 0x0F) | ((hi & 0x0F) << 4);
                match f {
                    KFormat::Q4K => {}
                    KFormat::Q5K => {
                        planes[4 * r + t] |= ((lo >> 4) << c) | ((hi >> 4) << (4 + c));
                    }
                    KFormat::Q6K => {
                        planes[4 * r + t] |= (lo >> 4) << (2 * c);
                        planes[32 + 4 * r + t] |= (hi >> 4) << (2 * c);
                    }
                }
            }
        }
    }
}

/// Row `r` of the grouped super-block `g`, decoded.
fn get_row(f: KFormat, g: &[u8], r: usize) -> Decoded {
    let mut k = Decoded {
        d: [g[2 * r], g[2 * r + 1]],
        dmin: [0; 2],
        sc: [0; 16],
        m: [0; 8],
        q: [0; QK_K],
    };
    let scales_at = match f {
        KFormat::Q6K => 2 * GROUP,
        _ => {
            k.dmin = [g[2 * GROUP + 2 * r], g[2 * GROUP + 2 * r + 1]];
            for s in 0..SUBS {
                k.m[s] = g[4 * GROUP + SUBS * GROUP + s * GROUP + r];
            }
            4 * GROUP
        }
    };
    let scales = if f == KFormat::Q6K { 16 } else { SUBS };
    for s in 0..scales {
        k.sc[s] = g[scales_at + s * GROUP + r];
    }
    for s in 0..SUBS {
        let sub = &g[f.header_bytes() + s * f.sub_bytes()..][..f.sub_bytes()];
        let (planes, quants) = sub.split_at(f.plane_bytes());
        for c in 0..4 {
            for t in 0..4 {
                let byte = quants[c * GROUP * 4 + r * 4 + t];
                let (mut lo, mut hi) = (byte & 0x0F, byte >> 4);
                match f {
                    KFormat::Q4K => {}
                    KFormat::Q5K => {
                        let p = planes[4 * r + t];
                        lo |= ((p >> c) & 1) << 4;
                        hi |= ((p >> (4 + c)) & 1) << 4;
                    }
                    KFormat::Q6K => {
                        lo |= ((planes[4 * r + t] >> (2 * c)) & 3) << 4;
                        hi |= ((planes[32 + 4 * r + t] >> (2 * c)) & 3) << 4;
                    }
                }
                k.q[32 * s + 4 * c + t] = lo;
                k.q[32 * s + 16 + 4 * c + t] = hi;
            }
        }
    }
    k
}

/// Bytes of a `[rows, cols]` matrix in the grouped layout (rows padded to a group).
pub(crate) fn repacked_len(f: KFormat, rows: usize, cols: usize) -> usize {
    rows.div_ceil(GROUP) * (cols / QK_K) * f.group_block_bytes()
}

/// GGML blocks (`rows` rows of `cols / 256`) into the grouped layout, in `out`
/// ([`repacked_len`] zeroed bytes: padding rows stay zero).
pub(crate) fn repack(f: KFormat, raw: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    let (nb, rb, gb) = (cols / QK_K, f.raw_bytes(), f.group_block_bytes());
    assert_eq!(out.len(), repacked_len(f, rows, cols));
    for row in 0..rows {
        let (g, r) = (row / GROUP, row % GROUP);
        for b in 0..nb {
            let k = decode_ggml(f, &raw[(row * nb + b) * rb..(row * nb + b + 1) * rb]);
            put_row(f, &k, r, &mut out[(g * nb + b) * gb..(g * nb + b + 1) * gb]);
        }
    }
}

/// The inverse of [`repack`]: GGML's row-major blocks.
pub(crate) fn unpack(f: KFormat, packed: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (nb, rb, gb) = (cols / QK_K, f.raw_bytes(), f.group_block_bytes());
    let mut out = vec![0u8; rows * nb * rb];
    for (row, dst) in out.chunks_exact_mut(nb * rb).enumerate() {
        let (g, r) = (row / GROUP, row % GROUP);
        for (b, dst) in dst.chunks_exact_mut(rb).enumerate() {
            let k = get_row(f, &packed[(g * nb + b) * gb..(g * nb + b + 1) * gb], r);
            encode_ggml(f, &k, dst);
        }
    }
    out
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The portable kernel over one group (all its super-blocks) against one activation row, and
/// the reference the SIMD kernels are tested against.
pub(crate) fn group_scalar(f: KFormat, w: &[u8], acts: &[Q8Block]) -> [f32; GROUP] {
    let gb = f.group_block_bytes();
    let mut out = [0f32; GROUP];
    for (sb, acts) in acts.chunks_exact(SUBS).enumerate() {
        let g = &w[sb * gb..(sb + 1) * gb];
        for (r, o) in out.iter_mut().enumerate() {
            let k = get_row(f, g, r);
            let (d, dmin) = (f16_at(&k.d, 0), f16_at(&k.dmin, 0));
            for (s, a) in acts.iter().enumerate() {
                let q = &k.q[32 * s..32 * s + 32];
                let dot = |range: std::ops::Range<usize>| -> i32 {
                    range.map(|i| i32::from(q[i]) * i32::from(a.qs[i])).sum()
                };
                match f {
                    KFormat::Q4K | KFormat::Q5K => {
                        let scale = d * f32::from(k.sc[s]);
                        let min = dmin * f32::from(k.m[s]);
                        *o += scale * a.d * dot(0..32) as f32 - min * a.s;
                    }
                    KFormat::Q6K => {
                        let (lo, hi) = (dot(0..16) - 32 * a.sum_lo, dot(16..32) - 32 * a.sum_hi());
                        let sc_lo = d * f32::from(k.sc[2 * s] as i8);
                        let sc_hi = d * f32::from(k.sc[2 * s + 1] as i8);
                        *o += sc_lo * a.d * lo as f32 + sc_hi * a.d * hi as f32;
                    }
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{KFormat, Q8Block, GROUP, SUBS};
    use crate::kernels::cpu::qmatmul::avx2::{act_word, f16x8};
    use std::arch::x86_64::*;

    /// Eight bytes at `p` (one per row) as eight f32, unsigned or signed.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn bytes8(p: *const u8, signed: bool) -> __m256 {
        let v = _mm_loadl_epi64(p as *const __m128i);
        _mm256_cvtepi32_ps(if signed {
            _mm256_cvtepi8_epi32(v)
        } else {
            _mm256_cvtepu8_epi32(v)
        })
    }

    /// Shifts each 16-bit lane of `v` left by `left`, then right by `right`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn shift(v: __m256i, left: i32, right: i32) -> __m256i {
        _mm256_srl_epi16(
            _mm256_sll_epi16(v, _mm_cvtsi32_si128(left)),
            _mm_cvtsi32_si128(right),
        )
    }

    /// Chunk `c` (0..4) of a grouped sub-block as unsigned bytes: the weights `4c..4c + 4` and
    /// `16 + 4c..16 + 4c + 4` of each of the eight rows, the low nibbles with their high bits
    /// from `planes` (the sub-block's first 64 bytes, loaded once for its four chunks) put back.
    /// `masks` are [`masks`] of `f`, made once by the caller.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn chunk(
        f: KFormat,
        quants: *const u8,
        planes: [__m256i; 2],
        c: i32,
        (mask, plane_mask): (__m256i, __m256i),
    ) -> (__m256i, __m256i) {
        let q = _mm256_loadu_si256(quants.add(c as usize * 32) as *const __m256i);
        let lo = _mm256_and_si256(q, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
        match f {
            KFormat::Q4K => (lo, hi),
            KFormat::Q5K => {
                let up = _mm256_and_si256(shift(planes[0], 4 - c, 0), plane_mask);
                let down = _mm256_and_si256(shift(planes[0], 0, c), plane_mask);
                (_mm256_or_si256(lo, up), _mm256_or_si256(hi, down))
            }
            KFormat::Q6K => {
                let (l, r) = ((4 - 2 * c).max(0), (2 * c - 4).max(0));
                let p_lo = _mm256_and_si256(shift(planes[0], l, r), plane_mask);
                let p_hi = _mm256_and_si256(shift(planes[1], l, r), plane_mask);
                (_mm256_or_si256(lo, p_lo), _mm256_or_si256(hi, p_hi))
            }
        }
    }

    /// The nibble mask and the mask of the bits a plane adds (0x10 for Q5_K, 0x30 for Q6_K).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn masks(f: KFormat) -> (__m256i, __m256i) {
        let plane = if f == KFormat::Q6K { 0x30 } else { 0x10 };
        (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(plane))
    }

    /// Defines a K-quant group kernel. `$dot(sum, w, a)` adds to `sum` the products of 32
    /// unsigned weights (at most 63) with 32 signed activations; `$widen(sum)` turns that sum
    /// into eight i32, which happens every `$run(f)` chunks (the most whose sums the
    /// accumulator holds exactly).
    macro_rules! k_kernel {
        ($name:ident, $features:literal, |$sum:ident, $w:ident, $a:ident| $dot:expr, |$s:ident| $widen:expr, |$ff:ident| $run:expr) => {
            /// # Safety
            /// The CPU must support the kernel's target features; `w` holds
            /// `acts[i].len() / 8` grouped super-blocks of `f`, the same count for every `i`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize>(
                f: KFormat,
                w: &[u8],
                acts: [&[Q8Block]; R],
            ) -> [[f32; GROUP]; R] {
                let gb = f.group_block_bytes();
                let blocks = acts[0].len() / SUBS;
                assert!(w.len() >= blocks * gb && acts.iter().all(|a| a.len() == blocks * SUBS));
                let six = f == KFormat::Q6K;
                let masks = masks(f);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut off = [_mm256_setzero_ps(); R];
                for sb in 0..blocks {
                    let g = w.as_ptr().add(sb * gb);
                    let d = f16x8(g);
                    let dmin = if six { d } else { f16x8(g.add(2 * GROUP)) };
                    let scales = g.add(if six { 2 * GROUP } else { 4 * GROUP });
                    for s in 0..SUBS {
                        let sub = g.add(f.header_bytes() + s * f.sub_bytes());
                        let quants = sub.add(f.plane_bytes());
                        let planes = [
                            _mm256_loadu_si256(sub as *const __m256i),
                            _mm256_loadu_si256(sub.add(32) as *const __m256i),
                        ];
                        let mut lo_sums = [_mm256_setzero_si256(); R];
                        let mut hi_sums = [_mm256_setzero_si256(); R];
                        let mut lo_run = [_mm256_setzero_si256(); R];
                        let mut hi_run = [_mm256_setzero_si256(); R];
                        let run = {
                            let $ff = f;
                            $run
                        };
                        for c in 0..4i32 {
                            let (lo, hi) = chunk(f, quants, planes, c, masks);
                            super::super::qmatmul::unrolled!(R, |i| {
                                let a = &acts[i][sb * SUBS + s];
                                let ($sum, $w, $a) =
                                    (&mut lo_run[i], lo, act_word(a, 4 * c as usize));
                                *$sum = $dot;
                                let ($sum, $w, $a) =
                                    (&mut hi_run[i], hi, act_word(a, 16 + 4 * c as usize));
                                *$sum = $dot;
                            });
                            if (c as usize + 1) % run == 0 {
                                super::super::qmatmul::unrolled!(R, |i| {
                                    let $s = lo_run[i];
                                    lo_sums[i] = _mm256_add_epi32(lo_sums[i], $widen);
                                    let $s = hi_run[i];
                                    hi_sums[i] = _mm256_add_epi32(hi_sums[i], $widen);
                                    lo_run[i] = _mm256_setzero_si256();
                                    hi_run[i] = _mm256_setzero_si256();
                                });
                            }
                        }
                        if six {
                            let sc_lo = _mm256_mul_ps(d, bytes8(scales.add(2 * s * GROUP), true));
                            let sc_hi =
                                _mm256_mul_ps(d, bytes8(scales.add((2 * s + 1) * GROUP), true));
                            for (((acc, lo), hi), a) in
                                acc.iter_mut().zip(lo_sums).zip(hi_sums).zip(&acts)
                            {
                                let a = &a[sb * SUBS + s];
                                let lo = _mm256_sub_epi32(lo, _mm256_set1_epi32(32 * a.sum_lo));
                                let hi = _mm256_sub_epi32(hi, _mm256_set1_epi32(32 * a.sum_hi()));
                                let ad = _mm256_set1_ps(a.d);
                                *acc = _mm256_fmadd_ps(
                                    _mm256_mul_ps(sc_lo, ad),
                                    _mm256_cvtepi32_ps(lo),
                                    *acc,
                                );
                                *acc = _mm256_fmadd_ps(
                                    _mm256_mul_ps(sc_hi, ad),
                                    _mm256_cvtepi32_ps(hi),
                                    *acc,
                                );
                            }
                        } else {
                            let scale = _mm256_mul_ps(d, bytes8(scales.add(s * GROUP), false));
                            let min =
                                _mm256_mul_ps(dmin, bytes8(scales.add((SUBS + s) * GROUP), false));
                            for ((((acc, off), lo), hi), a) in acc
                                .iter_mut()
                                .zip(off.iter_mut())
                                .zip(lo_sums)
                                .zip(hi_sums)
                                .zip(&acts)
                            {
                                let a = &a[sb * SUBS + s];
                                let sum = _mm256_add_epi32(lo, hi);
                                let ad = _mm256_set1_ps(a.d);
                                *acc = _mm256_fmadd_ps(
                                    _mm256_mul_ps(scale, ad),
                                    _mm256_cvtepi32_ps(sum),
                                    *acc,
                                );
                                *off = _mm256_fmadd_ps(min, _mm256_set1_ps(-a.s), *off);
                            }
                        }
                    }
                }
                let mut out = [[0f32; GROUP]; R];
                for ((out, acc), off) in out.iter_mut().zip(acc).zip(off) {
                    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(acc, off));
                }
                out
            }
        };
    }

    // u8·s8 pair sums in i16, widened to i32 once the next would overflow: a pair reaches
    // 2·15·127 (Q4_K), 2·31·127 (Q5_K), 2·63·127 (Q6_K), so four, four and two chunks fit.
    k_kernel!(
        group_k,
        "avx2,fma,f16c",
        |sum, w, a| _mm256_add_epi16(*sum, _mm256_maddubs_epi16(w, a)),
        |s| _mm256_madd_epi16(s, _mm256_set1_epi16(1)),
        |f| if f == KFormat::Q6K { 2 } else { 4 }
    );
    k_kernel!(
        group_k_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        |sum, w, a| _mm256_dpbusd_epi32(*sum, w, a),
        |s| s,
        |_f| 4
    );
}
