//! SEEDS (Gonzalez et al. 2023, stochastic explicit exponential derivative-free solvers, data
//! prediction in half-log-SNR time λ = −log σ for SD's schedule): `seeds_2`, `seeds_3`, and the
//! deterministic/stochastic exponential Heun `exp_heun_2_x0` / `exp_heun_2_x0_sde` (SEEDS-2 with
//! r = 1 and the φ₂ update), after ComfyUI's `sample_seeds_2` / `sample_seeds_3`.

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

/// h·φ₁(h) = e^h − 1.
fn phi1(h: f64) -> f64 {
    h.exp_m1()
}

/// h·φ₂(h) = (e^h − 1 − h)/h.
fn phi2(h: f64) -> f64 {
    (h.exp_m1() - h) / h
}

/// SEEDS' noise carried across a segment of length `seg` (in λ, times eta): the earlier draw decays by
/// e^seg and a fresh draw fills in the lost variance, so the path stays one Brownian motion.
fn carry_noise(noise: Tensor, seg: f64, x: &Tensor, cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
    Ok(noise * seg.exp() + (cx.noise)(x)? * (-(2.0 * seg).exp_m1()).sqrt())
}

fn lerp(a: f64, b: f64, w: f64) -> f64 {
    a + w * (b - a)
}

pub struct Seeds2 {
    pub eta: f64,
    pub s_noise: f64,
    pub r: f64,
    /// The φ₂ update (`solver_type="phi_2"`) instead of φ₁.
    pub phi_2: bool,
}

impl Sampler for Seeds2 {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let inject = self.eta > 0.0 && self.s_noise > 0.0;
        let (r, eta) = (self.r, self.eta);
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            if sigmas[i + 1] == 0.0 {
                x = denoised;
                (cx.step)(i, n, &x)?;
                continue;
            }
            let (ls, lt) = (-sigmas[i].ln(), -sigmas[i + 1].ln());
            let h = lt - ls;
            let h_eta = h * (eta + 1.0);
            let ls1 = lerp(ls, lt, r);
            let s1 = (-ls1).exp();
            let alpha_s1 = s1 * ls1.exp();
            let alpha_t = sigmas[i + 1] * lt.exp();
            let mut x2 = &x * (s1 / sigmas[i] * (-r * h * eta).exp()) - &denoised * (alpha_s1 * phi1(-r * h_eta));
            let mut sde_noise = None;
            if inject {
                let noise = (cx.noise)(&x)? * (-(-2.0 * r * h * eta).exp_m1()).sqrt();
                x2 += &noise * (s1 * self.s_noise);
                sde_noise = Some(noise);
            }
            let denoised2 = model.denoise(&x2, s1)?;
            let decay = sigmas[i + 1] / sigmas[i] * (-h * eta).exp();
            x = if self.phi_2 {
                let b2 = phi2(-h_eta) / r;
                let b1 = phi1(-h_eta) - b2;
                &x * decay - (&denoised * b1 + denoised2 * b2) * alpha_t
            } else {
                let mixed = &denoised + (denoised2 - &denoised) * (1.0 / (2.0 * r));
                &x * decay - mixed * (alpha_t * phi1(-h_eta))
            };
            if let Some(noise) = sde_noise {
                let noise = carry_noise(noise, (r - 1.0) * h * eta, &x, cx)?;
                x = &x + noise * (sigmas[i + 1] * self.s_noise);
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}

pub struct Seeds3 {
    pub eta: f64,
    pub s_noise: f64,
    pub r_1: f64,
    pub r_2: f64,
}

impl Sampler for Seeds3 {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let inject = self.eta > 0.0 && self.s_noise > 0.0;
        let (r1, r2, eta) = (self.r_1, self.r_2, self.eta);
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            if sigmas[i + 1] == 0.0 {
                x = denoised;
                (cx.step)(i, n, &x)?;
                continue;
            }
            let (ls, lt) = (-sigmas[i].ln(), -sigmas[i + 1].ln());
            let h = lt - ls;
            let h_eta = h * (eta + 1.0);
            let (ls1, ls2) = (lerp(ls, lt, r1), lerp(ls, lt, r2));
            let (s1, s2) = ((-ls1).exp(), (-ls2).exp());
            let (alpha_s1, alpha_s2) = (s1 * ls1.exp(), s2 * ls2.exp());
            let alpha_t = sigmas[i + 1] * lt.exp();

            let mut x2 = &x * (s1 / sigmas[i] * (-r1 * h * eta).exp()) - &denoised * (alpha_s1 * phi1(-r1 * h_eta));
            let mut sde_noise = None;
            if inject {
                let noise = (cx.noise)(&x)? * (-(-2.0 * r1 * h * eta).exp_m1()).sqrt();
                x2 += &noise * (s1 * self.s_noise);
                sde_noise = Some(noise);
            }
            let denoised2 = model.denoise(&x2, s1)?;

            let a3_2 = r2 / r1 * phi2(-r2 * h_eta);
            let a3_1 = phi1(-r2 * h_eta) - a3_2;
            let mut x3 = &x * (s2 / sigmas[i] * (-r2 * h * eta).exp()) - (&denoised * a3_1 + denoised2 * a3_2) * alpha_s2;
            if let Some(noise) = sde_noise.take() {
                let noise = carry_noise(noise, (r1 - r2) * h * eta, &x, cx)?;
                x3 += &noise * (s2 * self.s_noise);
                sde_noise = Some(noise);
            }
            let denoised3 = model.denoise(&x3, s2)?;

            let b3 = phi2(-h_eta) / r2;
            let b1 = phi1(-h_eta) - b3;
            x = &x * (sigmas[i + 1] / sigmas[i] * (-h * eta).exp()) - (&denoised * b1 + denoised3 * b3) * alpha_t;
            if let Some(noise) = sde_noise {
                let noise = carry_noise(noise, (r2 - 1.0) * h * eta, &x, cx)?;
                x = &x + noise * (sigmas[i + 1] * self.s_noise);
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
