//! The settings every run of an executor shares.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tch::{Device, Kind};

use crate::exec::disk::DiskCache;
use crate::exec::observer::Observer;
use crate::node::ImageTexts;
use crate::paths::{Folders, Locator};

/// Settings shared by every run of an executor.
pub struct RunOptions {
    pub device: Device,
    /// Where output nodes write files.
    pub output_dir: PathBuf,
    /// Set (from any thread) to stop the run at the next node or sampling step.
    pub cancel: Arc<AtomicBool>,
    /// Floating-point kind for model weights; `None` picks per device (fp32 on CPU, fp16 on CUDA).
    pub dtype: Option<Kind>,
    /// Model folders and the input directory files named in graphs are looked up in.
    pub folders: Folders,
    /// What saved images carry besides the RON graph (set by the CLI: ComfyUI's and A1111's metadata).
    pub image_texts: Option<ImageTexts>,
    /// Told what happens as a run goes (the server's progress messages).
    pub observer: Option<std::sync::Arc<dyn Observer>>,
    /// The persistent tier of the cache (`--cache-dir`), shared with other processes; None keeps
    /// results in memory only.
    pub disk_cache: Option<Arc<DiskCache>>,
}

impl RunOptions {
    /// Options for `device` writing to `output_dir`, with defaults for the rest.
    pub fn new(device: Device, output_dir: impl Into<PathBuf>) -> RunOptions {
        RunOptions {
            device,
            output_dir: output_dir.into(),
            cancel: Arc::new(AtomicBool::new(false)),
            dtype: None,
            folders: Folders::default(),
            image_texts: None,
            observer: None,
            disk_cache: None,
        }
    }

    /// Looks up files for a graph in `graph_dir` under these options.
    pub fn locator<'a>(&'a self, graph_dir: &'a std::path::Path) -> Locator<'a> {
        Locator { graph_dir, folders: &self.folders, output_dir: &self.output_dir }
    }

    /// The weight kind actually used.
    pub fn resolved_dtype(&self) -> Kind {
        self.dtype.unwrap_or(if self.device.is_cuda() { Kind::Half } else { Kind::Float })
    }
}
