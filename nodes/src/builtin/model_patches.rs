//! ComfyUI's model patch nodes that hook the UNet's blocks or the guidance (`patches.rs`): FreeU and
//! FreeU_V2, Kohya deep shrink, RescaleCFG, CFGZeroStar, CFGNorm, APG, Differential Diffusion and
//! perturbed-attention guidance.
//! Each makes a new MODEL sharing the weights, with one more hook; the math follows ComfyUI's
//! closures op for op.

use std::cell::RefCell;
use std::rc::Rc;

use diffloom_core::{Args, Bool, Combo, Ctx, Float, Handle, Int, Node, NodeError, Schema, Value, ValueType};
use tch::{Kind, Tensor};

use crate::patches::{
    AttnCx, AttnInPatch, AttnKey, AttnOutPatch, AttnReplace, BlockId, BlockPatch, CallCx, CfgArgs, CfgFunction, DenoiseMask, ModelPatches, PostCfg, PreCfg,
    SkipPatch, UnetPatches,
};
use crate::resample::common_upscale;
use crate::sampling::model_sampling::ModelSampling;
use crate::sd::SdModel;

/// The input model with `add` applied to a copy of its patches.
fn patched(a: &Args, what: &str, add: impl FnOnce(&SdModel, &mut ModelPatches)) -> Result<Vec<Value>, NodeError> {
    let m: &SdModel = a.handle("model")?;
    let mut p = (*m.patches).clone();
    add(m, &mut p);
    let label = format!("{} + {what}", m.name);
    Ok(vec![Value::Model(Handle::new(SdModel { patches: Rc::new(p), ..m.clone() }, 0, label))])
}

/// A float32 scalar tensor, as ComfyUI's sigma tensors are.
fn f32_scalar(v: f64) -> Tensor {
    Tensor::from(v as f32)
}

// ---------------------------------------------------------------------------------------------
// FreeU

/// FreeU's Fourier filter: the lowest frequencies (a 2·threshold square around the centre of the
/// shifted spectrum) scaled by `scale`, in float32.
fn fourier_filter(x: &Tensor, threshold: i64, scale: f64) -> Result<Tensor, NodeError> {
    let kind = x.kind();
    let freq = x.to_kind(Kind::Float).f_fft_fftn(None::<&[i64]>, &[-2i64, -1][..], "backward")?.f_fft_fftshift(&[-2i64, -1][..])?;
    let s = x.size();
    let (h, w) = (s[2], s[3]);
    let mask = Tensor::ones(s.as_slice(), (Kind::Float, x.device()));
    // Python slice semantics: a negative start counts from the end; both ends clamp.
    let range = |centre: i64, len: i64| {
        let start = if centre - threshold < 0 { (centre - threshold + len).max(0) } else { centre - threshold };
        let end = (centre + threshold).min(len);
        (start, (end - start).max(0))
    };
    let ((r0, rn), (c0, cn)) = (range(h / 2, h), range(w / 2, w));
    if rn > 0 && cn > 0 {
        let _ = mask.narrow(2, r0, rn).narrow(3, c0, cn).f_fill_(scale)?;
    }
    let filtered = (freq * mask).f_fft_ifftshift(&[-2i64, -1][..])?.f_fft_ifftn(None::<&[i64]>, &[-2i64, -1][..], "backward")?;
    Ok(filtered.real().to_kind(kind))
}

struct FreeU {
    /// (backbone, skip) factors by the activation's channel count: 4·mc → (b1, s1), 2·mc → (b2, s2).
    scales: [(i64, f64, f64); 2],
    /// FreeU_V2: the backbone factor follows the activation's normalised mean.
    v2: bool,
}

impl SkipPatch for FreeU {
    fn apply(&self, h: Tensor, skip: Tensor, _block: BlockId, _cx: &CallCx) -> Result<(Tensor, Tensor), NodeError> {
        let c = h.size()[1];
        let Some(&(_, b, s)) = self.scales.iter().find(|(ch, _, _)| *ch == c) else { return Ok((h, skip)) };
        let half = h.narrow(1, 0, c / 2);
        let scaled = if self.v2 {
            let b_rows = h.size()[0];
            let mean = h.mean_dim(1, true, None);
            let flat = mean.view([b_rows, -1]);
            let (max, min) = (flat.amax(-1, true), flat.amin(-1, true));
            let mean = (&mean - min.unsqueeze(-1).unsqueeze(-1)) / (max - &min).unsqueeze(-1).unsqueeze(-1);
            &half * ((mean * (b - 1.0)) + 1.0)
        } else {
            &half * b
        };
        let h = Tensor::cat(&[scaled, h.narrow(1, c / 2, c - c / 2)], 1);
        Ok((h, fourier_filter(&skip, 1, s)?))
    }
}

fn freeu_schema(name: &str, b1: f64, b2: f64) -> Schema {
    Schema::new(name, "model_patches/unet")
        .input("model", ValueType::Model)
        .input("b1", Float::new(b1).range(0.0, 10.0).step(0.01))
        .input("b2", Float::new(b2).range(0.0, 10.0).step(0.01))
        .input("s1", Float::new(0.9).range(0.0, 10.0).step(0.01))
        .input("s2", Float::new(0.2).range(0.0, 10.0).step(0.01))
        .output("MODEL", ValueType::Model)
}

