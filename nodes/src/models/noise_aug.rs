//! unCLIP's image-embedding noise augmentation and the ADM vector it makes, as ComfyUI 0.8 has them
//! (`comfy/ldm/modules/encoders/noise_aug_modules.py`: `CLIPEmbeddingNoiseAugmentation`;
//! `comfy/model_base.py`: `unclip_adm`, `SD21UNCLIP.encode_adm`).
//!
//! The augmentor has no learned weights. Its `data_mean` and `data_std` are non-persistent buffers set
//! to zeros and ones (ComfyUI passes no `clip_stats_path`), and ComfyUI loads only the UNet's keys into
//! the model, so the `noise_augmentor.*` tensors of a checkpoint (the schedule, and the CLIP statistics
//! of the released files) are never read: the scaling is the identity, as here.

use diffloom_aten::Generator;
use tch::{Device, Kind, Tensor};

/// `CLIPEmbeddingNoiseAugmentation` with the SD 2.1 unCLIP config: a 1000-step `squaredcos_cap_v2`
/// schedule, `max_noise_level` 1000, and `timestep_dim` the width of the image embeddings (768 for
/// unclip-l, 1024 for unclip-h; half the UNet's `adm_in_channels`).
pub struct NoiseAugmentor {
    pub timestep_dim: i64,
    pub max_noise_level: i64,
    /// `sqrt(alphas_cumprod)` and `sqrt(1 - alphas_cumprod)`, computed in f64 and stored as f32 as
    /// ComfyUI's `register_schedule` does.
    sqrt_alphas_cumprod: Vec<f32>,
    sqrt_one_minus_alphas_cumprod: Vec<f32>,
}

impl NoiseAugmentor {
    pub fn new(timestep_dim: i64) -> Self {
        let n = 1000;
        // betas_for_alpha_bar with the "squaredcos_cap_v2" alpha bar, max beta 0.999.
        let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
        let mut cumprod = 1.0f64;
        let (mut sqrt_ac, mut sqrt_1m_ac) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            let beta = (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999);
            // np.cumprod of the alphas, in order.
            cumprod *= 1.0 - beta;
            sqrt_ac.push(cumprod.sqrt() as f32);
            sqrt_1m_ac.push((1.0 - cumprod).sqrt() as f32);
        }
        NoiseAugmentor { timestep_dim, max_noise_level: 1000, sqrt_alphas_cumprod: sqrt_ac, sqrt_one_minus_alphas_cumprod: sqrt_1m_ac }
    }

    /// The noise level `round((max_noise_level - 1) * noise_augmentation)` (Python's round: halves to
    /// even), clamped into the schedule.
    pub fn noise_level(&self, noise_augmentation: f64) -> i64 {
        (((self.max_noise_level - 1) as f64 * noise_augmentation).round_ties_even() as i64).clamp(0, self.max_noise_level - 1)
    }

    /// `forward(x, noise_level, noise)`: `x` `[1, dim]` (f32) noised to `level` with `noise` (the
    /// identity scaling around it), and the sinusoidal embedding of the level, both `[1, dim]`.
    pub fn forward(&self, x: &Tensor, level: i64, noise: &Tensor) -> (Tensor, Tensor) {
        let l = level as usize;
        let z = x * f64::from(self.sqrt_alphas_cumprod[l]) + noise.to_device(x.device()) * f64::from(self.sqrt_one_minus_alphas_cumprod[l]);
        let emb = timestep_embedding_f32(&Tensor::from_slice(&[level]).to_device(x.device()), self.timestep_dim);
        (z, emb)
    }
}

/// ComfyUI's `timestep_embedding` in its own order of float operations: `exp(-ln(10000) * arange /
/// half)`, cosines first, a zero column for an odd `dim`.
pub fn timestep_embedding_f32(timesteps: &Tensor, dim: i64) -> Tensor {
    let half = dim / 2;
    let device = timesteps.device();
    let freqs = ((Tensor::arange(half, (Kind::Float, device)) * -(10000f64.ln())) / half as f64).exp();
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[args.cos(), args.sin()], -1);
    if dim % 2 == 1 {
        Tensor::cat(&[emb.shallow_clone(), emb.narrow(1, 0, 1).zeros_like()], -1)
    } else {
        emb
    }
}

/// One unCLIPConditioning application, as the ADM computation reads it.
pub struct UnclipInput<'a> {
    /// `[b, dim]`: each row is one image.
    pub image_embeds: &'a Tensor,
    pub strength: f64,
    pub noise_augmentation: f64,
}

/// The noise augmentation ComfyUI merges several images' vectors with (`unclip_noise_augment_merge`,
/// which no node sets).
pub const NOISE_AUGMENT_MERGE: f64 = 0.05;

/// ComfyUI's `unclip_adm` for an SD 2.1 unCLIP model on `device` (where ComfyUI's merge noise is
/// drawn), with `seed` the sampler's seed minus 10 (`SD21UNCLIP.encode_adm`). Returns `y` `[1,
/// 2 * dim]` in f32 on the CPU.
///
/// Each image's embedding is noise-augmented at its entry's level with `torch.manual_seed(seed)`'s
/// first normal draw on the CPU (every image the same noise), concatenated with the level's embedding
/// and multiplied by the strength. One image gives that vector; several are summed, and the sum's first
/// half is augmented again at level 50 (0.05) with noise from the global generator of the model's
/// device: on the CPU the draw after the last image's, on CUDA the first draw of the CUDA generator
/// that `torch.manual_seed` seeded too.
pub fn unclip_adm(inputs: &[UnclipInput], aug: &NoiseAugmentor, seed: u64, device: Device) -> Result<Tensor, String> {
    let dim = aug.timestep_dim;
    let mut outs = Vec::new();
    let mut generator = None;
    for input in inputs {
        let embeds = input.image_embeds;
        let width = embeds.size().last().copied().unwrap_or(0);
        if embeds.dim() != 2 || width != dim {
            return Err(format!("image_embeds of shape {:?}; this unCLIP model takes [images, {dim}] (its ADM input is {} wide)", embeds.size(), 2 * dim));
        }
        for i in 0..embeds.size()[0] {
            // (x - data_mean) / data_std promotes the embedding to f32.
            let x = embeds.get(i).to_device(Device::Cpu).to_kind(Kind::Float).unsqueeze(0);
            let mut g = Generator::cpu(seed);
            let noise = g.randn_f32(&[1, dim]);
            generator = Some(g);
            let (z, emb) = aug.forward(&x, aug.noise_level(input.noise_augmentation), &noise);
            outs.push(Tensor::cat(&[z, emb], 1) * input.strength);
        }
    }
    match outs.len() {
        0 => Err("no image embeddings (an empty CLIP vision output)".into()),
        1 => Ok(outs.swap_remove(0)),
        _ => {
            let sum = Tensor::stack(&outs, 0).sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
            let noise = match (device, generator) {
                (Device::Cpu, Some(mut g)) => g.randn_f32(&[1, dim]),
                _ => Generator::new(device, seed)
                    .and_then(|mut g| g.randn(&[1, dim], Kind::Float))
                    .map_err(|e| format!("cannot draw the merge noise on {device:?}: {e}"))?
                    .to_device(Device::Cpu),
            };
            let (z, emb) = aug.forward(&sum.narrow(1, 0, dim), aug.noise_level(NOISE_AUGMENT_MERGE), &noise);
            Ok(Tensor::cat(&[z, emb], 1))
        }
    }
}
