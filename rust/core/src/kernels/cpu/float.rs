//! Float weights (F16, BF16, F32) for the CPU forward pass. Half-precision weights stay in two
//! bytes per weight and are widened in registers: no f32 copy of the matrix, half the bytes a
//! decode step streams. F32 weights take the same layout and tiles.
//!
//! At load the rows are interleaved in groups of eight, column by column: the eight rows'
//! weights of column `k` sit side by side (16 or 32 bytes), so one load (widened) is a vector of
//! eight rows' weights, and a broadcast activation times it adds to eight outputs at once. A tile
//! takes `G` groups against `R` activation rows (`G · R` accumulators in registers): one row of a
//! decode step streams the weights at memory speed, a prefill's rows reuse each widened vector
//! `R` times. Every output is one chain of fused multiply-adds over the columns in order, the same
//! whatever the tile: a row's result does not depend on the batch it runs in.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use super::parallel::DisjointOut;
use super::weight_memory::WeightBytes;
use crate::error::{Error, Result};

/// Rows interleaved in one group (one 256-bit vector of f32).
const GROUP: usize = 8;

/// The element types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatKind {
    F16,
    Bf16,
    F32,
}

impl FloatKind {
    fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F16 => Some(FloatKind::F16),
            DType::BF16 => Some(FloatKind::Bf16),
            DType::F32 => Some(FloatKind::F32),
            _ => None,
        }
    }

    fn dtype(self) -> DType {
        match self {
            FloatKind::F16 => DType::F16,
            FloatKind::Bf16 => DType::BF16,
            FloatKind::F32 => DType::F32,
        }
    }

    fn size(self) -> usize {
        match self {
            FloatKind::F32 => 4,
            _ => 2,
        }
    }

    /// The element stored little-endian at the start of `b`, as f32.
    fn widen(self, b: &[u8]) -> f32 {
        match self {
            FloatKind::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            FloatKind::Bf16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            FloatKind::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }
}

/// A `[rows, cols]` float matrix in groups of eight interleaved rows (rows past `rows`, padding
/// the last group, are zero).
#[derive(Debug, Clone)]
pub struct FloatMatrix {
    kind: FloatKind,
    data: WeightBytes,
    rows: usize,
    cols: usize,
}

