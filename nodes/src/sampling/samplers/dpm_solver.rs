//! `dpm_fast` and `dpm_adaptive`: DPM-Solver (Lu et al. 2022) in k-diffusion's `DPMSolver` form, with
//! ComfyUI's arguments: from sigmas[0] down to the last non-zero sigma (they stop there, not at 0),
//! `dpm_fast` spending as many model calls as the list has steps.

use std::collections::HashMap;

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

fn sigma_of(t: f64) -> f64 {
    (-t).exp()
}

fn t_of(sigma: f64) -> f64 {
    -sigma.ln()
}

/// The solver steps over one interval, sharing model evaluations through a small cache.
struct Solver<'a> {
    model: &'a mut dyn Denoiser,
    calls: usize,
}

impl Solver<'_> {
    fn eps(&mut self, cache: &mut HashMap<&'static str, Tensor>, key: &'static str, x: &Tensor, t: f64) -> Result<Tensor, NodeError> {
        if let Some(e) = cache.get(key) {
            return Ok(e.shallow_clone());
        }
        self.calls += 1;
        let denoised = self.model.denoise(x, sigma_of(t))?;
        let eps = (x - denoised) / sigma_of(t);
        cache.insert(key, eps.shallow_clone());
        Ok(eps)
    }

    fn step1(&mut self, x: &Tensor, t: f64, t_next: f64, cache: &mut HashMap<&'static str, Tensor>) -> Result<Tensor, NodeError> {
        let h = t_next - t;
        let eps = self.eps(cache, "eps", x, t)?;
        Ok(x - eps * (sigma_of(t_next) * h.exp_m1()))
    }

    fn step2(&mut self, x: &Tensor, t: f64, t_next: f64, r1: f64, cache: &mut HashMap<&'static str, Tensor>) -> Result<Tensor, NodeError> {
        let h = t_next - t;
        let eps = self.eps(cache, "eps", x, t)?;
        let s1 = t + r1 * h;
        let u1 = x - &eps * (sigma_of(s1) * (r1 * h).exp_m1());
        let eps_r1 = self.eps(cache, "eps_r1", &u1, s1)?;
        Ok(x - &eps * (sigma_of(t_next) * h.exp_m1()) - (eps_r1 - &eps) * (sigma_of(t_next) / (2.0 * r1) * h.exp_m1()))
    }

    fn step3(&mut self, x: &Tensor, t: f64, t_next: f64, cache: &mut HashMap<&'static str, Tensor>) -> Result<Tensor, NodeError> {
        let (r1, r2) = (1.0 / 3.0, 2.0 / 3.0);
        let h = t_next - t;
        let eps = self.eps(cache, "eps", x, t)?;
        let (s1, s2) = (t + r1 * h, t + r2 * h);
        let u1 = x - &eps * (sigma_of(s1) * (r1 * h).exp_m1());
        let eps_r1 = self.eps(cache, "eps_r1", &u1, s1)?;
        let u2 = x - &eps * (sigma_of(s2) * (r2 * h).exp_m1()) - (&eps_r1 - &eps) * (sigma_of(s2) * (r2 / r1) * ((r2 * h).exp_m1() / (r2 * h) - 1.0));
        let eps_r2 = self.eps(cache, "eps_r2", &u2, s2)?;
        Ok(x - &eps * (sigma_of(t_next) * h.exp_m1()) - (eps_r2 - &eps) * (sigma_of(t_next) / r2 * (h.exp_m1() / h - 1.0)))
    }
}

/// ComfyUI's range for these solvers: sigmas[0] to the last non-zero sigma.
fn range(sigmas: &[f64]) -> Result<(f64, f64), NodeError> {
    let hi = sigmas[0];
    let lo = match sigmas.last() {
        Some(0.0) if sigmas.len() >= 2 => sigmas[sigmas.len() - 2],
        Some(s) => *s,
        None => 0.0,
    };
    if lo <= 0.0 || hi <= 0.0 {
        return Err(NodeError::input("sigmas", "dpm_fast and dpm_adaptive need positive sigmas besides the final 0"));
    }
    Ok((lo, hi))
}

pub struct DpmFast;

impl Sampler for DpmFast {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        if sigmas.len() <= 1 {
            return Ok(x);
        }
        let (lo, hi) = range(sigmas)?;
        let nfe = sigmas.len() - 1;
        let (t_start, t_end) = (t_of(hi), t_of(lo));
        let m = nfe / 3 + 1;
        let ts: Vec<f64> = (0..=m).map(|i| t_start + (t_end - t_start) * i as f64 / m as f64).collect();
        let orders: Vec<usize> = if nfe.is_multiple_of(3) {
            let mut o = vec![3; m - 2];
            o.extend([2, 1]);
            o
        } else {
            let mut o = vec![3; m - 1];
            o.push(nfe % 3);
            o
        };
        let mut solver = Solver { model, calls: 0 };
        for (i, order) in orders.iter().enumerate() {
            let mut cache = HashMap::new();
            let (t, t_next) = (ts[i], ts[i + 1]);
            x = match order {
                1 => solver.step1(&x, t, t_next, &mut cache)?,
                2 => solver.step2(&x, t, t_next, 0.5, &mut cache)?,
                _ => solver.step3(&x, t, t_next, &mut cache)?,
            };
            // ComfyUI draws per-step noise even with eta = 0 (it is multiplied by zero), which advances
            // the seeded generator; keep the draw so later draws stay in step.
            let _ = (cx.noise)(&x)?;
            (cx.step)(i, orders.len(), &x)?;
        }
        Ok(x)
    }
}

