//! Half-precision weights (F16, BF16) for the CPU forward pass, kept in two bytes per weight and
//! widened in registers: no f32 copy of the matrix, half the bytes a decode step streams.
//!
//! At load the rows are interleaved in groups of eight, column by column: the eight rows'
//! weights of column `k` sit side by side (16 bytes), so one load widens to a vector of eight
//! rows' weights, and a broadcast activation times it adds to eight outputs at once. A tile takes
//! `G` groups against `R` activation rows (`G · R` accumulators in registers): one row of a
//! decode step streams the weights at memory speed, a prefill's rows reuse each widened vector
//! `R` times. Every output is one chain of fused multiply-adds over the columns in order, the same
//! whatever the tile: a row's result does not depend on the batch it runs in.

use std::ops::Range;

use half::{bf16, f16};

use super::parallel::DisjointOut;
use super::weight_memory::WeightBytes;
use crate::error::{Error, Result};

/// Rows interleaved in one group (one 256-bit vector of f32).
const GROUP: usize = 8;

/// The two half-precision formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HalfKind {
    F16,
    Bf16,
}

impl HalfKind {
    fn widen(self, bits: u16) -> f32 {
        match self {
            HalfKind::F16 => f16::from_bits(bits).to_f32(),
            HalfKind::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }
}

/// A `[rows, cols]` half-precision matrix in groups of eight interleaved rows (rows past `rows`,
/// padding the last group, are zero).
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    kind: HalfKind,
    data: WeightBytes,
    rows: usize,
    cols: usize,
}

impl HalfMatrix {
    /// Interleaves a row-major `[rows, cols]` matrix of half-precision bit patterns.
    pub(crate) fn new(kind: HalfKind, bits: &[u16], rows: usize, cols: usize) -> Result<Self> {
        if bits.len() != rows * cols || cols == 0 {
            return Err(Error::invalid(format!(
                "half-precision weight holds {} values, expected {rows} x {cols}",
                bits.len()
            )));
        }
        let group_bytes = cols * GROUP * 2;
        let data = WeightBytes::filled_by(rows.div_ceil(GROUP) * group_bytes, |out| {
            for (r, row) in bits.chunks_exact(cols).enumerate() {
                let g = &mut out[r / GROUP * group_bytes..(r / GROUP + 1) * group_bytes];
                for (k, &b) in row.iter().enumerate() {
                    let at = (k * GROUP + r % GROUP) * 2;
                    g[at..at + 2].copy_from_slice(&b.to_le_bytes());
                }
            }
        });
        Ok(Self {
            kind,
            data,
            rows,
            cols,
        })
    }

    pub(crate) fn kind(&self) -> HalfKind {
        self.kind
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// The weights back in row-major order, as bit patterns.
    pub(crate) fn to_bits(&self) -> Vec<u16> {
        let mut out = vec![0u16; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            let g = self.group(r / GROUP);
            for (k, v) in row.iter_mut().enumerate() {
                let at = (k * GROUP + r % GROUP) * 2;
                *v = u16::from_le_bytes([g[at], g[at + 1]]);
            }
        }
        out
    }

    fn group(&self, g: usize) -> &[u8] {
        let gb = self.cols * GROUP * 2;
        &self.data[g * gb..(g + 1) * gb]
    }

    /// Rows `rows` of `x · Wᵀ` for the `m` rows of `x` (`[m, cols]`), written into `out`
    /// (`[m, self.rows]`). `rows.start` is a multiple of eight.
    ///
    /// # Safety
    /// No other task of the same parallel region writes these rows of `out`.
    pub(crate) unsafe fn compute_rows(&self, x: &[f32], rows: Range<usize>, out: &DisjointOut<'_>) {
        self.compute_rows_on(Path::select(self.kind), x, rows, out)
    }

    /// [`Self::compute_rows`] on `path` (one the CPU has).
    ///
    /// # Safety
    /// As [`Self::compute_rows`].
    unsafe fn compute_rows_on(
        &self,
        path: Path,
        x: &[f32],
        rows: Range<usize>,
        out: &DisjointOut<'_>,
    ) {
        debug_assert_eq!(rows.start % GROUP, 0);
        let m = x.len() / self.cols;
        let end = rows.end.min(self.rows);
        let groups: Vec<usize> = (rows.start / GROUP..end.div_ceil(GROUP)).collect();
        // Activation rows in chunks that stay in L2 while every group of the range passes over
        // them; few rows (decode) take four groups per tile so that enough chains are in flight.
        let chunk_rows = (ACT_CHUNK_BYTES / (self.cols * 4)).clamp(8, 64);
        for chunk in (0..m).step_by(chunk_rows) {
            let chunk_end = (chunk + chunk_rows).min(m);
            let wide_groups = if chunk_end - chunk <= 2 { 4 } else { 2 };
            for gs in groups.chunks(wide_groups) {
                // The groups after these, pulled towards the core while these are read (one
                // row of decode is bound by memory; the hardware prefetcher alone falls
                // behind four streams).
                let gb = self.cols * GROUP * 2;
                let next = (gs[gs.len() - 1] + 1) * gb;
                let ahead = self.data.get(next..next + gs.len() * gb).unwrap_or(&[]);
                let mut j = chunk;
                while j < chunk_end {
                    let step = tile_rows(chunk_end - j, gs.len());
                    let pull = if j + step >= chunk_end { ahead } else { &[] };
                    path.run(self, gs, x, j, step, end, pull, out);
                    j += step;
                }
            }
        }
    }
}

/// Bytes of activation rows one pass of the tiles keeps in L2.
const ACT_CHUNK_BYTES: usize = 192 << 10;

/// How many activation rows the next tile takes (register budget: `G · R` accumulators).
fn tile_rows(left: usize, groups: usize) -> usize {
    let widest = if groups >= 4 { 2 } else { 6 };
    [6, 4, 2, 1]
        .into_iter()
        .find(|&r| r <= left && r <= widest)
        .unwrap_or(1)
}

/// The instruction set the tiles run on (widening F16 needs F16C; BF16 is a shift).
#[derive(Clone, Copy)]
enum Path {
    Portable(HalfKind),
    #[cfg(target_arch = "x86_64")]
    Avx2(HalfKind),
}

impl Path {
    fn select(kind: HalfKind) -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::qmatmul::avx2_available() {
            return Path::Avx2(kind);
        }
        Path::Portable(kind)
    }

