//! `heunpp2`: Heun++ (from sd-webui-samplers-scheduler, as ComfyUI ships it): a third-order blend of
//! Euler slopes at the next two sigmas, weighted by sigma over the first; Heun on the second-to-last
//! step, Euler on the last.

use tch::Tensor;

use super::{to_d, SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Heunpp2;

impl Sampler for Heunpp2 {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let s_end = sigmas[n];
        for i in 0..n {
            let denoised = model.denoise(&x, sigmas[i])?;
            let d = to_d(&x, sigmas[i], &denoised);
            let dt = sigmas[i + 1] - sigmas[i];
            if sigmas[i + 1] == s_end {
                x = &x + d * dt;
            } else if sigmas[i + 2] == s_end {
                let x2 = &x + &d * dt;
                let d2 = to_d(&x2, sigmas[i + 1], &model.denoise(&x2, sigmas[i + 1])?);
                let w2 = sigmas[i + 1] / (2.0 * sigmas[0]);
                x = &x + (d * (1.0 - w2) + d2 * w2) * dt;
            } else {
                let x2 = &x + &d * dt;
                let d2 = to_d(&x2, sigmas[i + 1], &model.denoise(&x2, sigmas[i + 1])?);
                let x3 = &x2 + &d2 * (sigmas[i + 2] - sigmas[i + 1]);
                let d3 = to_d(&x3, sigmas[i + 2], &model.denoise(&x3, sigmas[i + 2])?);
                let w = 3.0 * sigmas[0];
                let (w2, w3) = (sigmas[i + 1] / w, sigmas[i + 2] / w);
                x = &x + (d * (1.0 - w2 - w3) + d2 * w2 + d3 * w3) * dt;
            }
            (cx.step)(i, n, &x)?;
        }
        Ok(x)
    }
}
