//! CPU matrix-vector kernels for the GGML formats in blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
//!
//! Activations are quantized to 8-bit blocks of 32 (as llama.cpp does) and dotted with the weight
//! blocks in integer arithmetic: AVX2 where the CPU has it (detected at run time), portable Rust
//! elsewhere. The K-quant super-blocks have their own module ([`super::kquants`]); other formats
//! go through candle's QMatMul.
//!
//! At load time the weight blocks are repacked, without changing a bit of them, so that eight
//! rows are interleaved: for each block column, the eight rows' scales sit side by side (one f16
//! vector), and their quants are interleaved four bytes at a time. One 256-bit load then holds
//! four quants of each of eight rows, an activation word broadcast against it gives eight
//! per-row partial sums in the eight lanes, and the scales apply to all eight rows in one
//! instruction. This cuts the instructions per weight block about three-fold against a row at a
//! time, which is what makes the kernels keep up with memory on a small CPU.

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use half::f16;
use std::borrow::Cow;
use std::ops::Range;

use super::kquants::{self, KFormat, QK_K};
use super::parallel::DisjointOut;
#[cfg(target_arch = "x86_64")]
use super::tiles256;
use super::weight_memory::WeightBytes;
use crate::error::{Error, Result};

const QK: usize = 32;
/// Rows interleaved in one group of the repacked layout.
pub(crate) const GROUP: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    /// A K-quant super-block format ([`kquants`]).
    K(KFormat),
}

impl Kind {
    /// Bytes of one GGML block (32 weights of one row).
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
            Kind::Q5_1 => 24,
            Kind::Q8_0 => 34,
            Kind::K(f) => f.raw_bytes(),
        }
    }

    /// Weights of one row in one GGML block.
    fn block_weights(self) -> usize {
        match self {
            Kind::K(_) => QK_K,
            _ => QK,
        }
    }

    /// Bytes of one block column of a group (eight rows) in the grouped layout.
    pub(crate) fn group_block_bytes(self) -> usize {
        match self {
            Kind::K(f) => f.group_block_bytes(),
            _ => GROUP * self.block_bytes(),
        }
    }

    /// Bytes of the f16 fields before the quants in a GGML block (`d`, or `d` and `m`).
    fn header_bytes(self) -> usize {
        match self {
            Kind::Q4_1 | Kind::Q5_1 => 4,
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q8_0 => 2,
            Kind::K(_) => unreachable!("K-quant headers are laid out by kquants"),
        }
    }

    /// Whether the block carries a fifth bit per weight (`qh`, four bytes after the header).
    pub(crate) fn high_bits(self) -> bool {
        matches!(self, Kind::Q5_0 | Kind::Q5_1)
    }
}

/// Bytes of the high-bit plane of a Q5 group block (see [`repack`]).
pub(crate) const HIGH_PLANE: usize = 32;

/// A quantized `[rows, cols]` weight matrix, repacked in groups of [`GROUP`] rows.
///
/// Group `g`, block column `b` starts at `(g * blocks_per_row + b) * GROUP * block_bytes` and
/// holds: the eight rows' `d` (8 × f16), for Q4_1 their `m` (8 × f16), then the quants in
/// chunks of `GROUP * 4` bytes, chunk `c` holding bytes `4c..4c+4` of each row's quants in row
/// order. Rows past `rows` (padding to a whole group) are zero. Q5_0/Q5_1 blocks put a
/// 32-byte plane of the fifth bits between the header and the quants: byte `4r + t` holds, in
/// bit `c`, the high bit of row `r`'s weight `4c + t` (the low nibble of chunk `c`) and in bit
/// `4 + c` that of weight `16 + 4c + t` (the high nibble), so that each chunk's bits move into
/// place with one shift of the whole plane.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: Kind,
    /// Shared so that a cloned model (merging an adapter while a generation runs on the old
    /// one) costs no copy of the weights; in huge-page memory (paired against 4 KiB pages:
    /// single-row decode 1.15x, 16 rows 1.06x).
    data: WeightBytes,
    rows: usize,
    cols: usize,
}

/// One activation block: `x ≈ d · qs`, with `sum = Σ qs` and `s = d · sum` for the formats with
/// an offset, and `sum_lo` the sum of the first sixteen quants (Q6_K's scales cover 16).
#[derive(Clone, Copy)]
pub(crate) struct Q8Block {
    pub(crate) d: f32,
    pub(crate) s: f32,
    sum: i32,
    pub(crate) sum_lo: i32,
    pub(crate) qs: [i8; QK],
}

impl Q8Block {
    /// The sum of the last sixteen quants.
    pub(crate) fn sum_hi(&self) -> i32 {
        self.sum - self.sum_lo
    }
}

impl QuantMatrix {
    /// Wraps `t` when its format has a kernel here and it lives on the CPU.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q5_1 => Kind::Q5_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            GgmlDType::Q4K => Kind::K(KFormat::Q4K),
            GgmlDType::Q5K => Kind::K(KFormat::Q5K),
            GgmlDType::Q6K => Kind::K(KFormat::Q6K),
            _ => return Ok(None),
        };
        if !matches!(t.device(), Device::Cpu) {
            return Ok(None);
        }
        let (rows, cols) = t.shape().dims2()?;
        if cols % kind.block_weights() != 0 {
            return Ok(None);
        }
        let raw = t.data()?;
        if raw.len() != rows * (cols / kind.block_weights()) * kind.block_bytes() {
            return Err(Error::invalid(
                "quantized tensor data has an unexpected size",
            ));
        }
        Ok(Some(Self {
            kind,
            data: WeightBytes::filled_by(repacked_len(kind, rows, cols), |out| {
                repack(kind, &raw, rows, cols, out)
            }),
            rows,
            cols,
        }))
    }

    pub fn ggml_dtype(&self) -> GgmlDType {
        match self.kind {
            Kind::Q4_0 => GgmlDType::Q4_0,
            Kind::Q4_1 => GgmlDType::Q4_1,
            Kind::Q5_0 => GgmlDType::Q5_0,
            Kind::Q5_1 => GgmlDType::Q5_1,
            Kind::Q8_0 => GgmlDType::Q8_0,
            Kind::K(KFormat::Q4K) => GgmlDType::Q4K,
            Kind::K(KFormat::Q5K) => GgmlDType::Q5K,
            Kind::K(KFormat::Q6K) => GgmlDType::Q6K,
        }
    }

    /// The matrix back as a GGML tensor, bit for bit as it was loaded.
    pub fn to_qtensor(&self) -> Result<QTensor> {
        let raw = unpack(self.kind, &self.data, self.rows, self.cols);
        let storage = QStorage::from_data(Cow::Owned(raw), &Device::Cpu, self.ggml_dtype())?;
        Ok(QTensor::new(storage, (self.rows, self.cols))?)
    }

    fn group_bytes(&self) -> usize {
        (self.cols / self.kind.block_weights()) * self.kind.group_block_bytes()
    }

    /// Rows `rows` of `x · Wᵀ` for every row of `acts`, written into `out` (`[m, self.rows]`).
    /// `rows.start` is a multiple of [`GROUP`].
    ///
    /// # Safety
    /// No other task of the same parallel region writes these rows of `out`.
    pub(crate) unsafe fn compute_rows(
        &self,
        acts: &QuantizedActs,
        rows: Range<usize>,
        out: &DisjointOut<'_>,
    ) {
        debug_assert_eq!(rows.start % GROUP, 0);
        let gb = self.group_bytes();
        let mut rows = rows;
        // Where the CPU has AVX-512 VNNI the tile kernels take every pair of groups, for any
        // number of rows: measured in one process against the 256-bit kernels below, one row
        // decodes ~1.2x faster through them and two rows (a CoLD pair) ~1.2x too.
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = select_tiles(self.kind) {
            rows.start = self.compute_row_pairs(&tiles, acts, rows.clone(), out);
        }
        #[cfg(target_arch = "x86_64")]
        if acts.m >= tiles256::MIN_ROWS {
            if let Some(tiles) = tiles256::select(self.kind) {
                self.compute_tiles256(&tiles, acts, rows, out);
                return;
            }
        }
        let kernels = select_kernels(self.kind);
        for first in rows.clone().step_by(GROUP) {
            let group = &self.data[first / GROUP * gb..(first / GROUP + 1) * gb];
            let live = (rows.end.min(self.rows) - first).min(GROUP);
            let write =
                |j: usize, sums: &[f32; GROUP]| out.set_slice(j * self.rows + first, &sums[..live]);
            // Four (then two) activation rows per pass share the weight loads and nibble
            // unpacking.
            let mut j = 0;
            while j + 4 <= acts.m {
                let sums = (kernels.quad)(
                    group,
                    [
                        acts.row(j),
                        acts.row(j + 1),
                        acts.row(j + 2),
                        acts.row(j + 3),
                    ],
                );
                for (i, s) in sums.iter().enumerate() {
                    write(j + i, s);
                }
                j += 4;
            }
            while j + 2 <= acts.m {
                let [a, b] = (kernels.pair)(group, [acts.row(j), acts.row(j + 1)]);
                write(j, &a);
                write(j + 1, &b);
                j += 2;
            }
            if j < acts.m {
                write(j, &(kernels.one)(group, [acts.row(j)])[0]);
            }
        }
    }
}

