//! `diffloom.patch_model(model, {cfg = f, post_cfg = f})`: a Lua plugin's own model patch, run through
//! the same hooks as the built-in patches (`diffloom_nodes::patches`). The plugin's instruction and time
//! budget counts per sampling run, its hooks' calls included.

use std::cell::Cell;
use std::rc::Rc;

use diffloom_core::{Handle, NodeError, Value};
use diffloom_nodes::patches::{CfgArgs, CfgFunction, PostCfg};
use diffloom_nodes::sd::SdModel;
use mlua::{Function, Lua, Table, Value as LuaValue};

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
    /// Calls the function with ComfyUI's arguments (`denoised` for a post-CFG function) and reads the
    /// tensor it returns.
    fn call(&self, a: &CfgArgs, denoised: Option<&tch::Tensor>) -> Result<tch::Tensor, NodeError> {
        if self.run.get() != a.run {
            self.run.set(a.run);
            self.budget.reset();
        }
        let fail = |e: mlua::Error| NodeError::Failed(format!("{}: a model hook failed: {e}", self.file));
        let Some(lua) = self.lua.try_upgrade() else { return Err(NodeError::Failed(format!("{}: the plugin was unloaded", self.file))) };
        let args = lua.create_table().map_err(fail)?;
        let tensor = |t: &tch::Tensor| LuaTensor::new(t.shallow_clone(), None);
        args.set("input", tensor(a.input)).map_err(fail)?;
        args.set("cond_denoised", tensor(a.cond_denoised)).map_err(fail)?;
        args.set("uncond_denoised", tensor(a.uncond_denoised)).map_err(fail)?;
        if let Some(d) = denoised {
            args.set("denoised", tensor(d)).map_err(fail)?;
        }
        args.set("sigma", a.sigma).map_err(fail)?;
        args.set("cond_scale", a.cond_scale).map_err(fail)?;
        let out: LuaValue = self.func.call(args).map_err(fail)?;
        match &out {
            LuaValue::UserData(ud) => match ud.borrow::<LuaTensor>() {
                Ok(t) if t.tensor.size() == a.input.size() => Ok(t.tensor.shallow_clone()),
                Ok(t) => Err(NodeError::Failed(format!(
                    "{}: a model hook returned a tensor of shape {:?}, expected {:?}",
                    self.file,
                    t.tensor.size(),
                    a.input.size()
                ))),
                Err(_) => Err(NodeError::Failed(format!("{}: a model hook must return a tensor", self.file))),
            },
            other => Err(NodeError::Failed(format!("{}: a model hook must return a tensor, it returned a {}", self.file, other.type_name()))),
        }
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

/// Installs `diffloom.patch_model` into the plugin's `diffloom` table.
pub fn install(lua: &Lua, table: &Table, budget: Budget, file: String) -> mlua::Result<()> {
    let f = lua.create_function(move |lua, (model, hooks): (LuaValue, Table)| {
        let err = |m: String| mlua::Error::RuntimeError(format!("diffloom.patch_model: {m}"));
        let LuaValue::UserData(ud) = &model else { return Err(err("the first argument must be a MODEL".into())) };
        let value = ud.borrow::<Opaque>().map_err(|_| err("the first argument must be a MODEL".into()))?.0.clone();
        let Value::Model(handle) = &value else { return Err(err(format!("the first argument must be a MODEL, not {}", value.value_type()))) };
        let m = handle.downcast::<SdModel>().ok_or_else(|| err(format!("{} cannot be patched", handle.label())))?;
        let hook = |name: &str| -> mlua::Result<Option<LuaHook>> {
            Ok(hooks.get::<Option<Function>>(name)?.map(|func| LuaHook {
                lua: lua.weak(),
                func,
                budget: budget.clone(),
                file: file.clone(),
                run: Cell::new(0),
            }))
        };
        let mut p = (*m.patches).clone();
        let (cfg, post) = (hook("cfg")?, hook("post_cfg")?);
        if cfg.is_none() && post.is_none() {
            return Err(err("give at least one hook: cfg = function(args) … end, post_cfg = function(args) … end".into()));
        }
        if let Some(h) = cfg {
            p.cfg_function = Some(Rc::new(LuaCfg(h)));
        }
        if let Some(h) = post {
            p.post_cfg.push(Rc::new(LuaPostCfg(h)));
        }
        let patched = SdModel { patches: Rc::new(p), ..m.clone() };
        let label = format!("{} + {file}", handle.label());
        lua.create_any_userdata(Opaque(Value::Model(Handle::new(patched, 0, label))))
    })?;
    table.set("patch_model", f)
}
