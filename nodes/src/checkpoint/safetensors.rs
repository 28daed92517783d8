//! Memory-mapped safetensors files: header validation with clear errors, and tensors copied straight
//! from the mapping into their target device and dtype (one copy, no intermediate CPU tensor).

// The one place nodes uses unsafe code: memory-mapping checkpoint files and viewing their bytes as
// tensors without a copy (the map outlives every view; see SafetensorsFile::load).
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::LoadError;

/// Where one tensor lies in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    /// Byte range inside the mapping (absolute, header included).
    pub start: usize,
    pub end: usize,
}

/// An open, validated checkpoint file: a memory-mapped safetensors file, or a PyTorch pickle whose
/// tensors were read into memory as data (see `pickle.rs`).
pub struct SafetensorsFile {
    pub path: PathBuf,
    backing: Backing,
    tensors: HashMap<String, TensorInfo>,
    /// The header's `__metadata__` strings.
    pub metadata: HashMap<String, String>,
}

enum Backing {
    Mmap(Mmap),
    /// A pickle's tensors (contiguous, on the CPU), by name.
    Tensors(HashMap<String, Tensor>),
}

impl SafetensorsFile {
    /// A PyTorch pickle's tensors, read without running code; `start` numbers them in file order.
    fn open_pickle(path: &Path) -> Result<SafetensorsFile, LoadError> {
        let mut tensors = HashMap::new();
        let mut data = HashMap::new();
        let (read, values) = super::pickle::read_with_values(path)?;
        for (i, (name, t)) in read.into_iter().enumerate() {
            let dtype = diffloom_core::dtypes::dtype_of(t.kind()).ok_or_else(|| LoadError::Dtype {
                file: path.to_path_buf(),
                key: name.clone(),
                found: format!("{:?}", t.kind()),
            })?;
            tensors.insert(name.clone(), TensorInfo { dtype, shape: t.size(), start: i, end: i });
            data.insert(name, t);
        }
        // The pickle's strings, numbers and booleans stand in for safetensors' metadata.
        Ok(SafetensorsFile { path: path.to_path_buf(), backing: Backing::Tensors(data), tensors, metadata: values.into_iter().collect() })
    }

    /// Opens and validates `path`: a pickle checkpoint, an empty or truncated file, or a header whose
    /// offsets do not fit the file is an error naming the file.
    pub fn open(path: &Path) -> Result<SafetensorsFile, LoadError> {
        let corrupt = |message: String| LoadError::Corrupt { file: path.to_path_buf(), message };
        if path.is_dir() {
            return Err(corrupt("is a directory, expected a .safetensors file or a diffusers folder".into()));
        }
        let file = File::open(path).map_err(|e| LoadError::Io { file: path.to_path_buf(), message: e.to_string() })?;
        // SAFETY: the mapping is read-only; a file truncated by another process while mapped would
        // fault, which is the same risk every mmap-based loader (ComfyUI's included) takes.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::Io { file: path.to_path_buf(), message: e.to_string() })?;
        if mmap.is_empty() {
            return Err(corrupt("the file is empty".into()));
        }
        // A safetensors header is JSON right after the 8-byte length; only without one can the file be a
        // pickle (a length like 0x0280 starts with the same bytes as pickle protocol 2).
        let json_header = mmap.len() > 8 && mmap[8] == b'{';
        if is_pickle(&mmap) && !json_header {
            drop(mmap);
            return SafetensorsFile::open_pickle(path);
        }
        if mmap.len() < 8 {
            return Err(corrupt(format!("only {} bytes: too short for a safetensors header", mmap.len())));
        }
        let header_len = u64::from_le_bytes(mmap[..8].try_into().unwrap_or([0; 8]));
        if header_len > (mmap.len() as u64).saturating_sub(8) {
            return Err(corrupt(format!("the header claims {header_len} bytes but the file has only {} (truncated or not a safetensors file)", mmap.len())));
        }
        let st = SafeTensors::deserialize(&mmap).map_err(|e| corrupt(format!("invalid safetensors header: {e}")))?;
        let data_start = 8 + header_len as usize;
        let (_, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| corrupt(format!("invalid safetensors header: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, info) in meta.tensors() {
            let shape = info.shape.iter().map(|d| *d as i64).collect();
            let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
            tensors.insert(name.clone(), TensorInfo { dtype: info.dtype, shape, start, end });
        }
        let total: usize = tensors.values().map(|t| t.end - t.start).sum();
        if data_start + total > mmap.len() {
            return Err(corrupt("the tensors' data runs past the end of the file (truncated)".into()));
        }
        drop(st);
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile { path: path.to_path_buf(), backing: Backing::Mmap(mmap), tensors, metadata })
    }

    /// Tensor names and where they lie.
    pub fn tensors(&self) -> &HashMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Copies tensor `name` into a new tensor on `device` with `kind` (floating-point tensors are
    /// converted; others keep their kind). The pages read are released from the mapping afterwards, so
    /// that resident memory stays near the size of the model itself.
    pub fn load(&self, name: &str, device: Device, kind: Option<Kind>) -> Result<Tensor, LoadError> {
        let info = self.tensors.get(name).ok_or_else(|| LoadError::Missing { file: self.path.clone(), key: name.to_owned() })?;
        let src_kind =
            dtype_kind(info.dtype).ok_or_else(|| LoadError::Dtype { file: self.path.clone(), key: name.to_owned(), found: format!("{:?}", info.dtype) })?;
        let dst_kind = match kind {
            Some(k) if matches!(src_kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) => k,
            _ => src_kind,
        };
        let mmap = match &self.backing {
            Backing::Mmap(m) => m,
            Backing::Tensors(t) => {
                let t = t.get(name).ok_or_else(|| LoadError::Missing { file: self.path.clone(), key: name.to_owned() })?;
                return Ok(t.f_to_device_(device, dst_kind, false, true)?);
            }
        };
        let bytes = &mmap[info.start..info.end];
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(src_kind.elt_size_in_bytes());
        let t = if aligned && !bytes.is_empty() {
            // SAFETY: `bytes` lies inside the mapping (validated at open), holds numel elements of
            // src_kind (checked by safetensors' validation), and outlives this borrow-only view; the
            // `copy = true` below leaves no tensor pointing into the mapping.
            let view = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &info.shape, &[], src_kind, Device::Cpu) }?;
            view.f_to_device_(device, dst_kind, false, true)?
        } else {
            Tensor::f_from_data_size(bytes, &info.shape, src_kind)?.f_to_device_(device, dst_kind, false, false)?
        };
        // SAFETY: the mapping is read-only and file-backed; dropping its pages only means that a later
        // read faults them in again from the file.
        unsafe {
            let _ = mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, info.start, info.end - info.start);
        }
        Ok(t)
    }
}

/// Whether the bytes are a PyTorch pickle: a zip archive as torch.save writes, or a raw pickle.
fn is_pickle(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || (bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]))
}

/// The libtorch kind of a safetensors dtype, for the dtypes checkpoints use.
pub use diffloom_core::dtypes::kind_of as dtype_kind;
