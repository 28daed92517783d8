//! `sa_solver` and `sa_solver_pece`: the stochastic Adams solver (Xue et al., NeurIPS 2023) in data
//! prediction, as ComfyUI has it: predictor order 3, corrector order 4, noise (τ = eta, 1 by default) only while sigma
//! lies between the schedule's 20% and 80% points, orders lowered near the end, and with PECE a second
//! model evaluation of each corrected state.

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct SaSolver {
    /// Stochasticity τ inside the noise interval (ComfyUI's tau_func; 0 makes it an ODE solver).
    pub eta: f64,
    /// The noise interval as fractions of the schedule (start, end): 0.2–0.8 by default.
    pub sde_percent: (f64, f64),
    pub predictor_order: usize,
    pub corrector_order: usize,
    pub s_noise: f64,
    /// Predict–evaluate–correct–evaluate.
    pub use_pece: bool,
    /// The paper's simplified order-2 coefficients (its appendix D).
    pub simple_order_2: bool,
}

impl Default for SaSolver {
    fn default() -> SaSolver {
        SaSolver { eta: 1.0, sde_percent: (0.2, 0.8), predictor_order: 3, corrector_order: 4, s_noise: 1.0, use_pece: false, simple_order_2: false }
    }
}

/// (1 + τ²)·∫ₛᵗ e^((1+τ²)(x − t))·xᵖ dx for p < order, by ComfyUI's recursion (`compute_exponential_coeffs`).
fn exponential_coeffs(s: f64, t: f64, order: usize, tau: f64) -> Vec<f64> {
    let tau_mul = 1.0 + tau * tau;
    let h = t - s;
    let terms: Vec<f64> = (0..order).map(|p| t.powi(p as i32) - s.powi(p as i32) * (-tau_mul * h).exp()).collect();
    let log_factorial = |p: usize| (1..=p).map(|k| (k as f64).ln()).sum::<f64>();
    (0..order)
        .map(|i| {
            (0..=i)
                .map(|j| {
                    let depth = (i - j) as f64;
                    let mut c = log_factorial(i) - log_factorial(j);
                    if tau > 0.0 {
                        c -= depth * tau_mul.ln();
                    }
                    let sign = if (i - j) % 2 == 0 { 1.0 } else { -1.0 };
                    c.exp() * sign * terms[j]
                })
                .sum()
        })
        .collect()
}

/// Solves the small linear system `a·x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|r, s| a[*r][col].abs().total_cmp(&a[*s][col].abs())).unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let sum: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - sum) / a[row][row];
    }
    x
}

/// The b coefficients of one step from λ_s to λ_t over the Lagrange basis on `lambdas`
/// (`compute_stochastic_adams_b_coeffs`; α_t = σ_t·e^λ_t is 1 on SD's schedule but kept); with
/// `simple_order_2` and two points, the paper's simplified ones.
fn b_coeffs(sigma_next: f64, lambdas: &[f64], lambda_s: f64, lambda_t: f64, tau: f64, simple_order_2: bool, corrector: bool) -> Vec<f64> {
    let k = lambdas.len();
    if simple_order_2 && k == 2 {
        let tau_mul = 1.0 + tau * tau;
        let h = lambda_t - lambda_s;
        let alpha_t = sigma_next * lambda_t.exp();
        let total = alpha_t * -(-h * tau_mul).exp_m1();
        let (b_2, b_1) = if corrector {
            let b_1 = alpha_t * (0.5 * tau_mul * h);
            (total - b_1, b_1)
        } else {
            let b_2 = alpha_t * (0.5 * tau_mul * h * h) / (lambdas[0] - lambda_s);
            (b_2, total - b_2)
        };
        return vec![b_2, b_1];
    }
    let integrals = exponential_coeffs(lambda_s, lambda_t, k, tau);
    // Vandermonde transposed: row p holds λ_i^p.
    let vt: Vec<Vec<f64>> = (0..k).map(|p| lambdas.iter().map(|l| l.powi(p as i32)).collect()).collect();
    let alpha_t = sigma_next * lambda_t.exp();
    solve(vt, integrals).into_iter().map(|c| c * alpha_t).collect()
}

