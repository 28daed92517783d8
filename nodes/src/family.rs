//! What differs between the model families diffloom runs, in one place, as ComfyUI keeps it in
//! `comfy/supported_models.py` and `comfy/latent_formats.py`: code that depends on the family reads
//! this spec instead of comparing families. Adding a family (SDXL) is adding a spec.

use crate::checkpoint::detect::{Family, Prediction};
use crate::models::clip::ClipLayout;

/// One family's facts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FamilySpec {
    /// LATENT values are the VAE's own; the sampler works on them times this (the LDM configs'
    /// `scale_factor`, latent_formats.SD15.scale_factor).
    pub latent_scale: f64,
    /// Channels of the VAE's latent and the UNet's output.
    pub latent_channels: i64,
    /// The latent of a blank image, what inpainting UNets see where no image is given
    /// (model_base.blank_inpaint_image_like), per latent channel.
    pub blank_inpaint_latent: [f32; 4],
    /// How the text encoder's weights are laid out (transformers' CLIP, or OpenCLIP).
    pub clip_layout: ClipLayout,
    /// The hidden state used when CLIPSetLastLayer is not set: None for the last layer, −2 for the
    /// penultimate (supported_models.SD20's `clip_skip`).
    pub default_clip_layer: Option<i64>,
    /// The token prompts are padded with: SD 1.x pads with the end token, SD 2.x (OpenCLIP) with 0.
    pub pad_token: u32,
    /// The tensor a textual-inversion file with several tensors is read from first.
    pub embedding_key: &'static str,
    /// The text encoder's width (the UNet's cross-attention context).
    pub context_dim: i64,
    /// What the UNet predicts unless the checkpoint or ModelSamplingDiscrete says otherwise.
    pub prediction: Prediction,
    /// The UNet's attention heads as (count, width), where the weights' shapes cannot tell them: None
    /// keeps what detection found (SD 1.x: 8 heads), SD 2.x's released models use 64-wide heads.
    pub unet_heads: Option<(i64, i64)>,
}

/// SD 1.x (supported_models.SD15).
pub const SD1: FamilySpec = FamilySpec {
    latent_scale: 0.18215,
    latent_channels: 4,
    blank_inpaint_latent: [0.8223, -0.6876, 0.6364, 0.1380],
    clip_layout: ClipLayout::Hf,
    default_clip_layer: None,
    pad_token: crate::tokenizer::END,
    embedding_key: "clip_l",
    context_dim: 768,
    prediction: Prediction::Eps,
    unet_heads: None,
};

/// SD 2.x (supported_models.SD20; the 768-v checkpoints predict v, told apart at load).
pub const SD2: FamilySpec = FamilySpec {
    clip_layout: ClipLayout::OpenClip,
    default_clip_layer: Some(-2),
    pad_token: 0,
    embedding_key: "clip_h",
    context_dim: 1024,
    unet_heads: Some((-1, 64)),
    ..SD1
};

impl Family {
    /// The family's facts.
    pub fn spec(self) -> &'static FamilySpec {
        match self {
            Family::Sd1 => &SD1,
            Family::Sd2 => &SD2,
        }
    }
}
