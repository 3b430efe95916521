//! Attention of a tile of query vectors over one run of cached keys and values.
//!
//! The queries of a tile may come from different rows and heads: every query that reads the same
//! run of keys (a row's own positions in prefill, or a block that several forked rows share)
//! goes through it together, so the run is read once for all of them. Queries sit in the lanes of
//! one vector (sixteen f32), transposed, so that a score is a sum of broadcast key elements times
//! a vector of queries: no horizontal sums. The result per query is a partial softmax (its
//! maximum score, the sum of exponentials and the unnormalised weighted values), merged across
//! runs by [`merge_partials`].
//!
//! Each lane's arithmetic depends only on its own query and the keys it sees, never on the other
//! lanes or on how many keys the tile reads for them: a query's result does not depend on the
//! batch it ran in.

use super::dense::exp_in_place;
use super::isa::Isa;

/// Query vectors per tile.
pub(crate) const LANES: usize = 16;

/// One tile of queries against one run of keys and values.
pub(crate) struct Tile<'a> {
    /// Queries transposed: element `d` of lane `q` at `d * LANES + q`; unused lanes hold zeros.
    pub queries: &'a [f32],
    /// Lanes in use, `0..used`.
    pub used: usize,
    /// How many leading keys each lane sees (at least one for a used lane).
    pub visible: [usize; LANES],
    /// Row-major `[len, head_dim]`.
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub head_dim: usize,
    pub scale: f32,
}

/// A partial softmax of one query over one run: `[max, sum, out[0..head_dim]]`.
pub(crate) const PARTIAL_HEADER: usize = 2;

/// Writes lane `q`'s partial into `partials[q]` (each `PARTIAL_HEADER + head_dim` long) for every
/// used lane. `scratch` is reused between calls.
pub(crate) fn attend(tile: &Tile<'_>, scratch: &mut Vec<f32>, partials: &mut [&mut [f32]]) {
    assert!(tile.used <= LANES && partials.len() >= tile.used);
    assert_eq!(tile.queries.len(), tile.head_dim * LANES);
    let len = tile.visible[..tile.used].iter().copied().max().unwrap_or(0);
    assert!(tile.keys.len() >= len * tile.head_dim && tile.values.len() >= len * tile.head_dim);
    attend_on(super::isa::active(), tile, len, scratch, partials)
}

/// The tile on `isa`'s path (one the CPU has: [`super::isa::active`] or below). Every query runs through
/// the transposed form, even alone: a query's bits must not depend on how many others share its
/// tile (a row decoded alone or beside its forks). A decode step's few queries go to
/// [`super::attention_few`], which gives these bits faster.
pub(crate) fn attend_on(
    isa: Isa,
    tile: &Tile<'_>,
    len: usize,
    scratch: &mut Vec<f32>,
    partials: &mut [&mut [f32]],
) {
    match isa {
        // SAFETY: the caller passes a level the CPU has; `attend` checked the slices.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { attend_avx512(tile, len, scratch, partials) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { attend_avx2(tile, len, scratch, partials) },
        // SAFETY: as above.
        _ => unsafe { attend_with::<Portable>(tile, len, scratch, partials) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(t: &Tile<'_>, len: usize, s: &mut Vec<f32>, p: &mut [&mut [f32]]) {
    attend_with::<x86::Avx512>(t, len, s, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(t: &Tile<'_>, len: usize, s: &mut Vec<f32>, p: &mut [&mut [f32]]) {
    attend_with::<x86::Avx2>(t, len, s, p)
}

/// Sixteen f32 lanes.
trait Lanes: Copy {
    /// Keys scored (and lanes weighed) per pass: as many accumulators as the registers hold
    /// beside the loaded vector (an AVX2 value spans two of its sixteen registers). The
    /// grouping never changes a lane's arithmetic, only how many run side by side.
    const PER_PASS: usize = 8;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `self * b + c`.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn max(self, b: Self) -> Self;
}

#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Lanes for Portable {
    unsafe fn zero() -> Self {
        Self([0.0; LANES])
    }
    unsafe fn splat(x: f32) -> Self {
        Self([x; LANES])
    }
    unsafe fn load(p: *const f32) -> Self {
        Self(std::ptr::read_unaligned(p as *const [f32; LANES]))
    }
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; LANES], self.0)
    }
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] * b.0[i] + c.0[i]))
    }
    unsafe fn mul(self, b: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] * b.0[i]))
    }
    unsafe fn add(self, b: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] + b.0[i]))
    }
    unsafe fn sub(self, b: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] - b.0[i]))
    }
    unsafe fn max(self, b: Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i].max(b.0[i])))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Lanes for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            Self(_mm512_fmadd_ps(self.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Self(_mm512_mul_ps(self.0, b.0))
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Self(_mm512_add_ps(self.0, b.0))
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Self(_mm512_sub_ps(self.0, b.0))
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            Self(_mm512_max_ps(self.0, b.0))
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2([__m256; 2]);

    impl Lanes for Avx2 {
        const PER_PASS: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self([_mm256_setzero_ps(); 2])
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Self([_mm256_set1_ps(x); 2])
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self([_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))])
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0[0]);
            _mm256_storeu_ps(p.add(8), self.0[1]);
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            Self([0, 1].map(|i| _mm256_fmadd_ps(self.0[i], b.0[i], c.0[i])))
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Self([0, 1].map(|i| _mm256_mul_ps(self.0[i], b.0[i])))
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Self([0, 1].map(|i| _mm256_add_ps(self.0[i], b.0[i])))
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Self([0, 1].map(|i| _mm256_sub_ps(self.0[i], b.0[i])))
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            Self([0, 1].map(|i| _mm256_max_ps(self.0[i], b.0[i])))
        }
    }
}