impl FloatMatrix {
    /// The interleaved copy of a `[rows, cols]` F16, BF16 or F32 tensor; `None` for other dtypes.
    pub(crate) fn from_tensor(t: &Tensor) -> Result<Option<Self>> {
        let Some(kind) = FloatKind::of(t.dtype()) else {
            return Ok(None);
        };
        let (rows, cols) = t.dims2()?;
        if cols == 0 {
            return Err(Error::invalid("a weight matrix with no columns"));
        }
        let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
        // Row-major little-endian bytes of the values as stored.
        let bytes: Vec<u8> = match kind {
            FloatKind::F16 => flat
                .to_vec1::<f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            FloatKind::Bf16 => flat
                .to_vec1::<bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            FloatKind::F32 => flat
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        let size = kind.size();
        let group_bytes = cols * GROUP * size;
        let data = WeightBytes::filled_by(rows.div_ceil(GROUP) * group_bytes, |out| {
            for (r, row) in bytes.chunks_exact(cols * size).enumerate() {
                let g = &mut out[r / GROUP * group_bytes..(r / GROUP + 1) * group_bytes];
                for (k, v) in row.chunks_exact(size).enumerate() {
                    let at = (k * GROUP + r % GROUP) * size;
                    g[at..at + size].copy_from_slice(v);
                }
            }
        });
        Ok(Some(Self {
            kind,
            data,
            rows,
            cols,
        }))
    }

    /// The matrix back as a row-major tensor of its own dtype, bit for bit.
    pub(crate) fn to_tensor(&self) -> Result<Tensor> {
        let size = self.kind.size();
        let mut bytes = vec![0u8; self.rows * self.cols * size];
        for (r, row) in bytes.chunks_exact_mut(self.cols * size).enumerate() {
            let g = self.group(r / GROUP);
            for (k, v) in row.chunks_exact_mut(size).enumerate() {
                let at = (k * GROUP + r % GROUP) * size;
                v.copy_from_slice(&g[at..at + size]);
            }
        }
        let shape = [self.rows, self.cols];
        Ok(Tensor::from_raw_buffer(
            &bytes,
            self.kind.dtype(),
            &shape,
            &Device::Cpu,
        )?)
    }

    /// Bytes the matrix holds (without the padding rows).
    pub(crate) fn bytes(&self) -> usize {
        self.rows * self.cols * self.kind.size()
    }

    fn group_bytes(&self) -> usize {
        self.cols * GROUP * self.kind.size()
    }

    fn group(&self, g: usize) -> &[u8] {
        let gb = self.group_bytes();
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
                let gb = self.group_bytes();
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
    Portable(FloatKind),
    #[cfg(target_arch = "x86_64")]
    Avx2(FloatKind),
}

impl Path {
    fn select(kind: FloatKind) -> Self {
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
    /// As [`FloatMatrix::compute_rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        self,
        w: &FloatMatrix,
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
    w: &FloatMatrix,
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
    kind: FloatKind,
    _ahead: &[u8],
    out: &mut [[[f32; GROUP]; R]; G],
) {
    for (g, group) in groups.iter().enumerate() {
        let mut acc = [[0f32; GROUP]; R];
        for k in 0..cols {
            let w: [f32; GROUP] =
                std::array::from_fn(|l| kind.widen(&group[(k * GROUP + l) * kind.size()..]));
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
    use super::{FloatKind, GROUP};
    use std::arch::x86_64::*;

    /// Eight weights at `p` as eight f32.
    #[inline(always)]
    unsafe fn widen8(p: *const u8, kind: FloatKind) -> __m256 {
        match kind {
            FloatKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            FloatKind::Bf16 => {
                let v = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
            }
            FloatKind::F32 => _mm256_loadu_ps(p as *const f32),
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
        kind: FloatKind,
        ahead: &[u8],
        out: &mut [[[f32; GROUP]; R]; G],
    ) {
        let step = GROUP * kind.size();
        assert!(groups.iter().all(|g| g.len() >= cols * step));
        assert!(xs.iter().all(|x| x.len() >= cols));
        let mut acc = [[_mm256_setzero_ps(); R]; G];
        let gp: [*const u8; G] = std::array::from_fn(|g| groups[g].as_ptr());
        let xp: [*const f32; R] = std::array::from_fn(|i| xs[i].as_ptr());
        // `ahead` is as long as the groups read here: one cache line of it per 64 bytes read.
        let pull_every = (64 / (G * step)).max(1);
        for k in 0..cols {
            if k % pull_every == 0 {
                let at = k * G * step;
                if at < ahead.len() {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.as_ptr().add(at) as *const i8);
                }
            }
            let w: [__m256; G] = std::array::from_fn(|g| widen8(gp[g].add(k * step), kind));
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

    /// Each path against a float64 product of the same weights, for 1, 2, 3, 8, 17 and 64
    /// activation rows and an odd number of weight rows and columns; a row's output is the same
    /// bits whatever batch it runs in; the matrix comes back bit for bit.
    #[test]
    fn float_kernels_match_a_float64_reference_and_ignore_the_batch() {
        let (rows, cols) = (45, 200);
        let x = matrix(64, cols, 2);
        let wf = Tensor::from_vec(matrix(rows, cols, 1), (rows, cols), &Device::Cpu).unwrap();
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let t = wf.to_dtype(dtype).unwrap();
            let w = FloatMatrix::from_tensor(&t).unwrap().unwrap();
            let back = w.to_tensor().unwrap();
            assert_eq!(back.dtype(), dtype);
            let (a, b) = (
                back.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
                t.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
            );
            let exact_w = b.to_vec1::<f64>().unwrap();
            assert_eq!(a.to_vec1::<f64>().unwrap(), exact_w, "{dtype:?}");
            let kind = w.kind;
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
                                let p =
                                    exact_w[r * cols + k] * f64::from(x[(first + j) * cols + k]);
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
