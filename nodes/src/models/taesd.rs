//! TAESD's decoder (madebyollin's tiny autoencoder), which turns a latent into a rough image cheaply:
//! live previews while sampling, as ComfyUI's TAESD previewer. Keys are those of the released
//! `taesd_decoder` files (an `nn.Sequential`: `1.weight`, `3.conv.0.weight`, …); a diffusers
//! `AutoencoderTiny` file's `decoder.layers.N.*` are the same layers one index lower (see
//! `checkpoint/keymap.rs`).

use tch::Tensor;

use super::layers::{conv3x3, Conv2d};
use crate::checkpoint::WPath;

/// The decoder's shape; the released SD 1.x/2.x decoder is the default.
#[derive(Clone, Debug)]
pub struct TaesdConfig {
    pub latent_channels: i64,
    /// Width of every layer.
    pub channels: i64,
    /// Residual blocks before each ×2 upsampling, then after the last.
    pub blocks: Vec<usize>,
}

impl Default for TaesdConfig {
    fn default() -> TaesdConfig {
        TaesdConfig { latent_channels: 4, channels: 64, blocks: vec![3, 3, 3, 1] }
    }
}

/// conv → ReLU → conv → ReLU → conv, plus the input, then ReLU (channels never change here, so the
/// skip is the identity).
struct Block {
    convs: [Conv2d; 3],
}

impl Block {
    fn new(p: &WPath, c: i64) -> Block {
        let conv = p.pp("conv");
        Block { convs: [conv3x3(&conv.pp(0), c, c), conv3x3(&conv.pp(2), c, c), conv3x3(&conv.pp(4), c, c)] }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.convs[0].forward(x).relu();
        let h = self.convs[1].forward(&h).relu();
        (self.convs[2].forward(&h) + x).relu()
    }
}

enum Layer {
    Conv(Conv2d),
    Block(Block),
    /// ×2 nearest-neighbour upsampling, then a bias-free convolution.
    Up(Tensor),
}

pub struct TaesdDecoder {
    layers: Vec<Layer>,
    conv_in: Conv2d,
}

impl TaesdDecoder {
    /// Walks the `nn.Sequential` indices: 0 clamp, 1 conv in, 2 ReLU, then per level its blocks, an
    /// upsample and a bias-free conv (a final conv to RGB after the last level's blocks).
    pub fn new(p: &WPath, c: TaesdConfig) -> TaesdDecoder {
        let ch = c.channels;
        let conv_in = conv3x3(&p.pp(1), c.latent_channels, ch);
        let mut layers = Vec::new();
        let mut i = 3;
        for (level, n) in c.blocks.iter().enumerate() {
            for _ in 0..*n {
                layers.push(Layer::Block(Block::new(&p.pp(i), ch)));
                i += 1;
            }
            if level + 1 < c.blocks.len() {
                // Upsample at `i`, its conv at `i + 1`.
                layers.push(Layer::Up(p.pp(i + 1).get("weight", &[ch, ch, 3, 3])));
                i += 2;
            } else {
                layers.push(Layer::Conv(conv3x3(&p.pp(i), ch, 3)));
            }
        }
        TaesdDecoder { layers, conv_in }
    }

    /// RGB in -1..1 `[b, 3, 8h, 8w]` for latents `[b, 4, h, w]` in the diffusion model's scale, as
    /// ComfyUI's `TAESD.decode`.
    pub fn forward(&self, latent: &Tensor) -> Tensor {
        let mut x = (latent / 3.0).tanh() * 3.0;
        x = self.conv_in.forward(&x).relu();
        for layer in &self.layers {
            x = match layer {
                Layer::Conv(conv) => conv.forward(&x),
                Layer::Block(b) => b.forward(&x),
                Layer::Up(w) => {
                    let s = x.size();
                    x.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None).conv2d(w, None::<Tensor>, [1, 1], [1, 1], [1, 1], 1)
                }
            };
        }
        x * 2.0 - 1.0
    }
}
