//! The denoiser samplers call: the UNet with classifier-free guidance (cond and uncond in one batched
//! forward pass), the model-sampling conversions, and ComfyUI's latent noise mask.

use std::cell::RefCell;
use std::rc::Rc;

use tch::{Kind, Tensor};

use diffloom_core::NodeError;

use super::conds::Cond;
use super::model_sampling::ModelSampling;
use crate::control::AppliedControl;
use crate::models::unet::Unet;
use crate::patches::{CallCx, CfgArgs, ModelPatches, ModelRunner, UnetPatches};

/// What a sampler calls: the denoised estimate of `x` at noise level `sigma`.
pub trait Denoiser {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, NodeError>;

    /// The guided estimate and the unconditional one, for the CFG++ samplers (ComfyUI hands them the
    /// uncond prediction through a post-CFG function and disables the cfg = 1 shortcut, so the uncond
    /// side always runs). A denoiser without guidance returns its estimate twice.
    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor), NodeError> {
        let d = self.denoise(x, sigma)?;
        Ok((d.shallow_clone(), d))
    }

    /// Whether the guidance has an unconditional side at all (BasicGuider has none).
    fn has_uncond(&self) -> bool {
        true
    }
}

/// Keeps the unmasked part of the latent: before each model call the latent is re-noised to the current
/// sigma there, and the model's estimate there is replaced by the original (ComfyUI's
/// `KSamplerX0Inpaint`). `mask` is 1 where the image is resampled.
pub struct NoiseMask {
    /// `[b, c, h, w]` at latent resolution.
    pub mask: Tensor,
    pub latent_image: Tensor,
    pub noise: Tensor,
}

/// How a guider combines its sides' denoised predictions (ComfyUI's guiders).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Guidance {
    /// KSampler, SamplerCustom and CFGGuider, sides [positive, negative]: uncond + (cond − uncond)·cfg.
    /// At cfg 1 the negative side is not run (ComfyUI's cfg = 1 shortcut).
    Cfg(f64),
    /// BasicGuider, sides [conditioning]: the prediction itself.
    Basic,
    /// DualCFGGuider, sides [cond1, cond2, negative]. Regular: CFG of cond2 against the negative by
    /// `cfg_cond2_negative`, plus (cond1 − cond2)·`cfg_conds`; nested: CFG of cond1 against cond2 by
    /// `cfg_conds`, then against the negative by `cfg_cond2_negative`.
    DualCfg { cfg_conds: f64, cfg_cond2_negative: f64, nested: bool },
    /// PerpNegGuider, sides [positive, negative, empty]: CFG against the empty prompt with the
    /// negative's component perpendicular to the positive direction subtracted, scaled by `neg_scale`.
    PerpNeg { cfg: f64, neg_scale: f64 },
}

impl Guidance {
    /// How many conditionings (sides) the guidance combines.
    pub fn side_count(&self) -> usize {
        match self {
            Guidance::Basic => 1,
            Guidance::Cfg(_) => 2,
            Guidance::DualCfg { .. } | Guidance::PerpNeg { .. } => 3,
        }
    }

    /// Which sides need a forward pass; with `want_uncond` (CFG++ samplers, ComfyUI's
    /// `disable_cfg1_optimization`) the scale-1 shortcuts are off.
    fn needed(&self, want_uncond: bool) -> Vec<bool> {
        let one = |v: f64| !want_uncond && (v - 1.0).abs() <= 1e-9;
        // math.isclose(v, 0.0) with its default tolerances holds only at 0 itself.
        let zero = |v: f64| !want_uncond && v == 0.0;
        match *self {
            Guidance::Cfg(cfg) => vec![true, !one(cfg)],
            Guidance::Basic => vec![true],
            Guidance::DualCfg { cfg_conds, cfg_cond2_negative, nested } => {
                let skip_negative = !nested && one(cfg_cond2_negative);
                vec![true, !(skip_negative && one(cfg_conds)), !skip_negative]
            }
            Guidance::PerpNeg { cfg, neg_scale } => vec![true, !zero(neg_scale), !(zero(neg_scale) && one(cfg))],
        }
    }

