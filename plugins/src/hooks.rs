//! `diffloom.patch_model(model, {cfg = f, post_cfg = f, input_block_patch = f, …})`: a Lua plugin's
//! own model patch, run through the same hooks as the built-in patches (`diffloom_nodes::patches`):
//! the guidance functions and the UNet's block and attention patch points, under ComfyUI's names. The
//! plugin's instruction and time budget counts per sampling run, its hooks' calls included.

use std::cell::Cell;
use std::rc::Rc;

use diffloom_core::{Handle, NodeError, Value};
use diffloom_nodes::patches::{AttnCx, AttnInPatch, AttnKey, AttnOutPatch, AttnReplace, BlockId, BlockPatch, CallCx, CfgArgs, CfgFunction, PostCfg, SkipPatch};
use diffloom_nodes::sd::SdModel;
use mlua::{Function, Lua, MultiValue, Table, Value as LuaValue};
use tch::Tensor;

use crate::api::{LuaTensor, Opaque};
use crate::sandbox::Budget;

/// A Lua function called as a CFG function or a post-CFG function.
pub struct LuaHook {
    lua: mlua::WeakLua,
    func: Function,
    budget: Budget,
    /// The plugin file, for errors.
    file: String,
    /// The run whose calls the budget is counting.
    run: Cell<u64>,
}

impl LuaHook {
    fn fail(&self, e: mlua::Error) -> NodeError {
        NodeError::Failed(format!("{}: a model hook failed: {e}", self.file))
    }

    /// The plugin's Lua state, its budget restarted when `run` is a new sampling run.
    fn enter(&self, run: u64) -> Result<Lua, NodeError> {
        if self.run.get() != run {
            self.run.set(run);
            self.budget.reset();
        }
        self.lua.try_upgrade().ok_or_else(|| NodeError::Failed(format!("{}: the plugin was unloaded", self.file)))
    }

    /// Calls the function with ComfyUI's arguments (`denoised` for a post-CFG function) and reads the
    /// tensor it returns.
    fn call(&self, a: &CfgArgs, denoised: Option<&Tensor>) -> Result<Tensor, NodeError> {
        let lua = self.enter(a.run)?;
        let fail = |e| self.fail(e);
        let args = lua.create_table().map_err(fail)?;
        let tensor = |t: &Tensor| LuaTensor::new(t.shallow_clone(), None);
        args.set("input", tensor(a.input)).map_err(fail)?;
        args.set("cond_denoised", tensor(a.cond_denoised)).map_err(fail)?;
        args.set("uncond_denoised", tensor(a.uncond_denoised)).map_err(fail)?;
        if let Some(d) = denoised {
            args.set("denoised", tensor(d)).map_err(fail)?;
        }
        args.set("sigma", a.sigma).map_err(fail)?;
        args.set("cond_scale", a.cond_scale).map_err(fail)?;
        let out: MultiValue = self.func.call(args).map_err(fail)?;
        Ok(self.tensors(out, &[a.input])?.remove(0))
    }

    /// Calls a UNet hook with `inputs` as tensors and an `info` table (ComfyUI's
    /// `transformer_options`: `block` "input", "middle" or "output" and its `index`, `sigma`,
    /// `original_shape`, `cond_or_uncond`, and for attention hooks `transformer` and `heads`); it returns
    /// `returns` tensors, shaped as the first `returns` inputs (a wrong shape would fail deep in the UNet).
    fn call_unet(&self, inputs: &[&Tensor], returns: usize, block: BlockId, attn: Option<&AttnCx>, call: &CallCx) -> Result<Vec<Tensor>, NodeError> {
        let lua = self.enter(call.run)?;
        let fail = |e| self.fail(e);
        let table = lua.create_table().map_err(fail)?;
        let name = match block {
            BlockId::Input(_) => "input",
            BlockId::Middle => "middle",
            BlockId::Output(_) => "output",
        };
        table.set("block", name).map_err(fail)?;
        table.set("index", block.index()).map_err(fail)?;
        if let Some(a) = attn {
            table.set("transformer", a.transformer).map_err(fail)?;
            table.set("heads", a.heads).map_err(fail)?;
        }
        table.set("sigma", call.sigma).map_err(fail)?;
        table.set("original_shape", call.original_shape.to_vec()).map_err(fail)?;
        table.set("cond_or_uncond", call.cond_or_uncond.to_vec()).map_err(fail)?;
        let mut args: Vec<LuaValue> = Vec::with_capacity(inputs.len() + 1);
        for t in inputs {
            args.push(LuaValue::UserData(lua.create_userdata(LuaTensor::new(t.shallow_clone(), None)).map_err(fail)?));
        }
        args.push(LuaValue::Table(table));
        let out: MultiValue = self.func.call(MultiValue::from_iter(args)).map_err(fail)?;
        self.tensors(out, &inputs[..returns])
    }

