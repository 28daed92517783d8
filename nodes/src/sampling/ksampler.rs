//! The common sampling path behind KSampler, KSamplerAdvanced and SamplerCustom (ComfyUI's
//! `common_ksampler` → `KSAMPLER.sample`): noise, latent scaling, the noise mask, inpainting-model
//! inputs, guidance, the sampler, progress and cancellation.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use diffloom_core::value::{CondEntry, Latent};
use diffloom_core::NodeError;
use tch::{Kind, Tensor};

use super::conds::{repeat_to_batch, resolve_sides, Target};
use super::guidance::{CfgDenoiser, Guidance, NoiseMask};
use super::model_sampling::ModelSampling;
use super::noise::{initial_noise, step_noise};
use super::samplers::{self, SampleCtx, Sampler};
use super::schedulers::calculate_sigmas;
use crate::control::AppliedControl;
use crate::sd::SdModel;

/// Samplers whose last step is wasted on a tiny sigma; KSampler plans one more step and drops the
/// penultimate sigma (ComfyUI's `DISCARD_PENULTIMATE_SIGMA_SAMPLERS`).
const DISCARD_PENULTIMATE: &[&str] = &["dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"];

/// KSampler's sigmas: the scheduler's list for `steps`, or for denoise < 1 the last `steps + 1` of a
/// longer list (the tail of the schedule, as img2img needs).
pub fn ksampler_sigmas(ms: &ModelSampling, sampler: &str, scheduler: &str, steps: i64, denoise: f64) -> Result<Vec<f64>, NodeError> {
    let plan = |n: i64| -> Result<Vec<f64>, NodeError> {
        let discard = DISCARD_PENULTIMATE.contains(&sampler);
        let mut s = calculate_sigmas(ms, scheduler, if discard { n + 1 } else { n })
            .ok_or_else(|| NodeError::input("scheduler", format!("unknown scheduler {scheduler:?}")))?;
        if discard && s.len() >= 2 {
            s.remove(s.len() - 2);
        }
        Ok(s)
    };
    if denoise > 0.9999 {
        return plan(steps);
    }
    if denoise <= 0.0 {
        return Ok(vec![]);
    }
    let all = plan((steps as f64 / denoise) as i64)?;
    let keep = (steps as usize + 1).min(all.len());
    Ok(all[all.len() - keep..].to_vec())
}

/// KSamplerAdvanced's step range: up to `last_step` (its sigma forced to 0 when `force_full_denoise`),
/// from `start_step`. `None` means the latent is returned as it is.
pub fn slice_steps(mut sigmas: Vec<f64>, start: Option<usize>, last: Option<usize>, force_full_denoise: bool) -> Option<Vec<f64>> {
    if let Some(last) = last {
        if last + 1 < sigmas.len() {
            sigmas.truncate(last + 1);
            if force_full_denoise {
                if let Some(s) = sigmas.last_mut() {
                    *s = 0.0;
                }
            }
        }
    }
    match start {
        Some(start) if start + 1 >= sigmas.len() => None,
        Some(start) => Some(sigmas[start..].to_vec()),
        None => Some(sigmas),
    }
}

/// A SAMPLER value: a sampling method with its parameters, under ComfyUI's name.
#[derive(Clone)]
pub struct SamplerSpec {
    /// ComfyUI's `sampler_name` (or the sampler node's type), for reports and KSampler's schedule rule.
    pub name: String,
    pub sampler: Rc<dyn Sampler>,
    /// `ddim`: the inpainting re-noise comes from seed + 1 rather than the initial noise (ComfyUI's
    /// `inpaint_options={"random": True}`).
    pub random_inpaint_noise: bool,
}

impl SamplerSpec {
    /// The sampler ComfyUI's `sampler_name` names, with its default parameters.
    pub fn named(name: &str) -> Result<SamplerSpec, NodeError> {
        // "ddim" is Euler whose inpainting re-noise comes from seed + 1 (comfy's sampler_object).
        let method = if name == "ddim" { "euler" } else { name };
        let sampler = samplers::by_name(method).ok_or_else(|| NodeError::input("sampler_name", format!("unknown sampler {name:?}")))?;
        Ok(SamplerSpec { name: name.to_owned(), sampler: Rc::from(sampler), random_inpaint_noise: name == "ddim" })
    }

