//! The SD 1.x/2.x denoising UNet (LDM `openaimodel.UNetModel`), with the key names of single-file
//! checkpoints under `model.diffusion_model.`: `time_embed.{0,2}`, `input_blocks.N.M`,
//! `middle_block.{0,1,2}`, `output_blocks.N.M`, `out.{0,2}`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::attention::SpatialTransformer;
use super::layers::{conv3x3, group_norm, linear, GroupNorm, Linear};
use super::resnet::ResBlock;
use super::unet_blocks::{Block, Downsample, Layer, Upsample};
use crate::checkpoint::WPath;
use crate::patches::{BlockId, CallCx, UnetPatches};
use diffloom_core::NodeError;

/// The UNet's hyper-parameters, named as in the LDM yaml configs (`unet_config.params`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnetConfig {
    /// 4, or 9 for inpainting models (latent + mask + masked-image latent).
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the first level (320 in SD 1.x/2.x).
    pub model_channels: i64,
    /// Width multiplier per level.
    pub channel_mult: Vec<i64>,
    pub num_res_blocks: i64,
    /// Downsampling factors (1, 2, 4, …) whose levels have spatial transformers.
    pub attention_resolutions: Vec<i64>,
    /// Fixed head count (SD 1.x: 8), or -1 when `num_head_channels` is used.
    pub num_heads: i64,
    /// Fixed head width (SD 2.x: 64), or -1 when `num_heads` is used.
    pub num_head_channels: i64,
    /// Transformer blocks per spatial transformer, per level (one number for every level: SD 1.x/2.x
    /// have 1; SDXL's levels have [0, 2, 10]). Files written before per-level depths read as one.
    #[serde(deserialize_with = "per_level")]
    pub transformer_depth: Vec<i64>,
    /// The middle block's depth; None: the deepest level's.
    #[serde(default)]
    pub transformer_depth_middle: Option<i64>,
    /// Width of the class-label input added to the timestep embedding (`label_emb`, SDXL's
    /// size-and-crop conditioning); None for SD 1.x/2.x.
    #[serde(default)]
    pub adm_in_channels: Option<i64>,
    /// Width of the text encoder's states (768 for SD 1.x, 1024 for SD 2.x).
    pub context_dim: i64,
    /// Linear rather than 1×1-convolution projections in and out of the transformers (SD 2.x).
    pub use_linear_in_transformer: bool,
}

impl UnetConfig {
    /// SD 1.x, from `configs/stable-diffusion/v1-inference.yaml`.
    pub fn sd1() -> Self {
        UnetConfig {
            in_channels: 4,
            out_channels: 4,
            model_channels: 320,
            channel_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attention_resolutions: vec![4, 2, 1],
            num_heads: 8,
            num_head_channels: -1,
            transformer_depth: vec![1],
            transformer_depth_middle: None,
            adm_in_channels: None,
            context_dim: 768,
            use_linear_in_transformer: false,
        }
    }

    /// SD 2.x, from `configs/stable-diffusion/v2-inference.yaml` (Stability-AI/stablediffusion).
    pub fn sd2() -> Self {
        UnetConfig { num_heads: -1, num_head_channels: 64, context_dim: 1024, use_linear_in_transformer: true, ..Self::sd1() }
    }

    /// SD 1.x inpainting (`v1-inpainting-inference.yaml`): 9 input channels.
    pub fn sd1_inpaint() -> Self {
        UnetConfig { in_channels: 9, ..Self::sd1() }
    }

    /// Transformer blocks at `level` (0 = the first, full-resolution level).
    pub fn depth_at(&self, level: usize) -> i64 {
        match self.transformer_depth.as_slice() {
            [one] => *one,
            per_level => per_level.get(level).copied().unwrap_or(1),
        }
    }

    /// The middle block's transformer depth.
    pub fn depth_middle(&self) -> i64 {
        self.transformer_depth_middle.unwrap_or_else(|| self.depth_at(self.channel_mult.len().saturating_sub(1)))
    }

    /// Heads and head width for a transformer over `channels` channels.
    fn heads(&self, channels: i64) -> (i64, i64) {
        if self.num_head_channels > 0 {
            (channels / self.num_head_channels, self.num_head_channels)
        } else {
            (self.num_heads, channels / self.num_heads.max(1))
        }
    }
}