/// k-diffusion's PID step-size controller.
struct Pid {
    h: f64,
    b1: f64,
    b2: f64,
    b3: f64,
    accept_safety: f64,
    errs: Vec<f64>,
}

impl Pid {
    fn propose(&mut self, error: f64) -> bool {
        let inv = 1.0 / (error + 1e-8);
        if self.errs.is_empty() {
            self.errs = vec![inv; 3];
        }
        self.errs[0] = inv;
        let factor = self.errs[0].powf(self.b1) * self.errs[1].powf(self.b2) * self.errs[2].powf(self.b3);
        let factor = 1.0 + (factor - 1.0).atan();
        let accept = factor >= self.accept_safety;
        if accept {
            self.errs[2] = self.errs[1];
            self.errs[1] = self.errs[0];
        }
        self.h *= factor;
        accept
    }
}

/// k-diffusion's `dpm_solver_adaptive` with its parameters (ComfyUI's SamplerDPMAdaptative; the
/// `dpm_adaptive` sampler name uses [`DpmAdaptive::default`]).
pub struct DpmAdaptive {
    /// 2 or 3.
    pub order: u32,
    pub rtol: f64,
    pub atol: f64,
    pub h_init: f64,
    pub pcoeff: f64,
    pub icoeff: f64,
    pub dcoeff: f64,
    pub accept_safety: f64,
    pub eta: f64,
    pub s_noise: f64,
}

impl Default for DpmAdaptive {
    fn default() -> DpmAdaptive {
        DpmAdaptive { order: 3, rtol: 0.05, atol: 0.0078, h_init: 0.05, pcoeff: 0.0, icoeff: 1.0, dcoeff: 0.0, accept_safety: 0.81, eta: 0.0, s_noise: 1.0 }
    }
}

impl Sampler for DpmAdaptive {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        if sigmas.len() <= 1 {
            return Ok(x);
        }
        if self.order != 2 && self.order != 3 {
            return Err(NodeError::input("order", format!("DPM-Solver's adaptive order is 2 or 3, not {}", self.order)));
        }
        let (lo, hi) = range(sigmas)?;
        let (t_start, t_end) = (t_of(hi), t_of(lo));
        // The controller's order is 1.5 with noise (k-diffusion).
        let order = if self.eta != 0.0 { 1.5 } else { f64::from(self.order) };
        let (p, i, d) = (self.pcoeff, self.icoeff, self.dcoeff);
        let mut pid =
            Pid { h: self.h_init.abs(), b1: (p + i + d) / order, b2: -(p + 2.0 * d) / order, b3: d / order, accept_safety: self.accept_safety, errs: vec![] };
        let mut s = t_start;
        let mut x_prev = x.shallow_clone();
        let mut solver = Solver { model, calls: 0 };
        let mut step = 0;
        while s < t_end - 1e-5 {
            let mut cache = HashMap::new();
            let t = t_end.min(s + pid.h);
            let (t_, su) = if self.eta != 0.0 {
                let (sd, _) = super::ancestral_step(sigma_of(s), sigma_of(t), self.eta);
                let t_ = t_end.min(t_of(sd));
                (t_, (sigma_of(t).powi(2) - sigma_of(t_).powi(2)).max(0.0).sqrt())
            } else {
                (t, 0.0)
            };
            let (x_low, x_high) = if self.order == 2 {
                (solver.step1(&x, s, t_, &mut cache)?, solver.step2(&x, s, t_, 0.5, &mut cache)?)
            } else {
                (solver.step2(&x, s, t_, 1.0 / 3.0, &mut cache)?, solver.step3(&x, s, t_, &mut cache)?)
            };
            let delta = (x_low.abs().maximum(&x_prev.abs()) * self.rtol).clamp_min(self.atol);
            let error = ((&x_low - &x_high) / delta).norm().double_value(&[]) / (x.numel() as f64).sqrt();
            if pid.propose(error) {
                x_prev = x_low;
                // ComfyUI draws the noise even when su is 0 (eta 0), which advances the generator.
                x = x_high + (cx.noise)(&x)? * (su * self.s_noise);
                s = t;
                (cx.step)(step, step + 1, &x)?;
                step += 1;
            }
            if solver.calls > 10_000 {
                return Err(NodeError::Failed("dpm_adaptive did not converge within 10000 model calls".into()));
            }
        }
        Ok(x)
    }
}