impl QuantMatrix {
    /// The part of [`Self::compute_rows`] that the 512-bit tile kernels take: every pair of
    /// groups that starts in `rows`, against the activation rows in tiles of up to eight.
    /// Returns where the rows it left (a final unpaired group) begin.
    ///
    /// # Safety
    /// As [`Self::compute_rows`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn compute_row_pairs(
        &self,
        tiles: &Tiles,
        acts: &QuantizedActs,
        rows: Range<usize>,
        out: &DisjointOut<'_>,
    ) -> usize {
        const PAIR: usize = 2 * GROUP;
        let gb = self.group_bytes();
        let end = rows.end.min(self.rows);
        // Pairs whose second group still has rows of this range (the storage holds whole groups).
        let pairs = (end.saturating_sub(rows.start) + GROUP - 1) / PAIR;
        // The tiles prefetch two pairs ahead; the first two pairs of the range are requested
        // here, all at once, rather than found missing one line after another.
        let first = rows.start / GROUP * gb;
        super::prefetch(&self.data[first..(first + 4 * gb).min(self.data.len())]);
        // Activation rows in chunks that stay in the core's L2 while every pair of the range
        // passes over them: the weights then stream from memory once per chunk.
        for chunk in (0..acts.m).step_by(ACT_CHUNK) {
            let chunk_end = (chunk + ACT_CHUNK).min(acts.m);
            for p in 0..pairs {
                let first = rows.start + p * PAIR;
                let g = first / GROUP;
                let (g0, g1) = (
                    &self.data[g * gb..(g + 1) * gb],
                    &self.data[(g + 1) * gb..(g + 2) * gb],
                );
                let live = (end - first).min(PAIR);
                // The last tile over this pair also pulls the pair after next towards the core
                // (the hardware prefetcher alone falls behind: single-row decode 1.3x with it,
                // four rows 1.17x, paired in one process). The other tiles find this pair in L1.
                // It reaches past the end of `rows` too: the chunk a thread claims next usually
                // starts there, and would otherwise begin cold.
                let ahead: &[u8] = self.data.get((g + 4) * gb..(g + 6) * gb).unwrap_or(&[]);
                // Output rows are written in place by the kernels, `live` values each.
                let dst = |j: usize| out.ptr_at(j * self.rows + first, live);
                let mut j = chunk;
                // Enough tiles over this pair that unpacking its quants once into bytes the
                // instruction takes as they are beats unpacking them in every tile.
                if chunk_end - chunk >= UNPACK_MIN_ROWS {
                    UNPACKED.with_borrow_mut(|unpacked| {
                        avx512::unpack_pair(self.kind, g0, g1, unpacked, ahead);
                        let kind = self.kind;
                        while j + 8 <= chunk_end {
                            let dsts = std::array::from_fn(|i| dst(j + i));
                            avx512::tile_unpacked::<8>(kind, unpacked, acts.rows(j), dsts, live);
                            j += 8;
                        }
                        if j + 4 <= chunk_end {
                            let dsts = std::array::from_fn(|i| dst(j + i));
                            avx512::tile_unpacked::<4>(kind, unpacked, acts.rows(j), dsts, live);
                            j += 4;
                        }
                        for j in j..chunk_end {
                            avx512::tile_unpacked::<1>(
                                kind,
                                unpacked,
                                acts.rows(j),
                                [dst(j)],
                                live,
                            );
                        }
                    });
                    continue;
                }
                while j < chunk_end {
                    let left = chunk_end - j;
                    let last = left <= 8 && left.count_ones() == 1;
                    let pull = if last { ahead } else { &[] };
                    let step = if left >= 8 {
                        let dsts = std::array::from_fn(|i| dst(j + i));
                        (tiles.eight)(g0, g1, acts.rows(j), dsts, live, pull);
                        8
                    } else if left >= 4 {
                        let dsts = std::array::from_fn(|i| dst(j + i));
                        (tiles.four)(g0, g1, acts.rows(j), dsts, live, pull);
                        4
                    } else if left >= 2 {
                        (tiles.two)(g0, g1, acts.rows(j), [dst(j), dst(j + 1)], live, pull);
                        2
                    } else {
                        (tiles.one)(g0, g1, acts.rows(j), [dst(j)], live, pull);
                        1
                    };
                    j += step;
                }
            }
        }
        rows.start + pairs * PAIR
    }
}

impl QuantMatrix {
    /// [`Self::compute_rows`] through the 256-bit tiles: each group of the range is unpacked once
    /// per chunk of activation rows, then tiles of four rows (and two, one) run over it.
    ///
    /// # Safety
    /// As [`Self::compute_rows`]; the CPU runs `tiles`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn compute_tiles256(
        &self,
        tiles: &tiles256::Tiles,
        acts: &QuantizedActs,
        rows: Range<usize>,
        out: &DisjointOut<'_>,
    ) {
        let gb = self.group_bytes();
        let end = rows.end.min(self.rows);
        UNPACKED256.with_borrow_mut(|unpacked| {
            for chunk in (0..acts.m).step_by(ACT_CHUNK) {
                let chunk_end = (chunk + ACT_CHUNK).min(acts.m);
                for first in (rows.start..end).step_by(GROUP) {
                    let g = first / GROUP;
                    tiles256::unpack(self.kind, &self.data[g * gb..(g + 1) * gb], unpacked);
                    let live = (end - first).min(GROUP);
                    let write = |j: usize, sums: &[f32; GROUP]| {
                        out.set_slice(j * self.rows + first, &sums[..live])
                    };
                    let mut j = chunk;
                    while j + 4 <= chunk_end {
                        for (i, s) in (tiles.four)(unpacked, acts.rows(j)).iter().enumerate() {
                            write(j + i, s);
                        }
                        j += 4;
                    }
                    if j + 2 <= chunk_end {
                        let [a, b] = (tiles.two)(unpacked, acts.rows(j));
                        write(j, &a);
                        write(j + 1, &b);
                        j += 2;
                    }
                    if j < chunk_end {
                        write(j, &(tiles.one)(unpacked, acts.rows(j))[0]);
                    }
                }
            }
        });
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The group the 256-bit tiles are working on, unpacked.
    static UNPACKED256: std::cell::RefCell<Vec<tiles256::Unpacked>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Activation rows per pass of the tile kernels over a range of weight rows.
const ACT_CHUNK: usize = 64;

/// From this many activation rows in a chunk, each pair of groups is unpacked once for all of
/// its tiles (paired in one process against unpacking in every tile: 64 rows 1.12x, prefill
/// 1.06x; at 16 rows, two tiles, no gain).
const UNPACK_MIN_ROWS: usize = 32;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// The pair of groups the tiles of a wide batch are working on, unpacked.
    static UNPACKED: std::cell::RefCell<Vec<avx512::Unpacked>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes of a `[rows, cols]` matrix of `kind` in the grouped layout (rows padded to a group).
fn repacked_len(kind: Kind, rows: usize, cols: usize) -> usize {
    rows.div_ceil(GROUP) * (cols / kind.block_weights()) * kind.group_block_bytes()
}

/// Reorders GGML blocks (`rows` rows of `cols / 32` blocks) into the grouped layout, in `out`
/// ([`repacked_len`] zeroed bytes: the padding rows stay zero).
fn repack(kind: Kind, raw: &[u8], rows: usize, cols: usize, out: &mut [u8]) {
    if let Kind::K(f) = kind {
        return kquants::repack(f, raw, rows, cols, out);
    }
    let bb = kind.block_bytes();
    let hb = kind.header_bytes();
    let nb = cols / QK;
    let groups = rows.div_ceil(GROUP);
    assert_eq!(out.len(), repacked_len(kind, rows, cols));
    for g in 0..groups {
        for b in 0..nb {
            let dst = &mut out[(g * nb + b) * GROUP * bb..(g * nb + b + 1) * GROUP * bb];
            for r in 0..GROUP.min(rows - g * GROUP) {
                let src =
                    &raw[((g * GROUP + r) * nb + b) * bb..((g * GROUP + r) * nb + b + 1) * bb];
                // Header fields: field f of row r at f * GROUP * 2 + r * 2.
                for f in 0..hb / 2 {
                    dst[f * GROUP * 2 + r * 2..f * GROUP * 2 + r * 2 + 2]
                        .copy_from_slice(&src[f * 2..f * 2 + 2]);
                }
                let mut quants_at = GROUP * hb;
                let mut quants = &src[hb..];
                if kind.high_bits() {
                    let qh = u32::from_le_bytes([src[hb], src[hb + 1], src[hb + 2], src[hb + 3]]);
                    for t in 0..4 {
                        dst[quants_at + 4 * r + t] = (0..4).fold(0u8, |byte, c| {
                            let lo = (qh >> (4 * c + t)) & 1;
                            let hi = (qh >> (16 + 4 * c + t)) & 1;
                            byte | (lo << c) as u8 | (hi << (4 + c)) as u8
                        });
                    }
                    quants_at += HIGH_PLANE;
                    quants = &src[hb + 4..];
                }
                for (c, word) in quants.chunks_exact(4).enumerate() {
                    let at = quants_at + c * GROUP * 4 + r * 4;
                    dst[at..at + 4].copy_from_slice(word);
                }
            }
        }
    }
}

/// The inverse of [`repack`]: GGML's row-major block order.
fn unpack(kind: Kind, packed: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    if let Kind::K(f) = kind {
        return kquants::unpack(f, packed, rows, cols);
    }
    let bb = kind.block_bytes();
    let hb = kind.header_bytes();
    let nb = cols / QK;
    let mut out = vec![0u8; rows * nb * bb];
    for (row, dst_row) in out.chunks_exact_mut(nb * bb).enumerate() {
        let (g, r) = (row / GROUP, row % GROUP);
        for (b, dst) in dst_row.chunks_exact_mut(bb).enumerate() {
            let src = &packed[(g * nb + b) * GROUP * bb..(g * nb + b + 1) * GROUP * bb];
            for f in 0..hb / 2 {
                dst[f * 2..f * 2 + 2]
                    .copy_from_slice(&src[f * GROUP * 2 + r * 2..f * GROUP * 2 + r * 2 + 2]);
            }
            let mut quants_at = GROUP * hb;
            let mut quants = &mut dst[hb..];
            if kind.high_bits() {
                let plane = &src[quants_at + 4 * r..quants_at + 4 * r + 4];
                let mut qh = 0u32;
                for (t, &byte) in plane.iter().enumerate() {
                    for c in 0..4 {
                        qh |= u32::from((byte >> c) & 1) << (4 * c + t);
                        qh |= u32::from((byte >> (4 + c)) & 1) << (16 + 4 * c + t);
                    }
                }
                quants[..4].copy_from_slice(&qh.to_le_bytes());
                quants = &mut quants[4..];
                quants_at += HIGH_PLANE;
            }
            for (c, word) in quants.chunks_exact_mut(4).enumerate() {
                let at = quants_at + c * GROUP * 4 + r * 4;
                word.copy_from_slice(&src[at..at + 4]);
            }
        }
    }
    out
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
        let empty = Q8Block {
            d: 0.0,
            s: 0.0,
            sum: 0,
            sum_lo: 0,
            qs: [0; QK],
        };
        let mut blocks = vec![empty; x.len() / QK];
        // From about eight rows on, the rows quantize in parallel (a decode step of a wide batch
        // does this four times per layer); a few rows are not worth a hand-off.
        const CHUNK: usize = 64;
        super::parallel::par_chunks_mut(&mut blocks, CHUNK, 256, |c, part| {
            let src = &x[c * CHUNK * QK..];
            for (b, x) in part.iter_mut().zip(src.chunks_exact(QK)) {
                *b = quantize_block(x);
            }
        });
        Self {
            blocks,
            per_row: cols / QK,
            m: x.len() / cols.max(1),
        }
    }

    /// Rows `j..j + R`.
    fn rows<const R: usize>(&self, j: usize) -> [&[Q8Block]; R] {
        std::array::from_fn(|i| self.row(j + i))
    }

    fn row(&self, j: usize) -> &[Q8Block] {
        &self.blocks[j * self.per_row..(j + 1) * self.per_row]
    }
}

