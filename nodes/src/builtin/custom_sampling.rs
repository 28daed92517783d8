//! ComfyUI's custom sampling (`comfy_extras/nodes_custom_sampler.py` and friends): schedules,
//! samplers, noise and guiders as graph values, and the nodes that put them together
//! (SamplerCustom, SamplerCustomAdvanced). Inputs, defaults and ranges are ComfyUI's.

use diffloom_core::{Args, Bool, Combo, Ctx, Float, Handle, Int, Node, NodeError, Schema, Str, Value, ValueType};

use super::shared::{cfg, cfg_guider, latent_out, sample_latent, seed, sigmas_value};
use crate::sampling::guidance::Guidance;
use crate::sampling::ksampler::{Guider, SamplerSpec};
use crate::sampling::model_sampling::ModelSampling;
use crate::sampling::noise::initial_noise;
use crate::sampling::samplers::*;
use crate::sampling::schedulers::{
    align_your_steps, beta, calculate_sigmas, exponential, gits, karras, laplace, polyexponential, sd_turbo, vp, SCHEDULER_NAMES,
};
use crate::sd::SdModel;

/// A float input as ComfyUI's samplers declare them: a default, 0 to `max`.
fn param(default: f64, max: f64) -> Float {
    Float::new(default).range(0.0, max).step(0.01)
}

/// A SAMPLER value.
fn sampler_value(spec: SamplerSpec) -> Vec<Value> {
    let label = spec.name.clone();
    vec![Value::Sampler(Handle::new(spec, 0, label))]
}

/// A GUIDER value.
fn guider_value(guider: Guider, label: &str) -> Vec<Value> {
    vec![Value::Guider(Handle::new(guider, 0, label))]
}

/// A NOISE value: the initial noise of SamplerCustomAdvanced (RandomNoise's seed, or none).
#[derive(Clone, Copy, Debug)]
pub struct NoiseSpec {
    /// The seed (also the step noise's); DisableNoise has 0, as ComfyUI's.
    pub seed: i128,
    pub enabled: bool,
}

fn noise_value(spec: NoiseSpec) -> Vec<Value> {
    let label = if spec.enabled { format!("seed {}", spec.seed) } else { "no noise".to_owned() };
    vec![Value::Noise(Handle::new(spec, 0, label))]
}

pub struct SamplerCustom;
impl Node for SamplerCustom {
    fn schema(&self) -> Schema {
        Schema::new("SamplerCustom", "sampling/custom_sampling")
            .input("model", ValueType::Model)
            .input("add_noise", Bool(true))
            .input("noise_seed", seed())
            .input("cfg", cfg())
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("sampler", ValueType::Sampler)
            .input("sigmas", ValueType::Sigmas)
            .input("latent_image", ValueType::Latent)
            .output("output", ValueType::Latent)
            .output("denoised_output", ValueType::Latent)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let sampler: &SamplerSpec = a.handle("sampler")?;
        let sigmas = a.sigmas("sigmas")?;
        let (samples, denoised) = sample_latent(cx, a, &cfg_guider(a)?, sampler, &sigmas, a.int("noise_seed")?, a.boolean("add_noise")?)?;
        Ok(vec![samples, denoised])
    }
}

pub struct KSamplerSelect;
impl Node for KSamplerSelect {
    fn schema(&self) -> Schema {
        Schema::new("KSamplerSelect", "sampling/custom_sampling/samplers").input("sampler_name", Combo::of(SAMPLER_NAMES)).output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let name = a.string("sampler_name")?;
        Ok(vec![Value::Sampler(Handle::new(SamplerSpec::named(name)?, 0, name))])
    }
}

pub struct BasicScheduler;
impl Node for BasicScheduler {
    fn schema(&self) -> Schema {
        Schema::new("BasicScheduler", "sampling/custom_sampling/schedulers")
            .input("model", ValueType::Model)
            .input("scheduler", Combo::of(SCHEDULER_NAMES))
            .input("steps", Int::new(20).range(1, 10_000))
            .input("denoise", Float::new(1.0).range(0.0, 1.0))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let (steps, denoise) = (a.i64("steps")?, a.float("denoise")?);
        if denoise <= 0.0 {
            return Ok(vec![sigmas_value(&[])]);
        }
        // Unlike KSampler, any denoise below 1 takes the tail, and dpm_2/uni_pc keep every sigma.
        let total = if denoise < 1.0 { (steps as f64 / denoise) as i64 } else { steps };
        let ms = ModelSampling::new(model.sampling);
        let scheduler = a.string("scheduler")?;
        let all = calculate_sigmas(&ms, scheduler, total).ok_or_else(|| NodeError::input("scheduler", format!("unknown scheduler {scheduler:?}")))?;
        let keep = (steps as usize + 1).min(all.len());
        Ok(vec![sigmas_value(&all[all.len() - keep..])])
    }
}

