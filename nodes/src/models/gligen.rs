//! GLIGEN for SD 1.x (ComfyUI `comfy/gligen.py`, text boxes only): a position net that turns each box
//! and its phrase's pooled CLIP embedding into a grounding token, and one gated self-attention block
//! ("fuser") per UNet spatial transformer that lets the visual tokens attend to those grounding tokens.
//!
//! Keys as ComfyUI's GLIGEN files have them (the pruned `gligen_sd14_textbox_pruned.safetensors`):
//! `position_net.{linears.0, linears.2, linears.4, null_positive_feature, null_position_feature}` and,
//! per transformer, `{input_blocks.N, middle_block, output_blocks.N}.M.transformer_blocks.0.fuser.{linear,
//! attn.{to_q, to_k, to_v, to_out.0}, ff.net.0.proj, ff.net.2, norm1, norm2, alpha_attn, alpha_dense}`.
//! As ComfyUI's `load_gligen`, the fusers are found by walking `input_blocks.0..19`, `middle_block.0..19`
//! and `output_blocks.0..19` for keys containing `.fuser.`; their order is the order the UNet's forward
//! pass meets its transformers, which is how the middle patch picks one (`transformer_index`).

use std::path::Path;
use std::rc::Rc;

use diffloom_core::value::Shared;
use diffloom_core::NodeError;
use tch::{Device, Kind, Tensor};

use super::attention::{CrossAttention, FeedForward};
use super::layers::{layer_norm, linear, LayerNorm, Linear};
use crate::checkpoint::safetensors::SafetensorsFile;
use crate::checkpoint::{LoadError, WPath, Weights};
use crate::patches::{AttnCx, MiddlePatch};

/// Objects (boxes) a GLIGEN conditioning holds at most (ComfyUI's `Gligen.max_objs`); the rest of the
/// 30 slots are padding that the position net replaces by its learnt null features.
pub const MAX_OBJS: usize = 30;

/// Fourier frequencies per box coordinate (ComfyUI's `PositionNet(fourier_freqs=8)`).
const FOURIER_FREQS: i64 = 8;

/// Width of a box's Fourier embedding: sin and cos of each frequency for the 4 coordinates.
const POSITION_DIM: i64 = FOURIER_FREQS * 2 * 4;

/// `x` `[.., 4]` → `[.., 64]`: for each frequency `100^(k/8)` (float32, as ComfyUI's
/// `FourierEmbedder(temperature=100)` computes them) `sin(f·x)` then `cos(f·x)`, concatenated.
pub fn fourier_embed(x: &Tensor) -> Tensor {
    let exponents = Tensor::arange(FOURIER_FREQS, (Kind::Float, Device::Cpu)) / FOURIER_FREQS as f64;
    let freqs = Tensor::pow_scalar(100i64, &exponents);
    let mut parts = Vec::with_capacity(2 * FOURIER_FREQS as usize);
    for k in 0..FOURIER_FREQS {
        let fx = x * freqs.get(k).to_device(x.device());
        parts.push(fx.sin());
        parts.push(fx.cos());
    }
    Tensor::cat(&parts, -1)
}

/// The position net (`position_net.*`): `[phrase embedding, Fourier(box)]` through three linear layers
/// (SiLU between) into one grounding token per object.
pub struct PositionNet {
    linears: [Linear; 3],
    null_positive: Tensor,
    null_position: Tensor,
    /// Width of a phrase embedding (the text encoder's pooled output, 768 for SD 1.x).
    pub in_dim: i64,
    /// Width of a grounding token.
    pub out_dim: i64,
}

impl PositionNet {
    pub fn new(p: &WPath, in_dim: i64, out_dim: i64) -> Self {
        let l = p.pp("linears");
        PositionNet {
            linears: [linear(&l.pp(0), in_dim + POSITION_DIM, 512), linear(&l.pp(2), 512, 512), linear(&l.pp(4), 512, out_dim)],
            null_positive: p.get("null_positive_feature", &[in_dim]),
            null_position: p.get("null_position_feature", &[POSITION_DIM]),
            in_dim,
            out_dim,
        }
    }