/// Scores of `N` consecutive keys starting at `keys` against every lane, scaled, into `out`
/// (`N` rows of [`LANES`]).
#[inline(always)]
unsafe fn score_keys<V: Lanes, const N: usize>(
    queries: *const f32,
    keys: *const f32,
    hd: usize,
    scale: V,
    out: *mut f32,
) {
    let mut acc = [V::zero(); N];
    for d in 0..hd {
        let q = V::load(queries.add(d * LANES));
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = V::splat(*keys.add(k * hd + d)).mul_add(q, *acc);
        }
    }
    for (k, acc) in acc.iter().enumerate() {
        acc.mul(scale).store(out.add(k * LANES));
    }
}

/// `out[q] = Σ_j probs[j][first + q] · values[j][cols]` for `N` lanes from `first`, over the
/// sixteen value columns starting at `col`.
#[inline(always)]
unsafe fn weigh_values<V: Lanes, const N: usize>(
    probs: *const f32,
    first: usize,
    values: *const f32,
    hd: usize,
    col: usize,
    len: usize,
    out: [*mut f32; N],
) {
    let mut acc = [V::zero(); N];
    for j in 0..len {
        let v = V::load(values.add(j * hd + col));
        let p = probs.add(j * LANES + first);
        for (q, acc) in acc.iter_mut().enumerate() {
            *acc = V::splat(*p.add(q)).mul_add(v, *acc);
        }
    }
    for (acc, out) in acc.iter().zip(out) {
        acc.store(out.add(col));
    }
}