pub struct KarrasScheduler;
impl Node for KarrasScheduler {
    fn schema(&self) -> Schema {
        Schema::new("KarrasScheduler", "sampling/custom_sampling/schedulers")
            .input("steps", Int::new(20).range(1, 10_000))
            .input("sigma_max", Float::new(14.614642).range(0.0, 5000.0))
            .input("sigma_min", Float::new(0.0291675).range(0.0, 5000.0))
            .input("rho", Float::new(7.0).range(0.0, 100.0))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![sigmas_value(&karras(a.i64("steps")?, a.float("sigma_min")?, a.float("sigma_max")?, a.float("rho")?))])
    }
}

pub struct ExponentialScheduler;
impl Node for ExponentialScheduler {
    fn schema(&self) -> Schema {
        Schema::new("ExponentialScheduler", "sampling/custom_sampling/schedulers")
            .input("steps", Int::new(20).range(1, 10_000))
            .input("sigma_max", Float::new(14.614642).range(0.0, 5000.0))
            .input("sigma_min", Float::new(0.0291675).range(0.0, 5000.0))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (lo, hi) = (a.float("sigma_min")?, a.float("sigma_max")?);
        if lo <= 0.0 || hi <= 0.0 {
            return Err(NodeError::input(if lo <= 0.0 { "sigma_min" } else { "sigma_max" }, "must be above 0 (the schedule is in log sigma)"));
        }
        Ok(vec![sigmas_value(&exponential(a.i64("steps")?, lo, hi))])
    }
}

