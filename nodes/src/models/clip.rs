//! The CLIP text transformer in its two checkpoint layouts: OpenAI CLIP as transformers names it (SD 1.x,
//! `cond_stage_model.transformer.text_model.*`) and OpenCLIP's own (SD 2.x, `cond_stage_model.model.*`,
//! fused `in_proj_weight`).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::attention::attention;
use super::layers::{layer_norm, linear, LayerNorm, Linear};
use crate::checkpoint::WPath;

/// Which key layout the weights use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipLayout {
    /// transformers' `CLIPTextModel` names (`encoder.layers.N.self_attn.q_proj`).
    Hf,
    /// OpenCLIP names (`transformer.resblocks.N.attn.in_proj_weight`).
    OpenClip,
}

/// Hyper-parameters, named as in transformers' `CLIPTextConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    /// "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP ViT-H).
    pub hidden_act: String,
    pub layout: ClipLayout,
    pub projection_dim: i64,
}

impl ClipConfig {
    /// OpenAI CLIP ViT-L/14 text model (SD 1.x), `openai/clip-vit-large-patch14` config.json.
    pub fn vit_l() -> Self {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 768,
            num_layers: 12,
            num_heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layout: ClipLayout::Hf,
            projection_dim: 768,
        }
    }

    /// OpenCLIP ViT-H/14 text model (SD 2.x), open_clip `model_configs/ViT-H-14.json`.
    pub fn vit_h() -> Self {
        ClipConfig {
            hidden_size: 1024,
            num_layers: 24,
            num_heads: 16,
            intermediate_size: 4096,
            hidden_act: "gelu".into(),
            layout: ClipLayout::OpenClip,
            projection_dim: 1024,
            ..Self::vit_l()
        }
    }
}

/// The attention projections: separate in the HF layout, fused in OpenCLIP's (split in forward).
enum Qkv {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// One pre-norm transformer layer (attention, then MLP), shared by the text model, the vision model
/// (`clip_vision.rs`) and the style adapter (`style_adapter.rs`).
pub(crate) struct EncoderLayer {
    ln1: LayerNorm,
    qkv: Qkv,
    out_proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Which hidden state [`ClipTextModel::encode`] returns, as ComfyUI's `SDClipModel` chooses it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClipOutput {
    /// The last layer's output after the final layer norm.
    Last,
    /// The output of layer `index` (negative counts from the end: -1 last, -2 penultimate), with the
    /// final layer norm applied when `layer_norm` (SD 1.x does, SD 2.x does not).
    Hidden { index: i64, layer_norm: bool },
}

pub struct ClipTextModel {
    pub config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// `p` is the text model's root: `…transformer.text_model` (HF) or `…model` (OpenCLIP).
    pub fn new(p: &WPath, config: ClipConfig) -> Self {
        let d = config.hidden_size;
        let inter = config.intermediate_size;
        let model = match config.layout {
            ClipLayout::Hf => {
                let layers = (0..config.num_layers).map(|i| EncoderLayer::hf(&p.pp("encoder").pp("layers").pp(i), d, inter)).collect();
                let e = p.pp("embeddings");
                ClipTextModel {
                    token_embedding: e.pp("token_embedding").get("weight", &[config.vocab_size, d]),
                    position_embedding: e.pp("position_embedding").get("weight", &[config.max_position_embeddings, d]),
                    layers,
                    final_layer_norm: layer_norm(&p.pp("final_layer_norm"), d, 1e-5),
                    config: config.clone(),
                }
            }
            ClipLayout::OpenClip => {
                let layers = (0..config.num_layers).map(|i| EncoderLayer::open_clip(&p.pp("transformer").pp("resblocks").pp(i), d, inter)).collect();
                ClipTextModel {
                    token_embedding: p.pp("token_embedding").get("weight", &[config.vocab_size, d]),
                    position_embedding: p.get("positional_embedding", &[config.max_position_embeddings, d]),
                    layers,
                    final_layer_norm: layer_norm(&p.pp("ln_final"), d, 1e-5),
                    config: config.clone(),
                }
            }
        };
        model
    }

    /// Hidden states `[b, n, hidden]` for token ids `tokens` `[b, n]` (n ≤ max positions).
    pub fn encode(&self, tokens: &Tensor, output: ClipOutput) -> Tensor {
        self.encode_embeddings(&self.embed_tokens(tokens), output)
    }

