//! Loading plugin files, turning their `diffloom.node{…}` declarations into registry entries, running
//! them, and reloading an edited file. Each file gets its own Lua state, so one plugin's globals,
//! memory or failures cannot touch another's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use diffloom_core::node::{InputKind, InputSpec};
use diffloom_core::{Args, Bool, Combo, Ctx, Float, Int, Node, NodeError, Origin, Registry, Schema, Str, Value, ValueType};
use mlua::{Function, Lua, Table, Value as LuaValue};

use crate::api::{self, LuaTensor};
use crate::sandbox::{self, Budget};

/// A plugin that could not be loaded; `message` starts with `file:line:` where Lua knows the line.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PluginError {
    pub file: PathBuf,
    pub message: String,
}

/// One plugin file's Lua state.
struct PluginState {
    lua: Lua,
    budget: Budget,
    path: PathBuf,
    /// BLAKE3 of the source: part of every cache key of the file's nodes, so an edit re-runs them.
    source_hash: String,
    logs: RefCell<Vec<String>>,
}

/// A node declared by a plugin.
pub struct LuaNode {
    state: Rc<PluginState>,
    schema: Schema,
    execute: Function,
}

fn declaration_error(lua: &Lua, path: &Path, message: impl std::fmt::Display) -> mlua::Error {
    let line = lua.inspect_stack(1, |d| d.current_line()).flatten().map_or(-1, |l| l as i64);
    let at = if line > 0 { format!("{}:{line}: ", path.display()) } else { format!("{}: ", path.display()) };
    mlua::Error::RuntimeError(format!("{at}{message}"))
}

/// The built-in nodes' choice lists by `"Node.input"` (`KSampler.sampler_name`), which a plugin input
/// may name as its type to offer the same choices.
pub type ChoiceLists = Rc<HashMap<String, InputKind>>;

/// The choice lists of the nodes registered so far (the built-ins, when plugins load).
pub fn choice_lists(registry: &Registry) -> ChoiceLists {
    let mut lists = HashMap::new();
    for entry in registry.entries() {
        for input in entry.schema.inputs.iter().filter(|i| matches!(i.kind, InputKind::Combo { .. })) {
            lists.insert(format!("{}.{}", entry.schema.name, input.name), input.kind.clone());
        }
    }
    Rc::new(lists)
}

/// An INT bound from Lua. With `unsigned`, a negative integer is the two's complement of a value
/// above 2^63 − 1 (Lua writes 0xffffffffffffffff as −1), so seeds up to 2^64 − 1 can be declared.
fn int_bound(v: i64, unsigned: bool) -> i128 {
    if unsigned && v < 0 {
        v as u64 as i128
    } else {
        v as i128
    }
}

