//! The SD KL autoencoder (LDM `AutoencoderKL`), keys under `first_stage_model.`: `encoder.*`,
//! `decoder.*`, `quant_conv`, `post_quant_conv`.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::layers::{conv1x1, conv2d, conv3x3, group_norm, Conv2d, GroupNorm};
use crate::checkpoint::WPath;

/// Hyper-parameters, named as in the LDM yaml (`first_stage_config.params.ddconfig`, `embed_dim`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    pub ch: i64,
    pub ch_mult: Vec<i64>,
    pub num_res_blocks: i64,
    pub z_channels: i64,
    pub embed_dim: i64,
    pub in_channels: i64,
    pub out_ch: i64,
}

impl VaeConfig {
    /// SD 1.x/2.x (`v1-inference.yaml`, `first_stage_config`).
    pub fn sd() -> Self {
        VaeConfig { ch: 128, ch_mult: vec![1, 2, 4, 4], num_res_blocks: 2, z_channels: 4, embed_dim: 4, in_channels: 3, out_ch: 3 }
    }
}

/// LDM's `ResnetBlock` without timestep input: `norm1, conv1, norm2, conv2, nin_shortcut`.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(p: &WPath, c_in: i64, c_out: i64) -> Self {
        ResnetBlock {
            norm1: group_norm(&p.pp("norm1"), c_in, 1e-6),
            conv1: conv3x3(&p.pp("conv1"), c_in, c_out),
            norm2: group_norm(&p.pp("norm2"), c_out, 1e-6),
            conv2: conv3x3(&p.pp("conv2"), c_out, c_out),
            shortcut: (c_in != c_out).then(|| conv1x1(&p.pp("nin_shortcut"), c_in, c_out)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // SiLU and the residual add work in place on temporaries: the same kernels, so the same
        // values, with one full-size activation fewer alive at a time, which is what sets the peak
        // memory of a decode at the 512² levels.
        let h = self.conv1.forward(&silu_(self.norm1.forward(x)));
        let mut h = self.conv2.forward(&silu_(self.norm2.forward(&h)));
        match &self.shortcut {
            Some(s) => s.forward(x).g_add_(&h),
            None => h.g_add_(x),
        }
    }
}

/// SiLU in place on a tensor nobody else holds.
fn silu_(mut t: Tensor) -> Tensor {
    let _ = t.silu_();
    t
}

/// Single-head self-attention over pixels with 1×1-convolution projections `q, k, v, proj_out`.
struct AttnBlock {
    norm: GroupNorm,
    q: Conv2d,
    k: Conv2d,
    v: Conv2d,
    proj_out: Conv2d,
}

