//! Model patches: what ComfyUI keeps in a model's `model_options` (its UNet block patches and the
//! pre-CFG, CFG and post-CFG functions, the denoise-mask function). A patch node makes a new MODEL
//! that shares the weights and carries one more hook, so patches stack in node order, never touch
//! the model they came from, and a hook's own state (APG's running average) lives as long as the
//! MODEL value, as a ComfyUI closure does.
//!
//! Where each hook runs is ComfyUI's: block patches in `Unet::forward_patched` (after each input
//! block, after its output became a skip, and before each output block concatenates its skip), the
//! attention and middle patches in `BasicTransformerBlock::forward` (`models/attention.rs`), the
//! CFG functions in `CfgDenoiser` (`sampling/guidance.rs`), the mask function before each model call.

use std::rc::Rc;

use diffloom_core::NodeError;
use tch::Tensor;

use crate::sampling::model_sampling::ModelSampling;

/// Which block list a block patch is called for, and the block's index in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockId {
    Input(usize),
    Middle,
    Output(usize),
}

impl BlockId {
    /// The index ComfyUI's `transformer_options["block"][1]` holds.
    pub fn index(self) -> usize {
        match self {
            BlockId::Input(i) | BlockId::Output(i) => i,
            BlockId::Middle => 0,
        }
    }
}

/// What a UNet call tells its block patches (ComfyUI's per-call `transformer_options`).
pub struct CallCx<'a> {
    /// The sigma of the call's rows (float32, as ComfyUI passes them).
    pub sigma: f32,
    /// The UNet input's shape (inpainting channels included).
    pub original_shape: &'a [i64],
    /// For each chunk of the batch (the rows of one conditioning), the index of its conditioning in
    /// ComfyUI's list of the guider's sides (`cond_or_uncond`: 0 positive, 1 negative for CFG).
    pub cond_or_uncond: &'a [usize],
    /// The sampling run (see [`CfgArgs::run`]); 0 outside one.
    pub run: u64,
}

/// Where a self-attention replacement applies: a block, and optionally one transformer block in it
/// (ComfyUI's `("middle", 0)` and `("middle", 0, 0)` keys; the more specific key wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnKey {
    pub block: BlockId,
    pub transformer: Option<usize>,
}

/// What an attention replacement sees besides q, k and v.
pub struct AttnCx<'a> {
    pub block: BlockId,
    /// The transformer block's index within its spatial transformer.
    pub transformer: usize,
    pub heads: i64,
    pub call: &'a CallCx<'a>,
}