fn freeu(a: &Args, v2: bool) -> Result<Vec<Value>, NodeError> {
    let (b1, b2, s1, s2) = (a.float("b1")?, a.float("b2")?, a.float("s1")?, a.float("s2")?);
    patched(a, if v2 { "FreeU_V2" } else { "FreeU" }, |m, p| {
        let mc = m.unet.config.model_channels;
        p.unet.output_block.push(Rc::new(FreeU { scales: [(mc * 4, b1, s1), (mc * 2, b2, s2)], v2 }));
    })
}

pub struct FreeUNode;
impl Node for FreeUNode {
    fn schema(&self) -> Schema {
        freeu_schema("FreeU", 1.1, 1.2).describe("FreeU: scales the decoder's backbone features and damps the skips' low frequencies.")
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        freeu(a, false)
    }
}

pub struct FreeUV2;
impl Node for FreeUV2 {
    fn schema(&self) -> Schema {
        freeu_schema("FreeU_V2", 1.3, 1.4).describe("FreeU v2: the backbone factor follows each image's normalised feature mean.")
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        freeu(a, true)
    }
}

// ---------------------------------------------------------------------------------------------
// Kohya deep shrink

const SCALE_METHODS: [&str; 5] = ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"];

struct Downscale {
    block: usize,
    factor: f64,
    sigma_start: f64,
    sigma_end: f64,
    method: String,
}

impl BlockPatch for Downscale {
    fn apply(&self, h: Tensor, block: BlockId, cx: &CallCx) -> Result<Tensor, NodeError> {
        let sigma = cx.sigma as f64;
        if block.index() != self.block || sigma > self.sigma_start || sigma < self.sigma_end {
            return Ok(h);
        }
        let s = h.size();
        let size = |v: i64| (v as f64 * (1.0 / self.factor)).round_ties_even() as i64;
        common_upscale(&h, size(s[3]).max(1), size(s[2]).max(1), &self.method, "disabled")
    }
}

/// Brings the decoder's activation back to its skip's size.
struct Upscale {
    method: String,
}

impl SkipPatch for Upscale {
    fn apply(&self, h: Tensor, skip: Tensor, _block: BlockId, _cx: &CallCx) -> Result<(Tensor, Tensor), NodeError> {
        if h.size()[2] == skip.size()[2] {
            return Ok((h, skip));
        }
        let s = skip.size();
        Ok((common_upscale(&h, s[3], s[2], &self.method, "disabled")?, skip))
    }
}