    /// Grounding tokens `[b, n, out_dim]` (float32) from `boxes` `[b, n, 4]` (x1, y1, x2, y2 as
    /// fractions of the latent), `masks` `[b, n]` (1 for a real object, 0 for padding) and phrase
    /// embeddings `[b, n, in_dim]`. ComfyUI's layers cast their weights to the input's dtype, float32
    /// here whatever the model is stored in.
    pub fn forward(&self, boxes: &Tensor, masks: &Tensor, embeddings: &Tensor) -> Tensor {
        let f32 = |t: &Tensor| t.to_kind(Kind::Float);
        let masks = masks.unsqueeze(-1);
        let xyxy = fourier_embed(boxes);
        let positive_null = f32(&self.null_positive).view([1, 1, -1]);
        let xyxy_null = f32(&self.null_position).view([1, 1, -1]);
        let inverse = masks.neg() + 1.0;
        let embeddings = embeddings * &masks + &inverse * positive_null;
        let xyxy = xyxy * &masks + &inverse * xyxy_null;
        let mut h = Tensor::cat(&[embeddings, xyxy], -1);
        for (i, l) in self.linears.iter().enumerate() {
            h = h.linear(&f32(&l.weight), l.bias.as_ref().map(f32).as_ref());
            if i < 2 {
                h = h.silu();
            }
        }
        h
    }
}

/// One transformer's fuser (`…transformer_blocks.0.fuser.*`, ComfyUI's `GatedSelfAttentionDense`):
/// self-attention over the visual tokens and the projected grounding tokens together, of which the
/// visual part is added back gated by `tanh(alpha_attn)`, then a gated GEGLU feed-forward.
pub struct GatedSelfAttentionDense {
    linear: Linear,
    attn: CrossAttention,
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    alpha_attn: Tensor,
    alpha_dense: Tensor,
    /// Width of the visual tokens (the transformer's).
    pub query_dim: i64,
    /// Width of the grounding tokens it takes.
    pub key_dim: i64,
    pub heads: i64,
}

impl GatedSelfAttentionDense {
    pub fn new(p: &WPath, query_dim: i64, key_dim: i64, heads: i64, dim_head: i64) -> Self {
        GatedSelfAttentionDense {
            linear: linear(&p.pp("linear"), key_dim, query_dim),
            attn: CrossAttention::new(&p.pp("attn"), query_dim, query_dim, heads, dim_head),
            ff: FeedForward::new(&p.pp("ff"), query_dim),
            norm1: layer_norm(&p.pp("norm1"), query_dim, 1e-5),
            norm2: layer_norm(&p.pp("norm2"), query_dim, 1e-5),
            alpha_attn: p.get("alpha_attn", &[]),
            alpha_dense: p.get("alpha_dense", &[]),
            query_dim,
            key_dim,
            heads,
        }
    }

    /// `x` `[b, n_visual, query_dim]`, `objs` `[b, n_objs, key_dim]` in x's kind and on its device.
    pub fn forward(&self, x: &Tensor, objs: &Tensor) -> Tensor {
        let n_visual = x.size()[1];
        let objs = self.linear.forward(objs);
        let attended = self.attn.forward(&self.norm1.forward(&Tensor::cat(&[x, &objs], 1)), None).narrow(1, 0, n_visual);
        let x = x + self.alpha_attn.tanh() * attended;
        let dense = self.ff.forward(&self.norm2.forward(&x));
        &x + self.alpha_dense.tanh() * dense
    }
}

/// A loaded GLIGEN model: the fusers in the UNet's transformer order and the position net.
pub struct Gligen {
    /// Each fuser with the key prefix it was read from (`input_blocks.1.1.transformer_blocks.0.fuser`).
    pub fusers: Vec<(String, GatedSelfAttentionDense)>,
    pub position_net: PositionNet,
    /// Width of the grounding tokens (and of the zero phrase embeddings that pad the 30 slots).
    pub key_dim: i64,
}

/// Where a GLIGEN file's fusers sit, as the file's key prefixes with their visual width, in
/// `load_gligen`'s order.
pub type FuserLayout = Vec<(String, i64)>;

impl Gligen {
    /// Declares the model's tensors: fusers at `layout` (key prefix, visual width) taking `key_dim`-wide
    /// grounding tokens, and a position net from `in_dim`-wide phrase embeddings.
    pub fn new(p: &WPath, layout: &[(String, i64)], in_dim: i64, key_dim: i64) -> Self {
        let fusers = layout
            .iter()
            .map(|(prefix, query_dim)| {
                let (heads, dim_head) = fuser_heads(*query_dim, key_dim);
                (prefix.clone(), GatedSelfAttentionDense::new(&p.pp(prefix), *query_dim, key_dim, heads, dim_head))
            })
            .collect();
        Gligen { fusers, position_net: PositionNet::new(&p.pp("position_net"), in_dim, key_dim), key_dim }
    }

