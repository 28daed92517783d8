//! Samplers, one file per ComfyUI `sampler_name`, all stepping over a list of sigmas (a SIGMAS value)
//! with a [`Denoiser`], after k-diffusion's `sampling.py` as ComfyUI ships it.

use tch::{Device, Tensor};

use diffloom_core::NodeError;

use super::guidance::Denoiser;
use super::model_sampling::ModelSampling;

pub mod cfg_pp;
pub mod cfgpp_history;
pub mod ddpm;
pub mod deis;
pub mod dpm_2;
pub mod dpm_2_ancestral;
pub mod dpm_solver;
pub mod dpmpp_2m;
pub mod dpmpp_2m_sde;
pub mod dpmpp_2s_ancestral;
pub mod dpmpp_3m_sde;
pub mod dpmpp_sde;
pub mod er_sde;
pub mod euler;
pub mod euler_ancestral;
pub mod euler_cfg_pp;
pub mod gradient_estimation;
pub mod heun;
pub mod heunpp2;
pub mod ipndm;
pub mod lcm;
pub mod lcm_upscale;
pub mod lms;
pub mod res_multistep;
pub mod sa_solver;
pub mod seeds;
pub mod uni_pc;

/// ComfyUI's sampler names, in its order (`comfy.samplers.SAMPLER_NAMES`: `KSAMPLER_NAMES`, then ddim
/// and the UniPC pair): 0.8's 44 and `cfgpp_ud10_ab`, which later versions add after `deis`.
pub const SAMPLER_NAMES: &[&str] = &[
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "exp_heun_2_x0",
    "exp_heun_2_x0_sde",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "cfgpp_ud10_ab",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
];

/// What a sampler needs besides the model: per-step noise and a step callback.
pub struct SampleCtx<'a> {
    /// The model's schedule (for samplers that convert between sigma and the schedule's percent).
    pub sampling: &'a ModelSampling,
    /// The model's device, where `_gpu` samplers draw their Brownian noise.
    pub device: Device,
    /// Fresh standard normal noise shaped like the argument (seeded as ComfyUI seeds it); fails only
    /// where libtorch does (a device out of memory).
    pub noise: &'a mut dyn FnMut(&Tensor) -> Result<Tensor, NodeError>,
    /// The run's seed, for samplers that build their own noise (the Brownian tree of the SDE ones).
    pub seed: i128,
    /// Called after each step with (step index, step count, the new x); stops the run with an error
    /// (cancellation, NaN) by returning one.
    pub step: &'a mut dyn FnMut(usize, usize, &Tensor) -> Result<(), NodeError>,
}

impl SampleCtx<'_> {
    /// Where a Brownian tree draws: the model's device for the `_gpu` samplers, else the CPU.
    pub fn brownian_device(&self, gpu: bool) -> Device {
        if gpu {
            self.device
        } else {
            Device::Cpu
        }
    }
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

