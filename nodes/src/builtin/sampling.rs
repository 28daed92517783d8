//! ComfyUI's `sampling` category: KSampler, KSamplerAdvanced, and the custom-sampling set that makes
//! schedules and samplers graph values (SamplerCustom, BasicScheduler, KarrasScheduler,
//! ExponentialScheduler, KSamplerSelect, SplitSigmas).

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Bool, Combo, Ctx, Float, Handle, Int, Node, NodeError, Schema, Value, ValueType};
use tch::Tensor;

use crate::sampling::ksampler::{ksampler_sigmas, sample, slice_steps, Guider, Request, SamplerSpec};
use crate::sampling::model_sampling::{ModelSampling, Parameterization, SamplingMode, SAMPLING_NAMES};
use crate::sampling::schedulers::{calculate_sigmas, exponential, karras, SCHEDULER_NAMES};
use crate::sd::SdModel;

/// ComfyUI 0.8's sampler names, in its order (`comfy.samplers.SAMPLER_NAMES`: `KSAMPLER_NAMES`, then
/// ddim and the UniPC pair).
pub const SAMPLER_NAMES: &[&str] = &[
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3",
    "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
];

/// ComfyUI's seed range: 0 to 2^64 − 1.
fn seed() -> Int {
    Int::new(0).range(0, u64::MAX as i128)
}

fn cfg() -> Float {
    Float::new(8.0).range(0.0, 100.0).step(0.1)
}

/// A SIGMAS value from a list.
fn sigmas_value(s: &[f64]) -> Value {
    let v: Vec<f32> = s.iter().map(|x| *x as f32).collect();
    Value::Sigmas(Shared(Tensor::from_slice(&v)))
}

fn latent_out(latent: &Latent, samples: Tensor) -> Value {
    Value::Latent(Latent { samples: Shared(samples), ..latent.clone() })
}

/// Samples the node's `latent_image` with `guider`, reporting the model calls; returns the new latent
/// and the last denoised estimate, both with the input's noise mask.
fn run(cx: &mut Ctx, a: &Args, guider: &Guider, sampler: &SamplerSpec, sigmas: &[f64], seed: i128, add_noise: bool) -> Result<(Value, Value), NodeError> {
    let latent = a.latent("latent_image")?;
    let label = cx.node_id.to_owned();
    let r = Request { guider, latent, seed, add_noise, sampler, sigmas, cancel: cx.cancel, label: &label };
    let out = sample(&r)?;
    cx.messages.push(format!("{} steps of {}, {} model calls", sigmas.len().saturating_sub(1), sampler.name, out.model_calls));
    Ok((latent_out(latent, out.samples), latent_out(latent, out.denoised)))
}

/// The CFG guider of a node's `model`, `positive`, `negative` and `cfg` inputs.
fn cfg_guider(a: &Args) -> Result<Guider, NodeError> {
    Ok(Guider::cfg(a.handle("model")?, a.conditioning("positive")?, a.conditioning("negative")?, a.float("cfg")?))
}

pub struct KSampler;
impl Node for KSampler {
    fn schema(&self) -> Schema {
        Schema::new("KSampler", "sampling")
            .describe("Denoises a latent: seeds, samplers and schedulers as ComfyUI's, so its seeds carry over.")
            .input("model", ValueType::Model)
            .input("seed", seed())
            .input("steps", Int::new(20).range(1, 10_000))
            .input("cfg", cfg())
            .input("sampler_name", Combo::of(SAMPLER_NAMES))
            .input("scheduler", Combo::of(SCHEDULER_NAMES))
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("latent_image", ValueType::Latent)
            .input("denoise", Float::new(1.0).range(0.0, 1.0))
            .doc("below 1, only the tail of the schedule runs (img2img)")
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let (sampler, scheduler) = (a.string("sampler_name")?, a.string("scheduler")?);
        let ms = ModelSampling::new(model.sampling);
        let sigmas = ksampler_sigmas(&ms, sampler, scheduler, a.i64("steps")?, a.float("denoise")?)?;
        let (samples, _) = run(cx, a, &cfg_guider(a)?, &SamplerSpec::named(sampler)?, &sigmas, a.int("seed")?, true)?;
        Ok(vec![samples])
    }
}

