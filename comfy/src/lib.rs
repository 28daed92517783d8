//! diffloom-comfy: ComfyUI interop. Workflows in ComfyUI's UI and API JSON (and PNG/WebP images that
//! carry them) converted to diffloom graphs and back, ComfyUI's model folders, and the metadata saved
//! images carry for ComfyUI and A1111-style tools.

#![forbid(unsafe_code)]

pub mod a1111;
pub mod api;
pub mod coverage;
pub mod display;
pub mod embedded;
pub mod error;
pub mod export;
pub mod flat;
pub mod import;
pub mod metadata;
pub mod model_paths;
pub mod ui;
pub mod widgets;

pub use error::ImportError;
pub use import::{graph_from_prompt, import_bytes, import_file, is_importable, Source};
