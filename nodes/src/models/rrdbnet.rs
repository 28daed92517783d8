//! ESRGAN's RRDBNet, the upscaler behind ESRGAN, Real-ESRGAN (x4plus, x2plus), BSRGAN and most
//! community "4x-…" models. Keys in Real-ESRGAN's (BasicSR's) layout: `conv_first`, `body.N.rdbR.convC`,
//! `conv_body`, `conv_upK`, `conv_hr`, `conv_last`. Files in the original ESRGAN layout (`model.0`,
//! `model.1.sub.N.RDBR.convC.0`, …) are renamed into it by `keymap::rrdbnet_old_layout_key`, those in ESRGAN's second
//! layout (`RRDB_trunk`, `trunk_conv`, `upconvK`, `HRconv`; BSRGAN) by `keymap::rrdbnet_trunk_layout_key`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::layers::{conv3x3, Conv2d};
use crate::checkpoint::WPath;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RrdbConfig {
    /// Image channels in and out (3 for RGB).
    pub in_nc: i64,
    pub out_nc: i64,
    /// Feature channels of the trunk (64 in the published models).
    pub nf: i64,
    /// Growth channels inside each dense block (32).
    pub gc: i64,
    /// Number of RRDB blocks (23 in the published models).
    pub nb: i64,
    /// Nearest-neighbour ×2 upsampling stages.
    pub upsamples: i64,
    /// Pixel-unshuffle factor applied first (Real-ESRGAN x2plus: 2, x1: 4): the input's channels are
    /// `in_nc * shuffle²`, so the net scale is `2^upsamples / shuffle`.
    pub shuffle: i64,
}

impl RrdbConfig {
    /// The output size over the input size.
    pub fn scale(&self) -> i64 {
        (1 << self.upsamples) / self.shuffle
    }

    /// The architecture from the tensor shapes (keys in the Real-ESRGAN layout), or why it is not an
    /// RRDBNet this code runs.
    pub fn detect(shapes: &HashMap<String, Vec<i64>>) -> Result<RrdbConfig, String> {
        let shape = |k: &str| match shapes.get(k) {
            Some(s) if s.len() == 4 => Ok(s),
            Some(s) => Err(format!("tensor {k:?} has shape {s:?}, not a 3×3 convolution's")),
            None => Err(format!("no tensor {k:?}")),
        };
        let first = shape("conv_first.weight")?;
        let last = shape("conv_last.weight")?;
        let dense = shape("body.0.rdb1.conv1.weight")?;
        let (nf, in_ch, out_nc, gc) = (first[0], first[1], last[0], dense[0]);
        let nb = (0..).take_while(|i| shapes.contains_key(&format!("body.{i}.rdb1.conv1.weight"))).count() as i64;
        let upsamples = (1..).take_while(|k| shapes.contains_key(&format!("conv_up{k}.weight"))).count() as i64;
        // The input is RGB (or gray) before any pixel-unshuffle, as the output is.
        let shuffle = [1, 2, 4]
            .into_iter()
            .find(|s| in_ch == out_nc * s * s)
            .ok_or_else(|| format!("conv_first takes {in_ch} channels, which is not {out_nc} (the output's) times 1, 4 or 16"))?;
        let config = RrdbConfig { in_nc: out_nc, out_nc, nf, gc, nb, upsamples, shuffle };
        if (1 << upsamples) < shuffle {
            return Err(format!("{upsamples} upsampling stages after a pixel-unshuffle by {shuffle} would shrink the image"));
        }
        Ok(config)
    }
}

/// Five densely connected convolutions; the output is scaled by 0.2 and added to the input.
struct DenseBlock {
    convs: Vec<Conv2d>,
}

impl DenseBlock {
    fn new(p: &WPath, nf: i64, gc: i64) -> Self {
        let convs = (0..5).map(|c| conv3x3(&p.pp(format!("conv{}", c + 1)), nf + c * gc, if c == 4 { nf } else { gc })).collect();
        DenseBlock { convs }
    }

    fn forward(&self, x: &Tensor, slope: &Tensor) -> Tensor {
        let mut features = vec![x.shallow_clone()];
        for conv in &self.convs[..4] {
            let y = lrelu(&conv.forward(&Tensor::cat(&features, 1)), slope);
            features.push(y);
        }
        self.convs[4].forward(&Tensor::cat(&features, 1)) * 0.2 + x
    }
}

/// Residual-in-residual dense block: three dense blocks, scaled by 0.2, plus the input.
struct Rrdb {
    blocks: [DenseBlock; 3],
}

impl Rrdb {
    fn new(p: &WPath, nf: i64, gc: i64) -> Self {
        Rrdb { blocks: [1, 2, 3].map(|r| DenseBlock::new(&p.pp(format!("rdb{r}")), nf, gc)) }
    }

    fn forward(&self, x: &Tensor, slope: &Tensor) -> Tensor {
        let y = self.blocks.iter().fold(x.shallow_clone(), |h, b| b.forward(&h, slope));
        y * 0.2 + x
    }
}