pub struct PatchModelAddDownscale;
impl Node for PatchModelAddDownscale {
    fn schema(&self) -> Schema {
        Schema::new("PatchModelAddDownscale", "model_patches/unet")
            .describe("Kohya deep shrink: the UNet works at a smaller size early in sampling, for images larger than the model was trained on.")
            .input("model", ValueType::Model)
            .input("block_number", Int::new(3).range(1, 32))
            .input("downscale_factor", Float::new(2.0).range(0.1, 9.0).step(0.001))
            .input("start_percent", Float::new(0.0).range(0.0, 1.0).step(0.001))
            .input("end_percent", Float::new(0.35).range(0.0, 1.0).step(0.001))
            .input("downscale_after_skip", Bool(true))
            .input("downscale_method", Combo::of(&SCALE_METHODS))
            .input("upscale_method", Combo::of(&SCALE_METHODS))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let m: &SdModel = a.handle("model")?;
        let ms = ModelSampling::new(m.sampling);
        let down = Rc::new(Downscale {
            block: a.i64("block_number")? as usize,
            factor: a.float("downscale_factor")?,
            sigma_start: ms.percent_to_sigma(a.float("start_percent")?),
            sigma_end: ms.percent_to_sigma(a.float("end_percent")?),
            method: a.string("downscale_method")?.to_owned(),
        });
        let up = Rc::new(Upscale { method: a.string("upscale_method")?.to_owned() });
        let after_skip = a.boolean("downscale_after_skip")?;
        patched(a, "deep shrink", |_, p| {
            if after_skip {
                p.unet.input_block_after_skip.push(down);
            } else {
                p.unet.input_block.push(down);
            }
            p.unet.output_block.push(up);
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Guidance functions

/// RescaleCFG (Lin et al. 2023): CFG on the v-prediction, its standard deviation rescaled to the
/// conditional one's, blended by `multiplier`.
struct RescaleCfg {
    multiplier: f64,
}

impl CfgFunction for RescaleCfg {
    fn guide(&self, a: &CfgArgs) -> Result<Tensor, NodeError> {
        let sigma = f32_scalar(a.sigma);
        let x_orig = a.input;
        // ComfyUI's args hold x − denoised for each side.
        let (cond, uncond) = (x_orig - a.cond_denoised, x_orig - a.uncond_denoised);
        let s2 = &sigma * &sigma + 1.0;
        let x = x_orig / &s2;
        let root = sigma.square().f_add_scalar(1.0)?.pow_tensor_scalar(0.5);
        let cond = ((&x - (x_orig - cond)) * &root) / &sigma;
        let uncond = ((&x - (x_orig - uncond)) * &root) / &sigma;
        let x_cfg = &uncond + (&cond - &uncond) * a.cond_scale;
        let std = |t: &Tensor| t.f_std_correction(&[1i64, 2, 3][..], 1, true);
        let (ro_pos, ro_cfg) = (std(&cond)?, std(&x_cfg)?);
        let rescaled = &x_cfg * (ro_pos / ro_cfg);
        let x_final = rescaled * self.multiplier + &x_cfg * (1.0 - self.multiplier);
        let noise = x_orig - (&x - x_final * &sigma / s2.pow_tensor_scalar(0.5));
        Ok(x_orig - noise)
    }
}

pub struct RescaleCFG;
impl Node for RescaleCFG {
    fn schema(&self) -> Schema {
        Schema::new("RescaleCFG", "advanced/model")
            .describe("Rescales the guided prediction's spread to the conditional one's (for v-prediction and zero-SNR models).")
            .input("model", ValueType::Model)
            .input("multiplier", Float::new(0.7).range(0.0, 1.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let multiplier = a.float("multiplier")?;
        patched(a, "RescaleCFG", |_, p| p.cfg_function = Some(Rc::new(RescaleCfg { multiplier })))
    }
}

/// CFG-Zero*: the unconditional prediction scaled by the optimal projection of the conditional one.
struct CfgZeroStar;

impl PostCfg for CfgZeroStar {
    fn apply(&self, out: Tensor, a: &CfgArgs) -> Result<Tensor, NodeError> {
        let (positive, negative) = (a.input - a.cond_denoised, a.input - a.uncond_denoised);
        let b = positive.size()[0];
        let (pf, nf) = (positive.reshape([b, -1]), negative.reshape([b, -1]));
        let dot = (&pf * &nf).sum_dim_intlist(1, true, None);
        let squared = nf.pow_tensor_scalar(2).sum_dim_intlist(1, true, None) + 1e-8;
        let alpha = (dot / squared).reshape([b, 1, 1, 1]);
        Ok(out + a.uncond_denoised * (&alpha - 1.0) + a.uncond_denoised * a.cond_scale * (alpha.neg() + 1.0))
    }
}

pub struct CFGZeroStar;
impl Node for CFGZeroStar {
    fn schema(&self) -> Schema {
        Schema::new("CFGZeroStar", "advanced/guidance").input("model", ValueType::Model).output("patched_model", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        patched(a, "CFGZeroStar", |_, p| p.post_cfg.push(Rc::new(CfgZeroStar)))
    }
}

/// CFGNorm: the guided prediction's per-pixel norm (over channels) capped at the conditional one's.
struct CfgNorm {
    strength: f64,
}

impl PostCfg for CfgNorm {
    fn apply(&self, pred: Tensor, a: &CfgArgs) -> Result<Tensor, NodeError> {
        let norm = |t: &Tensor| t.f_norm_scalaropt_dim(2, &[1i64][..], true);
        let (nc, np) = (norm(a.cond_denoised)?, norm(&pred)?);
        let scale = (nc / (np + 1e-8)).clamp(0.0, 1.0);
        Ok(pred * scale * self.strength)
    }
}

pub struct CFGNorm;
impl Node for CFGNorm {
    fn schema(&self) -> Schema {
        Schema::new("CFGNorm", "advanced/guidance")
            .input("model", ValueType::Model)
            .input("strength", Float::new(1.0).range(0.0, 100.0).step(0.01))
            .output("patched_model", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let strength = a.float("strength")?;
        patched(a, "CFGNorm", |_, p| p.post_cfg.push(Rc::new(CfgNorm { strength })))
    }
}

/// Adaptive Projected Guidance: the guidance direction split into its parts parallel and orthogonal
/// to the conditional prediction, the parallel part scaled by `eta`, with an optional norm cap and
/// momentum. The running average lives as long as the MODEL (ComfyUI's closure state).
struct Apg {
    eta: f64,
    norm_threshold: f64,
    momentum: f64,
    /// (running average, the previous call's sigma).
    state: RefCell<(Option<Tensor>, Option<f32>)>,
}

impl PreCfg for Apg {
    fn apply(&self, preds: Vec<Tensor>, _ran: &[bool], _input: &Tensor, sigma: f64, cond_scale: f64) -> Result<Vec<Tensor>, NodeError> {
        if preds.len() < 2 {
            return Ok(preds);
        }
        let (cond, uncond) = (&preds[0], &preds[1]);
        let sigma = sigma as f32;
        let mut state = self.state.borrow_mut();
        if state.1.is_some_and(|prev| sigma > prev) {
            state.0 = None;
        }
        state.1 = Some(sigma);
        let mut guidance = cond - uncond;
        if self.momentum != 0.0 {
            let avg = match state.0.take() {
                None => guidance.shallow_clone(),
                Some(avg) => avg * self.momentum + &guidance,
            };
            guidance = avg.shallow_clone();
            state.0 = Some(avg);
        }
        let dims = &[-1i64, -2, -3][..];
        if self.norm_threshold > 0.0 {
            let norm = guidance.f_norm_scalaropt_dim(2, dims, true)?;
            let scale = norm.ones_like().minimum(&(norm.reciprocal() * self.norm_threshold));
            // Not in place: with momentum, `guidance` shares the running average's storage.
            guidance = &guidance * &scale;
        }
        // F.normalize: v / max(‖v‖, 1e-12).
        let v1 = cond / cond.f_norm_scalaropt_dim(2, dims, true)?.clamp_min(1e-12);
        let parallel = (&guidance * &v1).sum_dim_intlist(dims, true, None) * &v1;
        let orthogonal = &guidance - &parallel;
        let modified = orthogonal + parallel * self.eta;
        let modified_cond = (uncond + modified) + (cond - uncond) / cond_scale;
        let mut out = vec![modified_cond];
        out.extend(preds.iter().skip(1).map(|t| t.shallow_clone()));
        Ok(out)
    }
}

pub struct APG;
impl Node for APG {
    fn schema(&self) -> Schema {
        Schema::new("APG", "sampling/custom_sampling")
            .describe("Adaptive Projected Guidance: damps the part of the guidance parallel to the prediction (less oversaturation at high CFG).")
            .input("model", ValueType::Model)
            .input("eta", Float::new(1.0).range(-10.0, 10.0).step(0.01))
            .input("norm_threshold", Float::new(5.0).range(0.0, 50.0).step(0.1))
            .input("momentum", Float::new(0.0).range(-5.0, 1.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let apg = Apg { eta: a.float("eta")?, norm_threshold: a.float("norm_threshold")?, momentum: a.float("momentum")?, state: RefCell::default() };
        patched(a, "APG", |_, p| p.pre_cfg.push(Rc::new(apg)))
    }
}

/// Differential Diffusion: a soft inpainting mask becomes a binary one that grows as sampling goes on
/// (each pixel is resampled once the run has passed its mask value), blended with the soft mask by
/// `strength`.
struct Differential {
    strength: f64,
}

impl DenoiseMask for Differential {
    fn apply(&self, sigma: f64, mask: &Tensor, run_sigmas: &[f64], ms: &ModelSampling) -> Result<Tensor, NodeError> {
        let (Some(first), Some(last)) = (run_sigmas.first(), run_sigmas.last()) else { return Ok(mask.shallow_clone()) };
        let sigma_to = if (*last as f32) > (ms.sigma_min() as f32) { *last } else { ms.sigma_min() };
        let ts = |s: f64| ms.timestep(&f32_scalar(s));
        let (from, to, current) = (ts(*first), ts(sigma_to), ts(sigma));
        let threshold = (current - &to) / (from - to);
        let binary = mask.ge_tensor(&threshold).to_kind(mask.kind());
        // As ComfyUI: strength 0 (falsy) behaves as 1.
        Ok(if self.strength != 0.0 && self.strength < 1.0 { binary * self.strength + mask * (1.0 - self.strength) } else { binary })
    }
}

pub struct DifferentialDiffusion;
impl Node for DifferentialDiffusion {
    fn schema(&self) -> Schema {
        Schema::new("DifferentialDiffusion", "_for_testing")
            .describe("Per-pixel denoising strength from a soft inpainting mask (gradual masks blend instead of a hard seam).")
            .input("model", ValueType::Model)
            .optional("strength", Float::new(1.0).range(0.0, 1.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let strength = match a.get("strength") {
            Some(_) => a.float("strength")?,
            None => 1.0,
        };
        patched(a, "DifferentialDiffusion", |_, p| p.denoise_mask = Some(Rc::new(Differential { strength })))
    }
}

// ---------------------------------------------------------------------------------------------
// Perturbed-attention guidance

/// Self-attention with an identity map: each token's output is its own value.
struct IdentityAttention;

impl AttnReplace for IdentityAttention {
    fn attend(&self, _q: &Tensor, _k: &Tensor, v: &Tensor, _cx: &AttnCx<'_>) -> Result<Tensor, NodeError> {
        Ok(v.shallow_clone())
    }
}

/// PAG's perturbation: every self-attention of the middle block (ComfyUI's `("middle", 0)` attn1
/// replacement; diffusers' `pag_applied_layers="mid"`) returns its values, so the layer gives
/// `to_out(to_v(x))`.
pub fn pag_perturbation() -> UnetPatches {
    let mut overlay = UnetPatches::default();
    overlay.set_attn1_replace(AttnKey { block: BlockId::Middle, transformer: None }, Rc::new(IdentityAttention));
    overlay
}

/// PAG (Ahn et al. 2024): an extra pass of the conditional entries with the middle block's
/// self-attention replaced by the identity; the guided estimate moves away from that perturbed one.
struct Pag {
    scale: f64,
}

impl PostCfg for Pag {
    fn apply(&self, out: Tensor, a: &CfgArgs) -> Result<Tensor, NodeError> {
        let Some((cond_side, _, runner)) = a.sides.filter(|_| self.scale != 0.0) else { return Ok(out) };
        let perturbed = runner.side_prediction(cond_side, a.input, a.sigma, &pag_perturbation())?;
        Ok(out + (a.cond_denoised - perturbed) * self.scale)
    }
}

pub struct PerturbedAttentionGuidance;
impl Node for PerturbedAttentionGuidance {
    fn schema(&self) -> Schema {
        Schema::new("PerturbedAttentionGuidance", "model_patches/unet")
            .describe("Perturbed-attention guidance: guides away from a pass whose middle-block self-attention is the identity (one extra UNet pass per step).")
            .input("model", ValueType::Model)
            .input("scale", Float::new(3.0).range(0.0, 100.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let scale = a.float("scale")?;
        patched(a, "PAG", |_, p| p.post_cfg.push(Rc::new(Pag { scale })))
    }
}

// ---------------------------------------------------------------------------------------------
// Self-attention guidance

/// The last attention map recorded from the unconditional rows, `[b·heads, tokens, tokens]`.
type Scores = Rc<RefCell<Option<Tensor>>>;

/// The middle block's first self-attention computed by hand, its softmax map kept when the call has
/// unconditional rows (ComfyUI's `attn_and_record`, `attention_basic_with_sim`).
struct RecordAttention {
    scores: Scores,
}

impl AttnReplace for RecordAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, cx: &AttnCx<'_>) -> Result<Tensor, NodeError> {
        let chunks = cx.call.cond_or_uncond;
        let Some(u) = chunks.iter().position(|c| *c == 1) else {
            return Ok(crate::models::attention::attention(q, k, v, cx.heads, false));
        };
        let (b, n, inner) = (q.size()[0], q.size()[1], q.size()[2]);
        let heads = cx.heads;
        let d = inner / heads;
        let split = |t: &Tensor| t.reshape([b, -1, heads, d]).permute([0, 2, 1, 3]).reshape([b * heads, -1, d]).contiguous();
        let (qs, ks, vs) = (split(q), split(k), split(v));
        // In float32, as ComfyUI does for SD 2.x (its attn_precision), and identical for fp32 models.
        let sim = (qs.to_kind(Kind::Float).matmul(&ks.to_kind(Kind::Float).transpose(1, 2)) * (d as f64).powf(-0.5)).softmax(-1, Kind::Float);
        let out = sim.to_kind(vs.kind()).matmul(&vs);
        let out = out.reshape([b, heads, n, d]).permute([0, 2, 1, 3]).reshape([b, n, heads * d]);
        let rows = b / chunks.len() as i64;
        *self.scores.borrow_mut() = Some(sim.narrow(0, heads * rows * u as i64, heads * rows));
        Ok(out)
    }
}

/// SAG's 9-tap Gaussian blur (reflect padding, per channel).
fn gaussian_blur_9(img: &Tensor, sigma: f64) -> Tensor {
    let x = Tensor::linspace(-4.0, 4.0, 9, (Kind::Float, tch::Device::Cpu));
    let pdf = ((&x / sigma).pow_tensor_scalar(2) * -0.5).exp();
    let k = (&pdf / pdf.sum(Kind::Float)).to_kind(img.kind()).to_device(img.device());
    let k2 = k.unsqueeze(1).mm(&k.unsqueeze(0));
    let c = img.size()[1];
    let k2 = k2.expand([c, 1, 9, 9], false);
    img.pad([4, 4, 4, 4], "reflect", None).conv2d(&k2, None::<Tensor>, [1, 1], [0, 0], [1, 1], c)
}

/// The unconditional prediction blurred where the recorded attention is strong (ComfyUI's
/// `create_blur_map`).
pub fn blur_map(x0: &Tensor, attn: &Tensor, sigma: f64) -> Result<Tensor, NodeError> {
    let s = x0.size();
    let (b, lh, lw) = (s[0], s[2], s[3]);
    let (hw1, hw2) = (attn.size()[1], attn.size()[2]);
    let attn = attn.reshape([b, -1, hw1, hw2]);
    let mask = attn.mean_dim(1, false, None).sum_dim_intlist(1, false, None).gt(1.0);
    let total = mask.size()[1];
    let x = ((lh as f64 / lw as f64) * total as f64).sqrt().round_ties_even() as i64;
    let mut found = None;
    'search: for i in 0..((total as f64).sqrt() / 2.0).floor() as i64 {
        for j in [x + i, (x - i).max(1)] {
            if j > 0 && total % j == 0 {
                found = Some(j);
                break 'search;
            }
        }
    }
    let Some(x) = found else { return Err(NodeError::Failed(format!("self-attention guidance: no grid for {total} attention tokens"))) };
    let mask = mask.reshape([b, x, total / x]).unsqueeze(1).to_kind(attn.kind()).upsample_nearest2d([lh, lw], None, None);
    let blurred = gaussian_blur_9(x0, sigma);
    Ok(&blurred * &mask + x0 * (mask.neg() + 1.0))
}

struct Sag {
    scale: f64,
    blur_sigma: f64,
    scores: Scores,
}

impl PostCfg for Sag {
    fn apply(&self, out: Tensor, a: &CfgArgs) -> Result<Tensor, NodeError> {
        let s = out.size();
        if s[2].min(s[3]) <= 4 {
            return Ok(out);
        }
        let Some((_, uncond_side, runner)) = a.sides else { return Ok(out) };
        let Some(uncond_side) = uncond_side else {
            return Err(NodeError::Failed("self-attention guidance needs a negative conditioning (it guides with the unconditional side)".into()));
        };
        let Some(attn) = self.scores.borrow().as_ref().map(|t| t.shallow_clone()) else {
            return Err(NodeError::Failed("self-attention guidance recorded no attention (the unconditional side did not run)".into()));
        };
        let degraded = blur_map(a.uncond_denoised, &attn, self.blur_sigma)?;
        let degraded_noised = &degraded + a.input - a.uncond_denoised;
        let sag = runner.side_prediction(uncond_side, &degraded_noised, a.sigma, &UnetPatches::default())?;
        Ok(out + (degraded - sag) * self.scale)
    }
}

pub struct SelfAttentionGuidance;
impl Node for SelfAttentionGuidance {
    fn schema(&self) -> Schema {
        Schema::new("SelfAttentionGuidance", "_for_testing")
            .describe("Self-attention guidance: guides away from the unconditional prediction blurred where it attends (one extra UNet pass per step).")
            .input("model", ValueType::Model)
            .input("scale", Float::new(0.5).range(-2.0, 5.0).step(0.01))
            .input("blur_sigma", Float::new(2.0).range(0.0, 10.0).step(0.1))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (scale, blur_sigma) = (a.float("scale")?, a.float("blur_sigma")?);
        let scores: Scores = Rc::default();
        patched(a, "SAG", |_, p| {
            p.unet.set_attn1_replace(AttnKey { block: BlockId::Middle, transformer: Some(0) }, Rc::new(RecordAttention { scores: scores.clone() }));
            p.post_cfg.push(Rc::new(Sag { scale, blur_sigma, scores }));
            p.disable_cfg1 = true;
        })
    }
}

// ---------------------------------------------------------------------------------------------
// HyperTile

/// HyperTile (tfernd): self-attention at the full-resolution levels runs on tiles of the image (q is
/// split into tiles; k and v keep their batch, so each tile attends to its run of tokens, as in
/// ComfyUI), which makes large images cheaper.
struct HyperTile {
    latent_tile: i64,
    swap_size: i64,
    max_depth: i64,
    scale_depth: bool,
    /// The tiling of the call in flight: (nh, nw, h, w).
    temp: RefCell<Option<(i64, i64, i64, i64)>>,
    /// xorshift state for the tile choice when swap_size > 2.
    rng: RefCell<u64>,
}

impl HyperTile {
    /// ComfyUI's `random_divisor`: `value / d` for one of the `swap_size` smallest divisors d ≥
    /// `min_value` (ComfyUI's exclusive upper bound never picks the last of them).
    fn random_divisor(&self, value: i64, min_value: i64) -> i64 {
        let min_value = min_value.min(value);
        let ns: Vec<i64> = (min_value.max(1)..=value).filter(|i| value % i == 0).take(self.swap_size as usize).map(|i| value / i).collect();
        let idx = if ns.len() > 1 {
            let mut s = self.rng.borrow_mut();
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            (*s % (ns.len() as u64 - 1)) as usize
        } else {
            0
        };
        ns.get(idx).copied().unwrap_or(1)
    }
}

impl AttnInPatch for HyperTile {
    fn apply(&self, n: Tensor, context: Tensor, value: Tensor, cx: &AttnCx<'_>) -> Result<(Tensor, Tensor, Tensor), NodeError> {
        let shape = cx.call.original_shape;
        let (s, tokens) = (n.size(), n.size()[1]);
        let (h0, w0) = (shape[shape.len() - 2] as f64, shape[shape.len() - 1] as f64);
        let Some(level) = (0..=self.max_depth).position(|i| (h0 / 2f64.powi(i as i32)) * (w0 / 2f64.powi(i as i32)) == tokens as f64) else {
            return Ok((n, context, value));
        };
        let ar = w0 / h0;
        // As ComfyUI: h from the width side, w from the height side (the same for square latents).
        let h = (tokens as f64 * ar).sqrt().round_ties_even() as i64;
        let w = (tokens as f64 / ar).sqrt().round_ties_even() as i64;
        let factor = if self.scale_depth { 1i64 << level } else { 1 };
        let nh = self.random_divisor(h, self.latent_tile * factor);
        let nw = self.random_divisor(w, self.latent_tile * factor);
        if nh * nw <= 1 {
            return Ok((n, context, value));
        }
        let (b, c) = (s[0], s[2]);
        let q = n.f_reshape([b, nh, h / nh, nw, w / nw, c])?.permute([0, 1, 3, 2, 4, 5]).f_reshape([b * nh * nw, (h / nh) * (w / nw), c])?;
        *self.temp.borrow_mut() = Some((nh, nw, h, w));
        Ok((q, context, value))
    }
}

impl AttnOutPatch for HyperTile {
    fn apply(&self, out: Tensor, _cx: &AttnCx<'_>) -> Result<Tensor, NodeError> {
        let Some((nh, nw, h, w)) = self.temp.borrow_mut().take() else { return Ok(out) };
        let c = out.size()[2];
        let b = out.size()[0] / (nh * nw);
        Ok(out.f_reshape([b, nh, nw, h / nh, w / nw, c])?.permute([0, 1, 3, 2, 4, 5]).f_reshape([b, nh * (h / nh) * nw * (w / nw), c])?)
    }
}

pub struct HyperTileNode;
impl Node for HyperTileNode {
    fn schema(&self) -> Schema {
        Schema::new("HyperTile", "model_patches/unet")
            .describe("Tiles self-attention at the full-resolution levels (faster on large images).")
            .input("model", ValueType::Model)
            .input("tile_size", Int::new(256).range(1, 2048))
            .input("swap_size", Int::new(2).range(1, 128))
            .input("max_depth", Int::new(0).range(0, 10))
            .input("scale_depth", Bool(false))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let tile = Rc::new(HyperTile {
            latent_tile: a.i64("tile_size")?.max(32) / 8,
            swap_size: a.i64("swap_size")?,
            max_depth: a.i64("max_depth")?,
            scale_depth: a.boolean("scale_depth")?,
            temp: RefCell::new(None),
            rng: RefCell::new(0x9E37_79B9_7F4A_7C15),
        });
        patched(a, "HyperTile", |_, p| {
            p.unet.attn1_patch.push(tile.clone());
            p.unet.attn1_output_patch.push(tile);
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Token merging (ToMe for SD)

/// What the output patch needs to put the merged tokens back (ComfyUI's `unmerge` closure).
struct Unmerge {
    tokens: i64,
    num_dst: i64,
    a_idx: Tensor,
    b_idx: Tensor,
    unm_idx: Tensor,
    src_idx: Tensor,
    dst_idx: Tensor,
}

/// ToMe (Bolya & Hoffman): at the full-resolution level, self-attention's queries are merged down by
/// `ratio` (random 2×2 destination tokens, bipartite soft matching) and the output scattered back.
struct Tome {
    ratio: f64,
    state: RefCell<Option<Unmerge>>,
    /// xorshift state for the destination choice (ComfyUI draws from the device's default generator).
    rng: RefCell<u64>,
}

impl Tome {
    fn draw(&self, n: usize, below: i64) -> Tensor {
        let mut s = self.rng.borrow_mut();
        let v: Vec<i64> = (0..n)
            .map(|_| {
                *s ^= *s << 13;
                *s ^= *s >> 7;
                *s ^= *s << 17;
                (*s % below as u64) as i64
            })
            .collect();
        Tensor::from_slice(&v)
    }
}

impl AttnInPatch for Tome {
    fn apply(&self, n: Tensor, context: Tensor, value: Tensor, cx: &AttnCx<'_>) -> Result<(Tensor, Tensor, Tensor), NodeError> {
        *self.state.borrow_mut() = None;
        let shape = cx.call.original_shape;
        let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let s = n.size();
        let (b, tokens, c) = (s[0], s[1], s[2]);
        let downsample = (((h * w) / tokens.max(1)) as f64).sqrt().ceil() as i64;
        let r = (tokens as f64 * self.ratio) as i64;
        if downsample > 1 || r <= 0 || w == 1 || h == 1 || tokens != h * w {
            return Ok((n, context, value));
        }
        let device = n.device();
        let (hsy, wsx) = (h / 2, w / 2);
        let rand_idx = self.draw((hsy * wsx) as usize, 4).view([hsy, wsx, 1]).to_device(device);
        let buf = Tensor::zeros([hsy, wsx, 4], (Kind::Int64, device)).f_scatter(2, &rand_idx, &rand_idx.full_like(-1))?;
        let buf = buf.view([hsy, wsx, 2, 2]).transpose(1, 2).reshape([hsy * 2, wsx * 2]);
        let buf = if hsy * 2 < h || wsx * 2 < w {
            let full = Tensor::zeros([h, w], (Kind::Int64, device));
            full.narrow(0, 0, hsy * 2).narrow(1, 0, wsx * 2).copy_(&buf);
            full
        } else {
            buf
        };
        let order = buf.reshape([1, -1, 1]).argsort(1, false);
        let num_dst = hsy * wsx;
        let (a_idx, b_idx) = (order.narrow(1, num_dst, tokens - num_dst), order.narrow(1, 0, num_dst));
        let split = |x: &Tensor| -> Result<(Tensor, Tensor), NodeError> {
            let c = x.size()[2];
            Ok((x.f_gather(1, &a_idx.expand([b, tokens - num_dst, c], false), false)?, x.f_gather(1, &b_idx.expand([b, num_dst, c], false), false)?))
        };
        let metric = &n / n.f_norm_scalaropt_dim(2, &[-1i64][..], true)?;
        let (a, bb) = split(&metric)?;
        let scores = a.matmul(&bb.transpose(-1, -2));
        let r = r.min(a.size()[1]);
        let (node_max, node_idx) = scores.max_dim(-1, false);
        let edge_idx = node_max.argsort(-1, true).unsqueeze(-1);
        let unmerged = a.size()[1] - r;
        let (unm_idx, src_idx) = (edge_idx.narrow(1, r, unmerged), edge_idx.narrow(1, 0, r));
        let dst_idx = node_idx.unsqueeze(-1).f_gather(1, &src_idx, false)?;
        // merge(q): the unmerged sources, then each destination averaged with the sources it took.
        let (src, dst) = split(&n)?;
        let unm = src.f_gather(1, &unm_idx.expand([b, unmerged, c], false), false)?;
        let moved = src.f_gather(1, &src_idx.expand([b, r, c], false), false)?;
        let index = dst_idx.expand([b, r, c], false);
        let sum = dst.f_scatter_add(1, &index, &moved)?;
        let count = dst.ones_like().f_scatter_add(1, &index, &moved.ones_like())?;
        let merged = Tensor::cat(&[unm, sum / count], 1);
        *self.state.borrow_mut() = Some(Unmerge { tokens, num_dst, a_idx, b_idx, unm_idx, src_idx, dst_idx });
        Ok((merged, context, value))
    }
}

impl AttnOutPatch for Tome {
    fn apply(&self, x: Tensor, _cx: &AttnCx<'_>) -> Result<Tensor, NodeError> {
        let Some(u) = self.state.borrow_mut().take() else { return Ok(x) };
        let s = x.size();
        let (b, c) = (s[0], s[2]);
        let unm_len = u.unm_idx.size()[1];
        let r = u.src_idx.size()[1];
        let (unm, dst) = (x.narrow(1, 0, unm_len), x.narrow(1, unm_len, s[1] - unm_len));
        let src = dst.f_gather(1, &u.dst_idx.expand([b, r, c], false), false)?;
        let na = u.a_idx.size()[1];
        let a = u.a_idx.expand([b, na, 1], false);
        let out = Tensor::zeros([b, u.tokens, c], (x.kind(), x.device()));
        let out = out.f_scatter(1, &u.b_idx.expand([b, u.num_dst, c], false), &dst)?;
        let out = out.f_scatter(1, &a.f_gather(1, &u.unm_idx, false)?.expand([b, unm_len, c], false), &unm)?;
        Ok(out.f_scatter(1, &a.f_gather(1, &u.src_idx, false)?.expand([b, r, c], false), &src)?)
    }
}

pub struct TomePatchModel;
impl Node for TomePatchModel {
    fn schema(&self) -> Schema {
        Schema::new("TomePatchModel", "model_patches/unet")
            .describe("Token merging: self-attention at full resolution runs on `ratio` fewer query tokens (faster, slightly different).")
            .input("model", ValueType::Model)
            .input("ratio", Float::new(0.3).range(0.0, 1.0).step(0.01))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let tome = Rc::new(Tome { ratio: a.float("ratio")?, state: RefCell::new(None), rng: RefCell::new(0x2545_F491_4F6C_DD1D) });
        patched(a, "ToMe", |_, p| {
            p.unet.attn1_patch.push(tome.clone());
            p.unet.attn1_output_patch.push(tome);
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Epsilon scaling, temporal score rescaling, tangential damping CFG

/// Epsilon scaling (Ning et al.): the guided noise prediction divided by `factor`.
struct EpsScaling {
    factor: f64,
}

impl PostCfg for EpsScaling {
    fn apply(&self, denoised: Tensor, a: &CfgArgs) -> Result<Tensor, NodeError> {
        let noise = a.input - denoised;
        Ok(a.input - noise / self.factor)
    }
}

pub struct EpsilonScaling;
impl Node for EpsilonScaling {
    fn schema(&self) -> Schema {
        Schema::new("Epsilon Scaling", "model_patches/unet")
            .describe("Epsilon scaling: divides the guided noise prediction by the factor (against exposure bias).")
            .input("model", ValueType::Model)
            .input("scaling_factor", Float::new(1.005).range(0.5, 1.5).step(0.001))
            .output("MODEL", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let f = a.float("scaling_factor")?;
        let factor = if f == 0.0 { 1e-9 } else { f };
        patched(a, "Epsilon Scaling", |_, p| p.post_cfg.push(Rc::new(EpsScaling { factor })))
    }
}

/// Temporal score rescaling (arXiv 2510.01184): the estimate moved towards x/α by the ratio r(snr).
/// For SD's noise schedules the half log-SNR is −log σ and α = σ·e^(−log σ) = 1.
struct Tsr {
    k: f64,
    variance: f64,
}

impl PostCfg for Tsr {
    fn apply(&self, denoised: Tensor, a: &CfgArgs) -> Result<Tensor, NodeError> {
        if self.k == 1.0 || a.sigma == 0.0 {
            return Ok(denoised);
        }
        let sigma = f32_scalar(a.sigma);
        let half_log_snr = sigma.log().neg();
        let snr = (&half_log_snr * 2.0).exp();
        if snr.double_value(&[]) == 0.0 {
            return Ok(denoised);
        }
        let r = (&snr * self.variance + 1.0) / (&snr * (self.variance / self.k) + 1.0);
        let r = if snr.double_value(&[]).is_infinite() { Tensor::from(self.k as f32) } else { r };
        let alpha = &sigma * half_log_snr.exp();
        Ok((a.input / &alpha).lerp_tensor(&denoised, &r))
    }
}

pub struct TemporalScoreRescaling;
impl Node for TemporalScoreRescaling {
    fn schema(&self) -> Schema {
        Schema::new("TemporalScoreRescaling", "model_patches/unet")
            .describe("Temporal score rescaling: steers sampling diversity (k < 1 more detail, k > 1 smoother; 1 is off).")
            .input("model", ValueType::Model)
            .input("tsr_k", Float::new(0.95).range(0.01, 100.0).step(0.001))
            .input("tsr_sigma", Float::new(1.0).range(0.01, 100.0).step(0.001))
            .output("patched_model", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (k, s) = (a.float("tsr_k")?, a.float("tsr_sigma")?);
        patched(a, "TSR", |_, p| p.post_cfg.push(Rc::new(Tsr { k, variance: s * s })))
    }
}

/// Tangential damping CFG (arXiv 2503.18137): the unconditional score keeps only its component along
/// the first right-singular vector of [uncond, cond].
struct Tcfg;

impl PreCfg for Tcfg {
    fn apply(&self, preds: Vec<Tensor>, ran: &[bool], input: &Tensor, _sigma: f64, _cond_scale: f64) -> Result<Vec<Tensor>, NodeError> {
        if preds.len() <= 1 || !ran.iter().take(2).all(|r| *r) {
            return Ok(preds);
        }
        let (cond, uncond) = (&preds[0], &preds[1]);
        let b = cond.size()[0];
        let cond_score = (input - cond).reshape([b, 1, -1]).to_kind(Kind::Float);
        let uncond_score = (input - uncond).reshape([b, 1, -1]).to_kind(Kind::Float);
        let matrix = Tensor::cat(&[&uncond_score, &cond_score], 1);
        let (_, _, v) = matrix.f_svd(true, true)?;
        let v1 = v.transpose(-2, -1).narrow(1, 0, 1);
        let damped = uncond_score.matmul(&v1.transpose(-2, -1)) * &v1;
        let uncond_td = input - damped.reshape_as(uncond).to_kind(uncond.kind());
        let mut out = vec![preds[0].shallow_clone(), uncond_td];
        out.extend(preds.iter().skip(2).map(|t| t.shallow_clone()));
        Ok(out)
    }
}

pub struct TCFG;
impl Node for TCFG {
    fn schema(&self) -> Schema {
        Schema::new("TCFG", "advanced/guidance")
            .describe("Tangential damping CFG: aligns the negative prediction with the positive one before guidance.")
            .input("model", ValueType::Model)
            .output("patched_model", ValueType::Model)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        patched(a, "TCFG", |_, p| p.pre_cfg.push(Rc::new(Tcfg)))
    }
}
