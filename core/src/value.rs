//! The values that flow along a graph's links, and their type names.
//!
//! Type names are ComfyUI's (`IMAGE`, `LATENT`, `MODEL`, …) so that graphs and plugin schemas read the
//! same as ComfyUI's. Tensors keep ComfyUI's layouts: IMAGE is `[batch, height, width, 3]` (NHWC)
//! float in 0..1, MASK is `[batch, height, width]` float in 0..1, LATENT is `[batch, channels, h, w]`.

use std::any::Any;
use std::fmt;
use std::rc::Rc;

use tch::Tensor;

/// The type of a value, as named in schemas, graph errors and `diffloom nodes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ValueType {
    Int,
    Float,
    String,
    Boolean,
    Image,
    Mask,
    Latent,
    Conditioning,
    Model,
    Clip,
    Vae,
    Sigmas,
    Sampler,
    /// Initial noise for SamplerCustomAdvanced (RandomNoise, DisableNoise).
    Noise,
    /// A model with its conditioning and guidance (CFGGuider, BasicGuider, …).
    Guider,
    UpscaleModel,
    /// A ControlNet or T2I-Adapter (ControlNetLoader), applied to conditioning by ControlNetApply.
    ControlNet,
    /// A CLIP image encoder (CLIPVisionLoader).
    ClipVision,
    /// What CLIPVisionEncode gives: image embeddings and hidden states.
    ClipVisionOutput,
    /// A style model (StyleModelLoader: T2I style adapter), applied by StyleModelApply.
    StyleModel,
    /// A GLIGEN model (GLIGENLoader), applied to conditioning by GLIGENTextBoxApply.
    Gligen,
    /// Accepts any value; only used for inputs (e.g. `PreviewAny`).
    Any,
}

impl ValueType {
    /// Every type, in the order `diffloom nodes` lists them.
    pub const ALL: [ValueType; 22] = [
        ValueType::Int,
        ValueType::Float,
        ValueType::String,
        ValueType::Boolean,
        ValueType::Image,
        ValueType::Mask,
        ValueType::Latent,
        ValueType::Conditioning,
        ValueType::Model,
        ValueType::Clip,
        ValueType::Vae,
        ValueType::Sigmas,
        ValueType::Sampler,
        ValueType::Noise,
        ValueType::Guider,
        ValueType::UpscaleModel,
        ValueType::ControlNet,
        ValueType::ClipVision,
        ValueType::ClipVisionOutput,
        ValueType::StyleModel,
        ValueType::Gligen,
        ValueType::Any,
    ];

    /// ComfyUI's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Int => "INT",
            ValueType::Float => "FLOAT",
            ValueType::String => "STRING",
            ValueType::Boolean => "BOOLEAN",
            ValueType::Image => "IMAGE",
            ValueType::Mask => "MASK",
            ValueType::Latent => "LATENT",
            ValueType::Conditioning => "CONDITIONING",
            ValueType::Model => "MODEL",
            ValueType::Clip => "CLIP",
            ValueType::Vae => "VAE",
            ValueType::Sigmas => "SIGMAS",
            ValueType::Sampler => "SAMPLER",
            ValueType::Noise => "NOISE",
            ValueType::Guider => "GUIDER",
            ValueType::UpscaleModel => "UPSCALE_MODEL",
            ValueType::ControlNet => "CONTROL_NET",
            ValueType::ClipVision => "CLIP_VISION",
            ValueType::ClipVisionOutput => "CLIP_VISION_OUTPUT",
            ValueType::StyleModel => "STYLE_MODEL",
            ValueType::Gligen => "GLIGEN",
            ValueType::Any => "*",
        }
    }

    /// The type with ComfyUI name `name`, if there is one.
    pub fn from_name(name: &str) -> Option<ValueType> {
        ValueType::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether an output of type `self` may feed an input declared as `input`.
    pub fn feeds(self, input: ValueType) -> bool {
        input == ValueType::Any || self == input || (self == ValueType::Int && input == ValueType::Float)
    }
}

impl serde::Serialize for ValueType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor that clones shallowly (shares storage), as values are shared between cache and consumers.
/// Nodes never modify an input tensor in place; they build new tensors.
pub struct Shared(pub Tensor);

impl Clone for Shared {
    fn clone(&self) -> Self {
        Shared(self.0.shallow_clone())
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{:?}/{:?}", self.0.size(), self.0.kind())
    }
}

impl std::ops::Deref for Shared {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.0
    }
}