fn quantize_block(x: &[f32]) -> Q8Block {
    #[cfg(target_arch = "x86_64")]
    let mut b = if avx2::available() {
        // SAFETY: the CPU has AVX2; `x` holds a whole block.
        unsafe { avx2::quantize_block(x) }
    } else {
        quantize_block_portable(x)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let mut b = quantize_block_portable(x);
    b.sum_lo = b.qs[..QK / 2].iter().map(|&q| i32::from(q)).sum();
    b
}

fn quantize_block_portable(x: &[f32]) -> Q8Block {
    // Adding and removing 1.5·2^23 rounds |v| < 2^22 to the nearest integer (ties to even, as
    // llama.cpp's SIMD path does) in plain arithmetic that vectorises; `f32::round` is a libm
    // call per value on baseline x86-64, and this runs serially before every projection.
    const ROUND: f32 = 12_582_912.0;
    let amax = x
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a { v.abs() } else { a });
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; QK];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = ((v * inv + ROUND) - ROUND) as i8;
    }
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    Q8Block {
        d,
        s: d * sum as f32,
        sum,
        sum_lo: 0,
        qs,
    }
}

/// The eight dot products of one row group with each of `R` rows of activations.
type GroupKernel<const R: usize> = fn(&[u8], [&[Q8Block]; R]) -> [[f32; GROUP]; R];

struct Kernels {
    one: GroupKernel<1>,
    pair: GroupKernel<2>,
    quad: GroupKernel<4>,
}

/// The one-row and two-row instances of one kernel expression generic over the row count.
macro_rules! kernels {
    (|$w:ident, $a:ident| $body:expr) => {
        Kernels {
            one: |$w, $a| $body,
            pair: |$w, $a| $body,
            quad: |$w, $a| $body,
        }
    };
}

fn select_kernels(kind: Kind) -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::vnni_available() {
            return match kind {
                Kind::Q4_0 => kernels!(|w, a| unsafe { avx2::group_q4_vnni(w, a, false) }),
                Kind::Q4_1 => kernels!(|w, a| unsafe { avx2::group_q4_vnni(w, a, true) }),
                Kind::Q5_0 => kernels!(|w, a| unsafe { avx2::group_q5_vnni(w, a, false) }),
                Kind::Q5_1 => kernels!(|w, a| unsafe { avx2::group_q5_vnni(w, a, true) }),
                Kind::Q8_0 => kernels!(|w, a| unsafe { avx2::group_q8_0_vnni(w, a) }),
                Kind::K(f) => select_k_kernels(f),
            };
        }
        if avx2::available() {
            return match kind {
                Kind::Q4_0 => kernels!(|w, a| unsafe { avx2::group_q4(w, a, false) }),
                Kind::Q4_1 => kernels!(|w, a| unsafe { avx2::group_q4(w, a, true) }),
                Kind::Q5_0 => kernels!(|w, a| unsafe { avx2::group_q5(w, a, false) }),
                Kind::Q5_1 => kernels!(|w, a| unsafe { avx2::group_q5(w, a, true) }),
                Kind::Q8_0 => kernels!(|w, a| unsafe { avx2::group_q8_0(w, a) }),
                Kind::K(f) => select_k_kernels(f),
            };
        }
    }
    match kind {
        Kind::Q4_0 => kernels!(|w, a| a.map(|a| group_scalar(Kind::Q4_0, w, a))),
        Kind::Q4_1 => kernels!(|w, a| a.map(|a| group_scalar(Kind::Q4_1, w, a))),
        Kind::Q5_0 => kernels!(|w, a| a.map(|a| group_scalar(Kind::Q5_0, w, a))),
        Kind::Q5_1 => kernels!(|w, a| a.map(|a| group_scalar(Kind::Q5_1, w, a))),
        Kind::Q8_0 => kernels!(|w, a| a.map(|a| group_scalar(Kind::Q8_0, w, a))),
        Kind::K(f) => select_k_kernels(f),
    }
}

/// [`kernels!`] for a K-quant format known only at run time: one instance per format, with the
/// format a constant inside (a closure capturing it would not be a function pointer).
macro_rules! per_format {
    ($f:expr, |$w:ident, $a:ident, $ff:ident| $body:expr) => {
        match $f {
            KFormat::Q4K => kernels!(|$w, $a| {
                let $ff = KFormat::Q4K;
                $body
            }),
            KFormat::Q5K => kernels!(|$w, $a| {
                let $ff = KFormat::Q5K;
                $body
            }),
            KFormat::Q6K => kernels!(|$w, $a| {
                let $ff = KFormat::Q6K;
                $body
            }),
        }
    };
}

/// The K-quant kernels.
fn select_k_kernels(f: KFormat) -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        if avx2::vnni_available() {
            return per_format!(f, |w, a, f| unsafe { kquants::avx2::group_k_vnni(f, w, a) });
        }
        if avx2::available() {
            return per_format!(f, |w, a, f| unsafe { kquants::avx2::group_k(f, w, a) });
        }
    }
    per_format!(f, |w, a, f| a.map(|a| kquants::group_scalar(f, w, a)))
}

/// Sixteen weight rows (two consecutive groups) dotted with each of `R` activation rows; the
/// first `live` of each row's sixteen results are written at its destination. The last argument
/// is memory to prefetch while it runs (the weights a later call will read), possibly empty.
///
/// # Safety
/// Each destination holds `live` (at most sixteen) writable values no other thread touches.
type TileKernel<const R: usize> =
    unsafe fn(&[u8], &[u8], [&[Q8Block]; R], [*mut f32; R], usize, &[u8]);

struct Tiles {
    one: TileKernel<1>,
    two: TileKernel<2>,
    four: TileKernel<4>,
    eight: TileKernel<8>,
}

macro_rules! tiles {
    ($kernel:ident $(, $arg:expr)?) => {
        Tiles {
            one: |g0, g1, a, d, live, ahead| unsafe {
                avx512::$kernel(g0, g1, a, d, live, ahead $(, $arg)?)
            },
            two: |g0, g1, a, d, live, ahead| unsafe {
                avx512::$kernel(g0, g1, a, d, live, ahead $(, $arg)?)
            },
            four: |g0, g1, a, d, live, ahead| unsafe {
                avx512::$kernel(g0, g1, a, d, live, ahead $(, $arg)?)
            },
            eight: |g0, g1, a, d, live, ahead| unsafe {
                avx512::$kernel(g0, g1, a, d, live, ahead $(, $arg)?)
            },
        }
    };
}

/// The 512-bit VNNI tile kernels, where the CPU has them.
#[cfg(target_arch = "x86_64")]
fn select_tiles(kind: Kind) -> Option<Tiles> {
    if !avx512::available() {
        return None;
    }
    Some(match kind {
        Kind::Q4_0 => tiles!(tile_q4, false),
        Kind::Q4_1 => tiles!(tile_q4, true),
        Kind::Q8_0 => tiles!(tile_q8_0),
        // The 256-bit kernels serve the five-bit and K-quant formats on every x86 CPU.
        Kind::Q5_0 | Kind::Q5_1 | Kind::K(_) => return None,
    })
}