    /// A sampler node's configured method, reported as `name`.
    pub fn custom(name: &str, sampler: impl Sampler + 'static) -> SamplerSpec {
        SamplerSpec { name: name.to_owned(), sampler: Rc::new(sampler), random_inpaint_noise: false }
    }
}

/// A GUIDER value: the model, its conditionings (with the input each came from, for errors) and how
/// their predictions combine. KSampler and SamplerCustom make a CFG one from positive and negative.
#[derive(Clone)]
pub struct Guider {
    pub model: SdModel,
    pub sides: Vec<(String, Vec<CondEntry>)>,
    pub guidance: Guidance,
}

impl Guider {
    /// CFG of `positive` against `negative` (CFGGuider, KSampler).
    pub fn cfg(model: &SdModel, positive: Vec<CondEntry>, negative: Vec<CondEntry>, cfg: f64) -> Guider {
        Guider { model: model.clone(), sides: vec![("positive".into(), positive), ("negative".into(), negative)], guidance: Guidance::Cfg(cfg) }
    }
}

/// One sampling run.
pub struct Request<'a> {
    pub guider: &'a Guider,
    pub latent: &'a Latent,
    pub seed: i128,
    pub add_noise: bool,
    pub sampler: &'a SamplerSpec,
    pub sigmas: &'a [f64],
    pub cancel: &'a AtomicBool,
    /// Shown in the progress bar.
    pub label: &'a str,
    /// Told `(step, steps, denoised estimate)` after each step (the run's observer, for progress and
    /// live previews; the estimate is in the model's latent scale).
    pub progress: &'a dyn Fn(u64, u64, Option<&Tensor>),
}

/// The result: the new latent (unscaled) and the last denoised estimate.
pub struct Output {
    pub samples: Tensor,
    pub denoised: Tensor,
    pub model_calls: usize,
    /// Time spent inside the UNet (the rest of the run is sampler, guidance and noise overhead).
    pub model_time: std::time::Duration,
}

