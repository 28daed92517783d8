//! The UNet's spatial transformer (LDM `ldm/modules/attention.py`): keys `<prefix>.{norm, proj_in,
//! transformer_blocks.N.{attn1, attn2, ff.net.0.proj, ff.net.2, norm1, norm2, norm3}, proj_out}`.

use tch::Tensor;

use diffloom_core::NodeError;

use super::layers::{conv1x1, group_norm, layer_norm, linear, linear_no_bias, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::checkpoint::WPath;
use crate::patches::{AttnCx, AttnReplace, BlockId, CallCx, UnetPatches};

/// Multi-head attention, `to_q`/`to_k`/`to_v` without bias and `to_out.0` with bias. Self-attention
/// when no context is given.
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
}

impl CrossAttention {
    pub fn new(p: &WPath, query_dim: i64, context_dim: i64, heads: i64, dim_head: i64) -> Self {
        let inner = heads * dim_head;
        CrossAttention {
            to_q: linear_no_bias(&p.pp("to_q"), query_dim, inner),
            to_k: linear_no_bias(&p.pp("to_k"), context_dim, inner),
            to_v: linear_no_bias(&p.pp("to_v"), context_dim, inner),
            // nn.Sequential(Linear, Dropout): the linear layer is index 0.
            to_out: linear(&p.pp("to_out").pp(0), inner, query_dim),
            heads,
        }
    }

    /// `x` `[b, n, query_dim]`, `context` `[b, m, context_dim]` (or `x` itself).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(x);
        let (q, k, v) = (self.to_q.forward(x), self.to_k.forward(ctx), self.to_v.forward(ctx));
        self.to_out.forward(&attention(&q, &k, &v, self.heads, false))
    }

    /// Attention with q projected from `x`, k from `context` and v from `value`, computed by `replace`
    /// (a model patch) or the usual way, then projected out.
    fn forward_qkv(&self, x: &Tensor, context: &Tensor, value: &Tensor, replace: Option<(&dyn AttnReplace, &AttnCx<'_>)>) -> Result<Tensor, NodeError> {
        let (q, k, v) = (self.to_q.forward(x), self.to_k.forward(context), self.to_v.forward(value));
        let attended = match replace {
            Some((r, cx)) => r.attend(&q, &k, &v, cx)?,
            None => attention(&q, &k, &v, self.heads, false),
        };
        Ok(self.to_out.forward(&attended))
    }
}

/// Scaled dot-product attention over `heads` heads of `[b, n, heads * d]` projections, returning
/// `[b, n, heads * d]`. `causal` masks out later tokens (CLIP's text transformer).
/// k and v are viewed with q's batch, as ComfyUI's kernels do: a patch that splits q into tiles
/// (HyperTile) makes each tile attend to the matching run of tokens.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64, causal: bool) -> Tensor {
    let b = q.size()[0];
    let split = |t: &Tensor| {
        let s = t.size();
        t.reshape([b, -1, heads, s[2] / heads]).transpose(1, 2)
    };
    let out = Tensor::scaled_dot_product_attention(&split(q), &split(k), &split(v), None::<Tensor>, 0.0, causal, None, false);
    let s = out.size();
    out.transpose(1, 2).reshape([s[0], s[2], s[1] * s[3]])
}

/// GEGLU feed-forward: `net.0.proj` maps to twice the inner width (value and gate), `net.2` back.
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(p: &WPath, dim: i64) -> Self {
        let inner = dim * 4;
        FeedForward { proj_in: linear(&p.pp("net").pp(0).pp("proj"), dim, inner * 2), proj_out: linear(&p.pp("net").pp(2), inner, dim) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj_in.forward(x);
        let parts = h.chunk(2, -1);
        self.proj_out.forward(&(&parts[0] * parts[1].gelu("none")))
    }
}

/// Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual.
pub struct BasicTransformerBlock {
    attn1: CrossAttention,
    attn2: CrossAttention,
    ff: FeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
}

impl BasicTransformerBlock {
    pub fn new(p: &WPath, dim: i64, context_dim: i64, heads: i64, dim_head: i64) -> Self {
        BasicTransformerBlock {
            attn1: CrossAttention::new(&p.pp("attn1"), dim, dim, heads, dim_head),
            attn2: CrossAttention::new(&p.pp("attn2"), dim, context_dim, heads, dim_head),
            ff: FeedForward::new(&p.pp("ff"), dim),
            norm1: layer_norm(&p.pp("norm1"), dim, 1e-5),
            norm2: layer_norm(&p.pp("norm2"), dim, 1e-5),
            norm3: layer_norm(&p.pp("norm3"), dim, 1e-5),
        }
    }