/// Whether the 512-bit VNNI tile kernels run on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) fn tiles_available() -> bool {
    avx512::available()
}

/// Whether the CPU has AVX-512F (the 16-lane f32 kernels).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512f_available() -> bool {
    super::isa::allows(super::isa::Isa::Avx512) && is_x86_feature_detected!("avx512f")
}

/// Whether the AVX2 kernels run on this CPU.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_available() -> bool {
    avx2::available()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Portable kernel over the grouped layout, also the reference the SIMD kernels are tested against.
/// Q4_0 values are `d·(q-8)`, Q4_1 `d·q+m` (low nibbles elements 0..16, high 16..32), Q5_0
/// `d·(q-16)` and Q5_1 `d·q+m` (the same nibbles with a fifth bit), Q8_0 `d·q`.
fn group_scalar(kind: Kind, w: &[u8], acts: &[Q8Block]) -> [f32; GROUP] {
    if let Kind::K(f) = kind {
        return kquants::group_scalar(f, w, acts);
    }
    let bb = kind.block_bytes();
    let hb = kind.header_bytes();
    let plane = if kind.high_bits() { HIGH_PLANE } else { 0 };
    let quants_at = GROUP * hb + plane;
    let mut out = [0f32; GROUP];
    for (b, a) in acts.iter().enumerate() {
        let blk = &w[b * GROUP * bb..(b + 1) * GROUP * bb];
        for (r, o) in out.iter_mut().enumerate() {
            let d = f16_at(blk, r * 2);
            let mut isum = 0i32;
            for c in 0..(GROUP * bb - quants_at) / (4 * GROUP) {
                for t in 0..4 {
                    let q = blk[quants_at + c * GROUP * 4 + r * 4 + t];
                    let j = 4 * c + t;
                    // The fifth bits of weights j and j + 16 (Q5 only).
                    let (h_lo, h_hi) = if kind.high_bits() {
                        let h = blk[GROUP * hb + 4 * r + t];
                        (((h >> c) & 1) << 4, ((h >> (4 + c)) & 1) << 4)
                    } else {
                        (0, 0)
                    };
                    isum += match kind {
                        Kind::Q8_0 => (q as i8) as i32 * a.qs[j] as i32,
                        _ => {
                            ((q & 0x0F) | h_lo) as i32 * a.qs[j] as i32
                                + ((q >> 4) | h_hi) as i32 * a.qs[j + 16] as i32
                        }
                    };
                }
            }
            let min = || f16_at(blk, GROUP * 2 + r * 2);
            *o += match kind {
                Kind::Q4_0 => d * (a.d * isum as f32 - 8.0 * a.s),
                Kind::Q5_0 => d * (a.d * isum as f32 - 16.0 * a.s),
                Kind::Q4_1 | Kind::Q5_1 => d * a.d * isum as f32 + min() * a.s,
                Kind::Q8_0 => d * a.d * isum as f32,
                Kind::K(_) => unreachable!("K-quant groups go through kquants::group_scalar"),
            };
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{Q8Block, GROUP};
    use std::arch::x86_64::*;

    /// Whether this CPU runs the kernels below.
    pub fn available() -> bool {
        super::super::isa::allows(super::super::isa::Isa::Avx2)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// [`super::quantize_block_portable`] with the same results, eight values at a time (it runs
    /// on the calling thread before every projection, once per block of every input row).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_block(x: &[f32]) -> Q8Block {
        assert!(x.len() >= super::QK);
        let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(x.as_ptr().add(o)));
        let sign = _mm256_set1_ps(-0.0);
        // max(|v|, m) keeps m when |v| is NaN, as the portable fold does.
        let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| {
            _mm256_max_ps(_mm256_andnot_ps(sign, v), m)
        });
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        // Rounds to nearest, ties to even, under the default rounding mode; NaN becomes 0 as
        // the portable `as i8` makes it.
        let q = v.map(|v| {
            let scaled = _mm256_mul_ps(v, inv);
            let scaled = _mm256_and_ps(scaled, _mm256_cmp_ps(scaled, scaled, _CMP_ORD_Q));
            _mm256_cvtps_epi32(scaled)
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(sum),
            _mm256_extracti128_si256(sum, 1),
        );
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
        let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b10_11_00_01));
        // Packing works within 128-bit lanes; the permute puts the 32 bytes back in order.
        let w01 = _mm256_packs_epi32(q[0], q[1]);
        let w23 = _mm256_packs_epi32(q[2], q[3]);
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(w01, w23),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        let mut qs = [0i8; super::QK];
        _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, bytes);
        let sum = _mm_cvtsi128_si32(sum);
        Q8Block {
            d,
            s: d * sum as f32,
            sum,
            sum_lo: 0,
            qs,
        }
    }

    /// Four activation quants starting at `at`, broadcast to all eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn act_word(a: &Q8Block, at: usize) -> __m256i {
        _mm256_set1_epi32(i32::from_le_bytes([
            a.qs[at] as u8,
            a.qs[at + 1] as u8,
            a.qs[at + 2] as u8,
            a.qs[at + 3] as u8,
        ]))
    }

    /// Chunk `c` (0..4) of a grouped Q5 block as unsigned five-bit bytes: the low nibbles of the
    /// quant chunk at `quants` with bit `c` of `plane` moved to bit 4, the high nibbles with bit
    /// `4 + c` (16-bit shifts: for these counts no bit crosses into bit 4 of the other byte).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn q5_chunk(
        quants: *const u8,
        plane: __m256i,
        c: usize,
    ) -> (__m256i, __m256i) {
        let (mask, fifth) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        let q = _mm256_loadu_si256(quants.add(c * 32) as *const __m256i);
        let up = _mm256_sll_epi16(plane, _mm_cvtsi32_si128(4 - c as i32));
        let down = _mm256_srl_epi16(plane, _mm_cvtsi32_si128(c as i32));
        let lo = _mm256_or_si256(_mm256_and_si256(q, mask), _mm256_and_si256(up, fifth));
        let hi = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(q, 4), mask),
            _mm256_and_si256(down, fifth),
        );
        (lo, hi)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn to_array(v: __m256) -> [f32; GROUP] {
        let mut out = [0f32; GROUP];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    }

    /// Defines a Q4_0/Q4_1 group kernel. `$dot(sum, w, a)` accumulates the products of 32 unsigned
    /// nibbles and 32 signed activations into `sum`; `$widen(sum)` turns the sum into eight i32.
    macro_rules! q4_kernel {
        ($name:ident, $features:literal, |$sum:ident, $w:ident, $a:ident| $dot:expr, |$s:ident| $widen:expr) => {
            /// # Safety
            /// The CPU must support the kernel's target features; `w` holds `acts[i].len()`
            /// grouped Q4_0/Q4_1 blocks, the same count for every `i`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize>(
                w: &[u8],
                acts: [&[Q8Block]; R],
                with_min: bool,
            ) -> [[f32; GROUP]; R] {
                let bb = if with_min { 20 } else { 18 } * GROUP;
                let qs_at = if with_min { 32 } else { 16 };
                let blocks = acts[0].len();
                assert!(w.len() >= blocks * bb && acts.iter().all(|a| a.len() == blocks));
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); R];
                let mut off = [_mm256_setzero_ps(); R];
                for b in 0..blocks {
                    let blk = w.as_ptr().add(b * bb);
                    let d = f16x8(blk);
                    let m = if with_min { f16x8(blk.add(16)) } else { d };
                    for (off, a) in off.iter_mut().zip(&acts) {
                        let s = if with_min { a[b].s } else { -8.0 * a[b].s };
                        *off = _mm256_fmadd_ps(m, _mm256_set1_ps(s), *off);
                    }
                    let mut sums = [_mm256_setzero_si256(); R];
                    for c in 0..4 {
                        let q = _mm256_loadu_si256(blk.add(qs_at + c * 32) as *const __m256i);
                        let lo = _mm256_and_si256(q, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                        for ($sum, a) in sums.iter_mut().zip(&acts) {
                            let a = &a[b];
                            let ($w, $a) = (lo, act_word(a, 4 * c));
                            *$sum = $dot;
                            let ($w, $a) = (hi, act_word(a, 16 + 4 * c));
                            *$sum = $dot;
                        }
                    }
                    for ((acc, $s), a) in acc.iter_mut().zip(sums).zip(&acts) {
                        let sum = _mm256_cvtepi32_ps($widen);
                        *acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a[b].d)), sum, *acc);
                    }
                }
                let mut out = [[0f32; GROUP]; R];
                for ((out, acc), off) in out.iter_mut().zip(acc).zip(off) {
                    *out = to_array(_mm256_add_ps(acc, off));
                }
                out
            }
        };
    }

    /// Defines a Q8_0 group kernel; `$dot(sum, w, a)` accumulates the products of 32 unsigned
    /// weight magnitudes and 32 signed activations into eight i32 in `sum`.
    macro_rules! q8_0_kernel {
        ($name:ident, $features:literal, |$sum:ident, $w:ident, $a:ident| $dot:expr) => {
            /// # Safety
            /// The CPU must support the kernel's target features; `w` holds `acts[i].len()`
            /// grouped Q8_0 blocks, the same count for every `i`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize>(
                w: &[u8],
                acts: [&[Q8Block]; R],
            ) -> [[f32; GROUP]; R] {
                let bb = 34 * GROUP;
                let blocks = acts[0].len();
                assert!(w.len() >= blocks * bb && acts.iter().all(|a| a.len() == blocks));
                let mut acc = [_mm256_setzero_ps(); R];
                for b in 0..blocks {
                    let blk = w.as_ptr().add(b * bb);
                    let d = f16x8(blk);
                    let mut sums = [_mm256_setzero_si256(); R];
                    for c in 0..8 {
                        let q = _mm256_loadu_si256(blk.add(16 + c * 32) as *const __m256i);
                        // The products need an unsigned left operand: move the weights' signs
                        // onto the activations.
                        let magnitude = _mm256_sign_epi8(q, q);
                        for ($sum, a) in sums.iter_mut().zip(&acts) {
                            let ($w, $a) = (magnitude, _mm256_sign_epi8(act_word(&a[b], 4 * c), q));
                            *$sum = $dot;
                        }
                    }
                    for ((acc, sum), a) in acc.iter_mut().zip(sums).zip(&acts) {
                        *acc = _mm256_fmadd_ps(
                            _mm256_mul_ps(d, _mm256_set1_ps(a[b].d)),
                            _mm256_cvtepi32_ps(sum),
                            *acc,
                        );
                    }
                }
                acc.map(|acc| to_array(acc))
            }
        };
    }

    /// Defines a Q5_0/Q5_1 group kernel. `$dot(sum, lo, a_lo, hi, a_hi)` adds to the eight i32
    /// in `sum` the products of two sets of 32 unsigned five-bit weights with their activations.
    macro_rules! q5_kernel {
        ($name:ident, $features:literal, |$sum:ident, $lo:ident, $alo:ident, $hi:ident, $ahi:ident| $dot:expr) => {
            /// # Safety
            /// The CPU must support the kernel's target features; `w` holds `acts[i].len()`
            /// grouped Q5_0/Q5_1 blocks, the same count for every `i`.
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const R: usize>(
                w: &[u8],
                acts: [&[Q8Block]; R],
                with_min: bool,
            ) -> [[f32; GROUP]; R] {
                let header = if with_min { 32 } else { 16 };
                let bb = if with_min { 24 } else { 22 } * GROUP;
                let qs_at = header + super::HIGH_PLANE;
                let blocks = acts[0].len();
                assert!(w.len() >= blocks * bb && acts.iter().all(|a| a.len() == blocks));
                let mut acc = [_mm256_setzero_ps(); R];
                let mut off = [_mm256_setzero_ps(); R];
                for b in 0..blocks {
                    let blk = w.as_ptr().add(b * bb);
                    let d = f16x8(blk);
                    let m = if with_min { f16x8(blk.add(16)) } else { d };
                    for (off, a) in off.iter_mut().zip(&acts) {
                        let s = if with_min { a[b].s } else { -16.0 * a[b].s };
                        *off = _mm256_fmadd_ps(m, _mm256_set1_ps(s), *off);
                    }
                    let plane = _mm256_loadu_si256(blk.add(header) as *const __m256i);
                    let mut sums = [_mm256_setzero_si256(); R];
                    for c in 0..4 {
                        let (lo, hi) = q5_chunk(blk.add(qs_at), plane, c);
                        for ($sum, a) in sums.iter_mut().zip(&acts) {
                            let a = &a[b];
                            let ($lo, $alo, $hi, $ahi) =
                                (lo, act_word(a, 4 * c), hi, act_word(a, 16 + 4 * c));
                            *$sum = $dot;
                        }
                    }
                    for ((acc, sum), a) in acc.iter_mut().zip(sums).zip(&acts) {
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(a[b].d));
                        *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), *acc);
                    }
                }
                let mut out = [[0f32; GROUP]; R];
                for ((out, acc), off) in out.iter_mut().zip(acc).zip(off) {
                    *out = to_array(_mm256_add_ps(acc, off));
                }
                out
            }
        };
    }

    // Two u8·s8 pair sums reach 2·2·31·127 < 2^15 in i16, then go to i32.
    q5_kernel!(group_q5, "avx2,fma,f16c", |sum, lo, alo, hi, ahi| {
        _mm256_add_epi32(
            *sum,
            _mm256_madd_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(lo, alo), _mm256_maddubs_epi16(hi, ahi)),
                _mm256_set1_epi16(1),
            ),
        )
    });
    q5_kernel!(
        group_q5_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        |sum, lo, alo, hi, ahi| _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(*sum, lo, alo), hi, ahi)
    );

    // AVX2: u8·s8 pair sums in i16 (|w·a| <= 2·15·127 per pair, so eight pair sums still fit),
    // widened to i32 once per block.
    q4_kernel!(
        group_q4,
        "avx2,fma,f16c",
        |sum, w, a| _mm256_add_epi16(*sum, _mm256_maddubs_epi16(w, a)),
        |s| _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    );
    // AVX-512 VNNI (256-bit): one instruction multiplies and adds into i32. The integer sums are
    // exact either way, so both kernels give the same results.
    q4_kernel!(
        group_q4_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        |sum, w, a| _mm256_dpbusd_epi32(*sum, w, a),
        |s| s
    );
    // Pair sums reach 2·127·127, so each goes to i32 at once.
    q8_0_kernel!(group_q8_0, "avx2,fma,f16c", |sum, w, a| _mm256_add_epi32(
        *sum,
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
    ));
    q8_0_kernel!(
        group_q8_0_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        |sum, w, a| _mm256_dpbusd_epi32(*sum, w, a)
    );

    pub fn vnni_available() -> bool {
        available()
            && super::super::isa::allows(super::super::isa::Isa::Avx512)
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    }
}

