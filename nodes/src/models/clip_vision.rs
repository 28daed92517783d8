//! The CLIP vision transformer (ViT) in transformers' `CLIPVisionModelWithProjection` layout, as ComfyUI
//! runs it (`comfy/clip_model.py`: `CLIPVisionModelProjection`): keys `vision_model.{embeddings.
//! {class_embedding, patch_embedding, position_embedding}, pre_layrnorm, encoder.layers.N.*,
//! post_layernorm}` and `visual_projection.weight`. The encoder layers are the text model's
//! (`clip.rs`), run without the causal mask.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::clip::EncoderLayer;
use super::layers::{layer_norm, linear_no_bias, LayerNorm, Linear};
use crate::checkpoint::WPath;

/// Hyper-parameters, named as in transformers' `CLIPVisionConfig`, with the preprocessing ComfyUI
/// reads from the same JSON (`image_mean`, `image_std`; OpenAI's values when absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    /// Not visible in the weights: ComfyUI's configs say 16 for ViT-L, ViT-H and ViT-bigG.
    pub num_attention_heads: i64,
    /// Side of the square patches, in pixels.
    pub patch_size: i64,
    /// Side of the square input, in pixels (224, or 336 for ViT-L/14-336).
    pub image_size: i64,
    /// Width of `image_embeds`.
    pub projection_dim: i64,
    /// "quick_gelu" (OpenAI's ViT-L) or "gelu" (OpenCLIP's ViT-H and ViT-bigG).
    pub hidden_act: String,
    /// Per-channel normalisation of the RGB input (CLIP's training statistics).
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

/// OpenAI CLIP's image statistics (`comfy/clip_vision.py` defaults).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl ClipVisionConfig {
    /// OpenAI CLIP ViT-L/14 (ComfyUI's `clip_vision_config_vitl.json`).
    pub fn vit_l() -> Self {
        ClipVisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            image_size: 224,
            projection_dim: 768,
            hidden_act: "quick_gelu".into(),
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// OpenAI CLIP ViT-L/14 at 336 pixels (`clip_vision_config_vitl_336.json`).
    pub fn vit_l_336() -> Self {
        ClipVisionConfig { image_size: 336, ..Self::vit_l() }
    }

    /// OpenCLIP ViT-H/14 (`clip_vision_config_h.json`; the IP-Adapter "SD 1.5" image encoder).
    pub fn vit_h() -> Self {
        ClipVisionConfig { hidden_size: 1280, intermediate_size: 5120, num_hidden_layers: 32, projection_dim: 1024, hidden_act: "gelu".into(), ..Self::vit_l() }
    }

    /// OpenCLIP ViT-bigG/14 (`clip_vision_config_g.json`).
    pub fn vit_g() -> Self {
        ClipVisionConfig { hidden_size: 1664, intermediate_size: 8192, num_hidden_layers: 48, projection_dim: 1280, hidden_act: "gelu".into(), ..Self::vit_l() }
    }

    /// Patches plus the class token.
    pub fn num_positions(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// What ComfyUI's `encode_image` returns for a CLIP model (`CLIP_VISION_OUTPUT`).
pub struct ClipVisionOutput {
    /// The last layer's output, `[b, positions, hidden]`, without the post-layernorm.
    pub last_hidden_state: Tensor,
    /// The second-to-last layer's output, `[b, positions, hidden]`, raw.
    pub penultimate_hidden_states: Tensor,
    /// `visual_projection(post_layernorm(class token))`, `[b, projection_dim]`.
    pub image_embeds: Tensor,
}

pub struct ClipVisionModel {
    pub config: ClipVisionConfig,
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
}

impl ClipVisionModel {
    /// `p` is the root holding `vision_model.*` and `visual_projection.*`.
    pub fn new(p: &WPath, config: ClipVisionConfig) -> Self {
        let (d, patch) = (config.hidden_size, config.patch_size);
        let v = p.pp("vision_model");
        let e = v.pp("embeddings");
        ClipVisionModel {
            class_embedding: e.get("class_embedding", &[d]),
            // A convolution with stride = kernel = patch size and no bias (CLIP's `conv1`).
            patch_embedding: e.pp("patch_embedding").get("weight", &[d, 3, patch, patch]),
            position_embedding: e.pp("position_embedding").get("weight", &[config.num_positions(), d]),
            // transformers' spelling.
            pre_layrnorm: layer_norm(&v.pp("pre_layrnorm"), d, 1e-5),
            layers: (0..config.num_hidden_layers).map(|i| EncoderLayer::hf(&v.pp("encoder").pp("layers").pp(i), d, config.intermediate_size)).collect(),
            post_layernorm: layer_norm(&v.pp("post_layernorm"), d, 1e-5),
            visual_projection: linear_no_bias(&p.pp("visual_projection"), d, config.projection_dim),
            config,
        }
    }

    /// The same model from OpenCLIP's `VisionTransformer` keys under `p` (`visual.` in an OpenCLIP
    /// file, `embedder.model.visual.` in an SD 2.1 unCLIP checkpoint): `class_embedding`, `conv1`,
    /// `positional_embedding`, `ln_pre`, `transformer.resblocks.N.*`, `ln_post` and `proj`. ComfyUI
    /// renames these to transformers' names (`clip_vision.convert_to_transformers`: q, k and v split
    /// out of `in_proj_weight`, `proj` transposed into `visual_projection.weight`); reading them in place
    /// computes the same.
    pub fn open_clip(p: &WPath, config: ClipVisionConfig) -> Self {
        let (d, patch) = (config.hidden_size, config.patch_size);
        let proj = p.get("proj", &[d, config.projection_dim]);
        ClipVisionModel {
            class_embedding: p.get("class_embedding", &[d]),
            patch_embedding: p.pp("conv1").get("weight", &[d, 3, patch, patch]),
            position_embedding: p.get("positional_embedding", &[config.num_positions(), d]),
            pre_layrnorm: layer_norm(&p.pp("ln_pre"), d, 1e-5),
            layers: (0..config.num_hidden_layers)
                .map(|i| EncoderLayer::open_clip(&p.pp("transformer").pp("resblocks").pp(i), d, config.intermediate_size))
                .collect(),
            post_layernorm: layer_norm(&p.pp("ln_post"), d, 1e-5),
            // x @ proj, as a linear layer: weight = projᵀ.
            visual_projection: Linear { weight: proj.tr(), bias: None },
            config,
        }
    }

    /// Runs the model on normalised pixels `[b, 3, image_size, image_size]` (see
    /// `clip_preprocess`), in the weights' kind.
    pub fn forward(&self, pixel_values: &Tensor) -> ClipVisionOutput {
        let patch = self.config.patch_size;
        let pixels = pixel_values.to_device(self.class_embedding.device()).to_kind(self.class_embedding.kind());
        let b = pixels.size()[0];
        let embeds = pixels.conv2d(&self.patch_embedding, None::<Tensor>, [patch, patch], [0, 0], [1, 1], 1).flatten(2, -1).transpose(1, 2);
        let class = self.class_embedding.view([1, 1, -1]).expand([b, 1, -1], false);
        let x = Tensor::cat(&[class, embeds], 1) + self.position_embedding.unsqueeze(0);
        let mut x = self.pre_layrnorm.forward(&x);
        // ComfyUI asks the encoder for intermediate output -2: the output of layer n - 2.
        let penultimate_index = self.layers.len() as i64 - 2;
        let mut penultimate = None;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, self.config.num_attention_heads, &self.config.hidden_act, false);
            if i as i64 == penultimate_index {
                penultimate = Some(x.shallow_clone());
            }
        }
        let pooled = self.post_layernorm.forward(&x.select(1, 0));
        ClipVisionOutput {
            image_embeds: self.visual_projection.forward(&pooled),
            // The loader refuses fewer than two layers, so there is always a penultimate layer.
            penultimate_hidden_states: penultimate.unwrap_or_else(|| x.shallow_clone()),
            last_hidden_state: x,
        }
    }
}

