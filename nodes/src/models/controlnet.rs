//! ControlNet (LDM `cldm.ControlNet`, ControlNet 1.0/1.1 files): a trainable copy of the UNet's
//! encoder that reads a hint image and returns one residual per skip connection and one for the middle
//! block. Key names as in the released files under `control_model.`: `time_embed`, `input_blocks`,
//! `middle_block` (the UNet's), `input_hint_block.{0,2,…,14}`, `zero_convs.N.0`, `middle_block_out.0`.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::layers::{conv1x1, conv2d, Conv2d};
use super::unet::{encoder_blocks, Residuals, TimeEmbed, UnetConfig};
use super::unet_blocks::Block;
use crate::checkpoint::WPath;

/// A ControlNet's hyper-parameters: its UNet half (the UNet it was trained from; `out_channels` is
/// unused) and the hint image's channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlNetConfig {
    pub unet: UnetConfig,
    /// 3 for RGB hints (every released SD 1.x/2.x ControlNet).
    pub hint_channels: i64,
}

pub struct ControlNet {
    pub config: ControlNetConfig,
    time_embed: TimeEmbed,
    input_blocks: Vec<Block>,
    middle_block: Block,
    /// 1×1 convolutions (zero-initialised in training) after every input block.
    zero_convs: Vec<Conv2d>,
    /// Eight 3×3 convolutions with SiLU between, three of stride 2: the hint at pixel resolution to
    /// the first block's width at latent resolution.
    input_hint_block: Vec<Conv2d>,
    middle_block_out: Conv2d,
}

impl ControlNet {
    pub fn new(p: &WPath, config: ControlNetConfig) -> Self {
        let c = &config.unet;
        let mc = c.model_channels;
        let (input_blocks, middle_block, skips) = encoder_blocks(p, c);
        let zc = p.pp("zero_convs");
        let zero_convs = skips.iter().enumerate().map(|(i, ch)| conv1x1(&zc.pp(i).pp(0), *ch, *ch)).collect();
        let hb = p.pp("input_hint_block");
        // (in, out, stride) of the convolutions at indices 0, 2, …, 14 (SiLU layers in between).
        let hint = [(config.hint_channels, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2), (256, mc, 1)];
        let input_hint_block = hint.iter().enumerate().map(|(i, (cin, cout, s))| conv2d(&hb.pp(2 * i), *cin, *cout, 3, *s, 1)).collect();
        let ch = *skips.last().unwrap_or(&mc);
        ControlNet {
            time_embed: TimeEmbed::new(p, c),
            input_blocks,
            middle_block,
            zero_convs,
            input_hint_block,
            middle_block_out: conv1x1(&p.pp("middle_block_out").pp(0), ch, ch),
            config,
        }
    }

    /// The residuals for latents `x` `[b, 4, h, w]` (the UNet's input, scaled) at `timesteps` `[b]`,
    /// text states `context` and `hint` `[b or 1, hint_channels, 8h, 8w]`: one per skip (`output`) and
    /// the middle block's, before any strength.
    pub fn forward(&self, x: &Tensor, hint: &Tensor, timesteps: &Tensor, context: &Tensor) -> Residuals {
        let kind = self.middle_block_out.weight.kind();
        let emb = self.time_embed.forward(timesteps, None, kind);
        let context = context.to_kind(kind);
        let last = self.input_hint_block.len() - 1;
        let mut guided = hint.to_kind(kind);
        for (i, conv) in self.input_hint_block.iter().enumerate() {
            guided = conv.forward(&guided);
            if i < last {
                guided = guided.silu();
            }
        }
        let mut h = x.to_kind(kind);
        let mut output = Vec::with_capacity(self.input_blocks.len());
        for (i, (block, zero)) in self.input_blocks.iter().zip(&self.zero_convs).enumerate() {
            h = block.forward(&h, &emb, &context, None);
            if i == 0 {
                h += &guided;
            }
            output.push(Some(zero.forward(&h)));
        }
        h = self.middle_block.forward(&h, &emb, &context, None);
        Residuals { input: Vec::new(), middle: Some(self.middle_block_out.forward(&h)), output }
    }
}
