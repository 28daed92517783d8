//! TencentARC's T2I style adapter (`comfy/t2i_adapter/adapter.py`: `StyleAdapter`): learned style
//! tokens appended to the CLIP vision model's last hidden state, run through OpenCLIP-style
//! transformer layers, and projected to the text encoder's width. Keys: `style_embedding`, `ln_pre`,
//! `transformer_layes.N.{ln_1, attn.in_proj_{weight,bias}, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`
//! (the misspelling is the checkpoint's), `ln_post`, `proj`.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::clip::EncoderLayer;
use super::layers::{layer_norm, LayerNorm};
use crate::checkpoint::WPath;

/// Hyper-parameters, named as `StyleAdapter.__init__`'s arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StyleAdapterConfig {
    /// Width of the vision states it reads (the CLIP vision model's hidden size).
    pub width: i64,
    /// Width of the tokens it makes (the text encoder's).
    pub context_dim: i64,
    /// Not visible in the weights: ComfyUI's `load_style_model` says 8.
    pub num_head: i64,
    pub n_layes: i64,
    pub num_token: i64,
}

impl Default for StyleAdapterConfig {
    /// ComfyUI's `load_style_model` (`t2iadapter_style_sd14v1.pth`).
    fn default() -> Self {
        StyleAdapterConfig { width: 1024, context_dim: 768, num_head: 8, n_layes: 3, num_token: 8 }
    }
}

pub struct StyleAdapter {
    pub config: StyleAdapterConfig,
    style_embedding: Tensor,
    ln_pre: LayerNorm,
    layers: Vec<EncoderLayer>,
    ln_post: LayerNorm,
    proj: Tensor,
}

impl StyleAdapter {
    pub fn new(p: &WPath, config: StyleAdapterConfig) -> Self {
        let w = config.width;
        StyleAdapter {
            style_embedding: p.get("style_embedding", &[1, config.num_token, w]),
            ln_pre: layer_norm(&p.pp("ln_pre"), w, 1e-5),
            // ResidualAttentionBlock: nn.MultiheadAttention and a quick-GELU MLP four times as wide.
            layers: (0..config.n_layes).map(|i| EncoderLayer::open_clip(&p.pp("transformer_layes").pp(i), w, 4 * w)).collect(),
            ln_post: layer_norm(&p.pp("ln_post"), w, 1e-5),
            // Stored as [width, context_dim] and applied as `x @ proj`.
            proj: p.get("proj", &[w, config.context_dim]),
            config,
        }
    }

    /// Style tokens `[b, num_token, context_dim]` for vision states `x` `[b, positions, width]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = self.style_embedding.kind();
        let x = x.to_device(self.style_embedding.device()).to_kind(kind);
        let b = x.size()[0];
        let style = self.style_embedding.expand([b, -1, -1], false);
        // The adapter's LayerNorm subclass computes in float32; libtorch's layer norm accumulates in
        // float32 for half-precision inputs too.
        let mut x = self.ln_pre.forward(&Tensor::cat(&[x, style], 1));
        for layer in &self.layers {
            x = layer.forward(&x, self.config.num_head, "quick_gelu", false);
        }
        let n = x.size()[1];
        let x = self.ln_post.forward(&x.narrow(1, n - self.config.num_token, self.config.num_token));
        x.matmul(&self.proj)
    }
}