impl AttnBlock {
    fn new(p: &WPath, c: i64) -> Self {
        AttnBlock {
            norm: group_norm(&p.pp("norm"), c, 1e-6),
            q: conv1x1(&p.pp("q"), c, c),
            k: conv1x1(&p.pp("k"), c, c),
            v: conv1x1(&p.pp("v"), c, c),
            proj_out: conv1x1(&p.pp("proj_out"), c, c),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("a 4-D [b, c, h, w] activation"); // invariant: nodes check shapes first
        let hn = self.norm.forward(x);
        // q, k and v exactly as ComfyUI's pytorch_attention makes them: libtorch's CPU SDPA rounds
        // differently for other strides, even of the size-1 head dimension (45 of a 512² image's 786,432
        // 8-bit values moved one step). With these, a full-size decode and encode equal ComfyUI's bit for
        // bit (tests/parity/comfy_vae_check.py).
        let tokens = |t: Tensor| t.view([b, 1, c, h * w]).transpose(2, 3).contiguous();
        let out = Tensor::scaled_dot_product_attention(
            &tokens(self.q.forward(&hn)),
            &tokens(self.k.forward(&hn)),
            &tokens(self.v.forward(&hn)),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        drop(hn);
        // `x + …`, ComfyUI's order: the sum keeps x's layout (NCHW in a decode), not the channels-last
        // strides the attention's output comes back in, so the convolutions after it run as ComfyUI's do.
        x + self.proj_out.forward(&out.transpose(2, 3).reshape([b, c, h, w]))
    }
}

/// The two resnets and the attention in the middle of encoder and decoder.
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(p: &WPath, c: i64) -> Self {
        Mid { block_1: ResnetBlock::new(&p.pp("block_1"), c, c), attn_1: AttnBlock::new(&p.pp("attn_1"), c), block_2: ResnetBlock::new(&p.pp("block_2"), c, c) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.block_2.forward(&self.attn_1.forward(&self.block_1.forward(x)))
    }
}

struct Encoder {
    conv_in: Conv2d,
    /// Per level: res blocks, then a stride-2 convolution except on the last level.
    down: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(p: &WPath, c: &VaeConfig) -> Self {
        let mut ch = c.ch;
        let mut down = Vec::new();
        for (i, mult) in c.ch_mult.iter().enumerate() {
            let lp = p.pp("down").pp(i);
            let blocks = (0..c.num_res_blocks)
                .map(|j| {
                    let b = ResnetBlock::new(&lp.pp("block").pp(j), ch, c.ch * mult);
                    ch = c.ch * mult;
                    b
                })
                .collect();
            let downsample = (i + 1 < c.ch_mult.len()).then(|| conv2d(&lp.pp("downsample").pp("conv"), ch, ch, 3, 2, 0));
            down.push((blocks, downsample));
        }
        Encoder {
            conv_in: conv3x3(&p.pp("conv_in"), c.in_channels, c.ch),
            down,
            mid: Mid::new(&p.pp("mid"), ch),
            norm_out: group_norm(&p.pp("norm_out"), ch, 1e-6),
            conv_out: conv3x3(&p.pp("conv_out"), ch, 2 * c.z_channels),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for (blocks, downsample) in &self.down {
            for b in blocks {
                h = b.forward(&h);
            }
            if let Some(conv) = downsample {
                // LDM pads right and bottom only, then convolves with stride 2 and no padding.
                h = conv.forward(&h.constant_pad_nd([0, 1, 0, 1]));
            }
        }
        h = self.mid.forward(&h);
        self.conv_out.forward(&silu_(self.norm_out.forward(&h)))
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    /// Per level, in checkpoint order (level 0 first); applied from the deepest level up.
    up: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(p: &WPath, c: &VaeConfig) -> Self {
        let levels = c.ch_mult.len();
        let mut ch = c.ch * c.ch_mult[levels - 1];
        let conv_in = conv3x3(&p.pp("conv_in"), c.z_channels, ch);
        let mid = Mid::new(&p.pp("mid"), ch);
        let mut up: Vec<(Vec<ResnetBlock>, Option<Conv2d>)> = Vec::new();
        for i in (0..levels).rev() {
            let lp = p.pp("up").pp(i);
            let blocks = (0..=c.num_res_blocks)
                .map(|j| {
                    let b = ResnetBlock::new(&lp.pp("block").pp(j), ch, c.ch * c.ch_mult[i]);
                    ch = c.ch * c.ch_mult[i];
                    b
                })
                .collect();
            let upsample = (i > 0).then(|| conv3x3(&lp.pp("upsample").pp("conv"), ch, ch));
            up.insert(0, (blocks, upsample));
        }
        Decoder { conv_in, mid, up, norm_out: group_norm(&p.pp("norm_out"), ch, 1e-6), conv_out: conv3x3(&p.pp("conv_out"), ch, c.out_ch) }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid.forward(&self.conv_in.forward(z));
        for (blocks, upsample) in self.up.iter().rev() {
            for b in blocks {
                h = b.forward(&h);
            }
            if let Some(conv) = upsample {
                let (_, _, hh, ww) = h.size4().expect("a 4-D [b, c, h, w] activation"); // invariant: nodes check shapes first
                let up = h.upsample_nearest2d([hh * 2, ww * 2], None, None);
                drop(h);
                h = conv.forward(&up);
            }
        }
        self.conv_out.forward(&silu_(self.norm_out.forward(&h)))
    }
}

pub struct AutoencoderKl {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
}

impl AutoencoderKl {
    pub fn new(p: &WPath, config: VaeConfig) -> Self {
        AutoencoderKl {
            encoder: Encoder::new(&p.pp("encoder"), &config),
            decoder: Decoder::new(&p.pp("decoder"), &config),
            quant_conv: conv1x1(&p.pp("quant_conv"), 2 * config.z_channels, 2 * config.embed_dim),
            post_quant_conv: conv1x1(&p.pp("post_quant_conv"), config.embed_dim, config.z_channels),
            config,
        }
    }

    /// Where the weights live.
    pub fn device(&self) -> tch::Device {
        self.quant_conv.weight.device()
    }

    /// The dtype the weights, and so the activations, are in.
    pub fn kind(&self) -> tch::Kind {
        self.quant_conv.weight.kind()
    }

    /// The mean of the latent distribution for images `x` `[b, 3, h, w]` in -1..1 (unscaled latents).
    pub fn encode_mean(&self, x: &Tensor) -> Tensor {
        let moments = self.quant_conv.forward(&self.encoder.forward(&self.layout(&x.to_kind(self.kind()))));
        // Latents leave in the plain layout the samplers' views expect.
        moments.narrow(1, 0, self.config.embed_dim).contiguous()
    }

    /// Images in about -1..1 from unscaled latents `z` `[b, embed_dim, h, w]`.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        self.decoder.forward(&self.post_quant_conv.forward(&self.layout(&z.to_kind(self.kind()))))
    }

    /// The input in the memory layout the convolutions run fastest in. On the CPU in bf16 or fp16 that
    /// is channels-last (NHWC strides, oneDNN's own layout): every convolution keeps it, GroupNorm,
    /// SiLU, the adds and the nearest upsampling have channels-last kernels, and the attention's tokens
    /// are contiguous as they are. Measured with diffusers' VAE on the full-size SD VAE, a 512² decode
    /// in bf16 takes 0.77× the time, as close to fp32's image as NCHW's (mean 0.80 of 255 either way).
    /// fp32 keeps ComfyUI's layouts, the input's own: channels-last would take 0.82× there but move
    /// 566 of that image's 786,432 8-bit values, and fp32 is the mode that gives ComfyUI's image.
    /// Weights stay as loaded (oneDNN reorders them per call, a few percent), plain contiguous tensors
    /// for LoRA patches, merging and CheckpointSave. Other devices keep NCHW: nothing was measured there.
    fn layout(&self, x: &Tensor) -> Tensor {
        match (self.device(), self.kind()) {
            (tch::Device::Cpu, tch::Kind::BFloat16 | tch::Kind::Half) => x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]),
            // The input's own layout, as in ComfyUI's calls: NCHW for the sampler's latents,
            // channels-last strides for an IMAGE permuted to [b, 3, h, w].
            _ => x.shallow_clone(),
        }
    }
}
