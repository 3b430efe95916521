//! f32 vector kernels for the CPU forward pass: matrix-vector products against dense weights,
//! and the dot products and scaled additions of attention. AVX2+FMA where the CPU has it
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
            out.set(j * out_rows + r, dot(row(r), &x[j * cols..(j + 1) * cols]));
        }
    }
}

/// `Σ a[i]·b[i]`.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::dot(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += a·x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    debug_assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if super::qmatmul::avx2_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::axpy(y, a, x) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
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

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i)),
                _mm256_loadu_ps(b.as_ptr().add(i)),
                acc0,
            );
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                acc1,
            );
            i += 16;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += a[i] * b[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let p = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(
                p,
                _mm256_fmadd_ps(av, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(p)),
            );
            i += 8;
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut y = vec![1f32; cols];
        axpy(&mut y, 2.0, &x[..cols]);
        assert!((y[3] - (1.0 + 2.0 * x[3])).abs() < 1e-6);
        assert!(
            (dot(&x[..cols], &x[..cols]) - x[..cols].iter().map(|v| v * v).sum::<f32>()).abs()
                < 1e-3
        );
    }
}
