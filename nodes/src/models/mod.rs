//! The Stable Diffusion model stack in tch, one file per part, each a config struct and a model whose
//! constructor walks the checkpoint's own key names.

pub mod attention;
pub mod clip;
pub mod clip_vision;
pub mod controlnet;
pub mod gligen;
pub mod hypernetwork;
pub mod layers;
pub mod noise_aug;
pub mod resnet;
pub mod rrdbnet;
pub mod style_adapter;
pub mod t2i_adapter;
pub mod taesd;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
