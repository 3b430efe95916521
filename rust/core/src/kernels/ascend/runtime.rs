//! The ACL runtime, opened at run time with `dlopen`: `libascendcl.so` (initialisation, devices,
//! streams, memory) and the operator libraries `libnnopbase.so` (tensors) and `libopapi.so`
//! (the aclnn operators), as CANN's `set_env.sh` puts them on the library path.
//!
//! Declarations checked against the CANN 8.0 documents "AscendCL API Reference" (`aclInit`,
//! `aclrtGetDeviceCount`, `aclrtSetDevice`; `acl_base.h` error codes) and "aclnn API Reference"
//! (the two-phase `aclnnXxxGetWorkspaceSize` / `aclnnXxx` form the plans follow).

use std::ffi::c_char;

use libloading::Library;

type AclError = i32;
const ACL_SUCCESS: AclError = 0;
/// `ACL_ERROR_REPEAT_INITIALIZE`: `aclInit` was already called in this process.
const ACL_ERROR_REPEAT_INITIALIZE: AclError = 100_002;

/// The loaded runtime and how many NPUs it sees.
pub struct Runtime {
    _acl: Library,
    _operators: [Library; 2],
    pub device_count: u32,
}

fn open(name: &str) -> Result<Library, String> {
    // SAFETY: loading a shared library runs its initialisers; the CANN libraries have none that
    // depend on the caller.
    unsafe { Library::new(name) }.map_err(|e| {
        format!(
            "no Ascend runtime found: {name} could not be loaded ({e}); install the CANN toolkit \
             and source its set_env.sh"
        )
    })
}

impl Runtime {
    /// Loads the libraries and initialises ACL; the error says which library or call failed.
    pub fn open() -> Result<Self, String> {
        let acl = open("libascendcl.so")?;
        let operators = [open("libnnopbase.so")?, open("libopapi.so")?];
        let symbol_error =
            |name: &str, e: libloading::Error| format!("libascendcl.so has no {name}: {e}");
        // SAFETY: the signatures are those of acl.h (see the module comment); the pointers passed
        // are null (no configuration file) or point to a live local.
        let device_count = unsafe {
            let init = acl
                .get::<unsafe extern "C" fn(*const c_char) -> AclError>(b"aclInit\0")
                .map_err(|e| symbol_error("aclInit", e))?;
            let rc = init(std::ptr::null());
            if rc != ACL_SUCCESS && rc != ACL_ERROR_REPEAT_INITIALIZE {
                return Err(format!("aclInit failed with ACL error {rc}"));
            }
            let count = acl
                .get::<unsafe extern "C" fn(*mut u32) -> AclError>(b"aclrtGetDeviceCount\0")
                .map_err(|e| symbol_error("aclrtGetDeviceCount", e))?;
            let mut n = 0u32;
            let rc = count(&mut n);
            if rc != ACL_SUCCESS {
                return Err(format!(
                    "aclrtGetDeviceCount failed with ACL error {rc}: no Ascend device found"
                ));
            }
            n
        };
        Ok(Self {
            _acl: acl,
            _operators: operators,
            device_count,
        })
    }
}

/// `Ok` when the runtime loads and NPU `ordinal` exists; otherwise what is missing.
pub fn check_device(ordinal: usize) -> Result<(), String> {
    let runtime = Runtime::open()?;
    if ordinal >= runtime.device_count as usize {
        return Err(format!(
            "no Ascend device {ordinal}: the runtime sees {} NPU(s)",
            runtime.device_count
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// On a machine without CANN (CI), the error names the runtime library that is missing.
    #[test]
    fn without_cann_the_error_names_the_missing_runtime() {
        if let Err(e) = super::Runtime::open() {
            assert!(
                e.contains("no Ascend runtime found") || e.contains("ACL error"),
                "{e}"
            );
        }
    }
}