#[inline(always)]
unsafe fn attend_with<V: Lanes>(
    t: &Tile<'_>,
    len: usize,
    scratch: &mut Vec<f32>,
    partials: &mut [&mut [f32]],
) {
    let hd = t.head_dim;
    // Every score is written below before it is read: the buffer only grows, never cleared (a
    // prefill's tiles would otherwise zero tens of kilobytes each).
    if scratch.len() < len * LANES {
        scratch.resize(len * LANES, 0.0);
    }
    let scores = &mut scratch[..len * LANES];
    let s = scores.as_mut_ptr();
    let scale = V::splat(t.scale);
    let (q, k) = (t.queries.as_ptr(), t.keys.as_ptr());
    let mut j = 0;
    while V::PER_PASS == 8 && j + 8 <= len {
        score_keys::<V, 8>(q, k.add(j * hd), hd, scale, s.add(j * LANES));
        j += 8;
    }
    while j + 4 <= len {
        score_keys::<V, 4>(q, k.add(j * hd), hd, scale, s.add(j * LANES));
        j += 4;
    }
    while j < len {
        score_keys::<V, 1>(q, k.add(j * hd), hd, scale, s.add(j * LANES));
        j += 1;
    }
    for (lane, &visible) in t.visible.iter().enumerate() {
        let visible = if lane < t.used { visible } else { 0 };
        for j in visible..len {
            *s.add(j * LANES + lane) = f32::NEG_INFINITY;
        }
    }
    let mut max = V::splat(f32::NEG_INFINITY);
    for j in 0..len {
        max = max.max(V::load(s.add(j * LANES)));
    }
    let mut maxes = [0f32; LANES];
    max.store(maxes.as_mut_ptr());
    // Unused lanes see no key; a zero maximum keeps their exponentials at 0 instead of NaN.
    for m in maxes.iter_mut().filter(|m| **m == f32::NEG_INFINITY) {
        *m = 0.0;
    }
    let max = V::load(maxes.as_ptr());
    for j in 0..len {
        V::load(s.add(j * LANES)).sub(max).store(s.add(j * LANES));
    }
    exp_in_place(scores);
    let s = scores.as_ptr();
    let mut sum = V::zero();
    for j in 0..len {
        sum = sum.add(V::load(s.add(j * LANES)));
    }
    let mut sums = [0f32; LANES];
    sum.store(sums.as_mut_ptr());
    let v = t.values.as_ptr();
    let vector_cols = hd / LANES * LANES;
    let mut first = 0;
    while first < t.used {
        // Lanes in groups of 8, 4, 2, 1: each group passes over the values once per column run.
        let n = [8, 4, 2, 1]
            .into_iter()
            .find(|&n| n <= V::PER_PASS && first + n <= t.used)
            .unwrap_or(1);
        let mut outs = [std::ptr::null_mut(); 8];
        for (i, out) in outs.iter_mut().enumerate().take(n) {
            *out = partials[first + i][PARTIAL_HEADER..].as_mut_ptr();
        }
        for col in (0..vector_cols).step_by(LANES) {
            match n {
                8 => weigh_values::<V, 8>(s, first, v, hd, col, len, outs),
                4 => weigh_values::<V, 4>(s, first, v, hd, col, len, [0, 1, 2, 3].map(|i| outs[i])),
                2 => weigh_values::<V, 2>(s, first, v, hd, col, len, [outs[0], outs[1]]),
                _ => weigh_values::<V, 1>(s, first, v, hd, col, len, [outs[0]]),
            }
        }
        first += n;
    }
    for (lane, partial) in partials.iter_mut().enumerate().take(t.used) {
        partial[0] = maxes[lane];
        partial[1] = sums[lane];
        // Columns past the last whole vector (head sizes that are not a multiple of 16).
        for col in vector_cols..hd {
            partial[PARTIAL_HEADER + col] = (0..len)
                .map(|j| *s.add(j * LANES + lane) * *v.add(j * hd + col))
                .sum();
        }
    }
}