    /// The tensors a hook returned, one per expected shape.
    fn tensors(&self, out: MultiValue, like: &[&Tensor]) -> Result<Vec<Tensor>, NodeError> {
        let out: Vec<LuaValue> = out.into_iter().collect();
        let what = if like.len() == 1 { "a tensor".to_owned() } else { format!("{} tensors", like.len()) };
        if out.len() < like.len() {
            return Err(NodeError::Failed(format!("{}: a model hook must return {what}, it returned {} values", self.file, out.len())));
        }
        like.iter()
            .zip(&out)
            .map(|(want, got)| match got {
                LuaValue::UserData(ud) => match ud.borrow::<LuaTensor>() {
                    Ok(t) if t.tensor.size() == want.size() => Ok(t.tensor.shallow_clone()),
                    Ok(t) => Err(NodeError::Failed(format!(
                        "{}: a model hook returned a tensor of shape {:?}, expected {:?}",
                        self.file,
                        t.tensor.size(),
                        want.size()
                    ))),
                    Err(_) => Err(NodeError::Failed(format!("{}: a model hook must return {what}", self.file))),
                },
                other => Err(NodeError::Failed(format!("{}: a model hook must return {what}, it returned a {}", self.file, other.type_name()))),
            })
            .collect()
    }
}

/// As the CFG function (`cfg`): returns the guided estimate.
struct LuaCfg(LuaHook);
impl CfgFunction for LuaCfg {
    fn guide(&self, a: &CfgArgs) -> Result<tch::Tensor, NodeError> {
        self.0.call(a, None)
    }
}

/// As a post-CFG function (`post_cfg`): returns the new guided estimate.
struct LuaPostCfg(LuaHook);
impl PostCfg for LuaPostCfg {
    fn apply(&self, denoised: tch::Tensor, a: &CfgArgs) -> Result<tch::Tensor, NodeError> {
        self.0.call(a, Some(&denoised))
    }
}

/// `input_block_patch` / `input_block_patch_after_skip`: `function(h, info) return h end`.
struct LuaBlock(LuaHook);
impl BlockPatch for LuaBlock {
    fn apply(&self, h: Tensor, block: BlockId, cx: &CallCx) -> Result<Tensor, NodeError> {
        Ok(self.0.call_unet(&[&h], 1, block, None, cx)?.remove(0))
    }
}

/// `output_block_patch`: `function(h, skip, info) return h, skip end`.
struct LuaSkip(LuaHook);
impl SkipPatch for LuaSkip {
    fn apply(&self, h: Tensor, skip: Tensor, block: BlockId, cx: &CallCx) -> Result<(Tensor, Tensor), NodeError> {
        let mut out = self.0.call_unet(&[&h, &skip], 2, block, None, cx)?;
        let skip = out.remove(1);
        Ok((out.remove(0), skip))
    }
}

/// `attn1_patch` / `attn2_patch`: `function(n, context, value, info) return n, context, value end`.
struct LuaAttnIn(LuaHook);
impl AttnInPatch for LuaAttnIn {
    fn apply(&self, n: Tensor, context: Tensor, value: Tensor, cx: &AttnCx<'_>) -> Result<(Tensor, Tensor, Tensor), NodeError> {
        let mut out = self.0.call_unet(&[&n, &context, &value], 3, cx.block, Some(cx), cx.call)?;
        let value = out.remove(2);
        let context = out.remove(1);
        Ok((out.remove(0), context, value))
    }
}

/// `attn1_output_patch`: `function(out, info) return out end`.
struct LuaAttnOut(LuaHook);
impl AttnOutPatch for LuaAttnOut {
    fn apply(&self, out: Tensor, cx: &AttnCx<'_>) -> Result<Tensor, NodeError> {
        Ok(self.0.call_unet(&[&out], 1, cx.block, Some(cx), cx.call)?.remove(0))
    }
}

/// An `attn1` replacement: `function(q, k, v, info) return out end`, `out` shaped as `q`.
struct LuaAttnReplace(LuaHook);
impl AttnReplace for LuaAttnReplace {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, cx: &AttnCx<'_>) -> Result<Tensor, NodeError> {
        Ok(self.0.call_unet(&[q, k, v], 1, cx.block, Some(cx), cx.call)?.remove(0))
    }
}

