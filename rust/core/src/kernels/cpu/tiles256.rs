//! Many-row kernels at 256 bits for the formats whose weights are unsigned quants of four to six
//! bits (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), where the 512-bit tiles of [`super::qmatmul`]
//! do not serve them (every such format on an AVX2-only CPU; the five-bit and K-quant formats
//! everywhere). Q8_0 stays with its group kernels: its signed weights cost a sign operation per
//! product either way, and through these tiles its prefill measured 0.88x. On CPUs with AVX-512
//! VNNI the VNNI form of the tiles replaces the 256-bit VNNI group kernels of the five-bit and
//! K-quant formats from four rows on; it gives the same bits, but its speed there is not yet
//! measured (measured so far: AMD EPYC Zen 3, AVX2 only).
//!
//! The group kernels rebuild each weight from its nibble and bit planes in every call, and a call
//! covers at most four activation rows: across a prefill's hundreds of rows that rebuilding was
//! most of the work. Here each group of eight weight rows is unpacked once into [`Unpacked`]
//! blocks, every weight in a byte the multiply takes as it is and every scale in f32, and tiles of
//! four activation rows then run over it with nothing but the products and their sums.
//!
//! A tile computes exactly what the group kernel of the same format computes for each row (the
//! same integer sums, the same float operations in the same order), so a row's result does not
//! depend on the batch it is decoded in.

use std::arch::x86_64::*;

use super::kquants::avx2::{bytes8, chunk, masks};
use super::kquants::KFormat;
use super::qmatmul::avx2::{act_word, f16x8, q5_chunk};
use super::qmatmul::{unrolled, Kind, Q8Block, GROUP, HIGH_PLANE};

/// From this many activation rows, the group kernels give way to the tiles.
pub(crate) const MIN_ROWS: usize = 4;

/// One block column of 32 weights of a group, unpacked.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
pub(crate) struct Unpacked {
    /// Word `k` holds weights `4k..4k + 4` of each of the eight rows, four bytes per row, as
    /// unsigned quants.
    words: [[u8; 32]; 8],
    /// Per row, the scale of the block's integer sum (Q6_K: of its first sixteen weights).
    scale: [f32; GROUP],
    /// Per row, the minimum (Q4_1, Q5_1, Q4_K, Q5_K), the scale again (Q4_0, Q5_0), or the scale
    /// of the last sixteen weights (Q6_K).
    second: [f32; GROUP],
}

const EMPTY: Unpacked = Unpacked {
    words: [[0; 32]; 8],
    scale: [0.0; GROUP],
    second: [0.0; GROUP],
};

/// Unpacks `group` (the grouped layout of `kind`, eight rows of whole blocks) into `out`, one
/// entry per block column of 32 weights.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpack(kind: Kind, group: &[u8], out: &mut Vec<Unpacked>) {
    let gb = kind.group_block_bytes();
    let columns = group.len() / gb;
    let per_column = match kind {
        Kind::K(_) => 8,
        _ => 1,
    };
    out.clear();
    out.resize(columns * per_column, EMPTY);
    let mask = _mm256_set1_epi8(0x0F);
    for (column, dst) in out.chunks_exact_mut(per_column).enumerate() {
        let p = group.as_ptr().add(column * gb);
        let word = |u: &mut Unpacked, k: usize, v: __m256i| {
            _mm256_storeu_si256(u.words[k].as_mut_ptr() as *mut __m256i, v)
        };
        match kind {
            Kind::Q4_0 | Kind::Q4_1 | Kind::Q5_0 | Kind::Q5_1 => {
                let u = &mut dst[0];
                let with_min = matches!(kind, Kind::Q4_1 | Kind::Q5_1);
                let header = if with_min { 32 } else { 16 };
                let d = f16x8(p);
                _mm256_storeu_ps(u.scale.as_mut_ptr(), d);
                let m = if with_min { f16x8(p.add(16)) } else { d };
                _mm256_storeu_ps(u.second.as_mut_ptr(), m);
                // Q5's plane of fifth bits, loaded once for the block's four chunks.
                let plane = kind
                    .high_bits()
                    .then(|| _mm256_loadu_si256(p.add(header) as *const __m256i));
                for c in 0..4 {
                    let (lo, hi) = if let Some(plane) = plane {
                        q5_chunk(p.add(header + HIGH_PLANE), plane, c)
                    } else {
                        let q = _mm256_loadu_si256(p.add(header + c * 32) as *const __m256i);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                        (_mm256_and_si256(q, mask), hi)
                    };
                    word(u, c, lo);
                    word(u, 4 + c, hi);
                }
            }
            Kind::Q8_0 => unreachable!("no 256-bit tiles for Q8_0"),
            Kind::K(f) => {
                let six = f == KFormat::Q6K;
                let masks = masks(f);
                let d = f16x8(p);
                let dmin = if six { d } else { f16x8(p.add(2 * GROUP)) };
                let scales = p.add(if six { 2 * GROUP } else { 4 * GROUP });
                for (s, u) in dst.iter_mut().enumerate() {
                    // The products the group kernel forms before each sub-block's sums.
                    let (scale, second) = if six {
                        (
                            _mm256_mul_ps(d, bytes8(scales.add(2 * s * GROUP), true)),
                            _mm256_mul_ps(d, bytes8(scales.add((2 * s + 1) * GROUP), true)),
                        )
                    } else {
                        (
                            _mm256_mul_ps(d, bytes8(scales.add(s * GROUP), false)),
                            _mm256_mul_ps(dmin, bytes8(scales.add((8 + s) * GROUP), false)),
                        )
                    };
                    _mm256_storeu_ps(u.scale.as_mut_ptr(), scale);
                    _mm256_storeu_ps(u.second.as_mut_ptr(), second);
                    let sub = p.add(f.header_bytes() + s * f.sub_bytes());
                    let planes = [
                        _mm256_loadu_si256(sub as *const __m256i),
                        _mm256_loadu_si256(sub.add(32) as *const __m256i),
                    ];
                    for c in 0..4 {
                        let (lo, hi) = chunk(f, sub.add(f.plane_bytes()), planes, c as i32, masks);
                        word(u, c, lo);
                        word(u, 4 + c, hi);
                    }
                }
            }
        }
    }
}

