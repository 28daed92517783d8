//! ComfyUI's `sampling` category: KSampler, KSamplerAdvanced and ModelSamplingDiscrete (the
//! custom-sampling nodes are in `custom_sampling.rs`).

use diffloom_core::{Args, Bool, Combo, Ctx, Float, Handle, Int, Node, NodeError, Schema, Value, ValueType};

use super::shared::{cfg, cfg_guider, latent_out, sample_latent, seed};
use crate::sampling::ksampler::{ksampler_sigmas, slice_steps, SamplerSpec};
use crate::sampling::model_sampling::{ModelSampling, Parameterization, SamplingMode, SAMPLING_NAMES};
use crate::sampling::samplers::SAMPLER_NAMES;
use crate::sampling::schedulers::SCHEDULER_NAMES;
use crate::sd::SdModel;

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
        let (samples, _) = sample_latent(cx, a, &cfg_guider(a)?, &SamplerSpec::named(sampler)?, &sigmas, a.int("seed")?, true)?;
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
        let (samples, _) = sample_latent(cx, a, &cfg_guider(a)?, &spec, &sigmas, a.int("noise_seed")?, a.string("add_noise")? == "enable")?;
        Ok(vec![samples])
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
        let parameterization =
            Parameterization::from_name(sampling).ok_or_else(|| NodeError::input("sampling", format!("unknown sampling type {sampling:?}")))?;
        let mode = SamplingMode { parameterization, zsnr: a.boolean("zsnr")? };
        let label = format!("{:?} ({sampling}{})", model.family, if mode.zsnr { ", zsnr" } else { "" });
        Ok(vec![Value::Model(Handle::new(SdModel { sampling: mode, ..model.clone() }, 0, label))])
    }
}