/// Bytes held by a tensor's elements (views count in full: an upper bound is what the cache needs).
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// A latent batch, `[batch, channels, h, w]`, with ComfyUI's optional noise mask (1 = resample,
/// 0 = keep), `[batch or 1, 1, H, W]` at any resolution.
#[derive(Clone, Debug)]
pub struct Latent {
    pub samples: Shared,
    pub noise_mask: Option<Shared>,
    /// Which items of a larger batch these are (LatentFromBatch, RepeatLatentBatch): item k gets the
    /// k-th per-item noise draw of the seed, as in ComfyUI's `prepare_noise`.
    pub batch_index: Option<Vec<i64>>,
}

/// One conditioning entry: the text encoder's cross-attention states `[batch, tokens, dim]` and,
/// where the encoder has one, the pooled output `[batch, dim]`.
#[derive(Clone, Debug)]
pub struct CondEntry {
    pub cross_attn: Shared,
    pub pooled: Option<Shared>,
    /// Where the entry applies (ConditioningSetArea, …); the whole latent when None.
    pub area: Option<Area>,
    /// GLIGENTextBoxApply: the GLIGEN model and its boxes (a node-crate object, ComfyUI's
    /// `("position", model, params)`), which becomes the UNet's middle patch for this entry's batch.
    pub gligen: Option<Handle>,
    /// Weight of this entry's prediction against overlapping entries (1 by default).
    pub strength: f64,
    /// ConditioningSetMask: `[b, h, w]` weights where the entry applies, times `mask_strength`.
    pub mask: Option<Shared>,
    pub mask_strength: f64,
    /// ConditioningSetMask's "mask bounds": the area becomes the mask's bounding box.
    pub area_from_mask: bool,
    /// InpaintModelConditioning: the masked image's latent (unscaled) and the pixel mask that inpainting
    /// UNets take as extra input channels.
    pub concat_latent: Option<Shared>,
    pub concat_mask: Option<Shared>,
    /// ConditioningSetTimestepRange: the part of the sampling, as fractions (start, end) from 0 (the
    /// first step) to 1, where the entry applies (ComfyUI's `start_percent`, `end_percent`).
    pub timestep_range: Option<(f64, f64)>,
    /// ControlNetApply: the last ControlNet or T2I-Adapter applied to this entry (a node-crate object
    /// that holds the ones applied before it); entries sharing one are run in one batch.
    pub control: Option<Handle>,
    /// The deprecated ControlNetApply sets this on the positive side: a negative entry without a
    /// ControlNet of its own then gets the positive's (ComfyUI's `control_apply_to_uncond`).
    pub control_apply_to_uncond: bool,
    /// unCLIPConditioning: image embeddings an unCLIP model takes as its ADM input, in the order they
    /// were applied (ComfyUI's `unclip_conditioning` list).
    pub unclip: Vec<UnclipCond>,
}

/// One unCLIPConditioning application: a CLIP vision output's `image_embeds` `[b, dim]`, its strength
/// and its noise augmentation (0..1).
#[derive(Clone, Debug)]
pub struct UnclipCond {
    pub image_embeds: Shared,
    pub strength: f64,
    pub noise_augmentation: f64,
}

impl CondEntry {
    /// An entry with the text encoder's states and nothing else set.
    pub fn new(cross_attn: Tensor) -> CondEntry {
        CondEntry {
            cross_attn: Shared(cross_attn),
            pooled: None,
            area: None,
            gligen: None,
            strength: 1.0,
            mask: None,
            mask_strength: 1.0,
            area_from_mask: false,
            concat_latent: None,
            concat_mask: None,
            timestep_range: None,
            control: None,
            control_apply_to_uncond: false,
            unclip: Vec::new(),
        }
    }
}

/// A conditioning area: in latent pixels, or (ConditioningSetAreaPercentage) in fractions of the
/// latent's sides, resolved when sampling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Area {
    Latent { h: i64, w: i64, y: i64, x: i64 },
    Fraction { h: f64, w: f64, y: f64, x: f64 },
}

/// A model-like object (checkpoint parts, samplers, upscalers) owned by the node crate that made it.
/// The engine only needs to share it and to know roughly how much memory it holds. A handle may be
/// lazy ([`Handle::lazy`]): the object is made when a node first asks for it, so a checkpoint part no
/// node uses is never read.
#[derive(Clone)]
pub struct Handle {
    inner: Inner,
    bytes: usize,
    label: String,
}

#[derive(Clone)]
enum Inner {
    Ready(Rc<dyn Any>),
    Lazy(Rc<Lazy>),
}

