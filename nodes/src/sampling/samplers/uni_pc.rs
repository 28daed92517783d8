//! `uni_pc` / `uni_pc_bh2`: UniPC (Zhao et al. 2023), the multistep predictor-corrector with data
//! prediction, as ComfyUI runs it (`comfy/extra_samplers/uni_pc.py`): time steps are the sigmas (a
//! last sigma of 0 becomes 0.001), x is moved to variance-preserving scale, order min(3, steps − 1)
//! with lower orders at the start and the end, no corrector on the final step.

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

/// B(h) = h ("bh1") or eᵸ − 1 ("bh2").
pub struct UniPc {
    pub bh2: bool,
}

/// The VP schedule of a VE sigma: α = 1/√(σ²+1), σ_vp = σ·α, λ = −log σ.
fn alpha(s: f64) -> f64 {
    1.0 / (s * s + 1.0).sqrt()
}

fn std_vp(s: f64) -> f64 {
    s * alpha(s)
}

/// Solves the small dense system `r · x = b` (Gaussian elimination with partial pivoting).
fn solve(mut r: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|i, j| r[*i][col].abs().total_cmp(&r[*j][col].abs())).unwrap_or(col);
        r.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = r[row][col] / r[col][col];
            for k in col..n {
                r[row][k] -= f * r[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| r[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / r[row][row];
    }
    x
}

impl UniPc {
    /// One update from the last `order` points to time `t`; returns the new x and, when the corrector
    /// ran, the model's estimate there.
    fn update(
        &self,
        model: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor, NodeError>,
        x: &Tensor,
        models: &[Tensor],
        ts: &[f64],
        t: f64,
        order: usize,
        use_corrector: bool,
    ) -> Result<(Tensor, Option<Tensor>), NodeError> {
        let (t0, m0) = (ts[ts.len() - 1], &models[models.len() - 1]);
        let lambda = |s: f64| -s.ln();
        let h = lambda(t) - lambda(t0);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for i in 1..order {
            let (ti, mi) = (ts[ts.len() - 1 - i], &models[models.len() - 1 - i]);
            let rk = (lambda(ti) - lambda(t0)) / h;
            rks.push(rk);
            d1s.push((mi - m0) / rk);
        }
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut h_phi_k = hh.exp_m1() / hh - 1.0;
        let mut factorial = 1.0;
        let mut r_mat = Vec::new();
        let mut b = Vec::new();
        for i in 1..=order {
            r_mat.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect::<Vec<f64>>());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let rhos_p = match order {
            1 => vec![],
            2 => vec![0.5],
            _ => solve(r_mat[..order - 1].iter().map(|r| r[..order - 1].to_vec()).collect(), b[..order - 1].to_vec()),
        };
        let rhos_c = if order == 1 { vec![0.5] } else { solve(r_mat.clone(), b.clone()) };
        let a_t = alpha(t);
        let x_t_ = x * (std_vp(t) / std_vp(t0)) - m0 * (a_t * h_phi_1);
        let residual = |rhos: &[f64]| -> Option<Tensor> { d1s.iter().zip(rhos).map(|(d, r)| d * *r).reduce(|a, b| a + b) };
        let x_t = match residual(&rhos_p) {
            Some(res) => &x_t_ - res * (a_t * b_h),
            None => x_t_.shallow_clone(),
        };
        if !use_corrector {
            return Ok((x_t, None));
        }
        let model_t = model(&x_t, t)?;
        let d1_t = &model_t - m0;
        let corr = match residual(&rhos_c[..rhos_c.len() - 1]) {
            Some(res) => res + d1_t * rhos_c[rhos_c.len() - 1],
            None => d1_t * rhos_c[rhos_c.len() - 1],
        };
        Ok((x_t_ - corr * (a_t * b_h), Some(model_t)))
    }
}

impl Sampler for UniPc {
    fn sample(&self, model: &mut dyn Denoiser, x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let mut ts: Vec<f64> = sigmas.to_vec();
        if ts.last() == Some(&0.0) {
            *ts.last_mut().unwrap_or(&mut 0.0) = 0.001;
        }
        let steps = ts.len() - 1;
        if steps < 2 {
            return Err(NodeError::input("steps", "uni_pc needs at least 2 steps"));
        }
        let order = 3.min(steps - 1);
        // The data prediction at VP-scale x: the denoiser takes VE-scale x = x_vp·√(σ²+1).
        let mut model_fn = |x_vp: &Tensor, s: f64| model.denoise(&(x_vp / alpha(s)), s);
        let mut x = &x * alpha(ts[0]);
        let mut models = vec![model_fn(&x, ts[0])?];
        let mut t_prev = vec![ts[0]];
        // ComfyUI's loop, one target sigma at a time: the first `order − 1` steps warm up with orders
        // 1, 2, …; later steps use `order`, lowered near the end; the last step runs no corrector.
        for step in 1..=steps {
            let step_order = if step < order { step } else { order.min(steps + 1 - step) };
            let (nx, m) = self.update(&mut model_fn, &x, &models, &t_prev, ts[step], step_order, step != steps)?;
            x = nx;
            if step < steps {
                let m = match m {
                    Some(m) => m,
                    None => model_fn(&x, ts[step])?,
                };
                if step >= order {
                    let _ = models.remove(0);
                    let _ = t_prev.remove(0);
                }
                models.push(m);
                t_prev.push(ts[step]);
            }
            (cx.step)(step - 1, steps, &(&x / alpha(ts[step])))?;
        }
        Ok(x / alpha(ts[steps]))
    }
}