pub struct RrdbNet {
    pub config: RrdbConfig,
    conv_first: Conv2d,
    body: Vec<Rrdb>,
    conv_body: Conv2d,
    ups: Vec<Conv2d>,
    conv_hr: Conv2d,
    conv_last: Conv2d,
    /// The LeakyReLU slope, on the weights' device and in their kind.
    slope: Tensor,
}

/// LeakyReLU(0.2) as PReLU with a single weight `slope` of 0.2 (the same products PyTorch's LeakyReLU
/// takes, in one kernel: tch's `leaky_relu` binding has no slope argument, and max(x, 0.2·x) costs a
/// temporary the size of the activation, which at the output resolution is most of the memory).
fn lrelu(x: &Tensor, slope: &Tensor) -> Tensor {
    x.prelu(slope)
}

impl RrdbNet {
    pub fn new(p: &WPath, config: RrdbConfig) -> Self {
        let (nf, gc) = (config.nf, config.gc);
        RrdbNet {
            conv_first: conv3x3(&p.pp("conv_first"), config.in_nc * config.shuffle * config.shuffle, nf),
            body: (0..config.nb).map(|i| Rrdb::new(&p.pp("body").pp(i), nf, gc)).collect(),
            conv_body: conv3x3(&p.pp("conv_body"), nf, nf),
            ups: (1..=config.upsamples).map(|k| conv3x3(&p.pp(format!("conv_up{k}")), nf, nf)).collect(),
            conv_hr: conv3x3(&p.pp("conv_hr"), nf, nf),
            conv_last: conv3x3(&p.pp("conv_last"), nf, config.out_nc),
            slope: Tensor::from_slice(&[0.2f32]).to_kind(p.kind()).to_device(p.device()),
            config,
        }
    }

    pub fn device(&self) -> tch::Device {
        self.conv_first.weight.device()
    }

    /// `x` `[b, in_nc, h, w]` in 0..1 → `[b, out_nc, h * scale, w * scale]` (not clamped). Before a
    /// pixel-unshuffle, odd sides are reflect-padded on the right and bottom to a multiple of its factor
    /// and the surplus cropped from the output (as spandrel does).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let f = self.config.shuffle;
        if f > 1 {
            let s = x.size();
            let (h, w) = (s[2], s[3]);
            let (ph, pw) = ((f - h % f) % f, (f - w % f) % f);
            let padded = if ph > 0 || pw > 0 { x.reflection_pad2d([0, pw, 0, ph]) } else { x.shallow_clone() };
            let scale = self.config.scale();
            return self.trunk(&padded.pixel_unshuffle(f)).narrow(2, 0, h * scale).narrow(3, 0, w * scale);
        }
        self.trunk(x)
    }

    /// What ComfyUI applies to each tile (spandrel's `ImageModelDescriptor.__call__`): the input padded on
    /// the right and bottom to at least 2 pixels (4 with a pixel-unshuffle, then to a multiple of 4;
    /// reflected up to side − 1 pixels, replicated beyond), the net, a clamp to 0..1, the padding cropped.
    pub fn upscale(&self, x: &Tensor) -> Tensor {
        let (multiple, minimum) = if self.config.shuffle > 1 { (4, 4) } else { (1, 2) };
        let s = x.size();
        let (h, w) = (s[2], s[3]);
        let target = |n: i64| ((n + multiple - 1) / multiple * multiple).max(minimum);
        let (ph, pw) = (target(h) - h, target(w) - w);
        if ph == 0 && pw == 0 {
            return self.forward(x).clamp_(0.0, 1.0);
        }
        let (rh, rw) = (ph.min(h - 1), pw.min(w - 1));
        let padded = x.reflection_pad2d([0, rw, 0, rh]).replication_pad2d([0, pw - rw, 0, ph - rh]);
        let scale = self.config.scale();
        self.forward(&padded).clamp_(0.0, 1.0).narrow(2, 0, h * scale).narrow(3, 0, w * scale)
    }

    fn trunk(&self, x: &Tensor) -> Tensor {
        let feat = self.conv_first.forward(x);
        let trunk = self.body.iter().fold(feat.shallow_clone(), |h, b| b.forward(&h, &self.slope));
        let mut feat = feat + self.conv_body.forward(&trunk);
        drop(trunk);
        // At the output resolution each activation is most of the memory: every intermediate is
        // dropped as soon as the next one exists, so at most two are alive.
        for up in &self.ups {
            let s = feat.size();
            let upsampled = feat.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None);
            drop(feat);
            let y = up.forward(&upsampled);
            drop(upsampled);
            feat = lrelu(&y, &self.slope);
        }
        let y = self.conv_hr.forward(&feat);
        drop(feat);
        let y = {
            let z = lrelu(&y, &self.slope);
            drop(y);
            z
        };
        self.conv_last.forward(&y)
    }
}
