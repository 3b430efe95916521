//! The bottom floor of the crate: the arithmetic every upper layer runs on. `cpu` holds the
//! matrix kernels, vector math, the thread team and the RNG; device kernels will sit beside it.

pub mod cpu;