pub struct KSamplerAdvanced;
impl Node for KSamplerAdvanced {
    fn schema(&self) -> Schema {
        Schema::new("KSamplerAdvanced", "sampling")
            .describe("KSampler over a range of the steps, for multi-pass graphs.")
            .input("model", ValueType::Model)
            .input("add_noise", Combo::of(&["enable", "disable"]))
            .input("noise_seed", seed())
            .input("steps", Int::new(20).range(1, 10_000))
            .input("cfg", cfg())
            .input("sampler_name", Combo::of(SAMPLER_NAMES))
            .input("scheduler", Combo::of(SCHEDULER_NAMES))
            .input("positive", ValueType::Conditioning)
            .input("negative", ValueType::Conditioning)
            .input("latent_image", ValueType::Latent)
            .input("start_at_step", Int::new(0).range(0, 10_000))
            .input("end_at_step", Int::new(10_000).range(0, 10_000))
            .input("return_with_leftover_noise", Combo::of(&["disable", "enable"]))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let (sampler, scheduler) = (a.string("sampler_name")?, a.string("scheduler")?);
        let ms = ModelSampling::new(model.sampling);
        let all = ksampler_sigmas(&ms, sampler, scheduler, a.i64("steps")?, 1.0)?;
        let force_full = a.string("return_with_leftover_noise")? != "enable";
        let latent = a.latent("latent_image")?;
        let range = slice_steps(all, Some(a.i64("start_at_step")? as usize), Some(a.i64("end_at_step")? as usize), force_full);
        let Some(sigmas) = range else {
            return Ok(vec![latent_out(latent, latent.samples.shallow_clone())]);
        };
        let spec = SamplerSpec::named(sampler)?;
        let (samples, _) = run(cx, a, &cfg_guider(a)?, &spec, &sigmas, a.int("noise_seed")?, a.string("add_noise")? == "enable")?;
        Ok(vec![samples])
    }
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
        let (samples, denoised) = run(cx, a, &cfg_guider(a)?, sampler, &sigmas, a.int("noise_seed")?, a.boolean("add_noise")?)?;
        Ok(vec![samples, denoised])
    }
}

pub struct KSamplerSelect;
impl Node for KSamplerSelect {
    fn schema(&self) -> Schema {
        Schema::new("KSamplerSelect", "sampling/custom_sampling/samplers")
            .input("sampler_name", Combo::of(SAMPLER_NAMES))
            .output("SAMPLER", ValueType::Sampler)
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
        let all = calculate_sigmas(&ms, a.string("scheduler")?, total).unwrap_or_default();
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

/// ComfyUI's ModelSamplingDiscrete: how the model's output is read (eps, v_prediction, lcm, x0,
/// img_to_img) and whether its schedule is rescaled to zero terminal SNR, where detection cannot tell
/// (an SD 2.x 768-v checkpoint whose norm statistics fool the heuristic, a v-prediction or zsnr
/// fine-tune, an LCM distillation).
pub struct ModelSamplingDiscrete;
impl Node for ModelSamplingDiscrete {
    fn schema(&self) -> Schema {
        Schema::new("ModelSamplingDiscrete", "advanced/model")
            .input("model", ValueType::Model)
            .input("sampling", Combo::of(SAMPLING_NAMES))
            .input("zsnr", Bool(false))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &SdModel = a.handle("model")?;
        let sampling = a.string("sampling")?;
        let parameterization = Parameterization::from_name(sampling)
            .ok_or_else(|| NodeError::input("sampling", format!("unknown sampling type {sampling:?}")))?;
        let mode = SamplingMode { parameterization, zsnr: a.boolean("zsnr")? };
        let label = format!("{:?} ({sampling}{})", model.family, if mode.zsnr { ", zsnr" } else { "" });
        Ok(vec![Value::Model(Handle::new(SdModel { unet: model.unet.clone(), family: model.family, sampling: mode }, 0, label))])
    }
}