/// Σ_k preds[k]·coeffs[k] over the last `coeffs.len()` predictions.
fn combine(preds: &[Tensor], coeffs: &[f64]) -> Tensor {
    let recent = &preds[preds.len() - coeffs.len()..];
    recent.iter().zip(coeffs).map(|(p, c)| p * *c).reduce(|a, b| a + b).unwrap_or_else(|| preds[0].zeros_like())
}

impl Sampler for SaSolver {
    fn sample(&self, model: &mut dyn Denoiser, x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        if sigmas.len() <= 1 {
            return Ok(x);
        }
        let n = sigmas.len() - 1;
        let lambdas: Vec<f64> = sigmas.iter().map(|s| -s.ln()).collect();
        let (start_sigma, end_sigma) = (cx.sampling.percent_to_sigma(self.sde_percent.0), cx.sampling.percent_to_sigma(self.sde_percent.1));
        let tau_of = |sigma: f64| if self.eta > 0.0 && start_sigma >= sigma && sigma >= end_sigma { self.eta } else { 0.0 };
        let max_order = self.predictor_order.max(self.corrector_order);
        let lower_order_to_end = sigmas[n] == 0.0;
        let (mut x, mut x_pred) = (x.shallow_clone(), x);
        let (mut h, mut tau_t) = (0.0, 0.0);
        let mut noise: Option<Tensor> = None;
        let mut preds: Vec<Tensor> = Vec::new();
        for i in 0..n {
            let mut denoised = model.denoise(&x_pred, sigmas[i])?;
            preds.push(denoised.shallow_clone());
            if preds.len() > max_order {
                let _ = preds.remove(0);
            }
            let mut predictor_order = self.predictor_order.min(preds.len());
            let mut corrector_order = if i == 0 || (sigmas[i + 1] == 0.0 && !self.use_pece) { 0 } else { self.corrector_order.min(preds.len()) };
            if lower_order_to_end {
                predictor_order = predictor_order.min(n - 1 - i);
                corrector_order = corrector_order.min(n - i);
            }
            // Corrector.
            if corrector_order == 0 {
                x = x_pred.shallow_clone();
            } else {
                let b = b_coeffs(sigmas[i], &lambdas[i + 1 - corrector_order..=i], lambdas[i - 1], lambdas[i], tau_t, self.simple_order_2, true);
                x = &x * (sigmas[i] / sigmas[i - 1] * (-(tau_t * tau_t) * h).exp()) + combine(&preds, &b);
                if tau_t > 0.0 && self.s_noise > 0.0 {
                    if let Some(noise) = &noise {
                        x = &x + noise;
                    }
                }
                if self.use_pece {
                    denoised = model.denoise(&x, sigmas[i])?;
                    if let Some(last) = preds.last_mut() {
                        *last = denoised.shallow_clone();
                    }
                }
            }
            // Predictor.
            if sigmas[i + 1] == 0.0 {
                x_pred = denoised;
            } else {
                tau_t = tau_of(sigmas[i + 1]);
                let b = b_coeffs(sigmas[i + 1], &lambdas[i + 1 - predictor_order..=i], lambdas[i], lambdas[i + 1], tau_t, self.simple_order_2, false);
                h = lambdas[i + 1] - lambdas[i];
                x_pred = &x * (sigmas[i + 1] / sigmas[i] * (-(tau_t * tau_t) * h).exp()) + combine(&preds, &b);
                if tau_t > 0.0 && self.s_noise > 0.0 {
                    let z = (cx.noise)(&x)? * (sigmas[i + 1] * (-(-2.0 * tau_t * tau_t * h).exp_m1()).sqrt() * self.s_noise);
                    x_pred = &x_pred + &z;
                    noise = Some(z);
                }
            }
            (cx.step)(i, n, &x_pred)?;
        }
        Ok(x_pred)
    }
}