/// The schema of one input entry `{ "name", TYPE, default = …, min = …, max = …, step = …,
/// optional = … }`, where TYPE is a type name, a list of choices, or a built-in node's choice input
/// (`"KSampler.sampler_name"`).
fn input_spec(entry: &Table, choices_of: &ChoiceLists) -> Result<InputSpec, String> {
    let name: String = entry.get(1).map_err(|_| "an input needs a name as its first element".to_owned())?;
    let ty: LuaValue = entry.get(2).map_err(|e| e.to_string())?;
    let optional = entry.get::<Option<bool>>("optional").ok().flatten().unwrap_or(false);
    let kind: InputKind = match ty {
        LuaValue::Table(choices) => {
            let choices: Vec<String> = choices.sequence_values::<String>().collect::<Result<_, _>>().map_err(|e| e.to_string())?;
            if choices.is_empty() {
                return Err(format!("input {name:?}: an empty list of choices"));
            }
            let mut c: InputKind = Combo(choices).into();
            if let (InputKind::Combo { default, .. }, Ok(Some(d))) = (&mut c, entry.get::<Option<String>>("default")) {
                *default = Some(d);
            }
            c
        }
        LuaValue::String(s) => {
            let t = s.to_str().map_err(|e| e.to_string())?.to_string();
            match t.as_str() {
                "INT" => {
                    let unsigned = entry.get::<Option<bool>>("unsigned").ok().flatten().unwrap_or(false);
                    let mut i = match entry.get::<Option<i64>>("default").ok().flatten() {
                        Some(d) => Int::new(int_bound(d, unsigned)),
                        None => Int::required(),
                    };
                    if unsigned {
                        i = i.range(0, u64::MAX as i128);
                    }
                    if let Ok(Some(min)) = entry.get::<Option<i64>>("min") {
                        i = i.min(int_bound(min, unsigned));
                    }
                    if let Ok(Some(max)) = entry.get::<Option<i64>>("max") {
                        i = i.max(int_bound(max, unsigned));
                    }
                    if let Ok(Some(step)) = entry.get::<Option<i64>>("step") {
                        i = i.step(step as i128);
                    }
                    i.into()
                }
                "FLOAT" => {
                    // Without a default the graph must set it, as an INT or STRING without one.
                    let f = match entry.get::<Option<f64>>("default").ok().flatten() {
                        Some(d) => Float::new(d),
                        None => Float::required(),
                    };
                    let min = entry.get::<Option<f64>>("min").ok().flatten().unwrap_or(f64::MIN);
                    let max = entry.get::<Option<f64>>("max").ok().flatten().unwrap_or(f64::MAX);
                    let step = entry.get::<Option<f64>>("step").ok().flatten().unwrap_or(0.01);
                    f.range(min, max).step(step).into()
                }
                "STRING" => {
                    let s = match entry.get::<Option<String>>("default").ok().flatten() {
                        Some(d) => Str::new(&d),
                        None => Str::required(),
                    };
                    if entry.get::<Option<bool>>("multiline").ok().flatten().unwrap_or(false) {
                        s.multiline().into()
                    } else {
                        s.into()
                    }
                }
                "BOOLEAN" => Bool(entry.get::<Option<bool>>("default").ok().flatten().unwrap_or(false)).into(),
                other if other.contains('.') => match choices_of.get(other) {
                    Some(InputKind::Combo { choices, default }) => {
                        let default = match entry.get::<Option<String>>("default").ok().flatten() {
                            Some(d) if choices.contains(&d) => Some(d),
                            Some(d) => return Err(format!("input {name:?}: default {d:?} is not one of {other}'s choices")),
                            None => default.clone(),
                        };
                        InputKind::Combo { choices: choices.clone(), default }
                    }
                    _ => return Err(format!("input {name:?}: {other:?} names no built-in choice input (Node.input, e.g. \"KSampler.sampler_name\")")),
                },
                other => match ValueType::from_name(other) {
                    Some(vt) => vt.into(),
                    None => return Err(format!("input {name:?}: unknown type {other:?}")),
                },
            }
        }
        other => return Err(format!("input {name:?}: the type must be a type name or a list of choices, not a {}", other.type_name())),
    };
    let description = entry.get::<Option<String>>("doc").ok().flatten().unwrap_or_default();
    Ok(InputSpec { name, kind, optional, description })
}

/// Parses a `diffloom.node{…}` table.
fn declaration(t: &Table, choices_of: &ChoiceLists) -> Result<(Schema, Function), String> {
    let name: String = t.get("name").map_err(|_| "a node needs a `name`".to_owned())?;
    let category = t.get::<Option<String>>("category").ok().flatten().unwrap_or_else(|| "plugins".into());
    let mut schema = Schema::new(&name, &category);
    schema.description = t.get::<Option<String>>("description").ok().flatten().unwrap_or_default();
    if let Ok(Some(inputs)) = t.get::<Option<Table>>("inputs") {
        for entry in inputs.sequence_values::<Table>() {
            let entry = entry.map_err(|_| format!("{name}: each input is a table like {{\"name\", \"IMAGE\"}}"))?;
            schema.inputs.push(input_spec(&entry, choices_of).map_err(|e| format!("{name}: {e}"))?);
        }
    }
    if let Ok(Some(outputs)) = t.get::<Option<Table>>("outputs") {
        for entry in outputs.sequence_values::<Table>() {
            let entry = entry.map_err(|_| format!("{name}: each output is a table like {{\"IMAGE\", \"IMAGE\"}}"))?;
            let out_name: String = entry.get(1).map_err(|_| format!("{name}: an output needs a name"))?;
            let ty: String = entry.get(2).map_err(|_| format!("{name}: output {out_name:?} needs a type"))?;
            let ty = ValueType::from_name(&ty).filter(|t| *t != ValueType::Any).ok_or_else(|| format!("{name}: output {out_name:?}: unknown type {ty:?}"))?;
            schema = schema.output(&out_name, ty);
        }
    }
    if t.get::<Option<bool>>("output_node").ok().flatten().unwrap_or(false) {
        schema = schema.output_node();
    }
    let execute: Function = t.get("execute").map_err(|_| format!("{name}: a node needs an `execute` function"))?;
    Ok((schema, execute))
}

