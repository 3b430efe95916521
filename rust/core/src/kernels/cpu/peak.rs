//! What this CPU's integer dot-product instruction can do: the roofline the quantized kernels
//! are measured against, and which kernel family runs here.

use std::time::Instant;

use super::parallel::{map_parallel, team};

/// The instruction set the quantized kernels use on this CPU.
pub fn kernel_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if super::qmatmul::tiles_available() {
            return "avx512-vnni";
        }
        if super::qmatmul::avx2_available() {
            return "avx2";
        }
    }
    "portable"
}

/// Threads the CPU kernels run on.
pub fn threads() -> usize {
    team().threads()
}

/// Measured peak of 8-bit multiply-adds on every thread of the team, in GOP/s (one multiply-add
/// counts two operations), from independent chains of the widest dot-product instruction the
/// kernels use; runs for about `seconds`.
pub fn int8_peak_gops(seconds: f64) -> f64 {
    let threads = team().threads();
    let started = Instant::now();
    let mut ops = 0f64;
    while started.elapsed().as_secs_f64() < seconds {
        // One task per thread, each running its own chains at the same time as the others; long
        // enough (~5 ms) that every worker has claimed its task before the caller could take it.
        let rounds = map_parallel(vec![2_000_000u64; threads], chains);
        ops += rounds.iter().map(|(n, per)| *n as f64 * per).sum::<f64>();
    }
    ops / started.elapsed().as_secs_f64() / 1e9
}

/// Runs `iterations` rounds of twelve independent dot-product chains; returns the rounds run and
/// the operations in one round.
fn chains(iterations: u64) -> (u64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::qmatmul::tiles_available() {
            // SAFETY: the CPU has AVX-512 VNNI.
            std::hint::black_box(unsafe { x86::vnni512(iterations) });
            return (iterations, 12.0 * 64.0 * 2.0);
        }
        if super::qmatmul::avx2_available() {
            // SAFETY: the CPU has AVX2.
            std::hint::black_box(unsafe { x86::avx2(iterations) });
            return (iterations, 12.0 * 32.0 * 2.0);
        }
    }
    let mut acc = [0i32; 12];
    for i in 0..iterations {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add(std::hint::black_box((i as i32) ^ k as i32) * 3);
        }
    }
    std::hint::black_box(acc);
    (iterations, 12.0 * 2.0)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn vnni512(iterations: u64) -> i32 {
        let a = std::hint::black_box(_mm512_set1_epi8(3));
        let b = std::hint::black_box(_mm512_set1_epi8(5));
        let mut acc = [_mm512_setzero_si512(); 12];
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        acc.iter().fold(0, |s, x| s ^ _mm512_reduce_add_epi32(*x))
    }

    /// The AVX2 kernels' pair: multiply-add of bytes to i16, then to i32, per 32 bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(iterations: u64) -> i32 {
        let ones = _mm256_set1_epi16(1);
        let mut a = std::hint::black_box(_mm256_set1_epi8(3));
        let b = std::hint::black_box(_mm256_set1_epi8(5));
        let mut acc = [_mm256_setzero_si256(); 12];
        for _ in 0..iterations {
            for x in acc.iter_mut() {
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
            }
            // Keeps the products from being hoisted out of the loop.
            a = _mm256_xor_si256(a, acc[0]);
        }
        _mm256_extract_epi32(
            acc.iter()
                .fold(_mm256_setzero_si256(), |s, x| _mm256_xor_si256(s, *x)),
            0,
        )
    }
}