/// The timestep embedding (`time_embed.{0,2}`), with SDXL's class-label input (`label_emb.0.{0,2}`)
/// where the config has one.
pub struct TimeEmbed {
    time_embed: (Linear, Linear),
    label_emb: Option<(Linear, Linear)>,
    model_channels: i64,
}

impl TimeEmbed {
    pub fn new(p: &WPath, c: &UnetConfig) -> Self {
        let (mc, emb) = (c.model_channels, c.model_channels * 4);
        let te = p.pp("time_embed");
        TimeEmbed {
            time_embed: (linear(&te.pp(0), mc, emb), linear(&te.pp(2), emb, emb)),
            label_emb: c.adm_in_channels.map(|adm| {
                let le = p.pp("label_emb").pp(0);
                (linear(&le.pp(0), adm, emb), linear(&le.pp(2), emb, emb))
            }),
            model_channels: mc,
        }
    }

    /// The embedding `[b, 4 * model_channels]` of `timesteps` in `kind`, the class label `y` added
    /// where the model has that input.
    pub fn forward(&self, timesteps: &Tensor, y: Option<&Tensor>, kind: Kind) -> Tensor {
        let t_emb = timestep_embedding(timesteps, self.model_channels).to_kind(kind);
        let mut emb = self.time_embed.1.forward(&self.time_embed.0.forward(&t_emb).silu());
        if let (Some((l0, l2)), Some(y)) = (&self.label_emb, y) {
            emb += l2.forward(&l0.forward(&y.to_kind(kind)).silu());
        }
        emb
    }
}

/// The UNet's first half, which a ControlNet copies under the same key names: the input blocks, the
/// middle block, and the channel count of every input block's output (the skips the output blocks
/// take, in order).
pub fn encoder_blocks(p: &WPath, c: &UnetConfig) -> (Vec<Block>, Block, Vec<i64>) {
    let mc = c.model_channels;
    let emb = mc * 4;
    let ib = p.pp("input_blocks");
    let mut input_blocks = vec![Block(vec![Layer::Conv(conv3x3(&ib.pp(0).pp(0), c.in_channels, mc))])];
    let mut skips = vec![mc];
    let mut ch = mc;
    let mut ds = 1;
    for (level, mult) in c.channel_mult.iter().enumerate() {
        for _ in 0..c.num_res_blocks {
            let bp = ib.pp(input_blocks.len());
            let mut layers = vec![Layer::Res(ResBlock::new(&bp.pp(0), ch, mult * mc, emb))];
            ch = mult * mc;
            if c.attention_resolutions.contains(&ds) {
                layers.push(c.transformer(&bp.pp(1), ch, c.depth_at(level)));
            }
            input_blocks.push(Block(layers));
            skips.push(ch);
        }
        if level + 1 < c.channel_mult.len() {
            let bp = ib.pp(input_blocks.len());
            input_blocks.push(Block(vec![Layer::Down(Downsample::new(&bp.pp(0), ch))]));
            skips.push(ch);
            ds *= 2;
        }
    }
    let mp = p.pp("middle_block");
    let middle_block = Block(vec![
        Layer::Res(ResBlock::new(&mp.pp(0), ch, ch, emb)),
        c.transformer(&mp.pp(1), ch, c.depth_middle()),
        Layer::Res(ResBlock::new(&mp.pp(2), ch, ch, emb)),
    ]);
    (input_blocks, middle_block, skips)
}

impl UnetConfig {
    /// A spatial transformer over `ch` channels at `p`.
    fn transformer(&self, p: &WPath, ch: i64, depth: i64) -> Layer {
        let (heads, dim_head) = self.heads(ch);
        Layer::Attn(SpatialTransformer::new(p, ch, heads, dim_head, depth, self.context_dim, self.use_linear_in_transformer))
    }
}

/// What ControlNets and T2I-Adapters add to the UNet's activations (ComfyUI's `control` dict), indexed
/// by input block (ComfyUI keeps these lists reversed and pops them).
#[derive(Default)]
pub struct Residuals {
    /// Added to input block i's output before it goes on and becomes a skip (T2I-Adapters).
    pub input: Vec<Option<Tensor>>,
    /// Added to the middle block's output.
    pub middle: Option<Tensor>,
    /// Added to input block i's skip where the output blocks take it (ControlNets).
    pub output: Vec<Option<Tensor>>,
}

