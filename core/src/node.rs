//! The node trait and the schema every node declares (inputs, outputs, defaults, ranges, choices).
//!
//! A schema is data: validation, `diffloom nodes`, the cache key and Lua plugins all read it, and a
//! node's `execute` never re-checks what its schema already states.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use tch::Device;

use std::path::Path;

use crate::error::{NodeError, ValidationKind};
use crate::paths::Locator;
use crate::registry::Registry;
use crate::value::{CondEntry, Latent, MissingPart, Shared, Value, ValueType};

/// What a node declares about itself, after ComfyUI's `INPUT_TYPES`/`RETURN_TYPES`/`OUTPUT_NODE`.
#[derive(Clone, Debug, Serialize)]
pub struct Schema {
    /// The node type name used in graph files (`"KSampler"`).
    pub name: String,
    /// ComfyUI's category path (`"sampling"`, `"image/upscaling"`).
    pub category: String,
    pub description: String,
    /// Inputs in declaration order, which is also their order in the cache key.
    pub inputs: Vec<InputSpec>,
    pub outputs: Vec<OutputSpec>,
    /// Output nodes (SaveImage, PreviewImage, …) are what a run evaluates; everything else runs only
    /// when an output node needs it.
    pub output_node: bool,
    /// `false` for nodes whose result must never be reused (ComfyUI's `IS_CHANGED` returning NaN).
    pub cacheable: bool,
    /// ComfyUI's `INPUT_IS_LIST`: the node is called once with every input as a [`Value::List`] (a
    /// single value as a list of one) instead of once per list item (see `exec/lists.rs`).
    pub input_is_list: bool,
}

/// One declared input.
#[derive(Clone, Debug, Serialize)]
pub struct InputSpec {
    pub name: String,
    pub kind: InputKind,
    /// An optional input may be left out entirely; the node sees `None`.
    pub optional: bool,
    pub description: String,
}

/// One declared output.
#[derive(Clone, Debug, Serialize)]
pub struct OutputSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ValueType,
    /// ComfyUI's `OUTPUT_IS_LIST`: the node returns a [`Value::List`] of `ty` items here, and
    /// consumers run once per item.
    pub is_list: bool,
}

/// What an input accepts. Widget kinds (numbers, strings, booleans, choices) take a literal or a link
/// from an output of the same type; `Link` kinds take only a link.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InputKind {
    Int { default: Option<i128>, min: i128, max: i128, step: i128 },
    Float { default: Option<f64>, min: f64, max: f64, step: f64 },
    String { default: Option<String>, multiline: bool },
    Boolean { default: Option<bool> },
    Combo { choices: Vec<String>, default: Option<String> },
    Link { ty: ValueType },
}

impl InputKind {
    /// The value type this input carries (a choice is a STRING).
    pub fn value_type(&self) -> ValueType {
        match self {
            InputKind::Int { .. } => ValueType::Int,
            InputKind::Float { .. } => ValueType::Float,
            InputKind::String { .. } | InputKind::Combo { .. } => ValueType::String,
            InputKind::Boolean { .. } => ValueType::Boolean,
            InputKind::Link { ty } => *ty,
        }
    }

    /// Checks a value against what the input accepts (type, range, choices), converting where the input
    /// allows (INT to FLOAT): the one check for literals, linked values and Lua's `diffloom.call`.
    pub fn check(&self, value: Value) -> Result<Value, ValidationKind> {
        let kind = self;
        let mismatch =
            |value: &Value| ValidationKind::TypeMismatch { expected: kind.value_type().name().to_owned(), found: value.value_type().name().to_owned() };
        match (kind, value) {
            (InputKind::Int { min, max, .. }, Value::Int(v)) => {
                if v < *min {
                    Err(ValidationKind::BelowMin { value: v.to_string(), min: min.to_string() })
                } else if v > *max {
                    Err(ValidationKind::AboveMax { value: v.to_string(), max: max.to_string() })
                } else {
                    Ok(Value::Int(v))
                }
            }
            (InputKind::Float { min, max, .. }, v @ (Value::Float(_) | Value::Int(_))) => {
                let v = match v {
                    Value::Int(i) => i as f64,
                    Value::Float(f) => f,
                    _ => f64::NAN, // not reachable: the pattern admits only Int and Float
                };
                if v.is_nan() {
                    Err(ValidationKind::TypeMismatch { expected: "a number".into(), found: "NaN".into() })
                } else if v < *min {
                    Err(ValidationKind::BelowMin { value: v.to_string(), min: min.to_string() })
                } else if v > *max {
                    Err(ValidationKind::AboveMax { value: v.to_string(), max: max.to_string() })
                } else {
                    Ok(Value::Float(v))
                }
            }
            (InputKind::String { .. }, v @ Value::String(_)) => Ok(v),
            (InputKind::Boolean { .. }, v @ Value::Boolean(_)) => Ok(v),
            (InputKind::Combo { choices, .. }, Value::String(s)) => {
                if choices.contains(&s) {
                    Ok(Value::String(s))
                } else {
                    let suggestion = crate::registry::closest(&s, choices.iter().map(String::as_str));
                    Err(ValidationKind::NotAChoice { value: s, choices: choices.clone(), suggestion })
                }
            }
            (InputKind::Link { ty }, v) if v.value_type().feeds(*ty) => Ok(v),
            (_, v) => Err(mismatch(&v)),
        }
    }

