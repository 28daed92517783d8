//! Build script shared by every workspace package that links libtorch.
//!
//! tch links libtorch dynamically and sets no run-time search path, so binaries and test executables
//! would need `LD_LIBRARY_PATH`. We record the libtorch directory (the `torch` package of the project
//! venv, see `scripts/env.sh`) as an rpath instead; the CUDA libraries it needs are then found through
//! libtorch's own `$ORIGIN`-relative rpath into the `nvidia` packages beside it.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
