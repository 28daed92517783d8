//! `dpmpp_sde`: DPM-Solver++ (stochastic, 2 model calls per step) with Brownian-tree noise, in ComfyUI's
//! half-log-SNR form (its last step to 0 returns the denoised estimate).

use tch::Tensor;

use super::{ancestral_step, SampleCtx, Sampler};
use crate::sampling::brownian::BrownianNoise;
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct DpmppSde {
    pub eta: f64,
    pub s_noise: f64,
    pub r: f64,
    /// The `_gpu` variant: Brownian noise drawn on the model's device (ComfyUI's `cpu=False` tree).
    pub gpu: bool,
}

impl Sampler for DpmppSde {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let mut bt = BrownianNoise::new(&x.size(), sigmas, cx.seed, cx.brownian_device(self.gpu))?;
        let lambda = |s: f64| -s.ln();
        let sigma_of = |l: f64| (-l).exp();
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            if sigmas[i + 1] == 0.0 {
                x = denoised;
            } else {
                let (ls, lt) = (lambda(sigmas[i]), lambda(sigmas[i + 1]));
                let h = lt - ls;
                let ls1 = ls + self.r * h;
                let fac = 1.0 / (2.0 * self.r);
                // The intermediate sigma is a Brownian-tree query point, which the tree rounds to 6
                // decimals: compute it in float32 libtorch ops as ComfyUI does, so it rounds the same.
                let s1 = f32_sigma_mid(sigmas[i], sigmas[i + 1], self.r);
                let alpha_s = sigmas[i] * ls.exp();
                let alpha_s1 = s1 * ls1.exp();
                let alpha_t = sigmas[i + 1] * lt.exp();
                // Step 1: to the intermediate point.
                let (sd, su) = ancestral_step(sigma_of(ls), sigma_of(ls1), self.eta);
                let h_ = lambda(sd) - ls;
                let mut x2 = &x * ((alpha_s1 / alpha_s) * (-h_).exp()) - &denoised * (alpha_s1 * (-h_).exp_m1());
                if self.eta > 0.0 && self.s_noise > 0.0 {
                    x2 += bt.noise(sigmas[i], s1)?.to_device(x.device()) * (alpha_s1 * self.s_noise * su);
                }
                let denoised2 = model.denoise(&x2, s1)?;
                // Step 2: to the next sigma.
                let (sd, su) = ancestral_step(sigma_of(ls), sigma_of(lt), self.eta);
                let h_ = lambda(sd) - ls;
                let denoised_d = &denoised * (1.0 - fac) + denoised2 * fac;
                x = &x * ((alpha_t / alpha_s) * (-h_).exp()) - denoised_d * (alpha_t * (-h_).exp_m1());
                if self.eta > 0.0 && self.s_noise > 0.0 {
                    x = &x + bt.noise(sigmas[i], sigmas[i + 1])?.to_device(x.device()) * (alpha_t * self.s_noise * su);
                }
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}

/// `exp(-(λ_s + r·(λ_t − λ_s)))` with λ = −log σ, in 0-dim float32 tensors as ComfyUI computes it.
fn f32_sigma_mid(sigma: f64, sigma_next: f64, r: f64) -> f64 {
    let ls = Tensor::from(sigma as f32).log().neg();
    let lt = Tensor::from(sigma_next as f32).log().neg();
    let h = &lt - &ls;
    (ls + h * r).neg().exp().double_value(&[])
}