    /// The guided estimate and the unconditional one a CFG++ sampler reads, from each side's
    /// prediction (zeros for a side not run, as ComfyUI's `calc_cond_batch` gives for a missing one),
    /// with the model's pre-CFG, CFG and post-CFG functions where ComfyUI's guiders call them.
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &self,
        p: Vec<Tensor>,
        patches: &ModelPatches,
        x: &Tensor,
        sigma: f64,
        needed: &[bool],
        runner: &dyn ModelRunner,
        run: u64,
    ) -> Result<(Tensor, Tensor), NodeError> {
        // `sides`: the sides the two predictions came from (ComfyUI's cond and uncond lists; None for
        // a side that was not run), for functions that run the model again.
        let args = |cond: &'_ Tensor, uncond: &'_ Tensor, scale: f64, sides: (usize, usize)| {
            let uncond_side = needed.get(sides.1).copied().unwrap_or(false).then_some(sides.1);
            let a =
                CfgArgs { input: x, sigma, cond_scale: scale, cond_denoised: cond, uncond_denoised: uncond, sides: Some((sides.0, uncond_side, runner)), run };
            patches.guide(&a)
        };
        Ok(match *self {
            Guidance::Cfg(cfg) => {
                let p = patches.pre(p, needed, x, sigma, cfg)?;
                (args(&p[0], &p[1], cfg, (0, 1))?, p[1].shallow_clone())
            }
            // BasicGuider is a CFG guider at scale 1 without a negative side: ComfyUI hands the hooks
            // (and CFG++ samplers) zeros for it.
            Guidance::Basic => {
                let zeros = p[0].zeros_like();
                let p = patches.pre(vec![p[0].shallow_clone(), zeros], &[true, false], x, sigma, 1.0)?;
                (args(&p[0], &p[1], 1.0, (0, usize::MAX))?, p[1].shallow_clone())
            }
            // ComfyUI's DualCFGGuider calls no pre-CFG functions; its CFG function (and the post-CFG
            // ones) run on the inner pair.
            Guidance::DualCfg { cfg_conds, cfg_cond2_negative, nested } => {
                let (c1, c2, neg) = (&p[0], &p[1], &p[2]);
                if nested {
                    let text = args(c1, c2, cfg_conds, (0, 1))?;
                    (neg + (text - neg) * cfg_cond2_negative, c2.shallow_clone())
                } else {
                    (args(c2, neg, cfg_cond2_negative, (1, 2))? + (c1 - c2) * cfg_conds, neg.shallow_clone())
                }
            }
            // PerpNeg has its own formula instead of a CFG function; the post-CFG functions follow it.
            Guidance::PerpNeg { cfg, neg_scale } => {
                let p = patches.pre(p, needed, x, sigma, cfg)?;
                let (positive, negative, empty) = (&p[0], &p[1], &p[2]);
                let pos = positive - empty;
                let neg = negative - empty;
                // Over the whole batch, as ComfyUI's perp_neg sums.
                let proj = (&neg * &pos).sum(Kind::Float) / pos.square().sum(Kind::Float);
                let perp = &neg - &pos * proj;
                let mut out = empty + (pos - perp * neg_scale) * cfg;
                let uncond_side = needed.get(1).copied().unwrap_or(false).then_some(1);
                let a = CfgArgs {
                    input: x,
                    sigma,
                    cond_scale: cfg,
                    cond_denoised: positive,
                    uncond_denoised: negative,
                    sides: Some((0, uncond_side, runner)),
                    run,
                };
                for post in &patches.post_cfg {
                    out = post.apply(out, &a)?;
                }
                (out, negative.shallow_clone())
            }
        })
    }
}

/// The guided UNet. Each side's entries are run on their areas and their predictions averaged with
/// their per-pixel weights (ComfyUI's `calc_cond_batch`); entries over the same area share one batched
/// forward pass, the last side's rows first, as ComfyUI batches them; entries outside their timestep
/// range are left out; then [`Guidance`] combines the sides.
pub struct CfgDenoiser<'a> {
    pub unet: &'a Unet,
    pub sampling: &'a ModelSampling,
    /// The conditioning of each side, in the order the guidance names them.
    pub sides: Vec<Vec<Cond>>,
    pub guidance: Guidance,
    pub noise_mask: Option<NoiseMask>,
    /// Model calls so far (for NaN reports and benchmarks).
    pub calls: usize,
    /// Time spent in the UNet itself, so benchmarks can tell sampler overhead from model time.
    pub model_time: std::time::Duration,
    /// Where the first estimate after each take is kept (the sampling run's per-step denoised output).
    pub first_estimate: Option<Rc<RefCell<Option<Tensor>>>>,
    /// The model's patches (block patches, CFG functions, the denoise-mask function).
    pub patches: Rc<ModelPatches>,
    /// The run's sigmas, which a denoise-mask function reads.
    pub run_sigmas: Vec<f64>,
    /// This sampling run's number (`patches::next_run`).
    pub run: u64,
}

