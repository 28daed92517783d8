//! `deis`: the diffusion exponential integrator sampler (Zhang & Chen 2023) in its "tab" form, as
//! zju-pi's diff-sampler computes it and ComfyUI ships it: sigmas mapped to VP time t, then
//! Adams–Bashforth coefficients (order up to 3) from the Lagrange basis integrated against
//! −½·(d log α/dt)/√(α(1 − α)) with a 10,000-point rule.

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Deis {
    pub max_order: usize,
}

/// The VP time of each EDM sigma and the VP schedule's β₀, β₁ (diff-sampler's `edm2t`, with its
/// defaults ε_s = 1e-3, σ_min = 0.002, σ_max = 80).
fn edm2t(sigmas: &[f64]) -> (Vec<f64>, f64, f64) {
    let (eps_s, smin, smax) = (1e-3f64, 0.002f64, 80.0f64);
    // In float64 (diff-sampler uses float32 tensors; the coefficients agree to about 1e-5).
    let ln = |s: f64| (s * s + 1.0).ln();
    let beta_d = 2.0 * (ln(smin) / eps_s - ln(smax)) / (eps_s - 1.0);
    let beta_min = ln(smax) - 0.5 * beta_d;
    let t = sigmas.iter().map(|s| ((beta_min * beta_min + 2.0 * beta_d * (s * s + 1.0).ln()).sqrt() - beta_min) / beta_d).collect();
    (t, beta_min, beta_d + beta_min)
}

/// The coefficients of each step (empty for the first-order steps).
fn coefficients(t: &[f64], max_order: usize) -> Vec<Vec<f64>> {
    const N: usize = 10_000;
    let (t, beta0, beta1) = edm2t(t);
    let alpha = |tau: f64| (-0.5 * tau * tau * (beta1 - beta0) - tau * beta0).exp();
    let dlog_alpha = |tau: f64| -tau * (beta1 - beta0) - beta0;
    (0..t.len() - 1)
        .map(|i| {
            let order = (i + 1).min(max_order);
            if order == 1 {
                return Vec::new();
            }
            let (t_cur, t_next) = (t[i], t[i + 1]);
            // torch.linspace(t_cur, t_next, N) with a step of (t_next − t_cur)/N, as diff-sampler has it.
            let dtau = (t_next - t_cur) / N as f64;
            let taus: Vec<f64> = (0..N).map(|k| t_cur + (t_next - t_cur) * k as f64 / (N - 1) as f64).collect();
            let integrand: Vec<f64> = taus.iter().map(|tau| -0.5 * dlog_alpha(*tau) / (alpha(*tau) * (1.0 - alpha(*tau))).sqrt()).collect();
            let prev: Vec<f64> = (0..order).map(|k| t[i - k]).collect();
            (0..order)
                .map(|j| {
                    let basis = |tau: f64| (0..order).filter(|k| *k != j).map(|k| (tau - prev[k]) / (prev[j] - prev[k])).product::<f64>();
                    taus.iter().zip(&integrand).map(|(tau, w)| w * basis(*tau)).sum::<f64>() * dtau
                })
                .collect()
        })
        .collect()
}

impl Sampler for Deis {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let coeffs = coefficients(sigmas, self.max_order);
        let mut buffer: Vec<Tensor> = Vec::new();
        for i in 0..n {
            let (t_cur, t_next) = (sigmas[i], sigmas[i + 1]);
            let denoised = model.denoise(&x, t_cur)?;
            let d = (&x - &denoised) / t_cur;
            let order = if t_next <= 0.0 { 1 } else { self.max_order.min(i + 1) };
            let next = if order == 1 {
                &x + &d * (t_next - t_cur)
            } else {
                let c = &coeffs[i];
                let mut next = &x + &d * c[0];
                for k in 1..order {
                    next += &buffer[buffer.len() - k] * c[k];
                }
                next
            };
            buffer.push(d);
            if buffer.len() > self.max_order - 1 {
                let _ = buffer.remove(0);
            }
            x = next;
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