    /// Token embeddings `[b, n, hidden]` (before positions); textual inversions replace rows of these.
    pub fn embed_tokens(&self, tokens: &Tensor) -> Tensor {
        let tokens = tokens.to_device(self.token_embedding.device()).to_kind(Kind::Int64);
        Tensor::embedding(&self.token_embedding, &tokens, -1, false, false)
    }

    /// Runs the transformer on token embeddings `x` `[b, n, hidden]`.
    pub fn encode_embeddings(&self, x: &Tensor, output: ClipOutput) -> Tensor {
        let n = x.size()[1];
        let mut x = x + self.position_embedding.narrow(0, 0, n).unsqueeze(0);
        let stop = match output {
            ClipOutput::Last => self.layers.len() as i64 - 1,
            ClipOutput::Hidden { index, .. } if index < 0 => self.layers.len() as i64 + index,
            ClipOutput::Hidden { index, .. } => index,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, self.config.num_heads, &self.config.hidden_act, true);
            if i as i64 == stop {
                break;
            }
        }
        match output {
            ClipOutput::Last | ClipOutput::Hidden { layer_norm: true, .. } => self.final_layer_norm.forward(&x),
            ClipOutput::Hidden { layer_norm: false, .. } => x,
        }
    }

    /// Where the weights live.
    pub fn device(&self) -> tch::Device {
        self.token_embedding.device()
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> i64 {
        self.layers.len() as i64
    }
}

impl EncoderLayer {
    /// transformers' `CLIPEncoderLayer` keys under `l`: `layer_norm1`, `self_attn.{q,k,v,out}_proj`,
    /// `layer_norm2`, `mlp.fc1`, `mlp.fc2`.
    pub(crate) fn hf(l: &WPath, d: i64, inter: i64) -> Self {
        let a = l.pp("self_attn");
        EncoderLayer {
            ln1: layer_norm(&l.pp("layer_norm1"), d, 1e-5),
            qkv: Qkv::Separate { q: linear(&a.pp("q_proj"), d, d), k: linear(&a.pp("k_proj"), d, d), v: linear(&a.pp("v_proj"), d, d) },
            out_proj: linear(&a.pp("out_proj"), d, d),
            ln2: layer_norm(&l.pp("layer_norm2"), d, 1e-5),
            fc1: linear(&l.pp("mlp").pp("fc1"), d, inter),
            fc2: linear(&l.pp("mlp").pp("fc2"), inter, d),
        }
    }

    /// OpenCLIP's `ResidualAttentionBlock` keys under `l`: `ln_1`, `attn.in_proj_{weight,bias}`,
    /// `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`.
    pub(crate) fn open_clip(l: &WPath, d: i64, inter: i64) -> Self {
        let a = l.pp("attn");
        EncoderLayer {
            ln1: layer_norm(&l.pp("ln_1"), d, 1e-5),
            // nn.MultiheadAttention stores q, k and v stacked: [3d, d] and [3d].
            qkv: Qkv::Fused(Linear { weight: a.get("in_proj_weight", &[3 * d, d]), bias: Some(a.get("in_proj_bias", &[3 * d])) }),
            out_proj: linear(&a.pp("out_proj"), d, d),
            ln2: layer_norm(&l.pp("ln_2"), d, 1e-5),
            fc1: linear(&l.pp("mlp").pp("c_fc"), d, inter),
            fc2: linear(&l.pp("mlp").pp("c_proj"), inter, d),
        }
    }

    /// `x` `[b, n, d]`; `causal` masks later tokens (the text model), `act` is "quick_gelu" or "gelu".
    pub(crate) fn forward(&self, x: &Tensor, heads: i64, act: &str, causal: bool) -> Tensor {
        let h = self.ln1.forward(x);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q, k, v } => (q.forward(&h), k.forward(&h), v.forward(&h)),
            Qkv::Fused(proj) => {
                let parts = proj.forward(&h).chunk(3, -1);
                (parts[0].shallow_clone(), parts[1].shallow_clone(), parts[2].shallow_clone())
            }
        };
        let x = x + self.out_proj.forward(&attention(&q, &k, &v, heads, causal));
        let h = self.fc1.forward(&self.ln2.forward(&x));
        let h = match act {
            // OpenAI CLIP's activation: x * sigmoid(1.702 x).
            "quick_gelu" => &h * (&h * 1.702).sigmoid(),
            _ => h.gelu("none"),
        };
        x.shallow_clone() + self.fc2.forward(&h)
    }
}