    /// One tile: the groups `gs` against activation rows `j..j + r`, written to `out` for the
    /// rows below `end`.
    ///
    /// # Safety
    /// As [`HalfMatrix::compute_rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        self,
        w: &HalfMatrix,
        gs: &[usize],
        x: &[f32],
        j: usize,
        r: usize,
        end: usize,
        ahead: &[u8],
        out: &DisjointOut<'_>,
    ) {
        let cols = w.cols;
        let mut sums = [[[0f32; GROUP]; 6]; 4];
        macro_rules! tile {
            ($f:path, $kind:expr) => {
                match (gs.len(), r) {
                    (4, 2) => dispatch::<4, 2>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (4, _) => dispatch::<4, 1>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (2, 6) => dispatch::<2, 6>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (2, 4) => dispatch::<2, 4>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (2, 2) => dispatch::<2, 2>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (2, _) => dispatch::<2, 1>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (_, 6) => dispatch::<1, 6>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (_, 4) => dispatch::<1, 4>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    (_, 2) => dispatch::<1, 2>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                    _ => dispatch::<1, 1>(&mut sums, w, gs, x, j, |g, xs, s| {
                        $f(g, xs, cols, $kind, ahead, s)
                    }),
                }
            };
        }
        match self {
            Path::Portable(kind) => tile!(tile_portable, kind),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(kind) => tile!(avx2::tile, kind),
        }
        // Groups of three or more in a tile only come with at most two rows, and vice versa.
        for (gi, &g) in gs.iter().enumerate() {
            let first = g * GROUP;
            let live = end.saturating_sub(first).min(GROUP);
            for (i, s) in sums[gi].iter().enumerate().take(r) {
                out.set_slice((j + i) * w.rows + first, &s[..live]);
            }
        }
    }
}

/// Calls a tile kernel of `G` groups and `R` rows on `gs` and rows `j..j + R` of `x`, its sums
/// into `sums[g][i]`.
fn dispatch<const G: usize, const R: usize>(
    sums: &mut [[[f32; GROUP]; 6]; 4],
    w: &HalfMatrix,
    gs: &[usize],
    x: &[f32],
    j: usize,
    kernel: impl FnOnce([&[u8]; G], [&[f32]; R], &mut [[[f32; GROUP]; R]; G]),
) {
    let cols = w.cols;
    let groups: [&[u8]; G] = std::array::from_fn(|g| w.group(gs[g]));
    let xs: [&[f32]; R] = std::array::from_fn(|i| &x[(j + i) * cols..(j + i + 1) * cols]);
    let mut out = [[[0f32; GROUP]; R]; G];
    kernel(groups, xs, &mut out);
    for (g, o) in out.iter().enumerate() {
        sums[g][..R].copy_from_slice(o);
    }
}