/// The sampler named `name` (ComfyUI's `sampler_name`, with its default parameters), if diffloom has it.
pub fn by_name(name: &str) -> Option<Box<dyn Sampler>> {
    let (eta, s_noise) = (1.0, 1.0);
    Some(match name {
        "euler" => Box::new(euler::Euler),
        "euler_cfg_pp" => Box::new(euler_cfg_pp::EulerAncestralCfgPp { eta: 0.0, s_noise: 0.0 }),
        "euler_ancestral" => Box::new(euler_ancestral::EulerAncestral { eta, s_noise }),
        "euler_ancestral_cfg_pp" => Box::new(euler_cfg_pp::EulerAncestralCfgPp { eta, s_noise }),
        "heun" => Box::new(heun::Heun),
        "heunpp2" => Box::new(heunpp2::Heunpp2),
        "exp_heun_2_x0" => Box::new(seeds::Seeds2 { eta: 0.0, s_noise: 0.0, r: 1.0, phi_2: true }),
        "exp_heun_2_x0_sde" => Box::new(seeds::Seeds2 { eta, s_noise, r: 1.0, phi_2: true }),
        "dpm_2" => Box::new(dpm_2::Dpm2),
        "dpm_2_ancestral" => Box::new(dpm_2_ancestral::Dpm2Ancestral { eta, s_noise }),
        "lms" => Box::new(lms::Lms { order: 4 }),
        "dpm_fast" => Box::new(dpm_solver::DpmFast),
        "dpm_adaptive" => Box::new(dpm_solver::DpmAdaptive::default()),
        "dpmpp_2s_ancestral" => Box::new(dpmpp_2s_ancestral::Dpmpp2sAncestral { eta, s_noise }),
        "dpmpp_2s_ancestral_cfg_pp" => Box::new(cfg_pp::Dpmpp2sAncestralCfgPp { eta, s_noise }),
        "dpmpp_sde" => Box::new(dpmpp_sde::DpmppSde { eta, s_noise, r: 0.5, gpu: false }),
        "dpmpp_sde_gpu" => Box::new(dpmpp_sde::DpmppSde { eta, s_noise, r: 0.5, gpu: true }),
        "dpmpp_2m" => Box::new(dpmpp_2m::Dpmpp2m),
        "dpmpp_2m_cfg_pp" => Box::new(cfg_pp::Dpmpp2mCfgPp),
        "dpmpp_2m_sde" => Box::new(dpmpp_2m_sde::Dpmpp2mSde { eta, s_noise, gpu: false, heun: false }),
        "dpmpp_2m_sde_gpu" => Box::new(dpmpp_2m_sde::Dpmpp2mSde { eta, s_noise, gpu: true, heun: false }),
        "dpmpp_2m_sde_heun" => Box::new(dpmpp_2m_sde::Dpmpp2mSde { eta, s_noise, gpu: false, heun: true }),
        "dpmpp_2m_sde_heun_gpu" => Box::new(dpmpp_2m_sde::Dpmpp2mSde { eta, s_noise, gpu: true, heun: true }),
        "dpmpp_3m_sde" => Box::new(dpmpp_3m_sde::Dpmpp3mSde { eta, s_noise, gpu: false }),
        "dpmpp_3m_sde_gpu" => Box::new(dpmpp_3m_sde::Dpmpp3mSde { eta, s_noise, gpu: true }),
        "ddpm" => Box::new(ddpm::Ddpm),
        "lcm" => Box::new(lcm::Lcm),
        "ipndm" => Box::new(ipndm::Ipndm { max_order: 4, variable: false }),
        "ipndm_v" => Box::new(ipndm::Ipndm { max_order: 4, variable: true }),
        "deis" => Box::new(deis::Deis { max_order: 3 }),
        "cfgpp_ud10_ab" => Box::new(cfgpp_history::UD10_AB),
        "res_multistep" => Box::new(res_multistep::ResMultistep { eta: 0.0, s_noise, cfg_pp: false }),
        "res_multistep_cfg_pp" => Box::new(res_multistep::ResMultistep { eta: 0.0, s_noise, cfg_pp: true }),
        "res_multistep_ancestral" => Box::new(res_multistep::ResMultistep { eta, s_noise, cfg_pp: false }),
        "res_multistep_ancestral_cfg_pp" => Box::new(res_multistep::ResMultistep { eta, s_noise, cfg_pp: true }),
        "gradient_estimation" => Box::new(gradient_estimation::GradientEstimation { ge_gamma: 2.0, cfg_pp: false }),
        "gradient_estimation_cfg_pp" => Box::new(gradient_estimation::GradientEstimation { ge_gamma: 2.0, cfg_pp: true }),
        "er_sde" => Box::new(er_sde::ErSde { s_noise, max_stage: 3, reverse_time_eta: None }),
        "seeds_2" => Box::new(seeds::Seeds2 { eta, s_noise, r: 0.5, phi_2: false }),
        "seeds_3" => Box::new(seeds::Seeds3 { eta, s_noise, r_1: 1.0 / 3.0, r_2: 2.0 / 3.0 }),
        "sa_solver" => Box::new(sa_solver::SaSolver { use_pece: false, ..sa_solver::SaSolver::default() }),
        "sa_solver_pece" => Box::new(sa_solver::SaSolver { use_pece: true, ..sa_solver::SaSolver::default() }),
        "uni_pc" => Box::new(uni_pc::UniPc { bh2: false }),
        "uni_pc_bh2" => Box::new(uni_pc::UniPc { bh2: true }),
        _ => return None,
    })
}