pub struct SplitSigmas;
impl Node for SplitSigmas {
    fn schema(&self) -> Schema {
        Schema::new("SplitSigmas", "sampling/custom_sampling/sigmas")
            .input("sigmas", ValueType::Sigmas)
            .input("step", Int::new(0).range(0, 10_000))
            .output("high_sigmas", ValueType::Sigmas)
            .output("low_sigmas", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = a.sigmas("sigmas")?;
        let step = (a.i64("step")? as usize).min(s.len());
        // The boundary sigma belongs to both halves, as in ComfyUI.
        let high = &s[..(step + 1).min(s.len())];
        let low = &s[step.min(s.len())..];
        Ok(vec![sigmas_value(high), sigmas_value(low)])
    }
}

pub struct SamplerCustomAdvanced;
impl Node for SamplerCustomAdvanced {
    fn schema(&self) -> Schema {
        Schema::new("SamplerCustomAdvanced", "sampling/custom_sampling")
            .describe("Samples with a NOISE, a GUIDER, a SAMPLER and SIGMAS, each built by its own node.")
            .input("noise", ValueType::Noise)
            .input("guider", ValueType::Guider)
            .input("sampler", ValueType::Sampler)
            .input("sigmas", ValueType::Sigmas)
            .input("latent_image", ValueType::Latent)
            .output("output", ValueType::Latent)
            .output("denoised_output", ValueType::Latent)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let noise: &NoiseSpec = a.handle("noise")?;
        let guider: &Guider = a.handle("guider")?;
        let sampler: &SamplerSpec = a.handle("sampler")?;
        let sigmas = a.sigmas("sigmas")?;
        let (samples, denoised) = sample_latent(cx, a, guider, sampler, &sigmas, noise.seed, noise.enabled)?;
        Ok(vec![samples, denoised])
    }
}

pub struct RandomNoise;
impl Node for RandomNoise {
    fn schema(&self) -> Schema {
        Schema::new("RandomNoise", "sampling/custom_sampling/noise").input("noise_seed", seed()).output("NOISE", ValueType::Noise)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(noise_value(NoiseSpec { seed: a.int("noise_seed")?, enabled: true }))
    }
}

pub struct DisableNoise;
impl Node for DisableNoise {
    fn schema(&self) -> Schema {
        Schema::new("DisableNoise", "sampling/custom_sampling/noise").output("NOISE", ValueType::Noise)
    }
    fn execute(&self, _cx: &mut Ctx, _a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(noise_value(NoiseSpec { seed: 0, enabled: false }))
    }
}

/// ComfyUI's AddNoise: the latent noised to the schedule's span (|σ₀ − σ_last|, or σ₀ alone), as the
/// sampler would start from it; an all-zero latent is not scaled in first.
pub struct AddNoise;
impl Node for AddNoise {
    fn schema(&self) -> Schema {
        Schema::new("AddNoise", "_for_testing/custom_sampling/noise")
            .input("model", ValueType::Model)
            .input("noise", ValueType::Noise)
            .input("sigmas", ValueType::Sigmas)
            .input("latent_image", ValueType::Latent)
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let noise: &NoiseSpec = a.handle("noise")?;
        let sigmas = a.sigmas("sigmas")?;
        let latent = a.latent("latent_image")?;
        if sigmas.is_empty() {
            return Ok(vec![Value::Latent(latent.clone())]);
        }
        let samples = latent.samples.to_kind(tch::Kind::Float);
        let shape = samples.size();
        let drawn = match noise.enabled {
            true => initial_noise(noise.seed, &shape, latent.batch_index.as_deref()),
            false => samples.zeros_like(),
        };
        let span = if sigmas.len() > 1 { (sigmas[0] - sigmas[sigmas.len() - 1]).abs() } else { sigmas[0] };
        let nonzero = samples.count_nonzero(None::<i64>).int64_value(&[]) > 0;
        let scale = model.family.spec().latent_scale;
        let latent_in = if nonzero { &samples * scale } else { samples.shallow_clone() };
        let ms = ModelSampling::new(model.sampling);
        let noisy = ms.noise_scaling(span, &drawn, &latent_in, false) / scale;
        Ok(vec![latent_out(latent, noisy.nan_to_num(0.0, 0.0, 0.0))])
    }
}

pub struct CFGGuider;
impl Node for CFGGuider {
    fn schema(&self) -> Schema {
        Schema::new("CFGGuider", "sampling/custom_sampling/guiders")
            .input("model", ValueType::Model)
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("cfg", cfg())
            .output("GUIDER", ValueType::Guider)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(guider_value(cfg_guider(a)?, &format!("CFG {}", a.float("cfg")?)))
    }
}

pub struct BasicGuider;
impl Node for BasicGuider {
    fn schema(&self) -> Schema {
        Schema::new("BasicGuider", "sampling/custom_sampling/guiders")
            .input("model", ValueType::Model)
            .input("conditioning", ValueType::Conditioning)
            .output("GUIDER", ValueType::Guider)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let guider = Guider { model: model.clone(), sides: vec![("conditioning".into(), a.conditioning("conditioning")?)], guidance: Guidance::Basic };
        Ok(guider_value(guider, "basic"))
    }
}

pub struct DualCFGGuider;
impl Node for DualCFGGuider {
    fn schema(&self) -> Schema {
        Schema::new("DualCFGGuider", "sampling/custom_sampling/guiders")
            .input("model", ValueType::Model)
            .input("cond1", ValueType::Conditioning)
            .input("cond2", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("cfg_conds", cfg())
            .input("cfg_cond2_negative", cfg())
            .input("style", Combo::of(&["regular", "nested"]))
            .output("GUIDER", ValueType::Guider)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let sides = ["cond1", "cond2", "negative"].iter().map(|n| Ok((n.to_string(), a.conditioning(n)?))).collect::<Result<Vec<_>, NodeError>>()?;
        let guidance =
            Guidance::DualCfg { cfg_conds: a.float("cfg_conds")?, cfg_cond2_negative: a.float("cfg_cond2_negative")?, nested: a.string("style")? == "nested" };
        Ok(guider_value(Guider { model: model.clone(), sides, guidance }, "dual CFG"))
    }
}

pub struct PerpNegGuider;
impl Node for PerpNegGuider {
    fn schema(&self) -> Schema {
        Schema::new("PerpNegGuider", "_for_testing")
            .input("model", ValueType::Model)
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("empty_conditioning", ValueType::Conditioning)
            .input("cfg", cfg())
            .input("neg_scale", param(1.0, 100.0))
            .output("GUIDER", ValueType::Guider)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let sides =
            ["positive", "negative", "empty_conditioning"].iter().map(|n| Ok((n.to_string(), a.conditioning(n)?))).collect::<Result<Vec<_>, NodeError>>()?;
        let guidance = Guidance::PerpNeg { cfg: a.float("cfg")?, neg_scale: a.float("neg_scale")? };
        Ok(guider_value(Guider { model: model.clone(), sides, guidance }, "perp-neg"))
    }
}

/// "gpu" (the default) draws the Brownian noise on the model's device, as ComfyUI's `_gpu` samplers.
fn noise_device() -> Combo {
    Combo::of(&["gpu", "cpu"])
}

pub struct SamplerEulerAncestral;
impl Node for SamplerEulerAncestral {
    fn schema(&self) -> Schema {
        Schema::new("SamplerEulerAncestral", "sampling/custom_sampling/samplers")
            .input("eta", param(1.0, 100.0))
            .input("s_noise", param(1.0, 100.0))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = euler_ancestral::EulerAncestral { eta: a.float("eta")?, s_noise: a.float("s_noise")? };
        Ok(sampler_value(SamplerSpec::custom("euler_ancestral", s)))
    }
}

pub struct SamplerEulerAncestralCFGPP;
impl Node for SamplerEulerAncestralCFGPP {
    fn schema(&self) -> Schema {
        Schema::new("SamplerEulerAncestralCFGPP", "sampling/custom_sampling/samplers")
            .input("eta", param(1.0, 1.0))
            .input("s_noise", param(1.0, 10.0))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = euler_cfg_pp::EulerAncestralCfgPp { eta: a.float("eta")?, s_noise: a.float("s_noise")? };
        Ok(sampler_value(SamplerSpec::custom("euler_ancestral_cfg_pp", s)))
    }
}

pub struct SamplerLMS;
impl Node for SamplerLMS {
    fn schema(&self) -> Schema {
        Schema::new("SamplerLMS", "sampling/custom_sampling/samplers").input("order", Int::new(4).range(1, 100)).output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(sampler_value(SamplerSpec::custom("lms", lms::Lms { order: a.i64("order")? as usize })))
    }
}

pub struct SamplerDpmpp3mSde;
impl Node for SamplerDpmpp3mSde {
    fn schema(&self) -> Schema {
        Schema::new("SamplerDPMPP_3M_SDE", "sampling/custom_sampling/samplers")
            .input("eta", param(1.0, 100.0))
            .input("s_noise", param(1.0, 100.0))
            .input("noise_device", noise_device())
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let gpu = a.string("noise_device")? == "gpu";
        let s = dpmpp_3m_sde::Dpmpp3mSde { eta: a.float("eta")?, s_noise: a.float("s_noise")?, gpu };
        Ok(sampler_value(SamplerSpec::custom(if gpu { "dpmpp_3m_sde_gpu" } else { "dpmpp_3m_sde" }, s)))
    }
}

pub struct SamplerDpmpp2mSde;
impl Node for SamplerDpmpp2mSde {
    fn schema(&self) -> Schema {
        Schema::new("SamplerDPMPP_2M_SDE", "sampling/custom_sampling/samplers")
            .input("solver_type", Combo::of(&["midpoint", "heun"]))
            .input("eta", param(1.0, 100.0))
            .input("s_noise", param(1.0, 100.0))
            .input("noise_device", noise_device())
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let gpu = a.string("noise_device")? == "gpu";
        let heun = a.string("solver_type")? == "heun";
        let s = dpmpp_2m_sde::Dpmpp2mSde { eta: a.float("eta")?, s_noise: a.float("s_noise")?, gpu, heun };
        Ok(sampler_value(SamplerSpec::custom(if gpu { "dpmpp_2m_sde_gpu" } else { "dpmpp_2m_sde" }, s)))
    }
}

pub struct SamplerDpmppSde;
impl Node for SamplerDpmppSde {
    fn schema(&self) -> Schema {
        Schema::new("SamplerDPMPP_SDE", "sampling/custom_sampling/samplers")
            .input("eta", param(1.0, 100.0))
            .input("s_noise", param(1.0, 100.0))
            .input("r", param(0.5, 100.0))
            .input("noise_device", noise_device())
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let gpu = a.string("noise_device")? == "gpu";
        let s = dpmpp_sde::DpmppSde { eta: a.float("eta")?, s_noise: a.float("s_noise")?, r: a.float("r")?, gpu };
        Ok(sampler_value(SamplerSpec::custom(if gpu { "dpmpp_sde_gpu" } else { "dpmpp_sde" }, s)))
    }
}

pub struct SamplerDpmpp2sAncestral;
impl Node for SamplerDpmpp2sAncestral {
    fn schema(&self) -> Schema {
        Schema::new("SamplerDPMPP_2S_Ancestral", "sampling/custom_sampling/samplers")
            .input("eta", param(1.0, 100.0))
            .input("s_noise", param(1.0, 100.0))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = dpmpp_2s_ancestral::Dpmpp2sAncestral { eta: a.float("eta")?, s_noise: a.float("s_noise")? };
        Ok(sampler_value(SamplerSpec::custom("dpmpp_2s_ancestral", s)))
    }
}

pub struct SamplerDPMAdaptative;
impl Node for SamplerDPMAdaptative {
    fn schema(&self) -> Schema {
        Schema::new("SamplerDPMAdaptative", "sampling/custom_sampling/samplers")
            .input("order", Int::new(3).range(2, 3))
            .input("rtol", param(0.05, 100.0))
            .input("atol", param(0.0078, 100.0))
            .input("h_init", param(0.05, 100.0))
            .input("pcoeff", param(0.0, 100.0))
            .input("icoeff", param(1.0, 100.0))
            .input("dcoeff", param(0.0, 100.0))
            .input("accept_safety", param(0.81, 100.0))
            .input("eta", param(0.0, 100.0))
            .input("s_noise", param(1.0, 100.0))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = dpm_solver::DpmAdaptive {
            order: a.i64("order")? as u32,
            rtol: a.float("rtol")?,
            atol: a.float("atol")?,
            h_init: a.float("h_init")?,
            pcoeff: a.float("pcoeff")?,
            icoeff: a.float("icoeff")?,
            dcoeff: a.float("dcoeff")?,
            accept_safety: a.float("accept_safety")?,
            eta: a.float("eta")?,
            s_noise: a.float("s_noise")?,
        };
        Ok(sampler_value(SamplerSpec::custom("dpm_adaptive", s)))
    }
}

pub struct SamplerErSde;
impl Node for SamplerErSde {
    fn schema(&self) -> Schema {
        Schema::new("SamplerER_SDE", "sampling/custom_sampling/samplers")
            .input("solver_type", Combo::of(&["ER-SDE", "Reverse-time SDE", "ODE"]))
            .input("max_stage", Int::new(3).range(1, 3))
            .input("eta", param(1.0, 100.0))
            .doc("stochastic strength of the reverse-time SDE; 0 makes it an ODE (not used by ER-SDE)")
            .input("s_noise", param(1.0, 100.0))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (kind, mut eta, mut s_noise) = (a.string("solver_type")?, a.float("eta")?, a.float("s_noise")?);
        if kind == "ODE" || (kind == "Reverse-time SDE" && eta == 0.0) {
            (eta, s_noise) = (0.0, 0.0);
        }
        let reverse_time_eta = (kind != "ER-SDE").then_some(eta);
        let s = er_sde::ErSde { s_noise, max_stage: a.i64("max_stage")? as usize, reverse_time_eta };
        Ok(sampler_value(SamplerSpec::custom("er_sde", s)))
    }
}

pub struct SamplerSASolver;
impl Node for SamplerSASolver {
    fn schema(&self) -> Schema {
        Schema::new("SamplerSASolver", "sampling/custom_sampling/samplers")
            .input("model", ValueType::Model)
            .input("eta", param(1.0, 10.0))
            .input("sde_start_percent", Float::new(0.2).range(0.0, 1.0).step(0.001))
            .input("sde_end_percent", Float::new(0.8).range(0.0, 1.0).step(0.001))
            .input("s_noise", param(1.0, 100.0))
            .input("predictor_order", Int::new(3).range(1, 6))
            .input("corrector_order", Int::new(4).range(0, 6))
            .input("use_pece", Bool(false))
            .input("simple_order_2", Bool(false))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        // The model only supplies the schedule, which the sampler reads from the run.
        let _: &SdModel = a.handle("model")?;
        let s = sa_solver::SaSolver {
            eta: a.float("eta")?,
            sde_percent: (a.float("sde_start_percent")?, a.float("sde_end_percent")?),
            predictor_order: a.i64("predictor_order")? as usize,
            corrector_order: a.i64("corrector_order")? as usize,
            s_noise: a.float("s_noise")?,
            use_pece: a.boolean("use_pece")?,
            simple_order_2: a.boolean("simple_order_2")?,
        };
        Ok(sampler_value(SamplerSpec::custom("sa_solver", s)))
    }
}

pub struct SamplerSEEDS2;
impl Node for SamplerSEEDS2 {
    fn schema(&self) -> Schema {
        Schema::new("SamplerSEEDS2", "sampling/custom_sampling/samplers")
            .input("solver_type", Combo::of(&["phi_1", "phi_2"]))
            .input("eta", param(1.0, 100.0))
            .input("s_noise", param(1.0, 100.0))
            .input("r", Float::new(0.5).range(0.01, 1.0).step(0.01))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = seeds::Seeds2 { eta: a.float("eta")?, s_noise: a.float("s_noise")?, r: a.float("r")?, phi_2: a.string("solver_type")? == "phi_2" };
        Ok(sampler_value(SamplerSpec::custom("seeds_2", s)))
    }
}

pub struct SamplerLCMUpscale;
impl Node for SamplerLCMUpscale {
    fn schema(&self) -> Schema {
        Schema::new("SamplerLCMUpscale", "sampling/custom_sampling/samplers")
            .input("scale_ratio", Float::new(1.0).range(0.1, 20.0).step(0.01))
            .input("scale_steps", Int::new(-1).range(-1, 1000))
            .input("upscale_method", Combo::of(&["bislerp", "nearest-exact", "bilinear", "area", "bicubic"]))
            .output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let steps = a.i64("scale_steps")?;
        let s = lcm_upscale::LcmUpscale {
            total_upscale: a.float("scale_ratio")?,
            upscale_steps: (steps >= 0).then_some(steps as usize),
            upscale_method: a.string("upscale_method")?.to_owned(),
        };
        Ok(sampler_value(SamplerSpec::custom("lcm_upscale", s)))
    }
}

pub struct SamplerEulerCFGpp;
impl Node for SamplerEulerCFGpp {
    fn schema(&self) -> Schema {
        Schema::new("SamplerEulerCFGpp", "_for_testing").input("version", Combo::of(&["regular", "alternative"])).output("SAMPLER", ValueType::Sampler)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(sampler_value(match a.string("version")? {
            "alternative" => SamplerSpec::custom("euler_cfg_pp (alternative)", euler_cfg_pp::EulerCfgPpAlternative),
            _ => SamplerSpec::named("euler_cfg_pp")?,
        }))
    }
}

/// The inputs of the sigma-range schedulers (KarrasScheduler and the like).
fn sigma_range(schema: Schema) -> Schema {
    schema
        .input("steps", Int::new(20).range(1, 10_000))
        .input("sigma_max", Float::new(14.614642).range(0.0, 5000.0).step(0.01))
        .input("sigma_min", Float::new(0.0291675).range(0.0, 5000.0).step(0.01))
}

/// Positive `sigma_min` and `sigma_max`, for schedules in log sigma.
fn log_range(a: &Args) -> Result<(f64, f64), NodeError> {
    let (lo, hi) = (a.float("sigma_min")?, a.float("sigma_max")?);
    if lo <= 0.0 || hi <= 0.0 {
        return Err(NodeError::input(if lo <= 0.0 { "sigma_min" } else { "sigma_max" }, "must be above 0 (the schedule is in log sigma)"));
    }
    Ok((lo, hi))
}

pub struct PolyexponentialScheduler;
impl Node for PolyexponentialScheduler {
    fn schema(&self) -> Schema {
        sigma_range(Schema::new("PolyexponentialScheduler", "sampling/custom_sampling/schedulers"))
            .input("rho", Float::new(1.0).range(0.0, 100.0).step(0.01))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (lo, hi) = log_range(a)?;
        Ok(vec![sigmas_value(&polyexponential(a.i64("steps")?, lo, hi, a.float("rho")?))])
    }
}

pub struct LaplaceScheduler;
impl Node for LaplaceScheduler {
    fn schema(&self) -> Schema {
        sigma_range(Schema::new("LaplaceScheduler", "sampling/custom_sampling/schedulers"))
            .input("mu", Float::new(0.0).range(-10.0, 10.0).step(0.1))
            .input("beta", Float::new(0.5).range(0.0, 10.0).step(0.1))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        // sigma_min above sigma_max clamps everything to sigma_max, as torch.clamp does in ComfyUI.
        let (lo, hi) = (a.float("sigma_min")?, a.float("sigma_max")?);
        Ok(vec![sigmas_value(&laplace(a.i64("steps")?, lo, hi, a.float("mu")?, a.float("beta")?))])
    }
}

pub struct VPScheduler;
impl Node for VPScheduler {
    fn schema(&self) -> Schema {
        Schema::new("VPScheduler", "sampling/custom_sampling/schedulers")
            .input("steps", Int::new(20).range(1, 10_000))
            .input("beta_d", Float::new(19.9).range(0.0, 5000.0).step(0.01))
            .input("beta_min", Float::new(0.1).range(0.0, 5000.0).step(0.01))
            .input("eps_s", Float::new(0.001).range(0.0, 1.0).step(0.0001))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![sigmas_value(&vp(a.i64("steps")?, a.float("beta_d")?, a.float("beta_min")?, a.float("eps_s")?))])
    }
}

pub struct BetaSamplingScheduler;
impl Node for BetaSamplingScheduler {
    fn schema(&self) -> Schema {
        Schema::new("BetaSamplingScheduler", "sampling/custom_sampling/schedulers")
            .input("model", ValueType::Model)
            .input("steps", Int::new(20).range(1, 10_000))
            .input("alpha", param(0.6, 50.0))
            .input("beta", param(0.6, 50.0))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let ms = ModelSampling::new(model.sampling);
        Ok(vec![sigmas_value(&beta(&ms, a.i64("steps")?, a.float("alpha")?, a.float("beta")?))])
    }
}

pub struct SDTurboScheduler;
impl Node for SDTurboScheduler {
    fn schema(&self) -> Schema {
        Schema::new("SDTurboScheduler", "sampling/custom_sampling/schedulers")
            .input("model", ValueType::Model)
            .input("steps", Int::new(1).range(1, 10))
            .input("denoise", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let ms = ModelSampling::new(model.sampling);
        Ok(vec![sigmas_value(&sd_turbo(&ms, a.i64("steps")?, a.float("denoise")?))])
    }
}

pub struct AlignYourStepsScheduler;
impl Node for AlignYourStepsScheduler {
    fn schema(&self) -> Schema {
        Schema::new("AlignYourStepsScheduler", "sampling/custom_sampling/schedulers")
            .input("model_type", Combo::of(&["SD1", "SDXL", "SVD"]))
            .input("steps", Int::new(10).range(1, 10_000))
            .input("denoise", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model_type = a.string("model_type")?;
        let s = align_your_steps(model_type, a.i64("steps")?, a.float("denoise")?)
            .ok_or_else(|| NodeError::input("model_type", format!("no Align Your Steps schedule for {model_type:?}")))?;
        Ok(vec![sigmas_value(&s)])
    }
}

pub struct GITSScheduler;
impl Node for GITSScheduler {
    fn schema(&self) -> Schema {
        Schema::new("GITSScheduler", "sampling/custom_sampling/schedulers")
            .input("coeff", Float::new(1.20).range(0.80, 1.50).step(0.05))
            .input("steps", Int::new(10).range(2, 1000))
            .input("denoise", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let coeff = a.float("coeff")?;
        let s = gits(coeff, a.i64("steps")?, a.float("denoise")?)
            .ok_or_else(|| NodeError::input("coeff", format!("GITS has schedules for 0.80, 0.85, …, 1.50, not {coeff}")))?;
        Ok(vec![sigmas_value(&s)])
    }
}

pub struct SplitSigmasDenoise;
impl Node for SplitSigmasDenoise {
    fn schema(&self) -> Schema {
        Schema::new("SplitSigmasDenoise", "sampling/custom_sampling/sigmas")
            .input("sigmas", ValueType::Sigmas)
            .input("denoise", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("high_sigmas", ValueType::Sigmas)
            .output("low_sigmas", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = a.sigmas("sigmas")?;
        let steps = s.len().saturating_sub(1);
        let total = ((steps as f64) * a.float("denoise")?).round_ties_even() as usize;
        // Python's sigmas[:-total] is empty for total 0, and both halves share the boundary sigma.
        let high = if total == 0 { &s[..0] } else { &s[..s.len().saturating_sub(total)] };
        let low = &s[s.len().saturating_sub(total + 1)..];
        Ok(vec![sigmas_value(high), sigmas_value(low)])
    }
}

pub struct FlipSigmas;
impl Node for FlipSigmas {
    fn schema(&self) -> Schema {
        Schema::new("FlipSigmas", "sampling/custom_sampling/sigmas").input("sigmas", ValueType::Sigmas).output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let mut s = a.sigmas("sigmas")?;
        s.reverse();
        if let Some(first) = s.first_mut().filter(|f| **f == 0.0) {
            *first = 0.0001;
        }
        Ok(vec![sigmas_value(&s)])
    }
}

pub struct SetFirstSigma;
impl Node for SetFirstSigma {
    fn schema(&self) -> Schema {
        Schema::new("SetFirstSigma", "sampling/custom_sampling/sigmas")
            .input("sigmas", ValueType::Sigmas)
            .input("sigma", Float::new(136.0).range(0.0, 20_000.0).step(0.001))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let mut s = a.sigmas("sigmas")?;
        let Some(first) = s.first_mut() else {
            return Err(NodeError::input("sigmas", "the schedule is empty: there is no first sigma to set"));
        };
        *first = a.float("sigma")?;
        Ok(vec![sigmas_value(&s)])
    }
}

pub struct ExtendIntermediateSigmas;
impl Node for ExtendIntermediateSigmas {
    fn schema(&self) -> Schema {
        Schema::new("ExtendIntermediateSigmas", "sampling/custom_sampling/sigmas")
            .input("sigmas", ValueType::Sigmas)
            .input("steps", Int::new(2).range(1, 100))
            .input("start_at_sigma", Float::new(-1.0).range(-1.0, 20_000.0).step(0.01))
            .doc("-1: from the first sigma")
            .input("end_at_sigma", Float::new(12.0).range(0.0, 20_000.0).step(0.01))
            .input("spacing", Combo::of(&["linear", "cosine", "sine"]))
            .output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = a.sigmas("sigmas")?;
        let steps = a.i64("steps")?;
        let start = match a.float("start_at_sigma")? {
            v if v < 0.0 => f64::INFINITY,
            v => v,
        };
        let end = a.float("end_at_sigma")?;
        let spacing = a.string("spacing")?;
        // torch.linspace(0, 1, steps + 1)[1:-1] through the spacing function, in float32.
        let points: Vec<f64> = (1..steps)
            .map(|k| {
                let x = (k as f32 / steps as f32) as f64;
                match spacing {
                    "cosine" => (x * std::f64::consts::FRAC_PI_2).sin(),
                    "sine" => 1.0 - (x * std::f64::consts::FRAC_PI_2).cos(),
                    _ => x,
                }
            })
            .collect();
        let mut out = Vec::new();
        for w in s.windows(2) {
            out.push(w[0]);
            if end <= w[0] && w[0] <= start {
                out.extend(points.iter().map(|p| ((*p as f32) * (w[1] - w[0]) as f32 + w[0] as f32) as f64));
            }
        }
        out.extend(s.last());
        Ok(vec![sigmas_value(&out)])
    }
}

pub struct SamplingPercentToSigma;
impl Node for SamplingPercentToSigma {
    fn schema(&self) -> Schema {
        Schema::new("SamplingPercentToSigma", "sampling/custom_sampling/sigmas")
            .input("model", ValueType::Model)
            .input("sampling_percent", Float::new(0.0).range(0.0, 1.0).step(0.0001))
            .input("return_actual_sigma", Bool(false))
            .doc("the schedule's own sigma at 0 and 1, instead of the values used for interval checks")
            .output("sigma_value", ValueType::Float)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let ms = ModelSampling::new(model.sampling);
        let percent = a.float("sampling_percent")?;
        let mut sigma = ms.percent_to_sigma(percent);
        if a.boolean("return_actual_sigma")? {
            if percent == 0.0 {
                sigma = ms.sigma_max();
            } else if percent == 1.0 {
                sigma = ms.sigma_min();
            }
        }
        Ok(vec![Value::Float(sigma)])
    }
}

pub struct ManualSigmas;
impl Node for ManualSigmas {
    fn schema(&self) -> Schema {
        Schema::new("ManualSigmas", "_for_testing/custom_sampling").input("sigmas", Str::new("1, 0.5")).output("SIGMAS", ValueType::Sigmas)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let sigmas = manual_sigmas(a.string("sigmas")?).map_err(|e| NodeError::input("sigmas", e))?;
        Ok(vec![sigmas_value(&sigmas)])
    }
}

/// The numbers in `text`, as ComfyUI's ManualSigmas finds them with the regex `[-+]?(?:\d*\.*\d+)`
/// and converts them with `float`: an optional sign, digits, points, digits. A match Python cannot
/// convert (`1..5`) is an error, as it is there.
pub fn manual_sigmas(text: &str) -> Result<Vec<f64>, String> {
    let b = text.as_bytes();
    let run = |mut i: usize, f: fn(&u8) -> bool| {
        while i < b.len() && f(&b[i]) {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let after_sign = if b[i] == b'-' || b[i] == b'+' { i + 1 } else { i };
        let d1 = run(after_sign, u8::is_ascii_digit);
        let dots = run(d1, |c| *c == b'.');
        let d2 = run(dots, u8::is_ascii_digit);
        // With no digits after the points, the regex backs off to the leading digits alone.
        let end = if d2 > dots { d2 } else { d1 };
        if end == after_sign {
            i += 1;
            continue;
        }
        let number = &text[start..end];
        out.push(number.parse::<f64>().map_err(|_| format!("{number:?} is not a number"))?);
        i = end;
    }
    Ok(out)
}