/// ComfyUI's `clip_preprocess` on an IMAGE `[b, h, w, c]` in 0..1: the first three channels, resized
/// (bicubic with antialiasing) so that the short side is `size` and centre-cropped (`crop`), or
/// squashed to `size`×`size`; quantised to 8-bit steps and normalised with `mean` and `std`. Returns
/// `[b, 3, size, size]` in the image's kind.
pub fn clip_preprocess(image: &Tensor, size: i64, mean: [f64; 3], std: [f64; 3], crop: bool) -> Result<Tensor, tch::TchError> {
    let s = image.size();
    let image = if s[3] > 3 { image.narrow(3, 0, 3) } else { image.shallow_clone() };
    let mut image = image.movedim([-1], [1]);
    let (h, w) = (s[1], s[2]);
    if !(h == size && w == size) {
        let scale_size = if crop {
            let scale = size as f64 / h.min(w) as f64;
            // Python's round: halves to even.
            ((scale * h as f64).round_ties_even() as i64, (scale * w as f64).round_ties_even() as i64)
        } else {
            (size, size)
        };
        image = image.f_internal_upsample_bicubic2d_aa([scale_size.0, scale_size.1], false, None, None)?;
        let top = (scale_size.0 - size).div_euclid(2);
        let left = (scale_size.1 - size).div_euclid(2);
        image = image.narrow(2, top, size).narrow(3, left, size);
    }
    let image = (image * 255.0).clamp(0.0, 255.0).round() / 255.0;
    let opts = (image.kind(), image.device());
    let mean = Tensor::from_slice(&mean).to_kind(opts.0).to_device(opts.1).view([3, 1, 1]);
    let std = Tensor::from_slice(&std).to_kind(opts.0).to_device(opts.1).view([3, 1, 1]);
    Ok((image - mean) / std)
}