/// The formats as constants, so that each tile is compiled for one (its branches fold away).
pub(crate) mod code {
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q5_0: u8 = 2;
    pub const Q5_1: u8 = 3;
    pub const Q4K: u8 = 4;
    pub const Q5K: u8 = 5;
    pub const Q6K: u8 = 6;
}

/// Chunks whose pair sums an i16 lane holds exactly: a pair reaches 2·15·127 (four bits),
/// 2·31·127 (five) or 2·63·127 (Q6_K's six).
const fn run_length(format: u8) -> usize {
    match format {
        code::Q5_0 | code::Q5_1 | code::Q5K => 4,
        code::Q6K => 2,
        _ => 8,
    }
}

/// Defines a tile kernel over unpacked blocks. `$dot(sum, w, a)` adds to `sum` the products of
/// 32 unsigned weights with 32 signed activations; `$widen(sum)` turns that sum into eight i32,
/// every `$run(format)` chunks.
macro_rules! tile_kernel {
    ($name:ident, $features:literal, |$sum:ident, $w:ident, $a:ident| $dot:expr, |$s:ident| $widen:expr, |$ff:ident| $run:expr) => {
        /// The eight sums of the unpacked group with each of `R` activation rows.
        ///
        /// # Safety
        /// The CPU supports the kernel's target features; `blocks` came from [`unpack`] for the
        /// format `F` and holds `acts[i].len()` entries.
        // The last chunk's reset of the running sums is never read.
        #[allow(unused_assignments)]
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name<const R: usize, const F: u8>(
            blocks: &[Unpacked],
            acts: [&[Q8Block]; R],
        ) -> [[f32; GROUP]; R] {
            assert!(acts.iter().all(|a| a.len() == blocks.len()));
            let run = {
                let $ff = F;
                $run
            };
            let mut acc = [_mm256_setzero_ps(); R];
            let mut off = [_mm256_setzero_ps(); R];
            for (b, u) in blocks.iter().enumerate() {
                let scale = _mm256_loadu_ps(u.scale.as_ptr());
                let second = _mm256_loadu_ps(u.second.as_ptr());
                // The offset terms, as the group kernels form them.
                if F != code::Q6K {
                    unrolled!(R, |i| {
                        let s = acts[i][b].s;
                        let s = match F {
                            code::Q4_0 => -8.0 * s,
                            code::Q5_0 => -16.0 * s,
                            code::Q4K | code::Q5K => -s,
                            _ => s,
                        };
                        off[i] = _mm256_fmadd_ps(second, _mm256_set1_ps(s), off[i]);
                    });
                }
                let mut part = [_mm256_setzero_si256(); R];
                let mut sums = [_mm256_setzero_si256(); R];
                unrolled!(8, |k| {
                    let w = _mm256_load_si256(u.words[k].as_ptr() as *const __m256i);
                    unrolled!(R, |i| {
                        let ($sum, $w, $a) = (&mut part[i], w, act_word(&acts[i][b], 4 * k));
                        *$sum = $dot;
                    });
                    if (k + 1) % run == 0 {
                        unrolled!(R, |i| {
                            let $s = part[i];
                            sums[i] = _mm256_add_epi32(sums[i], $widen);
                            part[i] = _mm256_setzero_si256();
                        });
                    }
                    // Q6_K: the first sixteen weights have a scale of their own.
                    if F == code::Q6K && k == 3 {
                        unrolled!(R, |i| {
                            let a = &acts[i][b];
                            let lo = _mm256_sub_epi32(sums[i], _mm256_set1_epi32(32 * a.sum_lo));
                            let ad = _mm256_set1_ps(a.d);
                            acc[i] = _mm256_fmadd_ps(
                                _mm256_mul_ps(scale, ad),
                                _mm256_cvtepi32_ps(lo),
                                acc[i],
                            );
                            sums[i] = _mm256_setzero_si256();
                        });
                    }
                });
                unrolled!(R, |i| {
                    let a = &acts[i][b];
                    let ad = _mm256_set1_ps(a.d);
                    acc[i] = if F == code::Q6K {
                        let hi = _mm256_sub_epi32(sums[i], _mm256_set1_epi32(32 * a.sum_hi()));
                        _mm256_fmadd_ps(_mm256_mul_ps(second, ad), _mm256_cvtepi32_ps(hi), acc[i])
                    } else {
                        _mm256_fmadd_ps(
                            _mm256_mul_ps(scale, ad),
                            _mm256_cvtepi32_ps(sums[i]),
                            acc[i],
                        )
                    };
                });
            }
            let mut out = [[0f32; GROUP]; R];
            unrolled!(R, |i| {
                _mm256_storeu_ps(out[i].as_mut_ptr(), _mm256_add_ps(acc[i], off[i]));
            });
            out
        }
    };
}

