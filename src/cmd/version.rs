//! `diffloom --version [-v]`: the version, and with -v what this binary can run on.

use std::process::ExitCode;

use anyhow::Result;

/// Prints `diffloom X.Y.Z`; verbose adds libtorch's version and CPU kernels, whether libtorch's CUDA
/// backend is compiled in (linked, see `build/rpath.rs`) and how many GPUs it sees, and whether this
/// CPU computes bf16 natively (the fast `--dtype bf16` path).
pub fn version(verbose: bool) -> Result<ExitCode> {
    println!("diffloom {}", env!("CARGO_PKG_VERSION"));
    if verbose {
        println!("libtorch {} (CPU kernels: {})", diffloom_aten::torch_version(), diffloom_aten::cpu_capability());
        if diffloom_aten::cuda_built() {
            let devices = tch::Cuda::device_count();
            let cudnn = if tch::Cuda::cudnn_is_available() { ", cuDNN available" } else { "" };
            println!("CUDA: compiled in; {devices} device{} visible{cudnn}", if devices == 1 { "" } else { "s" });
        } else {
            println!("CUDA: not compiled in (this libtorch has no CUDA backend)");
        }
        let bf16 = native_bf16();
        match bf16.is_empty() {
            true => println!("bf16 on this CPU: emulated (no AVX512-BF16 or AMX-BF16)"),
            false => println!("bf16 on this CPU: native ({})", bf16.join(", ")),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The CPU flags that make bf16 matrix work native (Linux's names in /proc/cpuinfo).
fn native_bf16() -> Vec<&'static str> {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = flags.lines().find(|l| l.starts_with("flags")).unwrap_or("").split_whitespace().collect();
    ["avx512_bf16", "amx_bf16"].into_iter().filter(|f| flags.contains(f)).collect()
}