    /// The default used when a graph leaves the input out, if the schema gives one.
    pub fn default_value(&self) -> Option<Value> {
        match self {
            InputKind::Int { default, .. } => default.map(Value::Int),
            InputKind::Float { default, .. } => default.map(Value::Float),
            InputKind::String { default, .. } => default.clone().map(Value::String),
            InputKind::Boolean { default } => default.map(Value::Boolean),
            InputKind::Combo { default, choices } => default.clone().or_else(|| choices.first().cloned()).map(Value::String),
            InputKind::Link { .. } => None,
        }
    }
}

/// An INT widget, built as `Int::new(20).range(1, 10_000)`.
#[derive(Clone, Copy, Debug)]
pub struct Int {
    default: Option<i128>,
    min: i128,
    max: i128,
    step: i128,
}

impl Int {
    /// An integer input with a default and no bounds beyond i64's.
    pub fn new(default: i128) -> Int {
        Int { default: Some(default), min: i64::MIN as i128, max: i64::MAX as i128, step: 1 }
    }
    /// An integer input the graph must set.
    pub fn required() -> Int {
        Int { default: None, ..Int::new(0) }
    }
    pub fn range(self, min: i128, max: i128) -> Int {
        Int { min, max, ..self }
    }
    pub fn min(self, min: i128) -> Int {
        Int { min, ..self }
    }
    pub fn max(self, max: i128) -> Int {
        Int { max, ..self }
    }
    /// The UI step; informational, as ComfyUI's (e.g. 8 for image sizes).
    pub fn step(self, step: i128) -> Int {
        Int { step, ..self }
    }
}

impl From<Int> for InputKind {
    fn from(i: Int) -> InputKind {
        InputKind::Int { default: i.default, min: i.min, max: i.max, step: i.step }
    }
}

/// A FLOAT widget, built as `Float::new(8.0).range(0.0, 100.0).step(0.5)`.
#[derive(Clone, Copy, Debug)]
pub struct Float {
    default: Option<f64>,
    min: f64,
    max: f64,
    step: f64,
}

impl Float {
    pub fn new(default: f64) -> Float {
        Float { default: Some(default), min: f64::MIN, max: f64::MAX, step: 0.01 }
    }
    /// A number the graph must set.
    pub fn required() -> Float {
        Float { default: None, ..Float::new(0.0) }
    }
    pub fn range(self, min: f64, max: f64) -> Float {
        Float { min, max, ..self }
    }
    pub fn step(self, step: f64) -> Float {
        Float { step, ..self }
    }
}

impl From<Float> for InputKind {
    fn from(f: Float) -> InputKind {
        InputKind::Float { default: f.default, min: f.min, max: f.max, step: f.step }
    }
}

/// A STRING widget.
#[derive(Clone, Debug)]
pub struct Str {
    default: Option<String>,
    multiline: bool,
}

impl Str {
    pub fn new(default: &str) -> Str {
        Str { default: Some(default.to_owned()), multiline: false }
    }
    /// A string the graph must set (a file name, say).
    pub fn required() -> Str {
        Str { default: None, multiline: false }
    }
    pub fn multiline(self) -> Str {
        Str { multiline: true, ..self }
    }
}

impl From<Str> for InputKind {
    fn from(s: Str) -> InputKind {
        InputKind::String { default: s.default, multiline: s.multiline }
    }
}