tile_kernel!(
    tile,
    "avx2,fma,f16c",
    |sum, w, a| _mm256_add_epi16(*sum, _mm256_maddubs_epi16(w, a)),
    |s| _mm256_madd_epi16(s, _mm256_set1_epi16(1)),
    |f| run_length(f)
);
// AVX-512 VNNI at 256 bits: the products go straight into i32.
tile_kernel!(
    tile_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    |sum, w, a| _mm256_dpbusd_epi32(*sum, w, a),
    |s| s,
    // Q6_K's first sixteen weights are summed apart (see the tile).
    |f| if f == code::Q6K { 4 } else { 8 }
);

/// A tile over `R` activation rows.
pub(crate) type Tile<const R: usize> = unsafe fn(&[Unpacked], [&[Q8Block]; R]) -> [[f32; GROUP]; R];

/// The tiles of one format.
pub(crate) struct Tiles {
    pub one: Tile<1>,
    pub two: Tile<2>,
    pub four: Tile<4>,
}

macro_rules! tiles_of {
    ($kernel:ident, $format:expr) => {
        Tiles {
            one: $kernel::<1, { $format }>,
            two: $kernel::<2, { $format }>,
            four: $kernel::<4, { $format }>,
        }
    };
}

macro_rules! for_format {
    ($kernel:ident, $kind:expr) => {
        match $kind {
            Kind::Q8_0 => return None,
            Kind::Q4_0 => tiles_of!($kernel, code::Q4_0),
            Kind::Q4_1 => tiles_of!($kernel, code::Q4_1),
            Kind::Q5_0 => tiles_of!($kernel, code::Q5_0),
            Kind::Q5_1 => tiles_of!($kernel, code::Q5_1),
            Kind::K(KFormat::Q4K) => tiles_of!($kernel, code::Q4K),
            Kind::K(KFormat::Q5K) => tiles_of!($kernel, code::Q5K),
            Kind::K(KFormat::Q6K) => tiles_of!($kernel, code::Q6K),
        }
    };
}

/// The tiles for `kind` on this CPU, where it has AVX2 (and the instruction-set cap allows it)
/// and the format has tiles.
pub(crate) fn select(kind: Kind) -> Option<Tiles> {
    Some(if super::qmatmul::avx2::vnni_available() {
        for_format!(tile_vnni, kind)
    } else if super::qmatmul::avx2::available() {
        for_format!(tile, kind)
    } else {
        return None;
    })
}

/// Every tile set this CPU runs for `kind` (the plain AVX2 one, and the VNNI one where it has it).
#[cfg(test)]
pub(crate) fn every(kind: Kind) -> Vec<(&'static str, Tiles)> {
    let mut sets = Vec::new();
    let mut push = |name, tiles: Option<Tiles>| sets.extend(tiles.map(|t| (name, t)));
    if super::qmatmul::avx2::available() {
        push("avx2", (|| Some(for_format!(tile, kind)))());
    }
    if super::qmatmul::avx2::vnni_available() {
        push("vnni", (|| Some(for_format!(tile_vnni, kind)))());
    }
    sets
}
