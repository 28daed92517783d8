//! The settings every run of an executor shares.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tch::{Device, Kind};

/// Settings shared by every run of an executor.
pub struct RunOptions {
    pub device: Device,
    /// Where output nodes write files.
    pub output_dir: PathBuf,
    /// Set (from any thread) to stop the run at the next node or sampling step.
    pub cancel: Arc<AtomicBool>,
    /// Floating-point kind for model weights; `None` picks per device (fp32 on CPU, fp16 on CUDA).
    pub dtype: Option<Kind>,
    /// Where `embedding:name` in prompts looks for textual inversions.
    pub embeddings_dir: Option<PathBuf>,
}

impl RunOptions {
    /// Options for `device` writing to `output_dir`, with defaults for the rest.
    pub fn new(device: Device, output_dir: impl Into<PathBuf>) -> RunOptions {
        RunOptions { device, output_dir: output_dir.into(), cancel: Arc::new(AtomicBool::new(false)), dtype: None, embeddings_dir: None }
    }

    /// The weight kind actually used.
    pub fn resolved_dtype(&self) -> Kind {
        self.dtype.unwrap_or(if self.device.is_cuda() { Kind::Half } else { Kind::Float })
    }
}
