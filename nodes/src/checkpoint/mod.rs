//! Reading checkpoints: safetensors files (memory-mapped) and PyTorch pickles (read as data), the tensor lookup the model constructors use,
//! and the load errors.

pub mod control;
pub mod detect;
pub mod keymap;
pub mod load;
pub mod pickle;
pub mod safetensors;
pub mod synthetic;
pub mod vision;
pub mod weights;

use std::path::PathBuf;

use thiserror::Error;

pub use weights::{WPath, Weights};

/// A loaded model and its tensors by logical name (sharing storage with the model's), from which a
/// LoRA builds a patched copy without touching the model.
pub struct Loaded<M> {
    pub model: std::rc::Rc<M>,
    pub state: std::rc::Rc<Vec<(String, tch::Tensor)>>,
}

impl<M> Clone for Loaded<M> {
    fn clone(&self) -> Self {
        Loaded { model: self.model.clone(), state: self.state.clone() }
    }
}

impl<M> std::ops::Deref for Loaded<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.model
    }
}

/// A checkpoint that cannot be loaded. Each variant names the file, and the key where there is one.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("{}: cannot read: {message}", .file.display())]
    Io { file: PathBuf, message: String },
    /// Not a valid safetensors file (empty, truncated, a lying header).
    #[error("{}: {message}", .file.display())]
    Corrupt { file: PathBuf, message: String },
    /// A kind of file or model diffloom does not load (pickles, SDXL, …).
    #[error("{}: {message}", .file.display())]
    Unsupported { file: PathBuf, message: String },
    /// A tensor the model needs is not in the file.
    #[error("{}: missing tensor {key:?}", .file.display())]
    Missing { file: PathBuf, key: String },
    /// A tensor has another shape than the model (as configured) needs.
    #[error("{}: tensor {key:?} has shape {found:?}, expected {expected:?}", .file.display())]
    Shape { file: PathBuf, key: String, expected: Vec<i64>, found: Vec<i64> },
    /// A tensor's dtype is not one a model can use.
    #[error("{}: tensor {key:?} has dtype {found}, which diffloom cannot load", .file.display())]
    Dtype { file: PathBuf, key: String, found: String },
    /// libtorch failed while copying a tensor.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// Several problems; the first is shown.
    #[error("{first} (and {more} more problem{})", if *.more == 1 { "" } else { "s" })]
    Many { first: Box<LoadError>, more: usize },
}
