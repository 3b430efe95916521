//! With the `cuda` feature, compiles the kernels in the repository's `cuda/` to PTX (embedded in
//! the crate and loaded by the driver at first use). Without it, nothing happens: the default
//! build needs no CUDA toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: [&str; 3] = ["cold", "bgmv", "sample"];

fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let cuda_dir = manifest.join("../../cuda");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let arch = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    println!(
        "cargo:rerun-if-changed={}",
        cuda_dir.join("common.cuh").display()
    );
    for name in KERNELS {
        let src = cuda_dir.join(format!("{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        compile(&nvcc, &arch, &src, &out_dir.join(format!("{name}.ptx")));
    }
}

fn compile(nvcc: &str, arch: &str, src: &Path, out: &Path) {
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{arch}"))
        .arg("-o")
        .arg(out)
        .arg(src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on {} ({s})", src.display()),
        Err(e) => panic!(
            "cannot run {nvcc} for the `cuda` feature ({e}): put nvcc on PATH or set NVCC \
             (scripts/build-cuda.sh installs one from PyPI)"
        ),
    }
}
