//! The UNet's block lists (LDM `TimestepEmbedSequential`): each entry of `input_blocks`,
//! `middle_block` and `output_blocks` is a short sequence of res blocks, transformers and resamplers,
//! indexed `.0`, `.1`, `.2` in the checkpoint.

use diffloom_core::NodeError;
use tch::Tensor;

use crate::patches::{BlockId, CallCx, UnetPatches};

use super::attention::SpatialTransformer;
use super::layers::{conv2d, conv3x3, Conv2d};
use super::resnet::ResBlock;

/// Halves the resolution: `op`, a 3×3 convolution with stride 2.
pub struct Downsample {
    pub op: Conv2d,
}

/// Doubles the resolution: nearest-neighbour upsampling, then `conv`.
pub struct Upsample {
    pub conv: Conv2d,
}

impl Downsample {
    pub fn new(p: &crate::checkpoint::WPath, channels: i64) -> Self {
        Downsample { op: conv2d(&p.pp("op"), channels, channels, 3, 2, 1) }
    }
}

impl Upsample {
    pub fn new(p: &crate::checkpoint::WPath, channels: i64) -> Self {
        Upsample { conv: conv3x3(&p.pp("conv"), channels, channels) }
    }

    /// `size` is the skip connection's resolution, so odd sizes round-trip (LDM passes `output_shape`).
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (_, _, h, w) = x.size4().expect("a 4-D [b, c, h, w] activation"); // invariant: nodes check shapes first
        let (oh, ow) = size.unwrap_or((h * 2, w * 2));
        self.conv.forward(&x.upsample_nearest2d([oh, ow], None, None))
    }
}

/// One member of a block sequence.
pub enum Layer {
    Conv(Conv2d),
    Res(ResBlock),
    Attn(SpatialTransformer),
    Down(Downsample),
    Up(Upsample),
}

/// A `TimestepEmbedSequential`: its layers in checkpoint order.
pub struct Block(pub Vec<Layer>);

impl Block {
    /// Applies each layer; `up_size` is the target size of an upsampler in the block.
    pub fn forward(&self, x: &Tensor, emb: &Tensor, context: &Tensor, up_size: Option<(i64, i64)>) -> Tensor {
        let result = self.forward_hooked(x, emb, context, up_size, None);
        result.expect("no patch ran") // invariant: without patches no layer fails
    }

    /// [`Block::forward`] with the model's patches (`hooks`: the patches and this block's id).
    pub fn forward_hooked(
        &self,
        x: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        up_size: Option<(i64, i64)>,
        hooks: Option<(&UnetPatches, BlockId, &CallCx<'_>)>,
    ) -> Result<Tensor, NodeError> {
        let mut h = x.shallow_clone();
        for layer in &self.0 {
            h = match layer {
                Layer::Conv(c) => c.forward(&h),
                Layer::Res(r) => r.forward(&h, emb),
                Layer::Attn(a) => a.forward(&h, context, hooks)?,
                Layer::Down(d) => d.op.forward(&h),
                Layer::Up(u) => u.forward(&h, up_size),
            };
        }
        Ok(h)
    }
}