/// An object made on first use; a failure is kept and reported to every user.
struct Lazy {
    cell: std::cell::OnceCell<Result<Rc<dyn Any>, String>>,
    make: std::cell::RefCell<Option<Box<dyn FnOnce() -> Result<Rc<dyn Any>, String>>>>,
}

impl Lazy {
    fn get(&self) -> &Result<Rc<dyn Any>, String> {
        self.cell.get_or_init(|| match self.make.borrow_mut().take() {
            Some(make) => make(),
            // invariant: only get_or_init takes the maker, and it runs once (not re-entrantly here).
            None => Err("was being loaded when it was asked for again".into()),
        })
    }
}

impl Handle {
    /// Wraps `value`; `bytes` is its approximate size (for the cache bound), `label` what to print.
    pub fn new<T: Any>(value: T, bytes: usize, label: impl Into<String>) -> Handle {
        Handle { inner: Inner::Ready(Rc::new(value)), bytes, label: label.into() }
    }

    /// A handle whose object `make` builds when it is first used (`bytes` is the estimate the cache
    /// counts from the start). An error is reported, naming what failed, to each node that uses it.
    pub fn lazy<T: Any>(make: impl FnOnce() -> Result<T, String> + 'static, bytes: usize, label: impl Into<String>) -> Handle {
        let make: Box<dyn FnOnce() -> Result<Rc<dyn Any>, String>> = Box::new(move || make().map(|v| Rc::new(v) as Rc<dyn Any>));
        let lazy = Lazy { cell: std::cell::OnceCell::new(), make: std::cell::RefCell::new(Some(make)) };
        Handle { inner: Inner::Lazy(Rc::new(lazy)), bytes, label: label.into() }
    }

    /// The wrapped object, if it is a `T` (made now if the handle is lazy and it was not yet).
    pub fn downcast<T: Any>(&self) -> Option<&T> {
        match &self.inner {
            Inner::Ready(v) => v.downcast_ref::<T>(),
            Inner::Lazy(l) => l.get().as_ref().ok()?.downcast_ref::<T>(),
        }
    }

    /// Why a lazy handle's object could not be made (it is made now if it was not yet).
    pub fn load_error(&self) -> Option<&str> {
        match &self.inner {
            Inner::Ready(_) => None,
            Inner::Lazy(l) => l.get().as_ref().err().map(String::as_str),
        }
    }

    /// Whether the object exists: a lazy handle's maker has run.
    pub fn is_loaded(&self) -> bool {
        match &self.inner {
            Inner::Ready(_) => true,
            Inner::Lazy(l) => l.cell.get().is_some(),
        }
    }