/// A BOOLEAN widget.
pub struct Bool(pub bool);

impl From<Bool> for InputKind {
    fn from(b: Bool) -> InputKind {
        InputKind::Boolean { default: Some(b.0) }
    }
}

/// A list of choices; the first is the default, as in ComfyUI.
pub struct Combo(pub Vec<String>);

impl Combo {
    pub fn of(choices: &[&str]) -> Combo {
        Combo(choices.iter().map(|c| c.to_string()).collect())
    }
    /// The same choices with another default (one of them), for the few ComfyUI combos whose default is
    /// not the first option (LatentBatchSeedBehavior's "fixed").
    pub fn default(self, choice: &str) -> InputKind {
        debug_assert!(self.0.iter().any(|c| c == choice), "{choice:?} is not among the choices");
        InputKind::Combo { default: Some(choice.to_owned()), choices: self.0 }
    }
}

impl From<Combo> for InputKind {
    fn from(c: Combo) -> InputKind {
        InputKind::Combo { default: c.0.first().cloned(), choices: c.0 }
    }
}

impl From<ValueType> for InputKind {
    fn from(ty: ValueType) -> InputKind {
        InputKind::Link { ty }
    }
}

impl Schema {
    /// A schema with no inputs or outputs yet, cacheable, not an output node.
    pub fn new(name: &str, category: &str) -> Schema {
        Schema {
            name: name.to_owned(),
            category: category.to_owned(),
            description: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            output_node: false,
            cacheable: true,
            input_is_list: false,
        }
    }

    pub fn describe(mut self, text: &str) -> Schema {
        self.description = text.to_owned();
        self
    }

    pub fn input(mut self, name: &str, kind: impl Into<InputKind>) -> Schema {
        self.inputs.push(InputSpec { name: name.to_owned(), kind: kind.into(), optional: false, description: String::new() });
        self
    }

    pub fn optional(mut self, name: &str, kind: impl Into<InputKind>) -> Schema {
        self.inputs.push(InputSpec { name: name.to_owned(), kind: kind.into(), optional: true, description: String::new() });
        self
    }

    /// Describes the input declared last.
    pub fn doc(mut self, text: &str) -> Schema {
        if let Some(last) = self.inputs.last_mut() {
            last.description = text.to_owned();
        }
        self
    }

    pub fn output(mut self, name: &str, ty: ValueType) -> Schema {
        self.outputs.push(OutputSpec { name: name.to_owned(), ty, is_list: false });
        self
    }

    /// An output holding a list of `ty` values (ComfyUI's `OUTPUT_IS_LIST`).
    pub fn list_output(mut self, name: &str, ty: ValueType) -> Schema {
        self.outputs.push(OutputSpec { name: name.to_owned(), ty, is_list: true });
        self
    }

    /// The node takes whole lists (ComfyUI's `INPUT_IS_LIST`); read them with [`Args::list`].
    pub fn input_is_list(mut self) -> Schema {
        self.input_is_list = true;
        self
    }

    pub fn output_node(mut self) -> Schema {
        self.output_node = true;
        self
    }

    pub fn never_cache(mut self) -> Schema {
        self.cacheable = false;
        self
    }

    /// The input named `name`.
    /// Binds values to the inputs, in schema order: each given value checked against its input
    /// ([`InputKind::check`]), each left out filled with the default, a required one left out an error
    /// naming it. `given` returns an input's value, or None when it is left out. The one binding the
    /// executor (linked values) and Lua's `diffloom.call` use; validation checks literals with the same
    /// [`InputKind::check`].
    pub fn bind(&self, mut given: impl FnMut(&InputSpec) -> Result<Option<Value>, NodeError>) -> Result<Args, NodeError> {
        let mut values = Vec::with_capacity(self.inputs.len());
        let check = |spec: &InputSpec, v: Value| spec.kind.check(v).map_err(|k| NodeError::input(&spec.name, k.to_string()));
        for spec in &self.inputs {
            let value = match given(spec)? {
                // A list node gets every input as a list, each item checked on its own.
                Some(Value::List(items)) if self.input_is_list => Some(Value::List(items.into_iter().map(|v| check(spec, v)).collect::<Result<_, _>>()?)),
                Some(v) if self.input_is_list => Some(Value::List(vec![check(spec, v)?])),
                Some(v) => Some(check(spec, v)?),
                None if self.input_is_list => spec.kind.default_value().map(|v| Value::List(vec![v])),
                None => spec.kind.default_value(),
            };
            if value.is_none() && !spec.optional {
                return Err(NodeError::input(&spec.name, ValidationKind::MissingInput.to_string()));
            }
            values.push((spec.name.clone(), value));
        }
        Ok(Args::new(values))
    }

