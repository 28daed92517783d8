//! The discrete noise schedule SD models were trained with, and how sigmas map to model inputs and
//! outputs: ComfyUI's `ModelSamplingDiscrete` (comfy/model_sampling.py) with the sampling types its
//! ModelSamplingDiscrete node offers (EPS, V_PREDICTION, LCM, X0, IMG_TO_IMG), the zero-terminal-SNR
//! rescale (`zsnr`) and LCM's distilled 50-step schedule (`ModelSamplingDiscreteDistilled`).

use tch::{Device, Kind, Tensor};

use crate::checkpoint::detect::Prediction;

/// SD 1.x/2.x: 1000 steps, "scaled linear" betas from 0.00085 to 0.012 (LDM configs'
/// `linear_start`/`linear_end`).
pub const TIMESTEPS: i64 = 1000;
pub const LINEAR_START: f64 = 0.00085;
pub const LINEAR_END: f64 = 0.012;

/// LCM's distilled schedule keeps 50 of the 1000 training sigmas (`original_timesteps`).
const LCM_ORIGINAL_TIMESTEPS: i64 = 50;

/// How the model's output is read, with ComfyUI's names (the `sampling` choices of its
/// ModelSamplingDiscrete node, in its order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parameterization {
    /// The output is the noise (SD 1.x, SD 2.x base).
    Eps,
    /// The output is the velocity (SD 2.x 768-v).
    V,
    /// Latent consistency models: eps output, LCM's boundary-condition skip/out scalings, and the
    /// distilled 50-sigma schedule.
    Lcm,
    /// The output is the denoised latent itself.
    X0,
    /// X0 output from the latent as it is (no input scaling).
    ImgToImg,
}

/// The names of [`Parameterization`] as the node offers them.
pub const SAMPLING_NAMES: &[&str] = &["eps", "v_prediction", "lcm", "x0", "img_to_img"];

impl Parameterization {
    /// The parameterization named as in [`SAMPLING_NAMES`].
    pub fn from_name(name: &str) -> Option<Parameterization> {
        Some(match name {
            "eps" => Parameterization::Eps,
            "v_prediction" => Parameterization::V,
            "lcm" => Parameterization::Lcm,
            "x0" => Parameterization::X0,
            "img_to_img" => Parameterization::ImgToImg,
            _ => return None,
        })
    }
}

/// What a MODEL samples with: its parameterization and whether its schedule is rescaled to zero
/// terminal SNR. A checkpoint's detected prediction gives the default; ModelSamplingDiscrete sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SamplingMode {
    pub parameterization: Parameterization,
    pub zsnr: bool,
}

impl From<Prediction> for SamplingMode {
    fn from(p: Prediction) -> SamplingMode {
        let parameterization = match p {
            Prediction::Eps => Parameterization::Eps,
            Prediction::V => Parameterization::V,
        };
        SamplingMode { parameterization, zsnr: false }
    }
}

/// The schedule's sigmas and the parameterization.
pub struct ModelSampling {
    /// Increasing float32 sigmas: of each of the 1000 training timesteps, or of LCM's 50.
    pub sigmas: Tensor,
    /// `log(sigmas)`, computed in float64 then stored as float32, as ComfyUI does.
    pub log_sigmas: Tensor,
    pub parameterization: Parameterization,
    /// Training timesteps between two kept sigmas: 1, or 20 for LCM's distilled schedule.
    skip_steps: i64,
}

impl ModelSampling {
    /// The SD schedule for a detected prediction type.
    pub fn sd(prediction: Prediction) -> ModelSampling {
        ModelSampling::new(prediction.into())
    }

    /// The SD schedule: betas = linspace(√start, √end, 1000)² in float64, alphā = cumprod(1 − β),
    /// sigma = √((1 − alphā) / alphā); rescaled to zero terminal SNR with `zsnr`; for LCM, every 20th
    /// sigma from the top.
    pub fn new(mode: SamplingMode) -> ModelSampling {
        let opts = (Kind::Double, Device::Cpu);
        let betas = Tensor::linspace(LINEAR_START.sqrt(), LINEAR_END.sqrt(), TIMESTEPS, opts).square();
        let alphas_cumprod = (betas.neg() + 1.0).cumprod(0, Kind::Double);
        let mut sigmas = ((alphas_cumprod.neg() + 1.0) / &alphas_cumprod).sqrt();
        if mode.zsnr {
            sigmas = rescale_zero_terminal_snr(&sigmas);
        }
        // ComfyUI stores the float64 sigmas as float32 before LCM picks from them.
        let mut sigmas = sigmas.to_kind(Kind::Float);
        let mut skip_steps = 1;
        if mode.parameterization == Parameterization::Lcm {
            skip_steps = TIMESTEPS / LCM_ORIGINAL_TIMESTEPS;
            // sigmas_valid[49 − x] = sigmas[999 − 20x]: indices 19, 39, …, 999.
            let idx = Tensor::arange_start_step(skip_steps - 1, TIMESTEPS, skip_steps, (Kind::Int64, Device::Cpu));
            sigmas = sigmas.index_select(0, &idx);
        }
        let log_sigmas = sigmas.log();
        ModelSampling { sigmas, log_sigmas, parameterization: mode.parameterization, skip_steps }
    }

