//! The built-in nodes, one module per ComfyUI category.

pub mod animation;
pub mod conditioning;
pub mod controlnet;
pub mod custom_sampling;
pub mod gligen;
pub mod image;
pub mod latent;
pub mod loaders;
pub mod mask;
pub mod model_merging;
pub mod model_patches;
pub mod preprocessors;
pub mod primitive;
pub mod quantize;
pub mod rebatch;
pub mod sampling;
pub mod shared;
pub mod strings;