    pub fn input_spec(&self, name: &str) -> Option<&InputSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// The index of the output named `name`.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }
}

/// Everything a node may use besides its inputs: the device, where files go, the cancel flag.
pub struct Ctx<'a> {
    /// Where tensors are computed.
    pub device: Device,
    /// The id of the node being run, for messages.
    pub node_id: &'a str,
    /// Where files named by inputs are found: model folders, the input directory, the graph's directory.
    pub files: Locator<'a>,
    /// Where output nodes write their files.
    pub output_dir: &'a Path,
    /// The text chunks a saved image of `(width, height)` pixels carries: the graph as run (RON,
    /// parameters applied) under `diffloom`, and what the run's [`ImageTexts`] hook adds.
    pub image_texts: &'a dyn Fn(u32, u32) -> Vec<(String, String)>,
    /// Set from another thread (Ctrl-C, a newer save in `watch`) to stop at the next step boundary.
    pub cancel: &'a AtomicBool,
    /// Floating-point kind for model weights (fp32 on CPU, fp16 on CUDA unless `--dtype`).
    pub dtype: tch::Kind,
    /// Lines a node wants in the run report (files written, previews).
    pub messages: Vec<String>,
    /// What the node shows in ComfyUI's UI once done (`images`: the files it saved), for observers.
    pub ui: serde_json::Map<String, serde_json::Value>,
    /// Reports `(done, total)` steps of a long node (sampling) to the run's observer, with the step's
    /// denoised latent where there is one (for live previews).
    pub progress: &'a dyn Fn(u64, u64, Option<&tch::Tensor>),
    /// The node types of the run, for nodes that run other nodes (Lua's `diffloom.call`).
    pub registry: &'a Registry,
}