/// The portable tile: for each column in order, `acc += x · w` (a product, then a sum).
fn tile_portable<const G: usize, const R: usize>(
    groups: [&[u8]; G],
    xs: [&[f32]; R],
    cols: usize,
    kind: HalfKind,
    _ahead: &[u8],
    out: &mut [[[f32; GROUP]; R]; G],
) {
    for (g, group) in groups.iter().enumerate() {
        let mut acc = [[0f32; GROUP]; R];
        for k in 0..cols {
            let w: [f32; GROUP] = std::array::from_fn(|l| {
                let at = (k * GROUP + l) * 2;
                kind.widen(u16::from_le_bytes([group[at], group[at + 1]]))
            });
            for (acc, x) in acc.iter_mut().zip(&xs) {
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a += x[k] * w;
                }
            }
        }
        out[g] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{HalfKind, GROUP};
    use std::arch::x86_64::*;

    /// Eight half-precision weights at `p` as eight f32.
    #[inline(always)]
    unsafe fn widen8(p: *const u8, kind: HalfKind) -> __m256 {
        let v = _mm_loadu_si128(p as *const __m128i);
        match kind {
            HalfKind::F16 => _mm256_cvtph_ps(v),
            HalfKind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)),
        }
    }

    /// [`super::tile_portable`] with fused multiply-adds: `G · R` chains in registers.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C (checked by `Path::select`); each group holds `cols`
    /// columns and each activation row `cols` values (checked here).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const G: usize, const R: usize>(
        groups: [&[u8]; G],
        xs: [&[f32]; R],
        cols: usize,
        kind: HalfKind,
        ahead: &[u8],
        out: &mut [[[f32; GROUP]; R]; G],
    ) {
        assert!(groups.iter().all(|g| g.len() >= cols * GROUP * 2));
        assert!(xs.iter().all(|x| x.len() >= cols));
        let mut acc = [[_mm256_setzero_ps(); R]; G];
        let gp: [*const u8; G] = std::array::from_fn(|g| groups[g].as_ptr());
        let xp: [*const f32; R] = std::array::from_fn(|i| xs[i].as_ptr());
        // `ahead` is as long as the groups read here: one cache line of it per 64 bytes read.
        let pull_every = (64 / (G * GROUP * 2)).max(1);
        for k in 0..cols {
            if k % pull_every == 0 {
                let at = k * G * GROUP * 2;
                if at < ahead.len() {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(at) as *const i8);
                }
            }
            let w: [__m256; G] = std::array::from_fn(|g| widen8(gp[g].add(k * GROUP * 2), kind));
            for i in 0..R {
                let x = _mm256_broadcast_ss(&*xp[i].add(k));
                for g in 0..G {
                    acc[g][i] = _mm256_fmadd_ps(x, w[g], acc[g][i]);
                }
            }
        }
        for g in 0..G {
            for i in 0..R {
                _mm256_storeu_ps(out[g][i].as_mut_ptr(), acc[g][i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::isa::{cpu_levels, Isa};

    fn matrix(rows: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.5 - 1.0) * 1.7)
            .collect()
    }

    /// Each path against a float64 product of the same half-precision weights, for 1, 2, 3, 8,
    /// 17 and 64 activation rows and an odd number of weight rows and columns; a row's output
    /// is the same bits whatever batch it runs in; unpacking gives the weights back.
    #[test]
    fn half_kernels_match_a_float64_reference_and_ignore_the_batch() {
        let (rows, cols) = (45, 200);
        let wf = matrix(rows, cols, 1);
        let x = matrix(64, cols, 2);
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            let bits: Vec<u16> = wf
                .iter()
                .map(|&v| match kind {
                    HalfKind::F16 => f16::from_f32(v).to_bits(),
                    HalfKind::Bf16 => bf16::from_f32(v).to_bits(),
                })
                .collect();
            let w = HalfMatrix::new(kind, &bits, rows, cols).unwrap();
            assert_eq!(w.to_bits(), bits);
            for isa in cpu_levels().into_iter().filter(|&l| l <= Isa::Avx2) {
                let path = match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => Path::Avx2(kind),
                    _ => Path::Portable(kind),
                };
                let run = |m: usize, first: usize| {
                    let xs = &x[first * cols..(first + m) * cols];
                    let mut out = vec![0f32; m * rows];
                    let writer = DisjointOut::new(&mut out);
                    // SAFETY: the two ranges are disjoint and run one after the other.
                    unsafe {
                        w.compute_rows_on(path, xs, 0..16, &writer);
                        w.compute_rows_on(path, xs, 16..rows, &writer);
                    }
                    out
                };
                let alone: Vec<Vec<f32>> = (0..64).map(|j| run(1, j)).collect();
                for m in [1, 2, 3, 8, 17, 64] {
                    let first = 64 - m;
                    let got = run(m, first);
                    for j in 0..m {
                        let row = &got[j * rows..(j + 1) * rows];
                        assert_eq!(row, &alone[first + j][..], "{kind:?} {isa:?} {m} rows");
                        for (r, &v) in row.iter().enumerate() {
                            let (mut exact, mut scale) = (0f64, 0f64);
                            for k in 0..cols {
                                let p = f64::from(kind.widen(bits[r * cols + k]))
                                    * f64::from(x[(first + j) * cols + k]);
                                exact += p;
                                scale += p.abs();
                            }
                            assert!(
                                (f64::from(v) - exact).abs() <= 1e-6 * scale,
                                "{kind:?} {isa:?} row {r}: {v} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }
}