/// `h + r`, or `h` with a warning when `r` does not fit (ComfyUI's `apply_control` logs and skips
/// a residual of another shape, e.g. an adapter made for another block layout).
fn add_residual(h: Tensor, r: Option<&Option<Tensor>>, at: &str) -> Tensor {
    let Some(Some(r)) = r else { return h };
    let (hs, rs) = (h.size(), r.size());
    let fits = hs.len() == rs.len() && hs.iter().zip(&rs).enumerate().all(|(i, (a, b))| a == b || (i == 0 && *b == 1));
    if !fits {
        tracing::warn!("a control residual of shape {rs:?} does not fit the UNet's {at} activation {hs:?}; not applied");
        return h;
    }
    let kind = h.kind();
    h + r.to_kind(kind)
}

pub struct Unet {
    pub config: UnetConfig,
    time_embed: TimeEmbed,
    input_blocks: Vec<Block>,
    middle_block: Block,
    output_blocks: Vec<Block>,
    out_norm: GroupNorm,
    out_conv: super::layers::Conv2d,
}

impl Unet {
    pub fn new(p: &WPath, config: UnetConfig) -> Self {
        let c = &config;
        let mc = c.model_channels;
        let emb = mc * 4;
        let (mut input_blocks, mut middle_block, mut skips) = encoder_blocks(p, c);
        let mut ch = *skips.last().unwrap_or(&mc);
        let mut ds = 1i64 << (c.channel_mult.len().saturating_sub(1));
        let ob = p.pp("output_blocks");
        let mut output_blocks = Vec::new();
        for (level, mult) in c.channel_mult.iter().enumerate().rev() {
            for i in 0..=c.num_res_blocks {
                let bp = ob.pp(output_blocks.len());
                let skip = skips.pop().unwrap_or(ch);
                let mut layers = vec![Layer::Res(ResBlock::new(&bp.pp(0), ch + skip, mult * mc, emb))];
                ch = mult * mc;
                if c.attention_resolutions.contains(&ds) {
                    layers.push(c.transformer(&bp.pp(1), ch, c.depth_at(level)));
                }
                if level > 0 && i == c.num_res_blocks {
                    layers.push(Layer::Up(Upsample::new(&bp.pp(layers.len()), ch)));
                    ds /= 2;
                }
                output_blocks.push(Block(layers));
            }
        }
        // ComfyUI counts the spatial transformers as the forward pass meets them (transformer_index).
        let transformers = input_blocks.iter_mut().chain(std::iter::once(&mut middle_block)).chain(output_blocks.iter_mut());
        for (index, t) in transformers.flat_map(|b| b.0.iter_mut()).filter_map(|l| if let Layer::Attn(t) = l { Some(t) } else { None }).enumerate() {
            t.index = index;
        }
        Unet {
            // After the blocks, as the key walk of the files written so far had it (synthetic weights
            // are drawn in lookup order).
            time_embed: TimeEmbed::new(p, c),
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: group_norm(&p.pp("out").pp(0), ch, 1e-5),
            out_conv: conv3x3(&p.pp("out").pp(2), ch, c.out_channels),
            config,
        }
    }

    /// Where the weights live.
    pub fn device(&self) -> tch::Device {
        self.out_conv.weight.device()
    }

    /// The spatial transformers in forward order (their `transformer_index`): the block each is in,
    /// its position in that block's layer list (the `input_blocks.N.M` key's M), and its token width.
    pub fn transformer_sites(&self) -> Vec<(BlockId, usize, i64)> {
        let blocks = self.input_blocks.iter().enumerate().map(|(i, b)| (BlockId::Input(i), b));
        let blocks = blocks.chain(std::iter::once((BlockId::Middle, &self.middle_block)));
        let blocks = blocks.chain(self.output_blocks.iter().enumerate().map(|(i, b)| (BlockId::Output(i), b)));
        blocks
            .flat_map(|(id, b)| b.0.iter().enumerate().filter_map(move |(m, l)| if let Layer::Attn(t) = l { Some((id, m, t.inner_dim)) } else { None }))
            .collect()
    }

    /// The kind of the weights.
    pub fn kind(&self) -> Kind {
        self.out_conv.weight.kind()
    }