impl<'a> CfgDenoiser<'a> {
    /// A denoiser with no noise mask.
    pub fn new(unet: &'a Unet, sampling: &'a ModelSampling, sides: Vec<Vec<Cond>>, guidance: Guidance) -> CfgDenoiser<'a> {
        CfgDenoiser {
            unet,
            sampling,
            sides,
            guidance,
            noise_mask: None,
            calls: 0,
            model_time: std::time::Duration::ZERO,
            first_estimate: None,
            patches: Rc::default(),
            run_sigmas: Vec::new(),
            run: crate::patches::next_run(),
        }
    }
}

/// Repeats token sequences to a common length (their least common multiple) and stacks them, so that
/// conds of different lengths can share a batch, as ComfyUI's `CONDCrossAttn.concat` does.
pub fn batch_conds(parts: &[Tensor]) -> Tensor {
    let lcm = parts.iter().map(|t| t.size()[1]).fold(1, |l, n| l / gcd(l, n) * n);
    let padded: Vec<Tensor> = parts.iter().map(|t| if t.size()[1] == lcm { t.shallow_clone() } else { t.repeat([1, lcm / t.size()[1], 1]) }).collect();
    Tensor::cat(&padded, 0)
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn crop(t: &Tensor, area: Option<[i64; 4]>) -> Tensor {
    match area {
        Some([h, w, y, x]) => t.narrow(2, y, h).narrow(3, x, w),
        None => t.shallow_clone(),
    }
}

impl Denoiser for CfgDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor, NodeError> {
        Ok(self.guided(x, sigma, false)?.0)
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor), NodeError> {
        self.guided(x, sigma, true)
    }

    fn has_uncond(&self) -> bool {
        self.guidance != Guidance::Basic
    }
}

