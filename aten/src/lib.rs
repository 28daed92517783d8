//! The few libtorch (ATen) functions tch does not bind, through a small C++ shim (`shim.cpp`).
//!
//! **Private random generators.** tch only reaches libtorch's process-wide default generator, so seeded
//! noise used to mean re-seeding it and hoping nothing else drew random numbers in between (another
//! test, a model patch that draws during sampling). [`Generator`] is a generator of its own, as
//! `torch.Generator(device).manual_seed(seed)` makes in Python: the same libtorch code draws from it, so
//! for the same seed it gives PyTorch's numbers bit for bit, whatever else runs.
//!
//! **Build facts** for `diffloom --version -v`: the libtorch version, whether its CUDA backend is linked
//! (see `build/rpath.rs`), and the CPU instruction set libtorch dispatches to.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;

use tch::{Device, Kind, Tensor};

extern "C" {
    fn dl_free_string(s: *mut c_char);
    fn dl_generator_new(device_type: c_int, device_index: c_int, seed: u64, err: *mut *mut c_char) -> *mut c_void;
    fn dl_generator_free(gen: *mut c_void);
    fn dl_generator_draw(gen: *mut c_void, sizes: *const i64, ndim: usize, dtype: c_int, uniform: c_int, err: *mut *mut c_char) -> *mut c_void;
    fn dl_cuda_built() -> c_int;
    fn dl_torch_version() -> *mut c_char;
    fn dl_cpu_capability() -> *mut c_char;
    fn dl_cuda_free_memory(index: c_int, free: *mut u64, total: *mut u64, err: *mut *mut c_char) -> c_int;
}

/// A libtorch error raised inside the shim (bad device, unsupported dtype, out of memory), as its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtenError(pub String);

impl fmt::Display for AtenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AtenError {}

/// Takes ownership of a string the shim allocated.
fn take_string(s: *mut c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    // SAFETY: the shim returns NUL-terminated strings from malloc, freed exactly once here.
    let text = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { dl_free_string(s) };
    Some(text)
}

/// A random generator of its own on one device: `torch.Generator(device).manual_seed(seed)`.
pub struct Generator {
    ptr: *mut c_void,
    device: Device,
}

// SAFETY: an at::Generator is a reference-counted handle whose state libtorch guards with its own
// mutex; diffloom uses each one from one thread at a time (Generator is not Sync).
unsafe impl Send for Generator {}

impl Generator {
    /// A generator on `device` seeded with `seed` (the full u64 range, as PyTorch takes it).
    pub fn new(device: Device, seed: u64) -> Result<Generator, AtenError> {
        let (device_type, index) = match device {
            Device::Cpu => (0, -1),
            Device::Cuda(i) => (1, i as c_int),
            other => return Err(AtenError(format!("no random generator for device {other:?}"))),
        };
        let mut err = std::ptr::null_mut();
        // SAFETY: plain values in; the shim reports failure through `err` and returns null.
        let ptr = unsafe { dl_generator_new(device_type, index, seed, &mut err) };
        if let Some(e) = take_string(err) {
            return Err(AtenError(e));
        }
        Ok(Generator { ptr, device })
    }

    /// A seeded CPU generator; creating one cannot fail.
    pub fn cpu(seed: u64) -> Generator {
        // invariant: the CPU generator needs no device and allocates a few kilobytes.
        Generator::new(Device::Cpu, seed).expect("a CPU generator") // invariant: see above
    }

    /// The device this generator draws on.
    pub fn device(&self) -> Device {
        self.device
    }

    fn draw(&mut self, shape: &[i64], kind: Kind, uniform: bool) -> Result<Tensor, AtenError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `shape` outlives the call; the shim returns a heap at::Tensor that tch then owns.
        let t = unsafe { dl_generator_draw(self.ptr, shape.as_ptr(), shape.len(), scalar_type(kind)?, c_int::from(uniform), &mut err) };
        if let Some(e) = take_string(err) {
            return Err(AtenError(e));
        }
        Ok(unsafe { Tensor::from_ptr(t as *mut _) })
    }

    /// `torch.randn(shape, dtype=kind, device=<its device>, generator=self)`.
    pub fn randn(&mut self, shape: &[i64], kind: Kind) -> Result<Tensor, AtenError> {
        self.draw(shape, kind, false)
    }

    /// `torch.rand(shape, dtype=kind, device=<its device>, generator=self)`: uniform in [0, 1).
    pub fn rand(&mut self, shape: &[i64], kind: Kind) -> Result<Tensor, AtenError> {
        self.draw(shape, kind, true)
    }

    /// Standard normal float32 noise of `shape` on a CPU generator, which cannot fail.
    pub fn randn_f32(&mut self, shape: &[i64]) -> Tensor {
        // invariant: a float32 draw on the CPU has no failure mode short of allocation failure,
        // which aborts the process before it could be reported.
        self.randn(shape, Kind::Float).expect("a float32 draw") // invariant: see above
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from dl_generator_new and is freed once.
        unsafe { dl_generator_free(self.ptr) }
    }
}

/// c10::ScalarType codes of the float kinds noise is drawn in.
fn scalar_type(kind: Kind) -> Result<c_int, AtenError> {
    Ok(match kind {
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::BFloat16 => 15,
        other => return Err(AtenError(format!("random draws are floating point; {other:?} was asked"))),
    })
}

/// Whether the libtorch this binary runs on has its CUDA backend linked and registered.
pub fn cuda_built() -> bool {
    // SAFETY: no arguments; never throws.
    unsafe { dl_cuda_built() != 0 }
}

/// Bytes free for new tensors on CUDA device `index` (the driver's free memory plus what libtorch's
/// caching allocator holds unused, as ComfyUI counts it) and the device's total, or why it is not known
/// (no such device, no CUDA backend).
pub fn cuda_free_memory(index: usize) -> Result<(u64, u64), AtenError> {
    let index = c_int::try_from(index).map_err(|_| AtenError(format!("no CUDA device {index}")))?;
    let (mut free, mut total, mut err) = (0u64, 0u64, std::ptr::null_mut());
    // SAFETY: out-pointers to locals; the shim catches every C++ exception into `err`.
    let ok = unsafe { dl_cuda_free_memory(index, &mut free, &mut total, &mut err) };
    match take_string(err) {
        Some(why) => Err(AtenError(why)),
        None if ok == 1 => Ok((free, total)),
        None => Err(AtenError("cudaMemGetInfo gave no answer".into())),
    }
}

/// The libtorch version, e.g. `2.13.0`.
pub fn torch_version() -> String {
    // SAFETY: returns a malloc'd string.
    take_string(unsafe { dl_torch_version() }).unwrap_or_default()
}

/// The CPU instruction set libtorch's kernels use here: `DEFAULT`, `AVX2` or `AVX512`.
pub fn cpu_capability() -> String {
    // SAFETY: returns a malloc'd string.
    take_string(unsafe { dl_cpu_capability() }).unwrap_or_default()
}

#[cfg(test)]
mod tests;
