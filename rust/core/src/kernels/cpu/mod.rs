//! CPU kernels: quantized and dense matrix products ([`qmatmul`], [`dense`]), attention over
//! cached keys ([`attention`], and [`attention_few`] for a decode step's few queries),
//! requantization of merged weights, vectorised exp, the persistent thread team ([`parallel`]),
//! the seeded RNG, and the huge-page memory the repacked weights live in ([`weight_memory`]).
//! SIMD paths are chosen at run time from the CPU's features, with a portable path beside each.

pub(crate) mod attention;
pub(crate) mod attention_few;
pub(crate) mod dense;
pub(crate) mod parallel;
pub mod peak;
pub(crate) mod qmatmul;
pub(crate) mod requantize;
mod rng;
pub(crate) mod weight_memory;

use candle_core::{DType, Tensor};

use crate::error::Result;

pub use dense::{exp_in_place, max_value};
pub use rng::Rng;

/// The values of `t`, flattened, as f32 on the host.
pub(crate) fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}