/// An `attn1` key as ComfyUI writes it: `"input:4"`, `"middle:0"`, `"output:3"`, optionally with the
/// transformer block (`"middle:0:0"`).
fn attn_key(key: &str) -> Option<AttnKey> {
    let mut parts = key.split(':');
    let (kind, index) = (parts.next()?, parts.next()?.parse::<usize>().ok()?);
    let transformer = match parts.next() {
        Some(t) => Some(t.parse::<usize>().ok()?),
        None => None,
    };
    if parts.next().is_some() {
        return None;
    }
    let block = match kind {
        "input" => BlockId::Input(index),
        "middle" if index == 0 => BlockId::Middle,
        "output" => BlockId::Output(index),
        _ => return None,
    };
    Some(AttnKey { block, transformer })
}

/// The hooks `diffloom.patch_model` takes, by ComfyUI's names.
const HOOKS: [&str; 9] =
    ["cfg", "post_cfg", "input_block_patch", "input_block_patch_after_skip", "output_block_patch", "attn1_patch", "attn1_output_patch", "attn2_patch", "attn1"];

/// Installs `diffloom.patch_model` into the plugin's `diffloom` table.
pub fn install(lua: &Lua, table: &Table, budget: Budget, file: String) -> mlua::Result<()> {
    let f = lua.create_function(move |lua, (model, hooks): (LuaValue, Table)| {
        let err = |m: String| mlua::Error::RuntimeError(format!("{file}: diffloom.patch_model: {m}"));
        let LuaValue::UserData(ud) = &model else { return Err(err("the first argument must be a MODEL".into())) };
        let value = ud.borrow::<Opaque>().map_err(|_| err("the first argument must be a MODEL".into()))?.0.clone();
        let Value::Model(handle) = &value else { return Err(err(format!("the first argument must be a MODEL, not {}", value.value_type()))) };
        let m = handle.downcast::<SdModel>().ok_or_else(|| err(format!("{} cannot be patched", handle.label())))?;
        let hook = |func: Function| LuaHook { lua: lua.weak(), func, budget: budget.clone(), file: file.clone(), run: Cell::new(0) };
        let mut p = (*m.patches).clone();
        let mut any = false;
        for pair in hooks.pairs::<String, LuaValue>() {
            let (name, value) = pair?;
            any = true;
            if name == "attn1" {
                // Self-attention replacements by block, ComfyUI's `patches_replace["attn1"]`.
                let LuaValue::Table(by_key) = value else {
                    return Err(err("attn1 must be a table of functions by block (attn1 = { [\"middle:0\"] = function(q, k, v, info) … end })".into()));
                };
                for pair in by_key.pairs::<String, Function>() {
                    let (key, func) = pair.map_err(|e| err(format!("attn1: {e}")))?;
                    let key = attn_key(&key).ok_or_else(|| {
                        err(format!("attn1: {key:?} is not a block (\"input:4\", \"middle:0\", \"output:3\", or with a transformer block \"middle:0:0\")"))
                    })?;
                    p.unet.set_attn1_replace(key, Rc::new(LuaAttnReplace(hook(func))));
                }
                continue;
            }
            let LuaValue::Function(func) = value else { return Err(err(format!("{name} must be a function"))) };
            let h = hook(func);
            match name.as_str() {
                "cfg" => p.cfg_function = Some(Rc::new(LuaCfg(h))),
                "post_cfg" => p.post_cfg.push(Rc::new(LuaPostCfg(h))),
                "input_block_patch" => p.unet.input_block.push(Rc::new(LuaBlock(h))),
                "input_block_patch_after_skip" => p.unet.input_block_after_skip.push(Rc::new(LuaBlock(h))),
                "output_block_patch" => p.unet.output_block.push(Rc::new(LuaSkip(h))),
                "attn1_patch" => p.unet.attn1_patch.push(Rc::new(LuaAttnIn(h))),
                "attn1_output_patch" => p.unet.attn1_output_patch.push(Rc::new(LuaAttnOut(h))),
                "attn2_patch" => p.unet.attn2_patch.push(Rc::new(LuaAttnIn(h))),
                other => return Err(err(format!("unknown hook {other:?}; the hooks are {}", HOOKS.join(", ")))),
            }
        }
        if !any {
            return Err(err(format!("give at least one hook ({})", HOOKS.join(", "))));
        }
        let patched = SdModel { patches: Rc::new(p), ..m.clone() };
        let label = format!("{} + {file}", handle.label());
        lua.create_any_userdata(Opaque(Value::Model(Handle::new(patched, 0, label))))
    })?;
    table.set("patch_model", f)
}
