//! CPU kernels: quantized and dense matrix products ([`qmatmul`], [`dense`]), attention over
//! cached keys ([`attention`], and [`attention_few`] for a decode step's few queries),
//! requantization of merged weights, vectorised exp, the persistent thread team ([`parallel`]),
//! the seeded RNG, and the huge-page memory the repacked weights live in ([`weight_memory`]).
//! SIMD paths are chosen at run time from the CPU's features, with a portable path beside each.

pub(crate) mod attention;
pub(crate) mod attention_few;
pub(crate) mod dense;
pub(crate) mod float;
pub mod isa;
pub(crate) mod kquants;
pub(crate) mod parallel;
pub mod peak;
pub(crate) mod qmatmul;
pub(crate) mod requantize;
mod rng;
#[cfg(target_arch = "x86_64")]
pub(crate) mod tiles256;
pub(crate) mod weight_memory;

use candle_core::{DType, Tensor};

use crate::error::Result;

pub use dense::{exp_in_place, max_value};
pub use rng::Rng;

/// Requests every cache line of `region` at once (a hint: nothing is read or written).
#[inline]
pub(crate) fn prefetch<T>(region: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = region.as_ptr() as *const i8;
        for at in (0..std::mem::size_of_val(region)).step_by(64) {
            // SAFETY: a prefetch never faults; the address lies inside `region`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = region;
}

/// The values of `t`, flattened, as f32 on the host.
pub(crate) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
