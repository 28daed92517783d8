//! `res_multistep` (and its `_cfg_pp`, `_ancestral`, `_ancestral_cfg_pp` variants): the second-order
//! multistep exponential integrator of Zhang et al. (arXiv 2308.02157) in ComfyUI's form, with
//! optional ancestral noise and CFG++.

use tch::Tensor;

use super::{ancestral_step, to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct ResMultistep {
    pub eta: f64,
    pub s_noise: f64,
    pub cfg_pp: bool,
}

/// φ₁(t) = (e^t − 1)/t and φ₂(t) = (φ₁(t) − 1)/t.
fn phi1(t: f64) -> f64 {
    t.exp_m1() / t
}

fn phi2(t: f64) -> f64 {
    (phi1(t) - 1.0) / t
}

/// ComfyUI replaces a NaN coefficient (from a zero step) with 0.
fn nan_to_zero(v: f64) -> f64 {
    if v.is_nan() {
        0.0
    } else {
        v
    }
}

impl Sampler for ResMultistep {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let t_of = |s: f64| -s.ln();
        let mut old: Option<(Tensor, f64)> = None;
        for i in 0..n {
            let (denoised, uncond) = match self.cfg_pp {
                true => model.denoise_with_uncond(&x, sigmas[i])?,
                false => {
                    let d = model.denoise(&x, sigmas[i])?;
                    (d.shallow_clone(), d)
                }
            };
            let (down, up) = ancestral_step(sigmas[i], sigmas[i + 1], self.eta);
            match &old {
                Some((old_denoised, old_down)) if down != 0.0 => {
                    let (t, t_old, t_next, t_prev) = (t_of(sigmas[i]), t_of(*old_down), t_of(down), t_of(sigmas[i - 1]));
                    let h = t_next - t;
                    let c2 = (t_prev - t_old) / h;
                    let (p1, p2) = (phi1(-h), phi2(-h));
                    let b1 = nan_to_zero(p1 - p2 / c2);
                    let b2 = nan_to_zero(p2 / c2);
                    let base = if self.cfg_pp { &x + (&denoised - &uncond) } else { x.shallow_clone() };
                    x = base * (-h).exp() + (&uncond * b1 + old_denoised * b2) * h;
                }
                _ => {
                    // Euler.
                    if self.cfg_pp {
                        let d = to_d(&x, sigmas[i], &uncond);
                        x = &denoised + d * down;
                    } else {
                        let d = to_d(&x, sigmas[i], &denoised);
                        x = &x + d * (down - sigmas[i]);
                    }
                }
            }
            if sigmas[i + 1] > 0.0 {
                x = &x + (cx.noise)(&x)? * (self.s_noise * up);
            }
            old = Some((uncond, down));
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
