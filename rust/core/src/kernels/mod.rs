//! The bottom floor of the crate: the arithmetic every upper layer runs on. `cpu` holds the
//! matrix kernels, vector math, the thread team and the RNG; `device` names the devices and says
//! which this build and machine provide; `ascend` (feature `ascend`) holds the aclnn plans and the
//! CANN runtime; `cuda` (feature `cuda`) launches the kernels of the repository's `cuda/` on
//! candle's CUDA tensors.

#[cfg(feature = "ascend")]
pub mod ascend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