    /// `hooks`: the model's patches and where this block is (ComfyUI's attn1 patches, replacement and
    /// output patches, in that order, then the middle patches); `transformer_index` is the spatial
    /// transformer's place in the UNet (what a middle patch is told).
    pub fn forward(&self, x: &Tensor, context: &Tensor, hooks: Option<(&UnetPatches, &AttnCx<'_>)>, transformer_index: usize) -> Result<Tensor, NodeError> {
        let mut n = self.norm1.forward(x);
        let attn = match hooks.filter(|(p, _)| !p.is_empty()) {
            None => self.attn1.forward(&n, None),
            Some((p, cx)) => {
                let (mut ctx, mut value) = (n.shallow_clone(), n.shallow_clone());
                for patch in &p.attn1_patch {
                    (n, ctx, value) = patch.apply(n, ctx, value, cx)?;
                }
                let replace = p.attn1_for(cx.block, cx.transformer);
                let mut out = self.attn1.forward_qkv(&n, &ctx, &value, replace.map(|r| (r.as_ref(), cx)))?;
                for patch in &p.attn1_output_patch {
                    out = patch.apply(out, cx)?;
                }
                out
            }
        };
        let mut x = attn + x;
        if let Some((p, cx)) = hooks {
            for patch in &p.middle_patch {
                x = patch.apply(x, transformer_index, cx)?;
            }
        }
        let mut n2 = self.norm2.forward(&x);
        let cross = match hooks.filter(|(p, _)| !p.attn2_patch.is_empty()) {
            None => self.attn2.forward(&n2, Some(context)),
            Some((p, cx)) => {
                let (mut ctx, mut value) = (context.shallow_clone(), context.shallow_clone());
                for patch in &p.attn2_patch {
                    (n2, ctx, value) = patch.apply(n2, ctx, value, cx)?;
                }
                self.attn2.forward_qkv(&n2, &ctx, &value, None)?
            }
        };
        let x = cross + &x;
        Ok(self.ff.forward(&self.norm3.forward(&x)) + &x)
    }
}

/// `proj_in` is a 1×1 convolution in SD1 and a linear layer in SD2 (`use_linear_in_transformer`); the
/// linear form projects after flattening the pixels into tokens.
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// Attention over the pixels of a feature map, conditioned on the text.
pub struct SpatialTransformer {
    /// Its position among the UNet's spatial transformers in forward order (input, middle, output
    /// blocks), set by `Unet::new`: ComfyUI's `transformer_index`, which GLIGEN's middle patch reads.
    pub index: usize,
    /// Width of the tokens its transformer blocks work on (heads × head width).
    pub inner_dim: i64,
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    pub fn new(p: &WPath, channels: i64, heads: i64, dim_head: i64, depth: i64, context_dim: i64, use_linear: bool) -> Self {
        let inner = heads * dim_head;
        let (proj_in, proj_out) = if use_linear {
            (Proj::Linear(linear(&p.pp("proj_in"), channels, inner)), Proj::Linear(linear(&p.pp("proj_out"), inner, channels)))
        } else {
            (Proj::Conv(conv1x1(&p.pp("proj_in"), channels, inner)), Proj::Conv(conv1x1(&p.pp("proj_out"), inner, channels)))
        };
        SpatialTransformer {
            index: 0,
            inner_dim: inner,
            norm: group_norm(&p.pp("norm"), channels, 1e-6),
            proj_in,
            blocks: (0..depth).map(|i| BasicTransformerBlock::new(&p.pp("transformer_blocks").pp(i), inner, context_dim, heads, dim_head)).collect(),
            proj_out,
        }
    }

    /// `hooks`: the model's patches and the UNet block this transformer is in.
    pub fn forward(&self, x: &Tensor, context: &Tensor, hooks: Option<(&UnetPatches, BlockId, &CallCx<'_>)>) -> Result<Tensor, NodeError> {
        let (b, _c, h, w) = x.size4().expect("a 4-D [b, c, h, w] activation"); // invariant: nodes check shapes first
        let to_tokens = |t: &Tensor| {
            let c = t.size()[1];
            t.permute([0, 2, 3, 1]).reshape([b, h * w, c])
        };
        let to_map = |t: &Tensor| {
            let c = t.size()[2];
            t.reshape([b, h, w, c]).permute([0, 3, 1, 2]).contiguous()
        };
        let xn = self.norm.forward(x);
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&xn)),
            Proj::Linear(lin) => lin.forward(&to_tokens(&xn)),
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let cx = hooks.map(|(p, id, call)| (p, AttnCx { block: id, transformer: i, heads: block.attn1.heads, call }));
            t = block.forward(&t, context, cx.as_ref().map(|(p, cx)| (*p, cx)), self.index)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&to_map(&t)),
            Proj::Linear(lin) => to_map(&lin.forward(&t)),
        };
        Ok(out + x)
    }
}
