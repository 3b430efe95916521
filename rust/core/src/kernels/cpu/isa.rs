//! Which instruction sets the CPU kernels may use: what the CPU has, capped by
//! `PEFTSCALE_MAX_CPU_ISA` (as oneDNN's `ONEDNN_MAX_CPU_ISA` caps its kernels).
//!
//! The machines this project runs on differ (AVX-512 VNNI on some, AVX2 only on others), so every
//! path has to be testable on any of them: `PEFTSCALE_MAX_CPU_ISA=avx2` makes an AVX-512 machine
//! run the AVX2 kernels, `portable` the plain Rust ones. The cap is read once per process.

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The environment variable that caps the kernels' instruction set.
pub const MAX_ISA_VAR: &str = "PEFTSCALE_MAX_CPU_ISA";

/// Instruction-set levels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, no SIMD intrinsics.
    Portable,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 (each kernel still checks the extensions it needs: F, BW, VL, VNNI).
    Avx512,
}

impl Isa {
    fn parse(value: &str) -> Result<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "portable" | "none" | "scalar" => Ok(Isa::Portable),
            "avx2" => Ok(Isa::Avx2),
            "avx512" | "avx512-vnni" | "avx512_vnni" | "native" | "" => Ok(Isa::Avx512),
            other => Err(Error::invalid(format!(
                "{MAX_ISA_VAR}={other:?} is not an instruction-set cap: use avx512, avx2 or portable"
            ))),
        }
    }
}

/// The cap from the environment; `Ok(None)` when the variable is unset.
pub fn cap_from_env() -> Result<Option<Isa>> {
    match std::env::var(MAX_ISA_VAR) {
        Ok(v) => Isa::parse(&v).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => {
            Err(Error::invalid(format!("{MAX_ISA_VAR} is not valid UTF-8")))
        }
    }
}

/// The highest level the kernels may use in this process. An unreadable cap means the portable
/// kernels (and [`check_env`] turns it into an error where an engine is loaded).
fn cap() -> Isa {
    static CAP: OnceLock<Isa> = OnceLock::new();
    *CAP.get_or_init(|| match cap_from_env() {
        Ok(cap) => cap.unwrap_or(Isa::Avx512),
        Err(_) => Isa::Portable,
    })
}

/// Fails with a readable error when `PEFTSCALE_MAX_CPU_ISA` holds something other than a level.
pub fn check_env() -> Result<()> {
    cap_from_env().map(|_| ())
}

/// Whether the kernels may use instructions of `level` (the CPU's own features are checked
/// separately, by each kernel family).
#[inline]
pub fn allows(level: Isa) -> bool {
    level <= cap()
}

/// The highest level this CPU has and the cap allows: the one the attention tiles (AVX-512F,
/// else AVX2 with FMA, else portable) run on.
pub fn active() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if super::qmatmul::avx512f_available() {
            return Isa::Avx512;
        }
        if super::qmatmul::avx2_available() {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// The levels this CPU has whatever the cap, lowest first: tests run every one of them in one
/// process (the cap only chooses what the engine runs).
#[cfg(test)]
pub(crate) fn cpu_levels() -> Vec<Isa> {
    let mut levels = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            levels.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512f") {
                levels.push(Isa::Avx512);
            }
        }
    }
    levels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Isa::parse("AVX2").ok(), Some(Isa::Avx2));
        assert_eq!(Isa::parse(" portable ").ok(), Some(Isa::Portable));
        assert_eq!(Isa::parse("avx512-vnni").ok(), Some(Isa::Avx512));
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        let err = Isa::parse("sse9")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("PEFTSCALE_MAX_CPU_ISA") && err.contains("sse9"),
            "{err}"
        );
    }

    #[test]
    fn the_active_level_respects_the_cap() {
        assert!(active() <= cap());
        assert!(allows(Isa::Portable));
    }
}
