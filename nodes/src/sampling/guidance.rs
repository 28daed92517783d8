//! The denoiser samplers call: the UNet with classifier-free guidance (cond and uncond in one batched
//! forward pass), the model-sampling conversions, and ComfyUI's latent noise mask.

use tch::{Kind, Tensor};

use diffloom_core::NodeError;

use super::conds::Cond;
use super::model_sampling::ModelSampling;
use crate::models::unet::Unet;

/// What a sampler calls: the denoised estimate of `x` at noise level `sigma`.
pub trait Denoiser {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, NodeError>;

    /// The guided estimate and the unconditional one, for the CFG++ samplers (ComfyUI hands them the
    /// uncond prediction through a post-CFG function and disables the cfg = 1 shortcut, so the uncond
    /// side always runs). A denoiser without guidance returns its estimate twice.
    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor), NodeError> {
        let d = self.denoise(x, sigma)?;
        Ok((d.shallow_clone(), d))
    }
}

/// Keeps the unmasked part of the latent: before each model call the latent is re-noised to the current
/// sigma there, and the model's estimate there is replaced by the original (ComfyUI's
/// `KSamplerX0Inpaint`). `mask` is 1 where the image is resampled.
pub struct NoiseMask {
    /// `[b, c, h, w]` at latent resolution.
    pub mask: Tensor,
    pub latent_image: Tensor,
    pub noise: Tensor,
}

/// The guided UNet. Each side's entries are run on their areas and their predictions averaged with
/// their per-pixel weights (ComfyUI's `calc_cond_batch`); entries over the same area share one batched
/// forward pass, uncond rows first, and the uncond side is skipped when cfg is 1, as ComfyUI does
/// (except for CFG++ samplers, which read it).
pub struct CfgDenoiser<'a> {
    pub unet: &'a Unet,
    pub sampling: &'a ModelSampling,
    pub cond: Vec<Cond>,
    pub uncond: Option<Vec<Cond>>,
    pub cfg: f64,
    pub noise_mask: Option<NoiseMask>,
    /// Model calls so far (for NaN reports and benchmarks).
    pub calls: usize,
    /// Time spent in the UNet itself, so benchmarks can tell sampler overhead from model time.
    pub model_time: std::time::Duration,
}

/// Repeats token sequences to a common length (their least common multiple) and stacks them, so that
/// conds of different lengths can share a batch, as ComfyUI's `CONDCrossAttn.concat` does.
pub fn batch_conds(parts: &[Tensor]) -> Tensor {
    let lcm = parts.iter().map(|t| t.size()[1]).fold(1, |l, n| l / gcd(l, n) * n);
    let padded: Vec<Tensor> = parts.iter().map(|t| if t.size()[1] == lcm { t.shallow_clone() } else { t.repeat([1, lcm / t.size()[1], 1]) }).collect();
    Tensor::cat(&padded, 0)
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn crop(t: &Tensor, area: Option<[i64; 4]>) -> Tensor {
    match area {
        Some([h, w, y, x]) => t.narrow(2, y, h).narrow(3, x, w),
        None => t.shallow_clone(),
    }
}

impl Denoiser for CfgDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, NodeError> {
        Ok(self.guided(x, sigma, false)?.0)
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor), NodeError> {
        let (guided, uncond) = self.guided(x, sigma, true)?;
        let uncond = uncond.unwrap_or_else(|| guided.shallow_clone());
        Ok((guided, uncond))
    }
}

impl CfgDenoiser<'_> {
    /// The guided estimate, and with `want_uncond` the uncond side's estimate (before the noise mask
    /// is applied, as ComfyUI's post-CFG functions see it), computed even at cfg 1.
    fn guided(&mut self, x: &Tensor, sigma: f64, want_uncond: bool) -> Result<(Tensor, Option<Tensor>), NodeError> {
        self.calls += 1;
        let use_uncond = self.uncond.is_some() && (want_uncond || (self.cfg - 1.0).abs() > 1e-9);
        let x_in = match &self.noise_mask {
            Some(m) => {
                let noised = self.sampling.noise_scaling(sigma, &m.noise, &m.latent_image, false);
                x * &m.mask + noised * (m.mask.neg() + 1.0)
            }
            None => x.shallow_clone(),
        };
        let b = x_in.size()[0];
        let device = self.unet_device();
        // (side, entry): side 0 is uncond, 1 cond; grouped by area in order of first appearance.
        let mut jobs: Vec<(usize, &Cond)> = Vec::new();
        if let Some(u) = self.uncond.as_ref().filter(|_| use_uncond) {
            jobs.extend(u.iter().map(|c| (0, c)));
        }
        jobs.extend(self.cond.iter().map(|c| (1, c)));
        let mut groups: Vec<(Option<[i64; 4]>, Vec<(usize, &Cond)>)> = Vec::new();
        for job in jobs {
            match groups.iter_mut().find(|(a, _)| *a == job.1.area) {
                Some((_, g)) => g.push(job),
                None => groups.push((job.1.area, vec![job])),
            }
        }
        let zeros = || x_in.zeros_like();
        let sums = [zeros(), zeros()];
        let weights = [x_in.ones_like() * 1e-37, x_in.ones_like() * 1e-37];
        for (area, group) in &groups {
            let n = group.len() as i64;
            let xs = crop(&x_in, *area).repeat([n, 1, 1, 1]);
            let mut model_in = self.sampling.calculate_input(sigma, &xs).to_device(device);
            let concats: Vec<Tensor> = group.iter().filter_map(|(_, c)| c.concat.as_ref().map(|t| crop(t, *area))).collect();
            if !concats.is_empty() {
                model_in = Tensor::cat(&[model_in, Tensor::cat(&concats, 0).to_device(device)], 1);
            }
            let sigmas = Tensor::from_slice(&vec![sigma as f32; (b * n) as usize]);
            let t = self.sampling.timestep(&sigmas).to_device(device);
            let contexts: Vec<Tensor> = group.iter().map(|(_, c)| c.context.repeat([b, 1, 1])).collect();
            let context = batch_conds(&contexts).to_device(device);
            let started = std::time::Instant::now();
            let out = self.unet.forward(&model_in, &t, &context).to_kind(Kind::Float).to_device(x.device());
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            self.model_time += started.elapsed();
            let denoised = self.sampling.calculate_denoised(sigma, &out, &xs);
            for (k, (side, c)) in group.iter().enumerate() {
                let pred = denoised.narrow(0, k as i64 * b, b);
                let _ = crop(&sums[*side], *area).f_add_(&(pred * &c.mult))?;
                let _ = crop(&weights[*side], *area).f_add_(&c.mult)?;
            }
        }
        let cond = &sums[1] / &weights[1];
        let uncond = use_uncond.then(|| &sums[0] / &weights[0]);
        let guided = match &uncond {
            // ComfyUI's cfg_function on the denoised estimates: uncond + (cond − uncond)·cfg.
            Some(uncond) => uncond + (cond - uncond) * self.cfg,
            None => cond,
        };
        let guided = match &self.noise_mask {
            Some(m) => &guided * &m.mask + &m.latent_image * (m.mask.neg() + 1.0),
            None => guided,
        };
        Ok((guided, uncond))
    }

    fn unet_device(&self) -> tch::Device {
        self.unet.device()
    }
}