    /// The grounding tokens for a latent batch of `batch` items `h`×`w` latent pixels (the area the
    /// conditioning covers) with `boxes` (ComfyUI's `set_position`): each box's corners as fractions of
    /// the latent, the phrases' pooled embeddings, zeros and mask 0 in the unused slots; `[batch, 30,
    /// key_dim]`, float32 on `device`.
    pub fn position_tokens(&self, batch: i64, h: i64, w: i64, boxes: &[GligenBox], device: Device) -> Result<Tensor, NodeError> {
        if boxes.len() > MAX_OBJS {
            return Err(NodeError::Failed(format!("GLIGEN takes at most {MAX_OBJS} boxes per conditioning, this one has {}", boxes.len())));
        }
        let mut coords = vec![0f32; MAX_OBJS * 4];
        let mut masks = vec![0f32; MAX_OBJS];
        let mut embeddings = Vec::with_capacity(boxes.len() + 1);
        for (i, b) in boxes.iter().enumerate() {
            // Python's int / int: float64, then float32 in torch.tensor.
            let (x1, y1) = (b.x as f64 / w as f64, b.y as f64 / h as f64);
            let (x2, y2) = ((b.x + b.width) as f64 / w as f64, (b.y + b.height) as f64 / h as f64);
            coords[i * 4..i * 4 + 4].copy_from_slice(&[x1 as f32, y1 as f32, x2 as f32, y2 as f32]);
            masks[i] = 1.0;
            let e = b.pooled.to_kind(Kind::Float).reshape([1, -1]);
            if e.size()[1] != self.position_net.in_dim {
                return Err(NodeError::Failed(format!(
                    "a GLIGEN box's text embedding is {} wide, the GLIGEN model takes {} (a text encoder of another family?)",
                    e.size()[1],
                    self.position_net.in_dim
                )));
            }
            embeddings.push(e);
        }
        if boxes.len() < MAX_OBJS {
            embeddings.push(Tensor::zeros([(MAX_OBJS - boxes.len()) as i64, self.key_dim], (Kind::Float, Device::Cpu)));
        }
        let repeat = |t: Tensor| t.unsqueeze(0).repeat([batch, 1, 1]).to_device(device);
        let coords = repeat(Tensor::from_slice(&coords).view([MAX_OBJS as i64, 4]));
        let masks = Tensor::from_slice(&masks).unsqueeze(0).repeat([batch, 1]).to_device(device);
        let embeddings = repeat(Tensor::cat(&embeddings, 0));
        Ok(self.position_net.forward(&coords, &masks, &embeddings))
    }
}

/// ComfyUI's head rule for a fuser: 8 heads for SD 1.x's 768-wide grounding tokens, else 64-wide heads.
fn fuser_heads(query_dim: i64, key_dim: i64) -> (i64, i64) {
    if key_dim == 768 {
        (8, query_dim / 8)
    } else {
        (query_dim / 64, 64)
    }
}

/// One GLIGENTextBoxApply box: the phrase's pooled (unprojected) CLIP embedding `[1, dim]` and the box
/// in latent pixels (ComfyUI's `(cond_pooled, height // 8, width // 8, y // 8, x // 8)`).
#[derive(Clone)]
pub struct GligenBox {
    pub pooled: Shared,
    pub height: i64,
    pub width: i64,
    pub y: i64,
    pub x: i64,
}

/// A GLIGEN value (GLIGENLoader's output): the model and its file name.
pub struct GligenModel {
    pub model: Rc<Gligen>,
    pub name: String,
}

/// What GLIGENTextBoxApply puts on a conditioning entry (ComfyUI's `("position", model, params)`).
pub struct GligenCond {
    pub model: Rc<Gligen>,
    /// The GLIGEN file's name, for errors.
    pub name: String,
    pub boxes: Vec<GligenBox>,
}