/// Runs the request. Errors name the input at fault; a NaN appearing in the latent names the step.
pub fn sample(r: &Request) -> Result<Output, NodeError> {
    let latent = r.latent.samples.to_kind(Kind::Float);
    let shape = latent.size();
    let model = &r.guider.model;
    let unet = &model.unet;
    let channels = unet.config.out_channels;
    if shape.len() != 4 || shape[1] != channels {
        return Err(NodeError::input(
            "latent_image",
            format!("a latent of shape {shape:?} does not fit this model, which needs {channels} channels [batch, {channels}, h, w]"),
        ));
    }
    if r.sigmas.is_empty() {
        return Ok(Output { samples: latent.shallow_clone(), denoised: latent, model_calls: 0, model_time: std::time::Duration::ZERO });
    }
    // Sigmas usually decrease; rising ones (FlipSigmas) run the sampler backwards, to "unsample" an
    // image into its noise, as ComfyUI allows.
    if r.sigmas.iter().any(|s| !s.is_finite() || *s < 0.0) {
        return Err(NodeError::input("sigmas", "sigmas must be finite and not negative"));
    }
    if let Some((input, _)) = r.guider.sides.iter().find(|(_, c)| c.is_empty()) {
        return Err(NodeError::input(input, "the conditioning is empty"));
    }
    let ms = ModelSampling::new(model.sampling);
    let noise = if r.add_noise {
        initial_noise(r.seed, &shape, r.latent.batch_index.as_deref())
    } else {
        Tensor::zeros(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
    };
    // LATENT values are the VAE's own; the sampler works on them scaled (ComfyUI's process_latent_in).
    let latent_scale = model.family.spec().latent_scale;
    let latent_in = &latent * latent_scale;
    let (b, h, w) = (shape[0], shape[2], shape[3]);

    // The noise mask at latent resolution, one channel per latent channel (comfy's reshape_mask).
    let mask = r.latent.noise_mask.as_ref().map(|m| {
        let m = m.to_kind(Kind::Float);
        let m = m.reshape([-1, 1, m.size()[m.dim() - 2], m.size()[m.dim() - 1]]);
        let m = m.upsample_bilinear2d([h, w], false, None, None);
        repeat_to_batch(&m.repeat([1, channels, 1, 1]), b)
    });

    let sigma_max = ms.sigma_max();
    let max_denoise = (r.sigmas[0] - sigma_max).abs() <= 1e-5 * r.sigmas[0].abs().max(sigma_max) || r.sigmas[0] > sigma_max;
    let mask_noise = match &mask {
        // One draw of the latent's shape, batch indices aside (comfy's KSAMPLER inpaint "random").
        Some(_) if r.sampler.random_inpaint_noise => initial_noise(r.seed + 1, &shape, None),
        _ => noise.shallow_clone(),
    };
    let x = ms.noise_scaling(r.sigmas[0], &noise, &latent_in, max_denoise);

    // Areas, masks and strengths of the entries, and the 5 extra input channels of inpainting UNets
    // (mask and masked-image latent).
    let target = Target {
        latent_in: &latent_in,
        noise_mask: mask.as_ref(),
        inpaint_unet: unet.config.in_channels == channels + 5,
        ip2p_unet: unet.config.in_channels == channels * 2,
        sampling: &ms,
        family: model.family.spec(),
    };
    let sides: Vec<(&str, &[CondEntry])> = r.guider.sides.iter().map(|(input, c)| (input.as_str(), c.as_slice())).collect();
    let mut conds = resolve_sides(&sides, &target)?;
    let inputs: Vec<&str> = sides.iter().map(|(input, _)| *input).collect();
    super::adm::attach_adm(&mut conds, &inputs, unet, &model.name, r.seed)?;
    for control in conds.iter().flatten().filter_map(|c| c.control.as_ref()?.downcast::<AppliedControl>()) {
        control.check_fits(&unet.config, &model.name)?;
    }
    let mut denoiser = CfgDenoiser::new(unet, &ms, conds, r.guider.guidance);
    denoiser.patches = model.patches.clone();
    denoiser.run_sigmas = r.sigmas.to_vec();
    denoiser.noise_mask = mask.map(|m| NoiseMask { mask: m, latent_image: latent_in.shallow_clone(), noise: mask_noise });
    // The denoised estimate of each step's first model call, what ComfyUI's step callback shows and
    // keeps as `denoised_output`.
    let step_estimate: Rc<RefCell<Option<Tensor>>> = Rc::default();
    denoiser.first_estimate = Some(step_estimate.clone());

    let total = r.sigmas.len() - 1;
    let progress = progress_bar(total as u64, r.label);
    let mut noise_fn = step_noise(r.seed, unet.device())?;
    let mut last_denoised: Option<Tensor> = None;
    let mut step = |i: usize, _n: usize, x: &Tensor| -> Result<(), NodeError> {
        progress.inc(1);
        if r.cancel.load(Ordering::Relaxed) {
            return Err(NodeError::Cancelled);
        }
        if x.isnan().any().int64_value(&[]) != 0 {
            return Err(NodeError::Failed(format!("the latent became NaN at step {} of {total} (sigma {:.4})", i + 1, r.sigmas[i])));
        }
        last_denoised = step_estimate.borrow_mut().take().or_else(|| Some(x.shallow_clone()));
        (r.progress)(i as u64 + 1, total as u64, last_denoised.as_ref());
        Ok(())
    };
    let mut cx = SampleCtx { sampling: &ms, device: unet.device(), noise: &mut noise_fn, seed: r.seed, step: &mut step };
    let result = r.sampler.sampler.sample(&mut denoiser, x, r.sigmas, &mut cx);
    progress.finish_and_clear();
    let out = result?;
    let (calls, model_time) = (denoiser.calls, denoiser.model_time);
    let denoised = last_denoised.unwrap_or_else(|| out.shallow_clone());
    Ok(Output { samples: &out / latent_scale, denoised: denoised / latent_scale, model_calls: calls, model_time })
}

/// A per-run progress bar (step, it/s, ETA) on stderr; indicatif draws nothing when stderr is not a
/// terminal.
fn progress_bar(total: u64, label: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}") {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_owned());
    bar
}
