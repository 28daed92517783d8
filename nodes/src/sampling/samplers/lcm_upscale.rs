//! SamplerLCMUpscale's method (ComfyUI's `sample_lcm_upscale`, comfy_extras/nodes_advanced_samplers.py):
//! LCM steps that upscale the denoised latent a little at each of the first steps, to `total_upscale`
//! times its size, then re-noise it.

use diffloom_aten::Generator;
use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::resample::common_upscale;
use crate::sampling::guidance::Denoiser;
use crate::sampling::noise::seed_bits;
use diffloom_core::NodeError;

pub struct LcmUpscale {
    pub total_upscale: f64,
    /// Upscaling steps; None: half the steps plus one, at least 2.
    pub upscale_steps: Option<usize>,
    pub upscale_method: String,
}

impl Sampler for LcmUpscale {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let steps = match self.upscale_steps {
            None => (sigmas.len() / 2 + 1).max(2),
            Some(s) => (s + 1).min(sigmas.len() + 1),
        };
        // np.linspace(1, total, steps)[1:]
        let upscales: Vec<f64> = (1..steps).map(|k| 1.0 + (self.total_upscale - 1.0) * k as f64 / (steps - 1) as f64).collect();
        let (h0, w0) = (x.size()[2], x.size()[3]);
        // ComfyUI re-noises with torch.randn_like on the latent's device, from the default generator
        // that prepare_noise's torch.manual_seed(seed) seeded. On the CPU that stream has since drawn
        // the initial noise (one latent of this shape); a CUDA device's is fresh.
        let mut g = Generator::new(cx.device, seed_bits(cx.seed)).map_err(|e| NodeError::Failed(format!("lcm_upscale noise on {:?}: {e}", cx.device)))?;
        if cx.device == tch::Device::Cpu {
            let _ = g.randn_f32(&x.size());
        }
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            x = denoised;
            if let Some(scale) = upscales.get(i) {
                let (w, h) = ((w0 as f64 * scale).round_ties_even() as i64, (h0 as f64 * scale).round_ties_even() as i64);
                x = common_upscale(&x, w, h, &self.upscale_method, "disabled")?;
            }
            if sigmas[i + 1] > 0.0 {
                let noise = g.randn(&x.size(), tch::Kind::Float).map_err(|e| NodeError::Failed(format!("lcm_upscale noise: {e}")))?;
                x = &x + noise.to_device(x.device()) * sigmas[i + 1];
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