    fn len(&self) -> i64 {
        self.sigmas.size()[0]
    }

    pub fn sigma_min(&self) -> f64 {
        self.sigmas.double_value(&[0])
    }

    pub fn sigma_max(&self) -> f64 {
        self.sigmas.double_value(&[self.len() - 1])
    }

    /// The training timestep of `sigma`: the nearest kept sigma in log space (ComfyUI quantizes; the
    /// model sees whole steps), as its index in the 1000-step schedule.
    pub fn timestep(&self, sigma: &Tensor) -> Tensor {
        let log_sigma = sigma.to_kind(Kind::Float).log();
        let dists = log_sigma.unsqueeze(0) - self.log_sigmas.to_device(sigma.device()).unsqueeze(1);
        let idx = dists.abs().argmin(0, false).view(sigma.size().as_slice());
        (idx * self.skip_steps + (self.skip_steps - 1)).to_kind(Kind::Float)
    }

    /// The sigma of a (fractional) training timestep, interpolating log sigmas.
    pub fn sigma(&self, t: f64) -> f64 {
        // ComfyUI computes the distilled position in float32.
        let t = if self.skip_steps == 1 { t } else { ((t as f32 - (self.skip_steps - 1) as f32) / self.skip_steps as f32) as f64 };
        let t = t.clamp(0.0, (self.len() - 1) as f64);
        let (lo, hi) = (t.floor() as i64, t.ceil() as i64);
        let w = t - t.floor();
        let ls = |i: i64| self.log_sigmas.double_value(&[i]) as f32;
        let log_sigma = (1.0 - w as f32) * ls(lo) + w as f32 * ls(hi);
        log_sigma.exp() as f64
    }

    /// ComfyUI's `percent_to_sigma`: the sigma reached `percent` of the way through the schedule
    /// (0 gives a sigma above any, 1 gives 0), for timestep ranges and SA-Solver's noise interval.
    pub fn percent_to_sigma(&self, percent: f64) -> f64 {
        if percent <= 0.0 {
            return 999_999_999.9;
        }
        if percent >= 1.0 {
            return 0.0;
        }
        self.sigma(((1.0 - percent) * 999.0) as f32 as f64)
    }

    /// The model input for noisy latents `x` at `sigma`: x / √(σ² + 1) (σ_data = 1), or x itself for
    /// IMG_TO_IMG.
    pub fn calculate_input(&self, sigma: f64, x: &Tensor) -> Tensor {
        match self.parameterization {
            Parameterization::ImgToImg => x.shallow_clone(),
            _ => x / ((sigma * sigma + 1.0) as f32).sqrt() as f64,
        }
    }

    /// The denoised estimate from the model output.
    pub fn calculate_denoised(&self, sigma: f64, output: &Tensor, x: &Tensor) -> Tensor {
        match self.parameterization {
            Parameterization::Eps => x - output * sigma,
            // σ_data = 1: x·1/(σ²+1) − v·σ/√(σ²+1)
            Parameterization::V => {
                let s2 = sigma * sigma + 1.0;
                x * (1.0 / s2) - output * (sigma / s2.sqrt())
            }
            Parameterization::X0 | Parameterization::ImgToImg => output.shallow_clone(),
            // LCM's boundary condition on the eps estimate, with σ_data 0.5 and the timestep scaled by 10
            // (comfy_extras/nodes_model_advanced.py, class LCM).
            Parameterization::Lcm => {
                let t = self.timestep(&Tensor::from(sigma as f32)).double_value(&[]) * 10.0;
                let sigma_data = 0.5f64;
                let c_skip = sigma_data * sigma_data / (t * t + sigma_data * sigma_data);
                let c_out = t / (t * t + sigma_data * sigma_data).sqrt();
                let x0 = x - output * sigma;
                x0 * c_out + x * c_skip
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

/// ComfyUI's `rescale_zero_terminal_snr_sigmas` (Lin et al. 2023): shift and scale √alphā so the last
/// timestep has zero signal, keeping the first; the last alphā is then set to 4.8973451890853435e-08
/// (not 0), so the top sigma is large but finite. In float64, as ComfyUI computes it.
pub fn rescale_zero_terminal_snr(sigmas: &Tensor) -> Tensor {
    let alphas_cumprod = (sigmas * sigmas + 1.0).reciprocal();
    let sqrt_ab = alphas_cumprod.sqrt();
    let n = sqrt_ab.size()[0];
    let first = sqrt_ab.double_value(&[0]);
    let last = sqrt_ab.double_value(&[n - 1]);
    let sqrt_ab = (sqrt_ab - last) * (first / (first - last));
    let alphas_bar = sqrt_ab.square();
    let _ = alphas_bar.get(n - 1).fill_(4.8973451890853435e-08);
    ((alphas_bar.neg() + 1.0) / &alphas_bar).sqrt()
}
