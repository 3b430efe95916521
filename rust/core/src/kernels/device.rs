//! Which device the engine runs on, parsed from the names users write (`"cpu"`, `"cuda"`,
//! `"cuda:N"`, `"ascend"`, `"ascend:N"`), and whether this build and this machine provide it.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
    /// A Huawei Ascend NPU by ordinal.
    Ascend(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        let unknown = || {
            Error::invalid(format!(
                "unknown device `{name}`: expected \"cpu\", \"cuda\", \"cuda:N\", \"ascend\" or \
                 \"ascend:N\""
            ))
        };
        let (kind, ordinal) = match name.split_once(':') {
            Some((kind, n)) => (kind, n.parse::<usize>().map_err(|_| unknown())?),
            None => (name, 0),
        };
        match kind {
            "cpu" if !name.contains(':') => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(ordinal)),
            "ascend" => Ok(DeviceSpec::Ascend(ordinal)),
            _ => Err(unknown()),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Ascend(n) => write!(f, "ascend:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The kinds of device this build can run on (`"cpu"`, and `"cuda"` / `"ascend"` when built
    /// with those features); whether the machine has one is [`Self::check_available`]'s to say.
    pub fn compiled_kinds() -> Vec<&'static str> {
        let mut kinds = vec!["cpu"];
        if cfg!(feature = "cuda") {
            kinds.push("cuda");
        }
        if cfg!(feature = "ascend") {
            kinds.push("ascend");
        }
        kinds
    }

    /// `Ok` when the engine can run here; otherwise what is missing: the build's feature, the
    /// runtime library, the device itself, or (on Ascend, so far) the model's path on that device.
    pub fn check_available(self) -> Result<()> {
        self.open().map(|_| ())
    }

    /// The candle device the model's tensors live on, or what is missing (see
    /// [`Self::check_available`]).
    pub fn open(self) -> Result<candle_core::Device> {
        let missing = |reason: String| Error::DeviceUnavailable {
            device: self.to_string(),
            reason,
        };
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(missing(
                        "this build has no CUDA support: build with the `cuda` feature \
                         (cuda/README.md)"
                            .into(),
                    ));
                }
                cuda_device(n).map_err(|e| {
                    // candle appends a backtrace when RUST_BACKTRACE is set: the first line says it.
                    let reason = e.to_string();
                    let reason = reason.lines().next().unwrap_or_default().to_string();
                    missing(format!("no CUDA device {n} could be opened: {reason}"))
                })
            }
            DeviceSpec::Ascend(n) => {
                if !cfg!(feature = "ascend") {
                    return Err(missing(
                        "this build has no Ascend support: build with the `ascend` feature".into(),
                    ));
                }
                ascend_device(n).map_err(missing)?;
                Err(missing(
                    "the engine's model runs on the CPU or a CUDA GPU so far; the Ascend plans \
                     (kernels/ascend) are checked on their own"
                        .into(),
                ))
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> candle_core::Result<candle_core::Device> {
    candle_core::Device::new_cuda(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> candle_core::Result<candle_core::Device> {
    candle_core::bail!("this build has no CUDA support")
}

#[cfg(feature = "ascend")]
fn ascend_device(ordinal: usize) -> std::result::Result<(), String> {
    super::ascend::runtime::check_device(ordinal)
}

#[cfg(not(feature = "ascend"))]
fn ascend_device(_ordinal: usize) -> std::result::Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DeviceSpec;

    #[test]
    fn names_parse_and_print_back() {
        for (name, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:7", DeviceSpec::Cuda(7)),
            ("ascend", DeviceSpec::Ascend(0)),
            ("ascend:1", DeviceSpec::Ascend(1)),
        ] {
            assert_eq!(name.parse::<DeviceSpec>().ok(), Some(spec));
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in [
            "", "gpu", "cuda:", "cuda:x", "cpu:0", "CUDA", "cuda:-1", "tpu:0",
        ] {
            let err = bad.parse::<DeviceSpec>().err().map(|e| e.to_string());
            assert!(
                err.is_some_and(|e| e.contains(&format!("`{bad}`"))),
                "{bad}"
            );
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_says_so() {
        assert!(DeviceSpec::Cpu.check_available().is_ok());
        let cuda = DeviceSpec::Cuda(7)
            .check_available()
            .err()
            .map(|e| e.to_string());
        assert!(cuda.is_some_and(|e| e.contains("cuda:7") && e.contains("`cuda` feature")));
    }

    #[test]
    fn ascend_names_what_is_missing() {
        let err = DeviceSpec::Ascend(0)
            .check_available()
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("ascend:0"), "{err}");
        if cfg!(feature = "ascend") {
            // No CANN (CI), CANN without an NPU, or both (the model's path is still the CPU's).
            let reasons = [
                "no Ascend runtime found",
                "no Ascend device",
                "ACL error",
                "CPU or a CUDA GPU",
            ];
            assert!(reasons.iter().any(|r| err.contains(r)), "{err}");
        } else {
            assert!(err.contains("`ascend` feature"), "{err}");
        }
    }
}