/// Rewrites self-attention's inputs before the projections (`attn1_patch`): the normed activation
/// (becomes q), and what k and v are projected from (the activation itself unless a patch changes them).
pub trait AttnInPatch {
    fn apply(&self, n: Tensor, context: Tensor, value: Tensor, cx: &AttnCx<'_>) -> Result<(Tensor, Tensor, Tensor), NodeError>;
}

/// Rewrites self-attention's output, after its output projection (`attn1_output_patch`).
pub trait AttnOutPatch {
    fn apply(&self, out: Tensor, cx: &AttnCx<'_>) -> Result<Tensor, NodeError>;
}

/// Computes self-attention from the projected q, k and v, `[b, tokens, heads · d]` each
/// (`patches_replace["attn1"]`); the result goes through the block's output projection.
pub trait AttnReplace {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, cx: &AttnCx<'_>) -> Result<Tensor, NodeError>;
}

/// Rewrites a transformer block's activation after self-attention's residual and before
/// cross-attention (`middle_patch`: GLIGEN's gated self-attention over the boxes). `transformer_index`
/// is the spatial transformer's position in the UNet's forward order, counted from 0 over the input,
/// middle and output blocks (ComfyUI's `transformer_index`).
pub trait MiddlePatch {
    fn apply(&self, x: Tensor, transformer_index: usize, cx: &AttnCx<'_>) -> Result<Tensor, NodeError>;
}

/// A patch on an input block's output (`input_block_patch`, `input_block_patch_after_skip`).
pub trait BlockPatch {
    fn apply(&self, h: Tensor, block: BlockId, cx: &CallCx) -> Result<Tensor, NodeError>;
}

/// A patch on an output block's input and the skip it is about to take (`output_block_patch`).
pub trait SkipPatch {
    fn apply(&self, h: Tensor, skip: Tensor, block: BlockId, cx: &CallCx) -> Result<(Tensor, Tensor), NodeError>;
}

/// The UNet's patch points, each list run in the order the patches were added.
#[derive(Clone, Default)]
pub struct UnetPatches {
    /// On an input block's output, before it becomes a skip.
    pub input_block: Vec<Rc<dyn BlockPatch>>,
    /// On an input block's output after it became a skip (only the path onwards sees the change).
    pub input_block_after_skip: Vec<Rc<dyn BlockPatch>>,
    /// On an output block's input and its skip, before they are concatenated.
    pub output_block: Vec<Rc<dyn SkipPatch>>,
    /// Self-attention replacements by key; setting a key again replaces its entry.
    pub attn1_replace: Vec<(AttnKey, Rc<dyn AttnReplace>)>,
    /// On self-attention's inputs, in every transformer block.
    pub attn1_patch: Vec<Rc<dyn AttnInPatch>>,
    /// On self-attention's output, in every transformer block.
    pub attn1_output_patch: Vec<Rc<dyn AttnOutPatch>>,
    /// On cross-attention's inputs (the activation, the text states k and v are projected from), in
    /// every transformer block (`attn2_patch`: hypernetworks).
    pub attn2_patch: Vec<Rc<dyn AttnInPatch>>,
    /// After self-attention's residual, before cross-attention, in every transformer block
    /// (`middle_patch`). No node puts one on a MODEL; the sampler adds a GLIGEN conditioning's for
    /// that conditioning's batch only, after the model's own (ComfyUI merges the cond's patches into
    /// `transformer_options` per batch).
    pub middle_patch: Vec<Rc<dyn MiddlePatch>>,
}

impl UnetPatches {
    pub fn is_empty(&self) -> bool {
        self.input_block.is_empty()
            && self.input_block_after_skip.is_empty()
            && self.output_block.is_empty()
            && self.attn1_replace.is_empty()
            && self.attn1_patch.is_empty()
            && self.attn1_output_patch.is_empty()
            && self.attn2_patch.is_empty()
            && self.middle_patch.is_empty()
    }

    /// Sets the self-attention replacement for `key` (replacing one set before for the same key).
    pub fn set_attn1_replace(&mut self, key: AttnKey, f: Rc<dyn AttnReplace>) {
        self.attn1_replace.retain(|(k, _)| *k != key);
        self.attn1_replace.push((key, f));
    }

    /// The self-attention replacement for transformer block `transformer` of `block`: the entry for
    /// exactly that transformer block, else the one for the whole block.
    pub fn attn1_for(&self, block: BlockId, transformer: usize) -> Option<&Rc<dyn AttnReplace>> {
        let find = |t: Option<usize>| self.attn1_replace.iter().find(|(k, _)| k.block == block && k.transformer == t).map(|(_, f)| f);
        find(Some(transformer)).or_else(|| find(None))
    }

