//! T2I-Adapters for SD 1.x/2.x (TencentARC's `Adapter` and `Adapter_light`, the files ComfyUI's
//! ControlNetLoader takes): a small network from the pixel-unshuffled hint to one feature map per UNet
//! level, added to the UNet's activations once per sampling run. Original key names: `conv_in`,
//! `body.N.{in_conv, block1, block2, down_opt.op}` (full); `body.N.{in_conv, body.M.{block1, block2},
//! out_conv}` (light).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::layers::{conv1x1, conv2d, conv3x3, Conv2d};
use crate::checkpoint::WPath;

/// Which of the two adapter networks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    /// `Adapter` (sk=True as released): `ksize` is the second convolution's kernel (1 in the released
    /// files); `use_conv` whether levels downsample with a stride-2 convolution rather than averaging.
    Full { ksize: i64, use_conv: bool },
    /// `Adapter_light`: 1×1 in and out convolutions around `nums_rb` plain residual blocks per level.
    Light,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub kind: AdapterKind,
    /// Channels after the ×8 pixel-unshuffle (64 × the hint's channels).
    pub cin: i64,
    /// Width of each level's features (the UNet's level widths: 320, 640, 1280, 1280).
    pub channels: Vec<i64>,
    /// Residual blocks per level (2 full, 4 light).
    pub nums_rb: i64,
}

impl AdapterConfig {
    /// The hint's channels (1 for a grey-scale hint such as sketches, 3 for RGB).
    pub fn hint_channels(&self) -> i64 {
        self.cin / 64
    }
}

/// A full adapter's residual block (`sk=True`): an input convolution only where the width changes.
struct AdapterBlock {
    down: Option<Option<Conv2d>>,
    in_conv: Option<Conv2d>,
    block1: Conv2d,
    block2: Conv2d,
}

/// A light adapter's level (`extractor`).
struct LightLevel {
    down: bool,
    in_conv: Conv2d,
    body: Vec<(Conv2d, Conv2d)>,
    out_conv: Conv2d,
}

enum Body {
    Full { conv_in: Conv2d, blocks: Vec<AdapterBlock> },
    Light(Vec<LightLevel>),
}

pub struct T2iAdapter {
    pub config: AdapterConfig,
    body: Body,
}

/// The adapters' downsampling without a convolution: 2×2 averages, the odd edge padded with zeros that
/// count in the average (`AvgPool2d(2, 2, padding=[h % 2, w % 2])`).
fn avg_down(x: &Tensor) -> Tensor {
    let s = x.size();
    x.avg_pool2d([2, 2], [2, 2], [s[2] % 2, s[3] % 2], false, true, None::<i64>)
}

impl T2iAdapter {
    pub fn new(p: &WPath, config: AdapterConfig) -> Self {
        let c = &config;
        let body = p.pp("body");
        let levels = c.channels.len();
        let body = match c.kind {
            AdapterKind::Full { ksize, use_conv } => {
                let mut blocks = Vec::new();
                for i in 0..levels {
                    for j in 0..c.nums_rb {
                        let bp = body.pp(blocks.len());
                        let (in_c, out_c) = if i > 0 && j == 0 { (c.channels[i - 1], c.channels[i]) } else { (c.channels[i], c.channels[i]) };
                        let down = (i > 0 && j == 0).then(|| use_conv.then(|| conv2d(&bp.pp("down_opt").pp("op"), in_c, in_c, 3, 2, 1)));
                        blocks.push(AdapterBlock {
                            down,
                            in_conv: (in_c != out_c).then(|| conv2d(&bp.pp("in_conv"), in_c, out_c, ksize, 1, ksize / 2)),
                            block1: conv3x3(&bp.pp("block1"), out_c, out_c),
                            block2: conv2d(&bp.pp("block2"), out_c, out_c, ksize, 1, ksize / 2),
                        });
                    }
                }
                Body::Full { conv_in: conv3x3(&p.pp("conv_in"), c.cin, c.channels[0]), blocks }
            }
            AdapterKind::Light => Body::Light(
                (0..levels)
                    .map(|i| {
                        let lp = body.pp(i);
                        let (in_c, out_c) = (if i == 0 { c.cin } else { c.channels[i - 1] }, c.channels[i]);
                        let inter = out_c / 4;
                        LightLevel {
                            down: i > 0,
                            in_conv: conv1x1(&lp.pp("in_conv"), in_c, inter),
                            body: (0..c.nums_rb)
                                .map(|k| (conv3x3(&lp.pp("body").pp(k).pp("block1"), inter, inter), conv3x3(&lp.pp("body").pp(k).pp("block2"), inter, inter)))
                                .collect(),
                            out_conv: conv1x1(&lp.pp("out_conv"), inter, out_c),
                        }
                    })
                    .collect(),
            ),
        };
        T2iAdapter { config, body }
    }

    /// One feature map per level for `hint` `[b, hint_channels, H, W]` (H and W multiples of 8).
    pub fn forward(&self, hint: &Tensor) -> Vec<Tensor> {
        let kind = match &self.body {
            Body::Full { conv_in, .. } => conv_in.weight.kind(),
            Body::Light(levels) => levels[0].in_conv.weight.kind(),
        };
        let mut x = hint.to_kind(kind).pixel_unshuffle(8);
        let mut features = Vec::new();
        match &self.body {
            Body::Full { conv_in, blocks } => {
                x = conv_in.forward(&x);
                for (k, b) in blocks.iter().enumerate() {
                    x = match &b.down {
                        Some(Some(op)) => op.forward(&x),
                        Some(None) => avg_down(&x),
                        None => x,
                    };
                    if let Some(c) = &b.in_conv {
                        x = c.forward(&x);
                    }
                    let h = b.block2.forward(&b.block1.forward(&x).relu());
                    x = h + &x;
                    if (k as i64 + 1) % self.config.nums_rb == 0 {
                        features.push(x.shallow_clone());
                    }
                }
            }
            Body::Light(levels) => {
                for level in levels {
                    if level.down {
                        x = avg_down(&x);
                    }
                    x = level.in_conv.forward(&x);
                    for (b1, b2) in &level.body {
                        x = b2.forward(&b1.forward(&x).relu()) + &x;
                    }
                    x = level.out_conv.forward(&x);
                    features.push(x.shallow_clone());
                }
            }
        }
        features
    }
}