/// Runs `body` for each index `i < R` (`R` at most eight), unrolled with constant indices: the
/// per-row sums of a tile then live in registers instead of on the stack, and a loop over a
/// block's quant words carries no counter or branch on the ports the products run on.
macro_rules! unrolled {
    ($r:expr, |$i:ident| $body:block) => {{
        $crate::kernels::cpu::qmatmul::unrolled!(@ $r, $i, $body, 0, 1, 2, 3, 4, 5, 6, 7);
    }};
    (@ $r:expr, $i:ident, $body:block, $($n:literal),*) => {
        $(
            if $n < $r {
                let $i = $n;
                $body
            }
        )*
    };
}
pub(crate) use unrolled;

/// The Q4 offset term of block column `b` for each row of a tile: `off[i] += m · s_i`, with `m`
/// the sixteen weight rows' minimum (Q4_1, `s_i` the activation block's `d · Σ q`) or their scale
/// (Q4_0, the constant -8 folded into `s_i`). Shared by [`avx512::tile_q4`] and
/// [`avx512::tile_unpacked`], which must give the same bits; a macro rather than a function so that
/// it unrolls inside their target features (see [`unrolled`]).
#[cfg(target_arch = "x86_64")]
macro_rules! add_q4_offsets {
    ($r:expr, $m:expr, $acts:expr, $b:expr, $with_min:expr, $off:expr) => {
        unrolled!($r, |i| {
            let s = if $with_min {
                $acts[i][$b].s
            } else {
                -8.0 * $acts[i][$b].s
            };
            $off[i] = _mm512_fmadd_ps($m, _mm512_set1_ps(s), $off[i]);
        })
    };
}

