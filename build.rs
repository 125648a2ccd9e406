//! With `--features cuda`, compiles our CUDA kernels (src/ops/kernels/kernels.cu) with nvcc into a fat
//! binary: machine code for `CUDA_COMPUTE_CAP` (loaded as is on such cards) and PTX the driver compiles for
//! newer ones.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/ops/kernels/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("kernels.fatbin");
    // bf16 arithmetic needs compute capability 8.0 (Ampere) or newer.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args([
            "--fatbin",
            "-O3",
            "-std=c++17",
            &format!("-gencode=arch=compute_{cap},code=[sm_{cap},compute_{cap}]"),
            "-o",
        ])
        .arg(&out)
        .arg("src/ops/kernels/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{nvcc}` to compile the CUDA decode kernels: {e}"));
    assert!(status.success(), "nvcc failed on src/ops/kernels/kernels.cu");
}