impl CfgDenoiser<'_> {
    /// The guided estimate (the noise mask applied) and the unconditional estimate CFG++ samplers read
    /// (before the mask, as ComfyUI's post-CFG functions see it). With `want_uncond` the scale-1
    /// shortcuts are off.
    fn guided(&mut self, x: &Tensor, sigma: f64, want_uncond: bool) -> Result<(Tensor, Tensor), NodeError> {
        self.calls += 1;
        if self.sides.len() != self.guidance.side_count() {
            return Err(NodeError::Failed(format!(
                "{:?} combines {} conditionings, {} were given",
                self.guidance,
                self.guidance.side_count(),
                self.sides.len()
            )));
        }
        let needed = self.guidance.needed(want_uncond || self.patches.disable_cfg1);
        if let Some(m) = self.noise_mask.as_ref().filter(|m| m.mask.size() != x.size()) {
            return Err(NodeError::Failed(format!(
                "the latent changed size while sampling ({:?} → {:?}); a noise mask cannot follow it",
                m.mask.size(),
                x.size()
            )));
        }
        // The mask this call uses (a denoise-mask function may rewrite it per call), for the input's
        // and the output's blend alike.
        let mask = match (&self.noise_mask, &self.patches.denoise_mask) {
            (Some(m), Some(f)) => Some(f.apply(sigma, &m.mask, &self.run_sigmas, self.sampling)?),
            (Some(m), None) => Some(m.mask.shallow_clone()),
            (None, _) => None,
        };
        let x_in = match (&self.noise_mask, &mask) {
            (Some(m), Some(mask)) => {
                let noised = self.sampling.noise_scaling(sigma, &m.noise, &m.latent_image, false);
                x * mask + noised * (mask.neg() + 1.0)
            }
            _ => x.shallow_clone(),
        };
        // ComfyUI's DualCFGGuider lists its conds as [negative, middle, positive], the reverse of ours.
        let dual = matches!(self.guidance, Guidance::DualCfg { .. });
        let label = move |side: usize| if dual { 2 - side.min(2) } else { side };
        let (preds, time) = self.calc(&x_in, sigma, &needed, &self.patches.unet, Some(&label))?;
        self.model_time += time;
        let (guided, uncond) = self.guidance.combine(preds, &self.patches, &x_in, sigma, &needed, &*self, self.run)?;
        let guided = match (&self.noise_mask, &mask) {
            (Some(m), Some(mask)) => &guided * mask + &m.latent_image * (mask.neg() + 1.0),
            _ => guided,
        };
        if let Some(cell) = &self.first_estimate {
            cell.borrow_mut().get_or_insert_with(|| guided.shallow_clone());
        }
        Ok((guided, uncond))
    }

    fn unet_device(&self) -> tch::Device {
        self.unet.device()
    }

    /// Each side's denoised prediction for `x_in` at `sigma` (zeros for a side not `needed`): ComfyUI's
    /// `calc_cond_batch` with the UNet patches `patches`, and the time spent in the UNet.
    /// `labels` numbers the sides as ComfyUI's conds list does (None: a single side's extra pass, whose
    /// rows ComfyUI labels 0).
    fn calc(
        &self,
        x_in: &Tensor,
        sigma: f64,
        needed: &[bool],
        patches: &UnetPatches,
        labels: Option<&dyn Fn(usize) -> usize>,
    ) -> Result<(Vec<Tensor>, std::time::Duration), NodeError> {
        let b = x_in.size()[0];
        let device = self.unet_device();
        // A sampler may change the latent's size (SamplerLCMUpscale): uniform entries follow it; areas,
        // masks and inpainting inputs were resolved for the size sampling started at.
        let hw = (x_in.size()[2], x_in.size()[3]);
        let resized = |c: &Cond| c.latent_hw != hw;
        for c in self.sides.iter().flatten() {
            if resized(c) && (c.uniform.is_none() || c.concat.is_some()) {
                return Err(NodeError::Failed(format!(
                    "the latent changed size while sampling ({:?} → {hw:?}); area, mask and inpainting conditioning cannot follow it",
                    c.latent_hw
                )));
            }
        }
        // (side, entry), the last side first; grouped by area in order of first appearance.
        let mut jobs: Vec<(usize, &Cond)> = Vec::new();
        for (side, conds) in self.sides.iter().enumerate().rev() {
            if needed.get(side).copied().unwrap_or(false) {
                jobs.extend(conds.iter().filter(|c| c.active_at(sigma)).map(|c| (side, c)));
            }
        }
        // Entries batch together when they share the area and the very same control (ComfyUI's
        // can_concat_cond). A GLIGEN entry runs alone: ComfyUI makes each cond's patches anew, and
        // batches only conds whose patches are the same object.
        let same_control = |a: &Cond, b: &Cond| {
            let control = match (&a.control, &b.control) {
                (Some(x), Some(y)) => x.same(y),
                (x, y) => x.is_none() && y.is_none(),
            };
            control && a.gligen.is_none() && b.gligen.is_none()
        };
        let mut groups: Vec<(Option<[i64; 4]>, Vec<(usize, &Cond)>)> = Vec::new();
        for job in jobs {
            match groups.iter_mut().find(|(a, g)| *a == job.1.area && same_control(g[0].1, job.1)) {
                Some((_, g)) => g.push(job),
                None => groups.push((job.1.area, vec![job])),
            }
        }
        let sums: Vec<Tensor> = (0..self.sides.len()).map(|_| x_in.zeros_like()).collect();
        let weights: Vec<Tensor> = (0..self.sides.len()).map(|_| x_in.ones_like() * 1e-37).collect();
        let mut time = std::time::Duration::ZERO;
        for (area, group) in &groups {
            let n = group.len() as i64;
            // A GLIGEN entry's middle patch, after the model's own, for its batch only.
            let with_gligen = match &group[0].1.gligen {
                Some(g) => Some(gligen_patches(self.unet, patches, g, b, crop(x_in, *area).size(), device)?),
                None => None,
            };
            let patches = with_gligen.as_ref().unwrap_or(patches);
            let xs = crop(x_in, *area).repeat([n, 1, 1, 1]);
            let scaled = self.sampling.calculate_input(sigma, &xs).to_device(device);
            let mut model_in = scaled.shallow_clone();
            let concats: Vec<Tensor> = group.iter().filter_map(|(_, c)| c.concat.as_ref().map(|t| crop(t, *area))).collect();
            if !concats.is_empty() {
                model_in = Tensor::cat(&[model_in, Tensor::cat(&concats, 0).to_device(device)], 1);
            }
            let sigmas = Tensor::from_slice(&vec![sigma as f32; (b * n) as usize]);
            let t = self.sampling.timestep(&sigmas).to_device(device);
            let contexts: Vec<Tensor> = group.iter().map(|(_, c)| c.context.repeat([b, 1, 1])).collect();
            let context = batch_conds(&contexts).to_device(device);
            let started = std::time::Instant::now();
            let control = group[0].1.control.as_ref().and_then(|h| h.downcast::<AppliedControl>());
            let residuals = match control {
                Some(c) => c.residuals(&scaled, &t, &context, n, sigma, self.sampling)?,
                None => None,
            };
            let cond_or_uncond: Vec<usize> = group.iter().map(|(side, _)| labels.map_or(0, |l| l(*side))).collect();
            let cx = CallCx { sigma: sigma as f32, original_shape: &model_in.size(), cond_or_uncond: &cond_or_uncond, run: self.run };
            // The class-label input of unCLIP UNets, per entry, repeated over the batch.
            let ys: Vec<Tensor> = group.iter().filter_map(|(_, c)| c.y.as_ref().map(|y| y.repeat([b, 1]))).collect();
            let y = (ys.len() == group.len()).then(|| Tensor::cat(&ys, 0).to_device(device));
            let out =
                self.unet.forward_patched(&model_in, &t, &context, y.as_ref(), residuals.as_ref(), patches, &cx)?.to_kind(Kind::Float).to_device(x_in.device());
            if let tch::Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
            time += started.elapsed();
            let denoised = self.sampling.calculate_denoised(sigma, &out, &xs);
            for (k, (side, c)) in group.iter().enumerate() {
                let pred = denoised.narrow(0, k as i64 * b, b);
                let mult = match c.uniform {
                    Some(strength) if resized(c) => x_in.ones_like() * strength,
                    _ => c.mult.shallow_clone(),
                };
                let _ = crop(&sums[*side], *area).f_add_(&(pred * &mult))?;
                let _ = crop(&weights[*side], *area).f_add_(&mult)?;
            }
        }
        Ok((sums.iter().zip(&weights).map(|(s, w)| s / w).collect(), time))
    }
}