/// The attention output of one query from its partials over every run it read (in a fixed
/// order): rescales each to the common maximum and divides by the total sum.
pub(crate) fn merge_partials<'a>(
    partials: impl Iterator<Item = &'a [f32]> + Clone,
    out: &mut [f32],
) {
    // Two passes over the partials (no copy: this runs for every query of every layer).
    let (count, max) = partials
        .clone()
        .fold((0, f32::NEG_INFINITY), |(n, m), p| (n + 1, m.max(p[0])));
    out.iter_mut().for_each(|o| *o = 0.0);
    let mut total = 0f32;
    for p in partials {
        let w = if count == 1 { 1.0 } else { (p[0] - max).exp() };
        total += w * p[1];
        for (o, v) in out.iter_mut().zip(&p[PARTIAL_HEADER..]) {
            *o += w * v;
        }
    }
    let inv = 1.0 / total;
    out.iter_mut().for_each(|o| *o *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax attention of one query over the first `visible` keys.
    fn reference(q: &[f32], keys: &[f32], values: &[f32], visible: usize, scale: f32) -> Vec<f32> {
        let hd = q.len();
        let scores: Vec<f64> = (0..visible)
            .map(|j| {
                let dot: f64 = (0..hd).map(|d| (q[d] * keys[j * hd + d]) as f64).sum();
                dot * scale as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = w.iter().sum();
        (0..hd)
            .map(|d| {
                let v: f64 = (0..visible).map(|j| w[j] * values[j * hd + d] as f64).sum();
                (v / total) as f32
            })
            .collect()
    }

    fn pseudo(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 1.5)
            .collect()
    }

    fn run(queries: &[Vec<f32>], visible: &[usize], keys: &[f32], values: &[f32]) -> Vec<Vec<f32>> {
        let hd = queries[0].len();
        let mut qt = vec![0f32; hd * LANES];
        for (lane, q) in queries.iter().enumerate() {
            for d in 0..hd {
                qt[d * LANES + lane] = q[d];
            }
        }
        let mut vis = [0usize; LANES];
        vis[..visible.len()].copy_from_slice(visible);
        let tile = Tile {
            queries: &qt,
            used: queries.len(),
            visible: vis,
            keys,
            values,
            head_dim: hd,
            scale: 0.125,
        };
        let mut bufs = vec![vec![0f32; PARTIAL_HEADER + hd]; queries.len()];
        let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        attend(&tile, &mut Vec::new(), &mut refs);
        bufs.iter()
            .map(|p| {
                let mut out = vec![0f32; hd];
                merge_partials(std::iter::once(p.as_slice()), &mut out);
                out
            })
            .collect()
    }

    #[test]
    fn a_tile_matches_softmax_attention_and_its_lanes_are_independent() {
        for hd in [64, 80, 24] {
            let len = 37;
            let keys = pseudo(len * hd, 1);
            let values = pseudo(len * hd, 2);
            let queries: Vec<Vec<f32>> = (0..11).map(|i| pseudo(hd, 10 + i)).collect();
            let visible: Vec<usize> = (0..11).map(|i| 1 + (i * 5) % len).collect();
            let all = run(&queries, &visible, &keys, &values);
            for (i, out) in all.iter().enumerate() {
                let want = reference(&queries[i], &keys, &values, visible[i], 0.125);
                for (a, b) in out.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "hd {hd} lane {i}: {a} vs {b}"
                    );
                }
                // Beside other queries in another lane: bit for bit the same.
                let mut mates: Vec<Vec<f32>> = (0..6).map(|m| pseudo(hd, 50 + m)).collect();
                let mut mate_visible = vec![len; 6];
                mates.insert(3, queries[i].clone());
                mate_visible.insert(3, visible[i]);
                let moved = run(&mates, &mate_visible, &keys, &values);
                assert_eq!(moved[3], *out, "hd {hd} lane {i}");
            }
        }
    }

    /// The portable, AVX2 and AVX-512 paths (where the CPU has them) against the reference.
    #[test]
    fn every_instruction_set_matches_the_reference() {
        let (hd, len) = (64, 29);
        let keys = pseudo(len * hd, 6);
        let values = pseudo(len * hd, 7);
        let queries: Vec<Vec<f32>> = (0..5).map(|i| pseudo(hd, 20 + i)).collect();
        let mut qt = vec![0f32; hd * LANES];
        for (lane, q) in queries.iter().enumerate() {
            for d in 0..hd {
                qt[d * LANES + lane] = q[d];
            }
        }
        let mut visible = [0; LANES];
        visible[..5].copy_from_slice(&[29, 1, 7, 16, 28]);
        let tile = Tile {
            queries: &qt,
            used: 5,
            visible,
            keys: &keys,
            values: &values,
            head_dim: hd,
            scale: 0.125,
        };
        type Path = unsafe fn(&Tile<'_>, usize, &mut Vec<f32>, &mut [&mut [f32]]);
        let mut paths: Vec<(&str, Path)> = vec![("portable", attend_with::<Portable>)];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::kernels::cpu::qmatmul::avx2_available() {
                paths.push(("avx2", attend_avx2));
            }
            if crate::kernels::cpu::qmatmul::avx512f_available() {
                paths.push(("avx512", attend_avx512));
            }
        }
        for (name, path) in paths {
            let mut bufs = vec![vec![0f32; PARTIAL_HEADER + hd]; 5];
            let mut refs: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
            // SAFETY: the path runs only where the CPU has its features; the slices fit.
            unsafe { path(&tile, len, &mut Vec::new(), &mut refs) };
            for (lane, p) in bufs.iter().enumerate() {
                let mut out = vec![0f32; hd];
                merge_partials(std::iter::once(p.as_slice()), &mut out);
                let want = reference(&queries[lane], &keys, &values, visible[lane], 0.125);
                for (a, b) in out.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "{name} lane {lane}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn partials_over_split_runs_merge_to_the_whole() {
        let (hd, len) = (64, 50);
        let keys = pseudo(len * hd, 3);
        let values = pseudo(len * hd, 4);
        let q = pseudo(hd, 5);
        let mut qt = vec![0f32; hd * LANES];
        for d in 0..hd {
            qt[d * LANES] = q[d];
        }
        let mut parts = Vec::new();
        for (a, b) in [(0, 16), (16, 17), (17, 50)] {
            let mut visible = [0; LANES];
            visible[0] = b - a;
            let tile = Tile {
                queries: &qt,
                used: 1,
                visible,
                keys: &keys[a * hd..b * hd],
                values: &values[a * hd..b * hd],
                head_dim: hd,
                scale: 0.125,
            };
            let mut p = vec![0f32; PARTIAL_HEADER + hd];
            attend(&tile, &mut Vec::new(), &mut [p.as_mut_slice()]);
            parts.push(p);
        }
        let mut out = vec![0f32; hd];
        merge_partials(parts.iter().map(|p| p.as_slice()), &mut out);
        let want = reference(&q, &keys, &values, len, 0.125);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
