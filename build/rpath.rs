//! Build script shared by every workspace package that links libtorch.
//!
//! tch links libtorch dynamically and sets no run-time search path, so binaries and test executables
//! would need `LD_LIBRARY_PATH`. We record the libtorch directory (the `torch` package of the project
//! venv, see `scripts/env.sh`) as an rpath instead; the CUDA libraries it needs are then found through
//! libtorch's own `$ORIGIN`-relative rpath into the `nvidia` packages beside it.
//!
//! No Rust code calls into `libtorch_cuda.so`: libtorch registers its CUDA backend from that library's
//! static initialisers. rustc links with `--as-needed`, so the linker would drop the library as unneeded
//! and `--device cuda` could never work; it is linked with `--no-as-needed` around it. A libtorch
//! without CUDA (the CPU-only wheel) has no such library and is linked as it is.
pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
        if std::path::Path::new(&libtorch).join("lib/libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-L{libtorch}/lib");
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