/// `patches` with the middle patch of a GLIGEN conditioning (`GligenCond`) for a batch of `b` latents
/// of `shape` (the entry's area): its grounding tokens computed for that area (ComfyUI's
/// `set_position`), after checking the GLIGEN model fits the UNet's transformers.
fn gligen_patches(
    unet: &Unet,
    patches: &UnetPatches,
    g: &diffloom_core::Handle,
    b: i64,
    shape: Vec<i64>,
    device: tch::Device,
) -> Result<UnetPatches, NodeError> {
    use crate::models::gligen::{GligenCond, GligenPatch};
    let g = g.downcast::<GligenCond>().ok_or_else(|| NodeError::Failed(format!("a conditioning's GLIGEN entry is a {}", g.label())))?;
    let sites = unet.transformer_sites();
    let fits = sites.len() == g.model.fusers.len() && sites.iter().zip(&g.model.fusers).all(|((_, _, width), (_, f))| *width == f.query_dim);
    if !fits {
        let widths = |w: Vec<i64>| w.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
        return Err(NodeError::Failed(format!(
            "GLIGEN {}: its {} fusers are {} wide, the UNet's {} transformers {} (a GLIGEN model for another UNet?)",
            g.name,
            g.model.fusers.len(),
            widths(g.model.fusers.iter().map(|(_, f)| f.query_dim).collect()),
            sites.len(),
            widths(sites.iter().map(|s| s.2).collect())
        )));
    }
    let objs = g.model.position_tokens(b, shape[2], shape[3], &g.boxes, device)?;
    let mut out = patches.clone();
    out.middle_patch.push(std::rc::Rc::new(GligenPatch { model: g.model.clone(), objs }));
    Ok(out)
}

/// A post-CFG function's extra model pass: one side's entries, with the model's UNet patches and the
/// function's overlay.
impl ModelRunner for CfgDenoiser<'_> {
    fn side_prediction(&self, side: usize, x: &Tensor, sigma: f64, overlay: &UnetPatches) -> Result<Tensor, NodeError> {
        let needed: Vec<bool> = (0..self.sides.len()).map(|s| s == side).collect();
        let (mut preds, _) = self.calc(x, sigma, &needed, &self.patches.unet.with_overlay(overlay), None)?;
        if side >= preds.len() {
            return Err(NodeError::Failed(format!("a model patch asked for conditioning {side} of {}", preds.len())));
        }
        Ok(preds.swap_remove(side))
    }
}
