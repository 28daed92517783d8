//! Samplers, one file per ComfyUI `sampler_name`, all stepping over a list of sigmas (a SIGMAS value)
//! with a [`Denoiser`], after k-diffusion's `sampling.py` as ComfyUI ships it.

use tch::Tensor;

use diffloom_core::NodeError;

use super::guidance::Denoiser;

pub mod dpm_2;
pub mod dpm_2_ancestral;
pub mod dpm_solver;
pub mod dpmpp_2m;
pub mod dpmpp_2m_sde;
pub mod dpmpp_2s_ancestral;
pub mod dpmpp_3m_sde;
pub mod dpmpp_sde;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod lcm;
pub mod lms;
pub mod uni_pc;

/// What a sampler needs besides the model: per-step noise and a step callback.
pub struct SampleCtx<'a> {
    /// Fresh standard normal noise shaped like the argument (seeded as ComfyUI seeds it); fails only
    /// where libtorch does (a device out of memory).
    pub noise: &'a mut dyn FnMut(&Tensor) -> Result<Tensor, NodeError>,
    /// The run's seed, for samplers that build their own noise (the Brownian tree of the SDE ones).
    pub seed: i128,
    /// Called after each step with (step index, step count, the new x); stops the run with an error
    /// (cancellation, NaN) by returning one.
    pub step: &'a mut dyn FnMut(usize, usize, &Tensor) -> Result<(), NodeError>,
}

/// One sampling method.
pub trait Sampler {
    /// Runs from `x` (already at noise level `sigmas[0]`) down the list.
    fn sample(&self, model: &mut dyn Denoiser, x: Tensor, sigmas: &[f64], cx: &mut SampleCtx) -> Result<Tensor, NodeError>;
}

/// k-diffusion's `to_d`: the ODE derivative (x − denoised)/σ.
pub fn to_d(x: &Tensor, sigma: f64, denoised: &Tensor) -> Tensor {
    (x - denoised) / sigma
}

/// k-diffusion's `get_ancestral_step`: the deterministic part σ_down and the noise σ_up of a step
/// from `from` to `to` with ancestral noise `eta`.
pub fn ancestral_step(from: f64, to: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 {
        return (to, 0.0);
    }
    let up = to.min(eta * (to * to * (from * from - to * to) / (from * from)).sqrt());
    ((to * to - up * up).sqrt(), up)
}

/// The sampler named `name`, if diffloom has it.
pub fn by_name(name: &str) -> Option<Box<dyn Sampler>> {
    Some(match name {
        "euler" => Box::new(euler::Euler),
        "euler_ancestral" => Box::new(euler_ancestral::EulerAncestral { eta: 1.0, s_noise: 1.0 }),
        "heun" => Box::new(heun::Heun),
        "dpm_2" => Box::new(dpm_2::Dpm2),
        "dpm_2_ancestral" => Box::new(dpm_2_ancestral::Dpm2Ancestral { eta: 1.0, s_noise: 1.0 }),
        "lms" => Box::new(lms::Lms { order: 4 }),
        "dpm_fast" => Box::new(dpm_solver::DpmFast),
        "dpm_adaptive" => Box::new(dpm_solver::DpmAdaptive),
        "dpmpp_2s_ancestral" => Box::new(dpmpp_2s_ancestral::Dpmpp2sAncestral { eta: 1.0, s_noise: 1.0 }),
        "dpmpp_2m" => Box::new(dpmpp_2m::Dpmpp2m),
        "dpmpp_sde" => Box::new(dpmpp_sde::DpmppSde { eta: 1.0, s_noise: 1.0, r: 0.5 }),
        "dpmpp_2m_sde" => Box::new(dpmpp_2m_sde::Dpmpp2mSde { eta: 1.0, s_noise: 1.0 }),
        "dpmpp_3m_sde" => Box::new(dpmpp_3m_sde::Dpmpp3mSde { eta: 1.0, s_noise: 1.0 }),
        "lcm" => Box::new(lcm::Lcm),
        "uni_pc" => Box::new(uni_pc::UniPc { bh2: false }),
        "uni_pc_bh2" => Box::new(uni_pc::UniPc { bh2: true }),
        _ => return None,
    })
}