    /// Whether both handles wrap the very same object (ComfyUI compares such objects with `is`).
    pub fn same(&self, other: &Handle) -> bool {
        match (&self.inner, &other.inner) {
            (Inner::Ready(a), Inner::Ready(b)) => Rc::ptr_eq(a, b),
            (Inner::Lazy(a), Inner::Lazy(b)) => Rc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// What the object is, for reports.
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({})", self.label)
    }
}

/// Stands in for a part a checkpoint lacks (a file with no VAE): a node that needs it gets an error
/// saying why it is missing ([`crate::Args::handle`]).
pub struct MissingPart(pub String);

/// A value on a link or a literal input.
#[derive(Clone, Debug)]
pub enum Value {
    /// Wide enough for ComfyUI seeds (0..=2^64-1) as well as negative numbers.
    Int(i128),
    Float(f64),
    String(String),
    Boolean(bool),
    /// `[batch, height, width, 3]`, float in 0..1.
    Image(Shared),
    /// `[batch, height, width]`, float in 0..1.
    Mask(Shared),
    Latent(Latent),
    Conditioning(Vec<CondEntry>),
    Model(Handle),
    Clip(Handle),
    Vae(Handle),
    /// A decreasing 1-D list of noise levels, ending at 0 for a full run.
    Sigmas(Shared),
    Sampler(Handle),
    Noise(Handle),
    Guider(Handle),
    UpscaleModel(Handle),
    ControlNet(Handle),
    ClipVision(Handle),
    ClipVisionOutput(Handle),
    StyleModel(Handle),
    Gligen(Handle),
    /// Several values of one type, as a node with a list output returns them (ComfyUI's
    /// `OUTPUT_IS_LIST`); the executor runs consumers once per item (see `exec/lists.rs`).
    List(Vec<Value>),
}

impl Value {
    /// The type this value has.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Int(_) => ValueType::Int,
            Value::Float(_) => ValueType::Float,
            Value::String(_) => ValueType::String,
            Value::Boolean(_) => ValueType::Boolean,
            Value::Image(_) => ValueType::Image,
            Value::Mask(_) => ValueType::Mask,
            Value::Latent(_) => ValueType::Latent,
            Value::Conditioning(_) => ValueType::Conditioning,
            Value::Model(_) => ValueType::Model,
            Value::Clip(_) => ValueType::Clip,
            Value::Vae(_) => ValueType::Vae,
            Value::Sigmas(_) => ValueType::Sigmas,
            Value::Sampler(_) => ValueType::Sampler,
            Value::Noise(_) => ValueType::Noise,
            Value::Guider(_) => ValueType::Guider,
            Value::UpscaleModel(_) => ValueType::UpscaleModel,
            Value::ControlNet(_) => ValueType::ControlNet,
            Value::ClipVision(_) => ValueType::ClipVision,
            Value::ClipVisionOutput(_) => ValueType::ClipVisionOutput,
            Value::StyleModel(_) => ValueType::StyleModel,
            Value::Gligen(_) => ValueType::Gligen,
            // A list has its items' type (one type per output); an empty one fits anywhere.
            Value::List(items) => items.first().map_or(ValueType::Any, Value::value_type),
        }
    }

    /// Approximate memory held, for the cache's bound. Handles report what their owner declared.
    pub fn bytes(&self) -> usize {
        match self {
            Value::Int(_) | Value::Float(_) | Value::Boolean(_) => 16,
            Value::String(s) => s.len() + 24,
            Value::Image(t) | Value::Mask(t) | Value::Sigmas(t) => tensor_bytes(t),
            Value::Latent(l) => tensor_bytes(&l.samples) + l.noise_mask.as_ref().map_or(0, |m| tensor_bytes(m)),
            Value::Conditioning(c) => c.iter().map(|e| tensor_bytes(&e.cross_attn) + e.pooled.as_ref().map_or(0, |p| tensor_bytes(p))).sum(),
            Value::Model(h)
            | Value::Clip(h)
            | Value::Vae(h)
            | Value::Sampler(h)
            | Value::Noise(h)
            | Value::Guider(h)
            | Value::UpscaleModel(h)
            | Value::ControlNet(h)
            | Value::ClipVision(h)
            | Value::ClipVisionOutput(h)
            | Value::StyleModel(h)
            | Value::Gligen(h) => h.bytes,
            Value::List(items) => items.iter().map(Value::bytes).sum(),
        }
    }

    /// The object behind a handle value (models, samplers, noise, guiders), if this is one.
    pub fn handle(&self) -> Option<&Handle> {
        match self {
            Value::Model(h)
            | Value::Clip(h)
            | Value::Vae(h)
            | Value::Sampler(h)
            | Value::Noise(h)
            | Value::Guider(h)
            | Value::UpscaleModel(h)
            | Value::ControlNet(h)
            | Value::ClipVision(h)
            | Value::ClipVisionOutput(h)
            | Value::StyleModel(h)
            | Value::Gligen(h) => Some(h),
            _ => None,
        }
    }

    /// A short description for reports and `PreviewAny`.
    pub fn describe(&self) -> String {
        match self {
            Value::Int(v) => v.to_string(),
            Value::Float(v) => v.to_string(),
            Value::String(s) if s.chars().count() > 1000 => {
                let head: String = s.chars().take(1000).collect();
                format!("{head}… ({} more characters)", s.chars().count() - 1000)
            }
            Value::String(s) => s.clone(),
            Value::Boolean(b) => b.to_string(),
            Value::Image(t) | Value::Mask(t) | Value::Sigmas(t) => {
                format!("{} {:?}", self.value_type(), t.size())
            }
            Value::Latent(l) => format!("LATENT {:?}", l.samples.size()),
            Value::Conditioning(c) => format!("CONDITIONING ({} entries)", c.len()),
            Value::Model(h)
            | Value::Clip(h)
            | Value::Vae(h)
            | Value::Sampler(h)
            | Value::Noise(h)
            | Value::Guider(h)
            | Value::UpscaleModel(h)
            | Value::ControlNet(h)
            | Value::ClipVision(h)
            | Value::ClipVisionOutput(h)
            | Value::StyleModel(h)
            | Value::Gligen(h) => {
                format!("{} {}", self.value_type(), h.label())
            }
            Value::List(items) => {
                let shown: Vec<String> = items.iter().take(8).map(Value::describe).collect();
                let more = if items.len() > 8 { format!(", … ({} in all)", items.len()) } else { String::new() };
                format!("[{}{more}]", shown.join(", "))
            }
        }
    }
}