/// The fuser layout of a GLIGEN file from its keys (ComfyUI's walk in `load_gligen`), with each
/// fuser's visual width from `linear.weight`, and the grounding-token width.
fn fuser_layout(path: &Path, file: &SafetensorsFile) -> Result<(FuserLayout, i64), LoadError> {
    let unsupported = |message: String| LoadError::Unsupported { file: path.to_path_buf(), message };
    let mut names: Vec<&String> = file.tensors().keys().filter(|k| k.contains(".fuser.")).collect();
    names.sort();
    let mut layout = Vec::new();
    let mut key_dim = None;
    for a in ["input_blocks", "middle_block", "output_blocks"] {
        for b in 0..20 {
            let site = format!("{a}.{b}.");
            let mut prefixes: Vec<&str> = names.iter().filter(|k| k.contains(&site)).filter_map(|k| k.rfind(".fuser.").map(|i| &k[..i + 6])).collect();
            prefixes.sort_unstable();
            prefixes.dedup();
            match prefixes.as_slice() {
                [] => continue,
                [prefix] => {
                    let key = format!("{prefix}.linear.weight");
                    let shape = file.info(&key).map(|i| i.shape.clone()).ok_or_else(|| LoadError::Missing { file: path.to_path_buf(), key: key.clone() })?;
                    let &[query_dim, kd] = shape.as_slice() else {
                        return Err(unsupported(format!("{key} has shape {shape:?}, expected [visual width, grounding width]")));
                    };
                    if *key_dim.get_or_insert(kd) != kd {
                        return Err(unsupported(format!("{key} takes {kd}-wide grounding tokens, other fusers {}-wide", key_dim.unwrap_or(kd))));
                    }
                    let (heads, dim_head) = fuser_heads(query_dim, kd);
                    if heads < 1 || heads * dim_head != query_dim {
                        return Err(unsupported(format!(
                            "{key}: a {query_dim}-wide fuser does not split into ComfyUI's attention heads ({heads} of {dim_head})"
                        )));
                    }
                    layout.push((prefix.to_string(), query_dim));
                }
                several => return Err(unsupported(format!("several fusers under {site}* ({}); SD 1.x GLIGEN has one per transformer", several.join(", ")))),
            }
        }
    }
    let Some(key_dim) = key_dim else {
        return Err(unsupported("not a GLIGEN model: no gated self-attention (\"…transformer_blocks.0.fuser.*\") keys".into()));
    };
    Ok((layout, key_dim))
}

/// Loads a GLIGEN text-box model (ComfyUI's `load_gligen`) in `kind` on `device`; returns it and its
/// size in bytes. A file without the text-box position net (an image-grounded GLIGEN, or not GLIGEN at
/// all) is refused by name.
pub fn load_gligen(path: &Path, device: Device, kind: Kind) -> Result<(Gligen, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let unsupported = |message: String| LoadError::Unsupported { file: path.to_path_buf(), message };
    let Some(null_positive) = file.info("position_net.null_positive_feature").map(|i| i.shape.clone()) else {
        let message = if file.tensors().keys().any(|k| k.starts_with("position_net.")) {
            "a GLIGEN model without the text-box position net (\"position_net.null_positive_feature\"); ComfyUI and diffloom run text-box GLIGEN only"
        } else {
            "not a GLIGEN model: no \"position_net.null_positive_feature\" (GLIGENLoader takes ComfyUI's gligen_sd14_textbox_pruned files)"
        };
        return Err(unsupported(message.into()));
    };
    let (layout, key_dim) = fuser_layout(path, &file)?;
    let &[in_dim] = null_positive.as_slice() else {
        return Err(unsupported(format!("position_net.null_positive_feature has shape {null_positive:?}, expected [width]")));
    };
    let out = file.info("position_net.linears.4.weight").map(|i| i.shape.clone()).unwrap_or_default();
    if out.first() != Some(&key_dim) {
        return Err(unsupported(format!("position_net.linears.4.weight has shape {out:?}; the fusers take {key_dim}-wide grounding tokens")));
    }
    if in_dim != key_dim {
        // ComfyUI pads the phrase embeddings with key_dim-wide zeros, which only fits when they agree.
        return Err(unsupported(format!(
            "the position net takes {in_dim}-wide phrase embeddings but makes {key_dim}-wide tokens; ComfyUI's GLIGEN needs both equal"
        )));
    }
    let w = Weights::from_prefix(file.clone(), "", device, kind);
    let model = Gligen::new(&w.root(), &layout, in_dim, key_dim);
    w.finish()?;
    Ok((model, w.loaded_bytes()))
}

/// The middle patch a GLIGEN conditioning gives its batch: the grounding tokens computed for that
/// batch, through the fuser of the transformer being run (ComfyUI's `Gligen._set_position` closure).
pub struct GligenPatch {
    pub model: Rc<Gligen>,
    /// `[b, 30, key_dim]`, float32.
    pub objs: Tensor,
}

impl MiddlePatch for GligenPatch {
    fn apply(&self, x: Tensor, transformer_index: usize, _cx: &AttnCx<'_>) -> Result<Tensor, NodeError> {
        let Some((_, fuser)) = self.model.fusers.get(transformer_index) else {
            return Err(NodeError::Failed(format!(
                "the GLIGEN model has {} fusers, the UNet has a transformer numbered {transformer_index}",
                self.model.fusers.len()
            )));
        };
        // Computed in the fuser's kind (ComfyUI casts the weights to the activation's instead; the same
        // wherever the GLIGEN model is loaded in the UNet's kind, as GLIGENLoader does).
        let kind = fuser.linear.weight.kind();
        let out = fuser.forward(&x.to_kind(kind), &self.objs.to_device(x.device()).to_kind(kind));
        Ok(out.to_kind(x.kind()))
    }
}
