//! `ipndm` and `ipndm_v`: improved pseudo-numerical methods (Zhang & Chen 2023, from zju-pi's
//! diff-sampler as ComfyUI ships them): Adams–Bashforth steps of order up to 4 on the ODE slope, with
//! fixed coefficients (`ipndm`) or coefficients for variable step sizes (`ipndm_v`).

use tch::Tensor;

use super::{SampleCtx, Sampler};
use crate::sampling::guidance::Denoiser;
use diffloom_core::NodeError;

pub struct Ipndm {
    pub max_order: usize,
    /// Variable-step coefficients (`ipndm_v`).
    pub variable: bool,
}

impl Sampler for Ipndm {
    fn sample(&self, model: &mut dyn Denoiser, mut x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError> {
        let n = sigmas.len() - 1;
        let t = sigmas;
        // Earlier slopes, newest last.
        let mut buffer: Vec<Tensor> = Vec::new();
        for i in 0..n {
            let (t_cur, t_next) = (t[i], t[i + 1]);
            let denoised = model.denoise(&x, t_cur)?;
            let d = (&x - &denoised) / t_cur;
            let order = self.max_order.min(i + 1);
            let b = |k: usize| &buffer[buffer.len() - k];
            let dt = t_next - t_cur;
            let next = if t_next == 0.0 {
                denoised
            } else if order == 1 {
                &x + &d * dt
            } else if !self.variable {
                let slope = match order {
                    2 => (&d * 3.0 - b(1)) / 2.0,
                    3 => (&d * 23.0 - b(1) * 16.0 + b(2) * 5.0) / 12.0,
                    _ => (&d * 55.0 - b(1) * 59.0 + b(2) * 37.0 - b(3) * 9.0) / 24.0,
                };
                &x + slope * dt
            } else {
                let h = dt;
                let h1 = t_cur - t[i - 1];
                let slope = match order {
                    2 => &d * ((2.0 + h / h1) / 2.0) + b(1) * (-(h / h1) / 2.0),
                    3 => {
                        let h2 = t[i - 1] - t[i - 2];
                        let temp = (1.0 - h / (3.0 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2.0;
                        let c1 = (2.0 + h / h1) / 2.0 + temp;
                        let c2 = -(h / h1) / 2.0 - (1.0 + h1 / h2) * temp;
                        let c3 = temp * h1 / h2;
                        &d * c1 + b(1) * c2 + b(2) * c3
                    }
                    _ => {
                        let (h2, h3) = (t[i - 1] - t[i - 2], t[i - 2] - t[i - 3]);
                        let temp1 = (1.0 - h / (3.0 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2.0;
                        let temp2 = ((1.0 - h / (3.0 * (h + h1))) / 2.0 + (1.0 - h / (2.0 * (h + h1))) * h / (6.0 * (h + h1 + h2)))
                            * (h * (h + h1) * (h + h1 + h2))
                            / (h1 * (h1 + h2) * (h1 + h2 + h3));
                        let q = h1 * (h1 + h2) / (h2 * (h2 + h3));
                        let c1 = (2.0 + h / h1) / 2.0 + temp1 + temp2;
                        let c2 = -(h / h1) / 2.0 - (1.0 + h1 / h2) * temp1 - (1.0 + h1 / h2 + q) * temp2;
                        let c3 = temp1 * h1 / h2 + (h1 / h2 + q * (1.0 + h2 / h3)) * temp2;
                        let c4 = -temp2 * q * h1 / h2;
                        &d * c1 + b(1) * c2 + b(2) * c3 + b(3) * c4
                    }
                };
                &x + slope * dt
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