/// Loads one plugin file: runs it in a fresh sandboxed state and returns the nodes it declared.
pub fn load_file(path: &Path, choices_of: &ChoiceLists) -> Result<Vec<Rc<LuaNode>>, PluginError> {
    let fail = |message: String| PluginError { file: path.to_path_buf(), message };
    let source = std::fs::read_to_string(path).map_err(|e| fail(format!("{}: cannot read: {e}", path.display())))?;
    let (lua, budget) = sandbox::new_state().map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let state = Rc::new(PluginState {
        lua,
        budget,
        path: path.to_path_buf(),
        source_hash: blake3::hash(source.as_bytes()).to_hex().to_string(),
        logs: RefCell::new(Vec::new()),
    });
    let declared: Rc<RefCell<Vec<(Schema, Function)>>> = Rc::default();
    install_api(&state, declared.clone(), choices_of.clone()).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    state.budget.reset();
    state.lua.load(source.as_str()).set_name(format!("@{}", path.display())).set_mode(mlua::ChunkMode::Text).exec().map_err(|e| fail(lua_message(&e)))?;
    let nodes = declared.take().into_iter().map(|(schema, execute)| Rc::new(LuaNode { state: state.clone(), schema, execute })).collect::<Vec<_>>();
    if nodes.is_empty() {
        return Err(fail(format!("{}: declares no node (call diffloom.node{{…}})", path.display())));
    }
    Ok(nodes)
}

/// The first line of a Lua error (mlua appends a traceback).
fn lua_message(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::CallbackError { cause, .. } => return lua_message(cause),
        other => other.to_string(),
    };
    text.lines().next().unwrap_or("").trim_start_matches("runtime error: ").trim_start_matches("syntax error: ").to_owned()
}

/// The `diffloom` table: `node`, `log`, `tensor`, `zeros`, `ones`, `cat`, `image`, `mask`, `latent`,
/// `patch_model`
/// (`call` is added around each execute, where the running node's context exists).
fn install_api(state: &Rc<PluginState>, declared: Rc<RefCell<Vec<(Schema, Function)>>>, choices_of: ChoiceLists) -> mlua::Result<()> {
    let lua = &state.lua;
    let t = lua.create_table()?;
    let path = state.path.clone();
    t.set(
        "node",
        lua.create_function(move |lua, decl: Table| {
            let (schema, execute) = declaration(&decl, &choices_of).map_err(|m| declaration_error(lua, &path, m))?;
            declared.borrow_mut().push((schema, execute));
            Ok(())
        })?,
    )?;
    let weak = Rc::downgrade(state);
    t.set(
        "log",
        lua.create_function(move |_, msg: String| {
            if let Some(s) = weak.upgrade() {
                s.logs.borrow_mut().push(msg);
            }
            Ok(())
        })?,
    )?;
    t.set("tensor", lua.create_function(|_, (values, shape): (Vec<f64>, Vec<i64>)| Ok(LuaTensor::new(api::tensor_from_table(values, shape)?, None)))?)?;
    t.set(
        "zeros",
        lua.create_function(|_, shape: Vec<i64>| Ok(LuaTensor::new(tch::Tensor::zeros(shape.as_slice(), (tch::Kind::Float, tch::Device::Cpu)), None)))?,
    )?;
    t.set(
        "ones",
        lua.create_function(|_, shape: Vec<i64>| Ok(LuaTensor::new(tch::Tensor::ones(shape.as_slice(), (tch::Kind::Float, tch::Device::Cpu)), None)))?,
    )?;
    t.set(
        "cat",
        lua.create_function(|_, (parts, dim): (Vec<LuaTensor>, Option<i64>)| {
            let ty = parts.first().and_then(|p| p.ty);
            let ts: Vec<tch::Tensor> = parts.iter().map(|p| p.tensor.shallow_clone()).collect();
            let t = tch::Tensor::f_cat(&ts, dim.unwrap_or(0)).map_err(|e| mlua::Error::RuntimeError(format!("cat: {e}")))?;
            Ok(LuaTensor::new(t, ty))
        })?,
    )?;
    t.set("conditioning", lua.create_function(|_, parts: Vec<LuaTensor>| api::conditioning(parts))?)?;
    for (name, ty) in [("image", ValueType::Image), ("mask", ValueType::Mask), ("latent", ValueType::Latent)] {
        t.set(name, lua.create_function(move |_, x: LuaTensor| Ok(LuaTensor::new(x.tensor, Some(ty))))?)?;
    }
    crate::hooks::install(lua, &t, state.budget.clone(), state.path.display().to_string())?;
    lua.globals().set("diffloom", t)?;
    Ok(())
}

impl Node for LuaNode {
    fn schema(&self) -> Schema {
        self.schema.clone()
    }

