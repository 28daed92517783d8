//! `lms`: the linear multistep method (order 4), with coefficients from integrating the Lagrange basis
//! polynomials over each step (k-diffusion integrates with scipy's `quad`; Gauss–Legendre is exact for
//! the default order's cubic polynomials).

use tch::Tensor;

use super::{to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Lms {
    pub order: usize,
}

/// ∫_{σ_i}^{σ_{i+1}} ∏_{k≠j} (τ − σ_{i−k}) / (σ_{i−j} − σ_{i−k}) dτ.
pub(super) fn coefficient(order: usize, t: &[f64], i: usize, j: usize) -> f64 {
    let basis = |tau: f64| (0..order).filter(|k| *k != j).map(|k| (tau - t[i - k]) / (t[i - j] - t[i - k])).product::<f64>();
    // 3-point Gauss–Legendre, exact to degree 5 (orders up to 6), on 32 sub-intervals, which keeps the
    // higher orders SamplerLMS allows far inside scipy quad's 1e-4 tolerance.
    const PARTS: usize = 32;
    let nodes = [(-(0.6f64).sqrt(), 5.0 / 9.0), (0.0, 8.0 / 9.0), ((0.6f64).sqrt(), 5.0 / 9.0)];
    let (a, b) = (t[i], t[i + 1]);
    let width = (b - a) / PARTS as f64;
    (0..PARTS)
        .map(|p| {
            let (mid, half) = (a + width * (p as f64 + 0.5), width / 2.0);
            nodes.iter().map(|(x, w)| w * basis(mid + half * x)).sum::<f64>() * half
        })
        .sum()
}

impl Sampler for Lms {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let mut ds: Vec<Tensor> = Vec::new();
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            ds.push(to_d(&x, sigmas[i], &denoised));
            if ds.len() > self.order {
                let _ = ds.remove(0);
            }
            // ComfyUI's version: the last step to sigma 0 returns the denoised estimate (upstream
            // k-diffusion integrates it like the others).
            if sigmas[i + 1] == 0.0 {
                x = denoised;
                (cx.step)(i, n, &x)?;
                continue;
            }
            let cur = (i + 1).min(self.order);
            let mut step = Tensor::zeros_like(&x);
            for (j, d) in ds.iter().rev().enumerate().take(cur) {
                step += d * coefficient(cur, sigmas, i, j);
            }
            x = &x + step;
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
