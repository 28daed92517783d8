//! The DPM-Solver++ samplers in CFG++ form (Chung et al. 2024), reading the unconditional estimate
//! beside the guided one: `dpmpp_2s_ancestral_cfg_pp` and `dpmpp_2m_cfg_pp` (ComfyUI's
//! `sample_dpmpp_2s_ancestral_cfg_pp`, `sample_dpmpp_2m_cfg_pp`).

use tch::Tensor;

use super::{ancestral_step, to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Dpmpp2sAncestralCfgPp {
    pub eta: f64,
    pub s_noise: f64,
}

impl Sampler for Dpmpp2sAncestralCfgPp {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let t_of = |s: f64| -s.ln();
        let sigma_of = |t: f64| (-t).exp();
        for i in 0..n {
            let (denoised, uncond) = model.denoise_with_uncond(&x, sigmas[i])?;
            let (down, up) = ancestral_step(sigmas[i], sigmas[i + 1], self.eta);
            if down == 0.0 {
                let d = to_d(&x, sigmas[i], &uncond);
                x = &denoised + d * down;
            } else {
                let (t, t_next) = (t_of(sigmas[i]), t_of(down));
                let r = 0.5;
                let h = t_next - t;
                let s = t + r * h;
                let x2 = (&x + (&denoised - &uncond)) * (sigma_of(s) / sigma_of(t)) - &denoised * (-h * r).exp_m1();
                // ComfyUI's post-CFG hook overwrites the uncond estimate on every model call, so the
                // final update shifts by the second evaluation's.
                let (denoised2, uncond2) = model.denoise_with_uncond(&x2, sigma_of(s))?;
                x = (&x + (&denoised - uncond2)) * (sigma_of(t_next) / sigma_of(t)) - denoised2 * (-h).exp_m1();
            }
            if sigmas[i + 1] > 0.0 {
                x = &x + (cx.noise)(&x)? * (self.s_noise * up);
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}

pub struct Dpmpp2mCfgPp;

impl Sampler for Dpmpp2mCfgPp {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let t_of = |s: f64| -s.ln();
        let mut old_uncond: Option<Tensor> = None;
        for i in 0..n {
            let (denoised, uncond) = model.denoise_with_uncond(&x, sigmas[i])?;
            let h = t_of(sigmas[i + 1]) - t_of(sigmas[i]);
            let mix = match &old_uncond {
                Some(old) if sigmas[i + 1] != 0.0 => {
                    let r = (t_of(sigmas[i]) - t_of(sigmas[i - 1])) / h;
                    &uncond * -(-h).exp() - (&denoised - old) * ((-h).exp_m1() / (2.0 * r))
                }
                _ => &uncond * -(-h).exp(),
            };
            x = &denoised + mix + &x * (-h).exp();
            old_uncond = Some(uncond);
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