    fn change_token(&self, _files: &diffloom_core::Locator, _literals: &Args) -> Result<Option<String>, NodeError> {
        Ok(Some(self.state.source_hash.clone()))
    }

    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let lua = &self.state.lua;
        let at = |e: mlua::Error| NodeError::Failed(lua_message(&e));
        let args = lua.create_table().map_err(at)?;
        for spec in &self.schema.inputs {
            if let Some(v) = a.get(&spec.name) {
                args.set(spec.name.as_str(), api::to_lua(lua, v).map_err(at)?).map_err(at)?;
            }
        }
        self.state.budget.reset();
        // The run's registry, so a node reloaded since this plugin loaded is reached as it is now.
        let registry: &Registry = cx.registry;
        let returned: mlua::MultiValue = lua
            .scope(|scope| {
                // diffloom.call runs another registered node with this node's context.
                let call = scope.create_function_mut(|lua, (name, inputs): (String, Option<Table>)| {
                    let entry = registry.get(&name).ok_or_else(|| mlua::Error::RuntimeError(format!("diffloom.call: unknown node type {name:?}")))?;
                    // The same binding as the executor's: defaults filled, ranges and choices checked.
                    let args = entry
                        .schema
                        .bind(|spec| {
                            let given: LuaValue = match &inputs {
                                Some(t) => t.get(spec.name.as_str()).map_err(|e| NodeError::input(&spec.name, e.to_string()))?,
                                None => LuaValue::Nil,
                            };
                            if given.is_nil() {
                                return Ok(None);
                            }
                            api::from_lua_input(given, &spec.kind).map(Some).map_err(|m| NodeError::input(&spec.name, m))
                        })
                        .map_err(|e| mlua::Error::RuntimeError(format!("diffloom.call({name:?}): {e}")))?;
                    let outs = entry.node.execute(cx, &args).map_err(|e| mlua::Error::RuntimeError(format!("diffloom.call({name:?}): {e}")))?;
                    let mut ret = mlua::MultiValue::new();
                    for o in &outs {
                        ret.push_back(api::to_lua(lua, o)?);
                    }
                    Ok(ret)
                })?;
                let d: Table = lua.globals().get("diffloom")?;
                d.set("call", call)?;
                let r = self.execute.call::<mlua::MultiValue>(args);
                let _ = d.raw_remove("call");
                r
            })
            .map_err(at)?;
        cx.messages.extend(self.state.logs.borrow_mut().drain(..));
        let returned: Vec<LuaValue> = returned.into_iter().collect();
        if returned.len() != self.schema.outputs.len() {
            return Err(NodeError::Failed(format!(
                "{}: execute returned {} value(s), but the node declares {} output(s)",
                self.state.path.display(),
                returned.len(),
                self.schema.outputs.len()
            )));
        }
        returned
            .into_iter()
            .zip(&self.schema.outputs)
            .map(|(v, spec)| api::from_lua(v, spec.ty).map_err(|m| NodeError::Failed(format!("{}: output {:?}: {m}", self.state.path.display(), spec.name))))
            .collect()
    }
}

/// The `.lua` files of a directory, sorted, as absolute paths (a plugin's origin, which reloading
/// matches against).
pub fn plugin_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "lua")).map(|p| p.canonicalize().unwrap_or(p)).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Registers the nodes of every plugin in `dirs`. A broken plugin, or a node whose name is taken, is
/// reported and skipped; the rest load.
pub fn load_plugins(dirs: &[PathBuf], registry: &mut Registry) -> Vec<PluginError> {
    let mut errors = Vec::new();
    let choices_of = choice_lists(registry);
    for dir in dirs {
        for file in plugin_files(dir) {
            match load_file(&file, &choices_of) {
                Ok(nodes) => errors.extend(register(&file, nodes, registry)),
                Err(e) => errors.push(e),
            }
        }
    }
    errors
}

fn register(file: &Path, nodes: Vec<Rc<LuaNode>>, registry: &mut Registry) -> Vec<PluginError> {
    nodes
        .into_iter()
        .filter_map(|n| registry.register(n, Origin::Plugin(file.to_path_buf())).err())
        .map(|e| PluginError { file: file.to_path_buf(), message: e.to_string() })
        .collect()
}

/// Reloads an edited plugin: on success its old nodes are replaced; on failure they stay and the error
/// comes back. Returns the names of the nodes now registered from the file.
pub fn reload(file: &Path, registry: &mut Registry) -> Result<Vec<String>, PluginError> {
    let nodes = load_file(file, &choice_lists(registry))?;
    let origin = Origin::Plugin(file.to_path_buf());
    let old: Vec<_> = registry.entries().filter(|e| e.origin == origin).cloned().collect();
    registry.remove_origin(&origin);
    let names: Vec<String> = nodes.iter().map(|n| n.schema.name.clone()).collect();
    let errors = register(file, nodes, registry);
    if let Some(e) = errors.into_iter().next() {
        registry.remove_origin(&origin);
        for entry in old {
            let _ = registry.register(entry.node.clone(), origin.clone());
        }
        return Err(e);
    }
    Ok(names)
}