impl Ctx<'_> {
    /// `Err(Cancelled)` once cancellation was asked for; long nodes call this between steps.
    pub fn check_cancel(&self) -> Result<(), NodeError> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(NodeError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// What a run adds to the images its output nodes save, beside the RON graph: called with the graph,
/// the saving node's index and the image size; returns (keyword, text) pairs (ComfyUI's `prompt` and
/// `workflow`, A1111's `parameters`).
pub type ImageTexts = std::sync::Arc<dyn Fn(&crate::graph::ResolvedGraph, usize, (u32, u32)) -> Vec<(String, String)> + Send + Sync>;

/// A node's inputs for one call, by name, with defaults filled in and parameters substituted.
pub struct Args {
    values: Vec<(String, Option<Value>)>,
}

impl Args {
    pub fn new(values: Vec<(String, Option<Value>)>) -> Args {
        Args { values }
    }

    /// The value of input `name`; `None` if it is optional and was left out.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.as_ref())
    }

    fn required(&self, name: &str) -> Result<&Value, NodeError> {
        self.get(name).ok_or_else(|| NodeError::input(name, "no value was given"))
    }

    fn wrong(name: &str, want: ValueType, got: &Value) -> NodeError {
        NodeError::input(name, format!("expected {want}, got {}", got.value_type()))
    }

    pub fn int(&self, name: &str) -> Result<i128, NodeError> {
        match self.required(name)? {
            Value::Int(v) => Ok(*v),
            v => Err(Self::wrong(name, ValueType::Int, v)),
        }
    }

    /// An INT input that must fit an i64 (sizes, counts), as libtorch wants.
    pub fn i64(&self, name: &str) -> Result<i64, NodeError> {
        let v = self.int(name)?;
        i64::try_from(v).map_err(|_| NodeError::input(name, format!("{v} does not fit a 64-bit integer")))
    }

    pub fn float(&self, name: &str) -> Result<f64, NodeError> {
        match self.required(name)? {
            Value::Float(v) => Ok(*v),
            Value::Int(v) => Ok(*v as f64),
            v => Err(Self::wrong(name, ValueType::Float, v)),
        }
    }

    pub fn string(&self, name: &str) -> Result<&str, NodeError> {
        match self.required(name)? {
            Value::String(s) => Ok(s),
            v => Err(Self::wrong(name, ValueType::String, v)),
        }
    }

    pub fn boolean(&self, name: &str) -> Result<bool, NodeError> {
        match self.required(name)? {
            Value::Boolean(b) => Ok(*b),
            v => Err(Self::wrong(name, ValueType::Boolean, v)),
        }
    }

    pub fn image(&self, name: &str) -> Result<&Shared, NodeError> {
        match self.required(name)? {
            Value::Image(t) => Ok(t),
            v => Err(Self::wrong(name, ValueType::Image, v)),
        }
    }

    pub fn mask(&self, name: &str) -> Result<&Shared, NodeError> {
        match self.required(name)? {
            Value::Mask(t) => Ok(t),
            v => Err(Self::wrong(name, ValueType::Mask, v)),
        }
    }

    /// An optional MASK input.
    pub fn opt_mask(&self, name: &str) -> Result<Option<&Shared>, NodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Mask(t)) => Ok(Some(t)),
            Some(v) => Err(Self::wrong(name, ValueType::Mask, v)),
        }
    }

    pub fn latent(&self, name: &str) -> Result<&Latent, NodeError> {
        match self.required(name)? {
            Value::Latent(l) => Ok(l),
            v => Err(Self::wrong(name, ValueType::Latent, v)),
        }
    }

    /// Any value (for `*` inputs).
    pub fn any(&self, name: &str) -> Result<&Value, NodeError> {
        self.required(name)
    }

    /// The items of an input of a list node ([`Schema::input_is_list`]).
    pub fn list(&self, name: &str) -> Result<&[Value], NodeError> {
        match self.required(name)? {
            Value::List(items) => Ok(items),
            v => Err(NodeError::input(name, format!("expected a list, got {}", v.value_type()))),
        }
    }

    /// A CONDITIONING input's entries.
    pub fn conditioning(&self, name: &str) -> Result<Vec<CondEntry>, NodeError> {
        match self.required(name)? {
            Value::Conditioning(c) => Ok(c.clone()),
            v => Err(Self::wrong(name, ValueType::Conditioning, v)),
        }
    }

    /// A SIGMAS input as a list (float32 values widened).
    pub fn sigmas(&self, name: &str) -> Result<Vec<f64>, NodeError> {
        match self.required(name)? {
            Value::Sigmas(t) => {
                let t = t.0.to_kind(tch::Kind::Float).contiguous().view([-1]);
                let v = Vec::<f32>::try_from(&t).map_err(|e| NodeError::input(name, format!("unreadable SIGMAS: {e}")))?;
                Ok(v.into_iter().map(f64::from).collect())
            }
            v => Err(Self::wrong(name, ValueType::Sigmas, v)),
        }
    }

    /// The object behind a handle input (MODEL, CLIP, VAE, SAMPLER, NOISE, GUIDER, UPSCALE_MODEL), or an
    /// error naming the input: the part is missing from its file ([`MissingPart`]), or another kind.
    pub fn handle<T: 'static>(&self, name: &str) -> Result<&T, NodeError> {
        let value = self.required(name)?;
        let Some(handle) = value.handle() else {
            return Err(NodeError::input(name, format!("expected a model or sampling object, got {}", value.value_type())));
        };
        if let Some(why) = handle.load_error() {
            return Err(NodeError::input(name, why.to_owned()));
        }
        handle.downcast::<T>().ok_or_else(|| match handle.downcast::<MissingPart>() {
            Some(MissingPart(why)) => NodeError::input(name, why.clone()),
            None => NodeError::input(name, format!("{} cannot be used here", handle.label())),
        })
    }
}

/// A node type: a schema and one function, like a ComfyUI `nodes.py` entry.
pub trait Node {
    /// The node's declaration; called once, when the node is registered.
    fn schema(&self) -> Schema;

    /// Computes the outputs, in the order the schema declares them.
    fn execute(&self, cx: &mut Ctx, args: &Args) -> Result<Vec<Value>, NodeError>;

    /// Something that changes when the node's result would change although its inputs did not (a hash
    /// of the file LoadImage reads), like ComfyUI's `IS_CHANGED`. It sees the literal inputs only
    /// (linked inputs are absent): keys are computed before anything runs, so that a cached node's
    /// ancestors need not run at all.
    fn change_token(&self, _files: &Locator, _literals: &Args) -> Result<Option<String>, NodeError> {
        Ok(None)
    }
}
