//! The discrete noise schedule SD models were trained with, and how sigmas map to model inputs and
//! outputs: ComfyUI's `ModelSamplingDiscrete` with its EPS and V_PREDICTION variants.

use tch::{Device, Kind, Tensor};

use crate::checkpoint::detect::Prediction;

/// SD 1.x/2.x: 1000 steps, "scaled linear" betas from 0.00085 to 0.012 (LDM configs'
/// `linear_start`/`linear_end`).
pub const TIMESTEPS: i64 = 1000;
pub const LINEAR_START: f64 = 0.00085;
pub const LINEAR_END: f64 = 0.012;

/// The schedule's sigmas and the prediction type.
pub struct ModelSampling {
    /// `[1000]` float32, increasing: sigma of timestep t.
    pub sigmas: Tensor,
    /// `log(sigmas)`, computed in float64 then stored as float32, as ComfyUI does.
    pub log_sigmas: Tensor,
    pub prediction: Prediction,
}

impl ModelSampling {
    /// The SD schedule: betas = linspace(√start, √end, 1000)² in float64, alphā = cumprod(1 − β),
    /// sigma = √((1 − alphā) / alphā).
    pub fn sd(prediction: Prediction) -> ModelSampling {
        let opts = (Kind::Double, Device::Cpu);
        let betas = Tensor::linspace(LINEAR_START.sqrt(), LINEAR_END.sqrt(), TIMESTEPS, opts).square();
        let alphas_cumprod = (betas.neg() + 1.0).cumprod(0, Kind::Double);
        let sigmas = ((alphas_cumprod.neg() + 1.0) / &alphas_cumprod).sqrt();
        ModelSampling { log_sigmas: sigmas.log().to_kind(Kind::Float), sigmas: sigmas.to_kind(Kind::Float), prediction }
    }

    pub fn sigma_min(&self) -> f64 {
        self.sigmas.double_value(&[0])
    }

    pub fn sigma_max(&self) -> f64 {
        self.sigmas.double_value(&[TIMESTEPS - 1])
    }

    /// The timestep nearest to `sigma` in log space (ComfyUI quantizes; the model sees whole steps).
    pub fn timestep(&self, sigma: &Tensor) -> Tensor {
        let log_sigma = sigma.to_kind(Kind::Float).log();
        let dists = log_sigma.unsqueeze(0) - self.log_sigmas.to_device(sigma.device()).unsqueeze(1);
        dists.abs().argmin(0, false).view(sigma.size().as_slice()).to_kind(Kind::Float)
    }

    /// The sigma of a (fractional) timestep, interpolating log sigmas.
    pub fn sigma(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, (TIMESTEPS - 1) as f64);
        let (lo, hi) = (t.floor() as i64, t.ceil() as i64);
        let w = t - t.floor();
        let ls = |i: i64| self.log_sigmas.double_value(&[i]) as f32;
        let log_sigma = (1.0 - w as f32) * ls(lo) + w as f32 * ls(hi);
        log_sigma.exp() as f64
    }

    /// The model input for noisy latents `x` at `sigma`: x / √(σ² + 1).
    pub fn calculate_input(&self, sigma: f64, x: &Tensor) -> Tensor {
        x / ((sigma * sigma + 1.0) as f32).sqrt() as f64
    }

    /// The denoised estimate from the model output.
    pub fn calculate_denoised(&self, sigma: f64, output: &Tensor, x: &Tensor) -> Tensor {
        match self.prediction {
            Prediction::Eps => x - output * sigma,
            // σ_data = 1: x·1/(σ²+1) − v·σ/√(σ²+1)
            Prediction::V => {
                let s2 = sigma * sigma + 1.0;
                x * (1.0 / s2) - output * (sigma / s2.sqrt())
            }
        }
    }

    /// Latents at noise level `sigma`: `latent + noise·σ`, or `noise·√(1+σ²)` scaled when starting from
    /// the schedule's maximum (`max_denoise`, ComfyUI's convention for full denoising).
    pub fn noise_scaling(&self, sigma: f64, noise: &Tensor, latent: &Tensor, max_denoise: bool) -> Tensor {
        let scale = if max_denoise { (1.0 + sigma * sigma).sqrt() } else { sigma };
        noise * scale + latent
    }
}