    /// These patches with `overlay`'s attention replacements set over them (a post-CFG function's
    /// extra model pass, as ComfyUI's copied `model_options`).
    pub fn with_overlay(&self, overlay: &UnetPatches) -> UnetPatches {
        let mut out = self.clone();
        for (k, f) in &overlay.attn1_replace {
            out.set_attn1_replace(*k, f.clone());
        }
        out.input_block.extend(overlay.input_block.iter().cloned());
        out.input_block_after_skip.extend(overlay.input_block_after_skip.iter().cloned());
        out.output_block.extend(overlay.output_block.iter().cloned());
        out.attn1_patch.extend(overlay.attn1_patch.iter().cloned());
        out.attn1_output_patch.extend(overlay.attn1_output_patch.iter().cloned());
        out.attn2_patch.extend(overlay.attn2_patch.iter().cloned());
        out.middle_patch.extend(overlay.middle_patch.iter().cloned());
        out
    }
}

/// Runs the model again from inside a CFG function (SAG's and PAG's extra passes): the denoised
/// prediction of one side's entries for input `x`, with `overlay` patches on top of the model's.
pub trait ModelRunner {
    fn side_prediction(&self, side: usize, x: &Tensor, sigma: f64, overlay: &UnetPatches) -> Result<Tensor, NodeError>;
}

/// What the CFG functions see (ComfyUI's `args`): the noisy input, the sigma, the guidance scale and
/// the denoised predictions of the conditional and unconditional sides (zeros for a side that was not
/// run).
pub struct CfgArgs<'a> {
    pub input: &'a Tensor,
    pub sigma: f64,
    pub cond_scale: f64,
    pub cond_denoised: &'a Tensor,
    pub uncond_denoised: &'a Tensor,
    /// The guider's sides the conditional and unconditional predictions came from (ComfyUI's
    /// `cond`/`uncond` lists), and the model to run them again; None outside a sampling run.
    pub sides: Option<(usize, Option<usize>, &'a dyn ModelRunner)>,
    /// The sampling run this call belongs to (a number new for each run; 0 outside one), so a hook
    /// can tell runs apart (a Lua hook's budget counts per run).
    pub run: u64,
}

/// A number for a new sampling run.
pub fn next_run() -> u64 {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Replaces classifier-free guidance's formula (`sampler_cfg_function`); returns the guided denoised
/// estimate.
pub trait CfgFunction {
    fn guide(&self, a: &CfgArgs) -> Result<Tensor, NodeError>;
}

/// Rewrites the sides' predictions before guidance (`sampler_pre_cfg_function`).
pub trait PreCfg {
    /// `ran[i]`: whether side i was run (a side skipped by the cfg = 1 shortcut, or BasicGuider's
    /// missing negative, is zeros; ComfyUI passes it as None).
    fn apply(&self, preds: Vec<Tensor>, ran: &[bool], input: &Tensor, sigma: f64, cond_scale: f64) -> Result<Vec<Tensor>, NodeError>;
}

/// Rewrites the guided estimate (`sampler_post_cfg_function`).
pub trait PostCfg {
    fn apply(&self, denoised: Tensor, a: &CfgArgs) -> Result<Tensor, NodeError>;
}

/// Rewrites the latent's noise mask before each model call (`denoise_mask_function`), given the call's
/// sigma and the run's sigmas.
pub trait DenoiseMask {
    fn apply(&self, sigma: f64, mask: &Tensor, run_sigmas: &[f64], sampling: &ModelSampling) -> Result<Tensor, NodeError>;
}

/// Every hook of a MODEL.
#[derive(Clone, Default)]
pub struct ModelPatches {
    pub unet: UnetPatches,
    /// The last one set wins, as in ComfyUI.
    pub cfg_function: Option<Rc<dyn CfgFunction>>,
    pub pre_cfg: Vec<Rc<dyn PreCfg>>,
    pub post_cfg: Vec<Rc<dyn PostCfg>>,
    /// The last one set wins.
    pub denoise_mask: Option<Rc<dyn DenoiseMask>>,
    /// Runs the unconditional side even at cfg 1 (sticky once a patch asks for it).
    pub disable_cfg1: bool,
}

impl ModelPatches {
    /// The default guidance, or the patched one, then the post-CFG functions (ComfyUI's
    /// `cfg_function`).
    pub fn guide(&self, a: &CfgArgs) -> Result<Tensor, NodeError> {
        let mut out = match &self.cfg_function {
            Some(f) => f.guide(a)?,
            None => a.uncond_denoised + (a.cond_denoised - a.uncond_denoised) * a.cond_scale,
        };
        for p in &self.post_cfg {
            out = p.apply(out, a)?;
        }
        Ok(out)
    }

    /// The pre-CFG functions in order.
    pub fn pre(&self, mut preds: Vec<Tensor>, ran: &[bool], input: &Tensor, sigma: f64, cond_scale: f64) -> Result<Vec<Tensor>, NodeError> {
        for p in &self.pre_cfg {
            preds = p.apply(preds, ran, input, sigma, cond_scale)?;
        }
        Ok(preds)
    }
}
