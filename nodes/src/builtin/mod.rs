//! The built-in nodes, one module per ComfyUI category.

pub mod image;
pub mod primitive;
