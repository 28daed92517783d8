//! Sampling: the model's noise schedule, schedulers (sigma lists), samplers, guidance, and
//! ComfyUI-compatible noise.

pub mod adm;
pub mod brownian;
pub mod conds;
pub mod gits;
pub mod guidance;
pub mod ksampler;
pub mod model_sampling;
pub mod noise;
pub mod samplers;
pub mod schedulers;