/// Tile kernels over sixteen weight rows in 512-bit registers: the two groups' quants of one
/// chunk fill one register, and each activation word is broadcast against it. They compute
/// exactly what the 256-bit kernels compute for each group (the same integer sums, the same
/// float operations in the same order), so a row's result does not depend on which kernel ran.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Kind, Q8Block, GROUP};
    use std::arch::x86_64::*;

    const ROWS: usize = 2 * GROUP;

    pub fn available() -> bool {
        super::avx2::vnni_available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
    }

    /// 32 bytes at `a` in the low half, 32 at `b` in the high half.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn halves(a: *const u8, b: *const u8) -> __m512i {
        _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(a as *const __m256i)),
            _mm256_loadu_si256(b as *const __m256i),
            1,
        )
    }

    /// Eight f16 at `a` and eight at `b` as sixteen f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn f16x16(a: *const u8, b: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(a as *const __m128i)),
            _mm_loadu_si128(b as *const __m128i),
            1,
        ))
    }

    /// Four activation quants starting at `at`, broadcast to all sixteen lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn act_word(a: &Q8Block, at: usize) -> __m512i {
        // Byte by byte, not through `array::map`: that is a call the compiler does not inline
        // into this function's features, and every spilled register around it cost the tiles
        // most of their speed.
        _mm512_set1_epi32(i32::from_le_bytes([
            a.qs[at] as u8,
            a.qs[at + 1] as u8,
            a.qs[at + 2] as u8,
            a.qs[at + 3] as u8,
        ]))
    }

    /// Prefetches of one region spread evenly over the steps of a loop.
    struct Prefetch<'a> {
        region: &'a [u8],
        per_step: usize,
    }

    impl<'a> Prefetch<'a> {
        fn new(region: &'a [u8], steps: usize) -> Self {
            let per_step = region.len().div_ceil(steps.max(1)).next_multiple_of(64);
            Self { region, per_step }
        }

        /// Requests the cache lines of step `i`'s share of the region.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        unsafe fn step(&self, i: usize) {
            let from = (i * self.per_step).min(self.region.len());
            let to = (from + self.per_step).min(self.region.len());
            super::super::prefetch(&self.region[from..to]);
        }
    }

    /// The first `live` lanes of `v` at `dst`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn store(v: __m512, dst: *mut f32, live: usize) {
        if live >= ROWS {
            _mm512_storeu_ps(dst, v)
        } else {
            _mm512_mask_storeu_ps(dst, ((1u32 << live) - 1) as u16, v)
        }
    }

    /// Q4_0 / Q4_1 groups `g0` and `g1` against `R` activation rows, written to `dst`.
    ///
    /// # Safety
    /// The CPU has the features of [`available`]; both groups hold `acts[i].len()` blocks; each
    /// destination holds `live` writable values.
    // The block index addresses the weights and every row's activations alike.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn tile_q4<const R: usize>(
        g0: &[u8],
        g1: &[u8],
        acts: [&[Q8Block]; R],
        dst: [*mut f32; R],
        live: usize,
        ahead: &[u8],
        with_min: bool,
    ) {
        let bb = if with_min { 20 } else { 18 } * GROUP;
        let qs_at = if with_min { 32 } else { 16 };
        let blocks = acts[0].len();
        assert!(g0.len() >= blocks * bb && g1.len() >= blocks * bb);
        assert!(acts.iter().all(|a| a.len() == blocks));
        let mask = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut off = [_mm512_setzero_ps(); R];
        let pull = Prefetch::new(ahead, blocks);
        for b in 0..blocks {
            pull.step(b);
            let (p0, p1) = (g0.as_ptr().add(b * bb), g1.as_ptr().add(b * bb));
            let d = f16x16(p0, p1);
            let m = if with_min {
                f16x16(p0.add(16), p1.add(16))
            } else {
                d
            };
            add_q4_offsets!(R, m, acts, b, with_min, off);
            // Up to two rows, low and high nibbles go to separate sums: two dependency chains of
            // four instead of one of eight, which is what bounds a tile of one or two rows
            // (integer sums, so the result is the same bits).
            let mut sums = [_mm512_setzero_si512(); R];
            let mut sums_hi = [_mm512_setzero_si512(); R];
            unrolled!(4, |c| {
                let q = halves(p0.add(qs_at + c * 32), p1.add(qs_at + c * 32));
                let lo = _mm512_and_si512(q, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), mask);
                unrolled!(R, |i| {
                    let a = &acts[i][b];
                    sums[i] = _mm512_dpbusd_epi32(sums[i], lo, act_word(a, 4 * c));
                    if R <= 2 {
                        sums_hi[i] = _mm512_dpbusd_epi32(sums_hi[i], hi, act_word(a, 16 + 4 * c));
                    } else {
                        sums[i] = _mm512_dpbusd_epi32(sums[i], hi, act_word(a, 16 + 4 * c));
                    }
                });
            });
            unrolled!(R, |i| {
                let sum = if R <= 2 {
                    _mm512_add_epi32(sums[i], sums_hi[i])
                } else {
                    sums[i]
                };
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(acts[i][b].d));
                acc[i] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), acc[i]);
            });
        }
        unrolled!(R, |i| {
            store(_mm512_add_ps(acc[i], off[i]), dst[i], live);
        });
    }

    /// One block column of a pair of groups unpacked for the tiles of a wide batch: word `k`
    /// holds the sixteen rows' unsigned quants to dot with activation quants `4k..4k + 4` (for
    /// Q4 the low nibbles of chunk `k`, then the high nibbles; for Q8_0 the quants plus 128),
    /// and the rows' scales (and Q4 offsets: the minimum, or the scale for Q4_0) as f32.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    pub struct Unpacked {
        words: [[u8; 64]; 8],
        d: [f32; 16],
        m: [f32; 16],
    }

    /// Unpacks groups `g0` and `g1` (of `kind`) into `out`, one entry per block column, and
    /// prefetches `ahead` while it runs.
    ///
    /// # Safety
    /// The CPU has the features of [`available`]; both groups hold whole blocks of `kind`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn unpack_pair(
        kind: Kind,
        g0: &[u8],
        g1: &[u8],
        out: &mut Vec<Unpacked>,
        ahead: &[u8],
    ) {
        let bb = kind.block_bytes() * GROUP;
        let blocks = g0.len() / bb;
        assert!(g1.len() >= blocks * bb);
        let empty = Unpacked {
            words: [[0; 64]; 8],
            d: [0.0; 16],
            m: [0.0; 16],
        };
        out.resize(blocks, empty);
        let pull = Prefetch::new(ahead, blocks);
        let mask = _mm512_set1_epi8(0x0F);
        let bias = _mm512_set1_epi8(i8::MIN);
        for (b, u) in out.iter_mut().enumerate() {
            pull.step(b);
            let (p0, p1) = (g0.as_ptr().add(b * bb), g1.as_ptr().add(b * bb));
            let d = f16x16(p0, p1);
            _mm512_storeu_ps(u.d.as_mut_ptr(), d);
            let word = |k: usize| u.words[k].as_ptr() as *mut __m512i;
            match kind {
                Kind::Q4_0 | Kind::Q4_1 => {
                    let with_min = kind == Kind::Q4_1;
                    let m = if with_min {
                        f16x16(p0.add(16), p1.add(16))
                    } else {
                        d
                    };
                    _mm512_storeu_ps(u.m.as_mut_ptr(), m);
                    let qs_at = if with_min { 32 } else { 16 };
                    for c in 0..4 {
                        let q = halves(p0.add(qs_at + c * 32), p1.add(qs_at + c * 32));
                        _mm512_storeu_si512(word(c), _mm512_and_si512(q, mask));
                        let hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), mask);
                        _mm512_storeu_si512(word(4 + c), hi);
                    }
                }
                // `select_tiles` gives no tiles for the five-bit formats.
                Kind::Q5_0 | Kind::Q5_1 | Kind::K(_) => {
                    unreachable!("no tile kernels for {kind:?}")
                }
                Kind::Q8_0 => {
                    for c in 0..8 {
                        let q = halves(p0.add(16 + c * 32), p1.add(16 + c * 32));
                        _mm512_storeu_si512(word(c), _mm512_xor_si512(q, bias));
                    }
                }
            }
        }
    }

    /// [`tile_q4`] or [`tile_q8_0`] over an unpacked pair of groups: the same integer sums and
    /// the same float operations in the same order, so the same bits.
    ///
    /// # Safety
    /// As [`tile_q4`]; `blocks` came from [`unpack_pair`] for `kind` and holds `acts[i].len()`
    /// entries.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn tile_unpacked<const R: usize>(
        kind: Kind,
        blocks: &[Unpacked],
        acts: [&[Q8Block]; R],
        dst: [*mut f32; R],
        live: usize,
    ) {
        assert!(acts.iter().all(|a| a.len() == blocks.len()));
        let (q4, with_min) = (kind != Kind::Q8_0, kind == Kind::Q4_1);
        let mut acc = [_mm512_setzero_ps(); R];
        let mut off = [_mm512_setzero_ps(); R];
        for (b, u) in blocks.iter().enumerate() {
            let d = _mm512_loadu_ps(u.d.as_ptr());
            if q4 {
                let m = _mm512_loadu_ps(u.m.as_ptr());
                add_q4_offsets!(R, m, acts, b, with_min, off);
            }
            let mut sums = [_mm512_setzero_si512(); R];
            unrolled!(8, |k| {
                let w = _mm512_loadu_si512(u.words[k].as_ptr() as *const __m512i);
                unrolled!(R, |i| {
                    sums[i] = _mm512_dpbusd_epi32(sums[i], w, act_word(&acts[i][b], 4 * k));
                });
            });
            unrolled!(R, |i| {
                let a = &acts[i][b];
                let sum = if q4 {
                    sums[i]
                } else {
                    _mm512_sub_epi32(sums[i], _mm512_set1_epi32(128 * a.sum))
                };
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
                acc[i] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sum), acc[i]);
            });
        }
        unrolled!(R, |i| {
            store(
                if q4 {
                    _mm512_add_ps(acc[i], off[i])
                } else {
                    acc[i]
                },
                dst[i],
                live,
            );
        });
    }

    /// Q8_0 groups `g0` and `g1` against `R` activation rows. The weights are signed, and the
    /// instruction wants one unsigned operand: it multiplies `w + 128` and subtracts `128 · Σ a`.
    ///
    /// # Safety
    /// As [`tile_q4`].
    // The block index addresses the weights and every row's activations alike.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn tile_q8_0<const R: usize>(
        g0: &[u8],
        g1: &[u8],
        acts: [&[Q8Block]; R],
        dst: [*mut f32; R],
        live: usize,
        ahead: &[u8],
    ) {
        let bb = 34 * GROUP;
        let blocks = acts[0].len();
        assert!(g0.len() >= blocks * bb && g1.len() >= blocks * bb);
        assert!(acts.iter().all(|a| a.len() == blocks));
        let bias = _mm512_set1_epi8(i8::MIN);
        let mut acc = [_mm512_setzero_ps(); R];
        let pull = Prefetch::new(ahead, blocks);
        for b in 0..blocks {
            pull.step(b);
            let (p0, p1) = (g0.as_ptr().add(b * bb), g1.as_ptr().add(b * bb));
            let d = f16x16(p0, p1);
            // Up to four rows, even and odd words go to separate sums (two dependency chains of
            // four, as in `tile_q4`); an eight-row tile has no registers to spare for them.
            let mut sums = [_mm512_setzero_si512(); R];
            let mut odd = [_mm512_setzero_si512(); R];
            unrolled!(8, |c| {
                let biased =
                    _mm512_xor_si512(halves(p0.add(16 + c * 32), p1.add(16 + c * 32)), bias);
                unrolled!(R, |i| {
                    let word = act_word(&acts[i][b], 4 * c);
                    if R <= 4 && c % 2 == 1 {
                        odd[i] = _mm512_dpbusd_epi32(odd[i], biased, word);
                    } else {
                        sums[i] = _mm512_dpbusd_epi32(sums[i], biased, word);
                    }
                });
            });
            unrolled!(R, |i| {
                let a = &acts[i][b];
                let sum = if R <= 4 {
                    _mm512_add_epi32(sums[i], odd[i])
                } else {
                    sums[i]
                };
                let exact = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * a.sum));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.d));
                acc[i] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(exact), acc[i]);
            });
        }
        unrolled!(R, |i| {
            store(acc[i], dst[i], live);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn simd_activation_quantization_matches_the_portable_one() {
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|b| {
                (0..QK)
                    .map(|i| {
                        (((b * 131 + i * 7919) % 1013) as f32 / 1013.0 - 0.5) * (b as f32 + 0.1)
                    })
                    .collect()
            })
            .collect();
        // Exact ties (127 · k / 2 scaled by the block's maximum), zeros, and a NaN.
        blocks.push(
            (0..QK)
                .map(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 })
                .collect(),
        );
        blocks.push(vec![0.0; QK]);
        blocks.push(
            (0..QK)
                .map(|i| if i == 3 { f32::NAN } else { i as f32 })
                .collect(),
        );
        for x in &blocks {
            let (a, b) = (quantize_block(x), quantize_block_portable(x));
            assert_eq!(a.qs, b.qs, "{x:?}");
            assert_eq!(
                (a.d.to_bits(), a.s.to_bits()),
                (b.d.to_bits(), b.s.to_bits())
            );
        }
    }

    /// 41 rows (five groups and a padded one); two rows near the integer limits of the kernels
    /// (nearly all quants at 15 for Q4, against activations of ±127).
    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
            .collect();
        for c in 0..cols {
            w[c] = if c % QK == 0 { 0.0 } else { 1.0 };
            w[cols + c] = if c % QK == 0 { -1.0 } else { 0.875 };
        }
        w
    }

    /// [`weights`] with two more rows at the integer limits: every weight at the top of its
    /// range, or spread wide.
    fn limit_weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut w = weights(rows, cols);
        for c in 0..cols {
            w[2 * cols + c] = 1.0;
            w[3 * cols + c] = if c % 7 == 0 { -3.0 } else { 3.0 };
        }
        w
    }

    /// `m` rows of varied activations, the last with every quant at +-127.
    fn spread_acts(m: usize, cols: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..(m - 1) * cols)
            .map(|i| (((i * 7919) % 251) as f32 / 125.0 - 1.0) * (1 + i % 5) as f32)
            .collect();
        x.extend((0..cols).map(|i| if i % 3 == 0 { -2.0 } else { 2.0 }));
        x
    }

    /// Through `compute_rows` (over two ranges split at `split`), each of the first `n` rows of
    /// `x` gives in a batch of `n` what it gives alone, for every `n` of `counts`.
    fn assert_rows_alone(
        qm: &QuantMatrix,
        x: &[f32],
        split: usize,
        counts: impl IntoIterator<Item = usize>,
        what: &str,
    ) {
        let (rows, cols) = (qm.rows, qm.cols);
        let counts: Vec<usize> = counts.into_iter().collect();
        let most = counts.iter().copied().max().unwrap_or(0);
        let alone: Vec<Vec<f32>> = (0..most)
            .map(|j| {
                let a = QuantizedActs::new(&x[j * cols..(j + 1) * cols], cols);
                let mut o = vec![0f32; rows];
                // SAFETY: one task writes the whole output.
                unsafe { qm.compute_rows(&a, 0..rows, &DisjointOut::new(&mut o)) };
                o
            })
            .collect();
        for n in counts {
            let a = QuantizedActs::new(&x[..n * cols], cols);
            let mut o = vec![0f32; n * rows];
            let out = DisjointOut::new(&mut o);
            // SAFETY: the two ranges are disjoint and run one after the other.
            unsafe {
                qm.compute_rows(&a, 0..split, &out);
                qm.compute_rows(&a, split..rows, &out);
            }
            for j in 0..n {
                assert_eq!(
                    &o[j * rows..(j + 1) * rows],
                    &alone[j][..],
                    "{what} {n} rows"
                );
            }
        }
    }

    fn check(dtype: GgmlDType) {
        let (rows, cols) = (41, 96);
        let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let mut x: Vec<f32> = (0..2 * cols)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        x.extend(std::iter::repeat_n(1.0, cols));
        x.extend(std::iter::repeat_n(-1.0, cols));
        let m = x.len() / cols;
        let qm = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        let back = qm.to_qtensor().unwrap();
        assert_eq!(back.dtype(), dtype);
        assert_eq!(
            back.data().unwrap(),
            q.data().unwrap(),
            "{dtype:?}: unpack(repack(raw)) != raw"
        );
        let acts = QuantizedActs::new(&x, cols);
        let mut ours = vec![0f32; m * rows];
        // SAFETY: one task writes the whole output.
        unsafe { qm.compute_rows(&acts, 0..rows, &DisjointOut::new(&mut ours)) };
        let exact = Tensor::from_slice(&x, (m, cols), &Device::Cpu)
            .unwrap()
            .matmul(&deq.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Only the 8-bit activation rounding separates the two: each activation moves by at
        // most half its block's step (amax / 127), so the error is bounded by that times |w|.
        let wd = deq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for j in 0..m {
            for r in 0..rows {
                let bound: f32 = (0..cols)
                    .map(|k| {
                        let blk = &x[j * cols + k / QK * QK..j * cols + (k / QK + 1) * QK];
                        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                        wd[r * cols + k].abs() * amax / 254.0
                    })
                    .sum();
                let (o, e) = (ours[j * rows + r], exact[j * rows + r]);
                assert!(
                    (o - e).abs() <= bound * 1.01 + 1e-4,
                    "{dtype:?} row {r} input {j}: {o} vs {e} (bound {bound})"
                );
            }
        }
        // The selected (SIMD) kernel against the portable one, group by group.
        let kernels = select_kernels(qm.kind);
        for g in 0..rows.div_ceil(GROUP) {
            let group = &qm.data[g * qm.group_bytes()..(g + 1) * qm.group_bytes()];
            for j in 0..m {
                let portable = group_scalar(qm.kind, group, acts.row(j));
                let one = (kernels.one)(group, [acts.row(j)])[0];
                // Row j in either slot of a pair, beside another row.
                let other = acts.row((j + 1) % m);
                let paired = [
                    (kernels.pair)(group, [acts.row(j), other])[0],
                    (kernels.pair)(group, [other, acts.row(j)])[1],
                ];
                // And in the last slot of four.
                let quad = (kernels.quad)(group, [other, other, other, acts.row(j)])[3];
                assert_eq!(quad, one, "a row's sums do not depend on its neighbours");
                // Where both run, the VNNI and AVX2 kernels agree exactly (exact integer sums).
                #[cfg(target_arch = "x86_64")]
                if avx2::vnni_available() {
                    let a = [acts.row(j)];
                    // SAFETY: the CPU has AVX2 and VNNI; the group and rows match in length.
                    let (plain, vnni) = unsafe {
                        match qm.kind {
                            Kind::Q8_0 => {
                                (avx2::group_q8_0(group, a), avx2::group_q8_0_vnni(group, a))
                            }
                            Kind::Q5_0 | Kind::Q5_1 => {
                                let min = qm.kind == Kind::Q5_1;
                                (
                                    avx2::group_q5(group, a, min),
                                    avx2::group_q5_vnni(group, a, min),
                                )
                            }
                            k => {
                                let min = k == Kind::Q4_1;
                                (
                                    avx2::group_q4(group, a, min),
                                    avx2::group_q4_vnni(group, a, min),
                                )
                            }
                        }
                    };
                    assert_eq!(plain, vnni, "{dtype:?}");
                }
                for fast in [one, paired[0], paired[1], quad] {
                    for (f, p) in fast.iter().zip(&portable) {
                        assert!(
                            (f - p).abs() <= 1e-4 * p.abs().max(1.0),
                            "{dtype:?}: {f} vs {p}"
                        );
                    }
                }
            }
        }
    }

    /// The 512-bit tile kernels give, lane for lane, exactly what the 256-bit group kernel gives
    /// for each of their two groups, whatever the tile size and a row's place in it.
    #[cfg(target_arch = "x86_64")]
    fn check_tiles(dtype: GgmlDType) {
        let Some(tiles) = select_tiles(match dtype {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            _ => Kind::Q8_0,
        }) else {
            eprintln!("no AVX-512 VNNI on this CPU: tile kernels not tested");
            return;
        };
        let (rows, cols) = (32, 160);
        let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let qm = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        let m = 9;
        let mut x: Vec<f32> = (0..(m - 1) * cols)
            .map(|i| (((i * 7919) % 251) as f32 / 125.0 - 1.0) * (1 + i / cols) as f32)
            .collect();
        // A row at the extremes: every activation quant at +-127.
        x.extend((0..cols).map(|i| if i % 3 == 0 { -2.0 } else { 2.0 }));
        // More rows for the wide batches below.
        let wide = 70;
        x.extend((0..(wide - m) * cols).map(|i| (i * 104729 % 509) as f32 / 254.0 - 1.0));
        let acts = QuantizedActs::new(&x, cols);
        let kernels = select_kernels(qm.kind);
        let gb = qm.group_bytes();
        for g in [0, 2] {
            let (g0, g1) = (
                &qm.data[g * gb..(g + 1) * gb],
                &qm.data[(g + 1) * gb..(g + 2) * gb],
            );
            let want: Vec<[f32; 2 * GROUP]> = (0..m)
                .map(|j| {
                    let mut both = [0f32; 2 * GROUP];
                    both[..GROUP].copy_from_slice(&(kernels.one)(g0, [acts.row(j)])[0]);
                    both[GROUP..].copy_from_slice(&(kernels.one)(g1, [acts.row(j)])[0]);
                    both
                })
                .collect();
            // Runs a kernel into sixteen-value rows.
            fn run<const R: usize>(
                k: TileKernel<R>,
                g0: &[u8],
                g1: &[u8],
                a: [&[Q8Block]; R],
            ) -> [[f32; 2 * GROUP]; R] {
                let mut out = [[0f32; 2 * GROUP]; R];
                let dst = out.each_mut().map(|o| o.as_mut_ptr());
                // SAFETY: the CPU has the kernels' features; each destination holds 16 values.
                unsafe { k(g0, g1, a, dst, 2 * GROUP, &[]) };
                out
            }
            for j in 0..m {
                let others = |k: usize| acts.row((j + 1 + k) % m);
                assert_eq!(
                    run(tiles.one, g0, g1, [acts.row(j)])[0],
                    want[j],
                    "{dtype:?}"
                );
                assert_eq!(run(tiles.two, g0, g1, [others(0), acts.row(j)])[1], want[j]);
                let four = run(
                    tiles.four,
                    g0,
                    g1,
                    [others(0), others(1), acts.row(j), others(2)],
                );
                assert_eq!(four[2], want[j]);
                let mut eight: [&[Q8Block]; 8] = std::array::from_fn(others);
                eight[j % 8] = acts.row(j);
                assert_eq!(run(tiles.eight, g0, g1, eight)[j % 8], want[j], "{dtype:?}");
                let mut unpacked = Vec::new();
                let mut out = [[0f32; 2 * GROUP]; 8];
                // SAFETY: the CPU has the kernels' features; each destination holds 16 values.
                unsafe {
                    avx512::unpack_pair(qm.kind, g0, g1, &mut unpacked, &[]);
                    let dst = out.each_mut().map(|o| o.as_mut_ptr());
                    avx512::tile_unpacked::<8>(qm.kind, &unpacked, eight, dst, 2 * GROUP);
                }
                assert_eq!(out[j % 8], want[j], "{dtype:?} unpacked");
            }
        }
        // Through compute_rows with every row count from 1 to 9, wide batches (unpacked pairs,
        // several chunks of activation rows) and a range that ends on an unpaired group: each
        // input row's output equals that of the row alone.
        assert_rows_alone(
            &qm,
            &x,
            24,
            (1..=m).chain([16, 17, 32, 39, 70]),
            &format!("{dtype:?}"),
        );
    }

    #[test]
    fn tile_kernels_equal_the_group_kernels() {
        #[cfg(target_arch = "x86_64")]
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            check_tiles(dtype);
        }
    }

    /// The 256-bit tiles give, lane for lane, what the group kernel of the same format gives
    /// for each row, whatever the tile size and the row's slot in it, on every tile set this CPU
    /// runs; and through `compute_rows` a batch of any size gives each row what it gets alone.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiles256_equal_the_group_kernels() {
        if !avx2::available() {
            eprintln!("no AVX2 on this CPU (or capped): 256-bit tiles not tested");
            return;
        }
        use GgmlDType::*;
        for dtype in [Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q5K, Q6K] {
            let (rows, cols) = (43, 768);
            let wt =
                Tensor::from_vec(limit_weights(rows, cols), (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let qm = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let m = 9;
            let x = spread_acts(m, cols);
            let acts = QuantizedActs::new(&x, cols);
            let kernels = select_kernels(qm.kind);
            let sets = tiles256::every(qm.kind);
            assert!(!sets.is_empty(), "{dtype:?} has no 256-bit tiles");
            let gb = qm.group_bytes();
            let mut unpacked = Vec::new();
            for g in 0..rows.div_ceil(GROUP) {
                let group = &qm.data[g * gb..(g + 1) * gb];
                // SAFETY: the CPU has AVX2; the group holds whole blocks.
                unsafe { tiles256::unpack(qm.kind, group, &mut unpacked) };
                for j in 0..m {
                    let one = (kernels.one)(group, [acts.row(j)])[0];
                    let other = acts.row((j + 1) % m);
                    for (name, t) in &sets {
                        // SAFETY: `select` gave only sets this CPU runs; the blocks match.
                        let got = unsafe {
                            [
                                (t.one)(&unpacked, [acts.row(j)])[0],
                                (t.two)(&unpacked, [other, acts.row(j)])[1],
                                (t.four)(&unpacked, [acts.row(j), other, other, other])[0],
                                (t.four)(&unpacked, [other, other, other, acts.row(j)])[3],
                            ]
                        };
                        for g in got {
                            assert_eq!(
                                g.map(f32::to_bits),
                                one.map(f32::to_bits),
                                "{dtype:?} {name}"
                            );
                        }
                    }
                }
            }
            assert_rows_alone(&qm, &x, 16, 1..=m, &format!("{dtype:?}"));
        }
    }

    /// The K-quant kernels against a float64 reference of dequantize-then-multiply (candle's
    /// dequantization of the GGML blocks; the activations as their 8-bit blocks stand for them),
    /// for 1, 2, 3, 8, 17 and 64 activation rows and an odd number of weight rows, on every path
    /// this CPU has; the repacking round-trips bit for bit, and a row's result does not depend on
    /// the rows beside it.
    #[test]
    fn k_quant_kernels_match_a_float64_reference() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (rows, cols) = (43, 768);
            let wt =
                Tensor::from_vec(limit_weights(rows, cols), (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let deq: Vec<f64> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let qm = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            assert_eq!(qm.ggml_dtype(), dtype);
            let back = qm.to_qtensor().unwrap();
            let same = back.data().unwrap() == q.data().unwrap();
            assert!(same, "{dtype:?}: unpack(repack(raw)) != raw");
            let m = 64;
            let x = spread_acts(m, cols);
            let Kind::K(f) = qm.kind else {
                panic!("{dtype:?} is not a K-quant kind")
            };
            for n in [1, 2, 3, 8, 17, 64] {
                let rows_x = &x[(m - n) * cols..];
                let acts = QuantizedActs::new(rows_x, cols);
                let mut ours = vec![0f32; n * rows];
                // SAFETY: the two ranges are disjoint and run one after the other.
                unsafe {
                    let out = DisjointOut::new(&mut ours);
                    qm.compute_rows(&acts, 0..16, &out);
                    qm.compute_rows(&acts, 16..rows, &out);
                }
                for j in 0..n {
                    let a: Vec<f64> = acts
                        .row(j)
                        .iter()
                        .flat_map(|b| b.qs.map(|q| f64::from(b.d) * f64::from(q)))
                        .collect();
                    for r in 0..rows {
                        let wr = &deq[r * cols..(r + 1) * cols];
                        let exact: f64 = wr.iter().zip(&a).map(|(w, a)| w * a).sum();
                        let scale: f64 = wr.iter().zip(&a).map(|(w, a)| (w * a).abs()).sum();
                        let got = f64::from(ours[j * rows + r]);
                        assert!(
                            (got - exact).abs() <= 1e-5 * scale + 1e-6,
                            "{dtype:?} {n} rows: row {r} input {j}: {got} vs {exact}"
                        );
                    }
                }
            }
            // Every path against the portable one; the same row alone, in a pair, or last of four.
            let acts = QuantizedActs::new(&x, cols);
            let mut paths: Vec<(&str, Kernels)> = vec![(
                "portable",
                per_format!(f, |w, a, f| a.map(|a| kquants::group_scalar(f, w, a))),
            )];
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                paths.push((
                    "avx2",
                    per_format!(f, |w, a, f| unsafe { kquants::avx2::group_k(f, w, a) }),
                ));
                if avx2::vnni_available() {
                    paths.push((
                        "vnni",
                        per_format!(f, |w, a, f| unsafe { kquants::avx2::group_k_vnni(f, w, a) }),
                    ));
                }
            }
            let gb = qm.group_bytes();
            for g in 0..rows.div_ceil(GROUP) {
                let group = &qm.data[g * gb..(g + 1) * gb];
                for j in [0, 5, m - 1] {
                    let other = acts.row((j + 1) % m);
                    let portable = kquants::group_scalar(f, group, acts.row(j));
                    let mut first: Option<[f32; GROUP]> = None;
                    for (name, k) in &paths {
                        let one = (k.one)(group, [acts.row(j)])[0];
                        assert_eq!((k.pair)(group, [other, acts.row(j)])[1], one, "{name}");
                        assert_eq!((k.quad)(group, [other, other, other, acts.row(j)])[3], one);
                        for (a, b) in one.iter().zip(&portable) {
                            assert!(
                                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                                "{name}: {a} vs {b}"
                            );
                        }
                        // The x86 paths' integer sums are exact: AVX2 and VNNI agree bit for bit.
                        if *name != "portable" {
                            assert_eq!(*first.get_or_insert(one), one, "{dtype:?} {name}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_match_dequantized_matmul() {
        check(GgmlDType::Q4_0);
        check(GgmlDType::Q4_1);
        check(GgmlDType::Q5_0);
        check(GgmlDType::Q5_1);
        check(GgmlDType::Q8_0);
    }
}