    /// Predicts noise (or v) for latents `x` `[b, in_channels, h, w]` at `timesteps` `[b]` (0..999,
    /// fractional allowed) given text states `context` `[b, tokens, context_dim]`.
    pub fn forward(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor) -> Tensor {
        self.forward_with_class(x, timesteps, context, None)
    }

    /// [`Unet::forward`] with the class-label input `y` `[b, adm_in_channels]` added to the timestep
    /// embedding, for UNets that have one (a UNet without `label_emb` ignores it).
    pub fn forward_with_class(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor, y: Option<&Tensor>) -> Tensor {
        self.forward_controlled(x, timesteps, context, y, None)
    }

    /// [`Unet::forward_with_class`] with ControlNet / T2I-Adapter residuals added where ComfyUI's
    /// `apply_control` adds them.
    pub fn forward_controlled(&self, x: &Tensor, timesteps: &Tensor, context: &Tensor, y: Option<&Tensor>, control: Option<&Residuals>) -> Tensor {
        let cx = CallCx { sigma: 0.0, original_shape: &x.size(), cond_or_uncond: &[], run: 0 };
        let result = self.forward_patched(x, timesteps, context, y, control, &UnetPatches::default(), &cx);
        result.expect("no patch ran") // invariant: without patches no step of the forward returns an error
    }

    /// [`Unet::forward_controlled`] with the model's block patches run where ComfyUI's `UNetModel`
    /// runs them (see `patches.rs`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_patched(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        y: Option<&Tensor>,
        control: Option<&Residuals>,
        patches: &UnetPatches,
        cx: &CallCx,
    ) -> Result<Tensor, NodeError> {
        let kind = self.kind();
        let emb = self.time_embed.forward(timesteps, y, kind);
        let context = context.to_kind(kind);
        let none = Residuals::default();
        let control = control.unwrap_or(&none);
        let mut h = x.to_kind(kind);
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        for (i, block) in self.input_blocks.iter().enumerate() {
            h = block.forward_hooked(&h, &emb, &context, None, Some((patches, BlockId::Input(i), cx)))?;
            h = add_residual(h, control.input.get(i), "input block");
            for p in &patches.input_block {
                h = p.apply(h, BlockId::Input(i), cx)?;
            }
            hs.push(h.shallow_clone());
            for p in &patches.input_block_after_skip {
                h = p.apply(h, BlockId::Input(i), cx)?;
            }
        }
        h = self.middle_block.forward_hooked(&h, &emb, &context, None, Some((patches, BlockId::Middle, cx)))?;
        h = add_residual(h, Some(&control.middle.as_ref().map(|m| m.shallow_clone())), "middle block");
        for (i, block) in self.output_blocks.iter().enumerate() {
            // There are as many output blocks as input blocks, one skip each.
            if let Some(skip) = hs.pop() {
                let mut skip = add_residual(skip, control.output.get(hs.len()), "skip");
                for p in &patches.output_block {
                    (h, skip) = p.apply(h, skip, BlockId::Output(i), cx)?;
                }
                if h.size()[2..] != skip.size()[2..] {
                    return Err(NodeError::Failed(format!(
                        "output block {i}: the activation is {:?} but its skip is {:?} (a model patch changed one size)",
                        h.size(),
                        skip.size()
                    )));
                }
                h = Tensor::cat(&[h, skip], 1);
            }
            // An upsampler must match the next skip's size, so odd latent sizes work.
            let up = hs.last().map(|s| (s.size()[2], s.size()[3]));
            h = block.forward_hooked(&h, &emb, &context, up, Some((patches, BlockId::Output(i), cx)))?;
        }
        Ok(self.out_conv.forward(&self.out_norm.forward(&h).silu()))
    }
}

/// A depth per level from a list, or from one number (every level; configs written before per-level
/// depths).
fn per_level<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Depth {
        One(i64),
        PerLevel(Vec<i64>),
    }
    Ok(match Depth::deserialize(d)? {
        Depth::One(n) => vec![n],
        Depth::PerLevel(v) => v,
    })
}

/// Sinusoidal embedding of `timesteps` `[b]` into `[b, dim]`, cosines first (LDM's
/// `timestep_embedding`, max period 10000).
pub fn timestep_embedding(timesteps: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let freqs = (Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln()) / half as f64)).exp();
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], -1)
}

#[cfg(test)]
#[path = "../tests/unet.rs"]
mod tests;
