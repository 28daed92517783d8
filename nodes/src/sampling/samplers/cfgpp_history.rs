//! `cfgpp_ud10_ab` ("CFG++ UD10 AB", which ComfyUI adds after 0.8): CFG++ Euler steps whose
//! unconditional slope is extrapolated from the last step (weight 0.1), blended a quarter of the way
//! toward a variable-step Adams–Bashforth 2 step, and a last step to σ = 0 replaced by the linear
//! extrapolation of the denoised estimates to σ = 0 (ComfyUI's `_sample_cfgpp_history`).

use tch::Tensor;

use super::lms::coefficient;
use super::{to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct CfgppHistory {
    pub history_weight: f64,
    pub zero_weight: Option<f64>,
    pub uncond_history_weight: f64,
}

/// UD10 AB's weights.
pub const UD10_AB: CfgppHistory = CfgppHistory { history_weight: 0.25, zero_weight: Some(1.0), uncond_history_weight: 0.1 };

impl Sampler for CfgppHistory {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let mut derivatives: Vec<Tensor> = Vec::new();
        let mut denoised_history: Vec<Tensor> = Vec::new();
        let mut old_uncond_d: Option<Tensor> = None;
        for i in 0..n {
            // Without a negative side the sampler takes the conditional estimate (ComfyUI reads
            // cond_denoised when there is no uncond).
            let (denoised, uncond) = model.denoise_with_uncond(&x, sigmas[i])?;
            let uncond = if model.has_uncond() { uncond } else { denoised.shallow_clone() };
            let current = to_d(&x, sigmas[i], &uncond);
            let dt = sigmas[i + 1] - sigmas[i];
            let mut uncond_d = current.shallow_clone();
            if let (Some(old), true) = (&old_uncond_d, self.uncond_history_weight != 0.0) {
                let ratio = dt / (sigmas[i] - sigmas[i - 1]);
                uncond_d += (&current - old) * (self.uncond_history_weight * ratio);
            }
            let euler_step = &denoised + uncond_d * sigmas[i + 1] - &x;
            derivatives.push(&euler_step / dt);
            if derivatives.len() > 2 {
                let _ = derivatives.remove(0);
            }
            let step = if derivatives.len() == 1 {
                euler_step
            } else {
                // Newest derivative first, with the Lagrange-basis weights over [σ_i, σ_{i+1}].
                let history = &derivatives[1] * coefficient(2, sigmas, i, 0) + &derivatives[0] * coefficient(2, sigmas, i, 1);
                &euler_step + (history - &euler_step) * self.history_weight
            };
            x = &x + step;
            if let (Some(w), Some(last)) = (self.zero_weight.filter(|_| sigmas[i + 1] == 0.0), denoised_history.last()) {
                let slope = (&denoised - last) / (sigmas[i] - sigmas[i - 1]);
                let zero = &denoised - slope * sigmas[i];
                x = &x + (zero - &x) * w;
            }
            denoised_history.push(denoised);
            if denoised_history.len() > 2 {
                let _ = denoised_history.remove(0);
            }
            old_uncond_d = Some(current);
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
