//! Looking up a model's tensors by checkpoint key while its constructor runs, in the manner of candle's
//! `VarBuilder`: `w.pp("input_blocks").pp(1).get("weight", &[320, 4, 3, 3])`.
//!
//! Constructors stay infallible: a missing key or a wrong shape is recorded, a placeholder returned, and
//! [`Weights::finish`] reports every problem before the model is used.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Display;
use std::rc::Rc;

use diffloom_aten::Generator;
use tch::{Device, Kind, Tensor};

use super::safetensors::SafetensorsFile;
use super::LoadError;

/// Where a logical name's tensor comes from.
enum Source {
    /// (file index, stored name).
    File(usize, String),
    /// A tensor already in memory (a model's own, or one a LoRA patched), used as it is.
    Memory(Tensor),
}

/// Tensors of one or more safetensors files, or of a model already loaded, under logical (LDM) names.
pub struct Weights {
    files: Vec<Rc<SafetensorsFile>>,
    index: HashMap<String, Source>,
    pub device: Device,
    /// The floating-point kind tensors are converted to.
    pub kind: Kind,
    errors: RefCell<Vec<LoadError>>,
    bytes: Cell<usize>,
    /// The stored-name prefix of `from_prefix`, to name missing keys as the file would have them.
    prefix: String,
    /// When set, lookups make random tensors and record them instead of reading files (see
    /// `synthetic.rs`): the model constructors then define exactly the keys a real file has.
    pub(crate) synthetic: Option<RefCell<Synthetic>>,
    /// Every tensor handed out, by logical name (sharing storage with the model's): the model's state,
    /// from which a LoRA-patched copy is built without touching the original.
    loaded: RefCell<Vec<(String, Tensor)>>,
}

/// The tensors a synthetic [`Weights`] invented, in order, and the generator they came from.
pub(crate) struct Synthetic {
    pub generator: Generator,
    pub made: Vec<(String, Tensor)>,
}

impl Weights {
    /// Weights that invent every tensor asked for (random values from a generator seeded with `seed`,
    /// see `synthetic::init`).
    pub(crate) fn synthetic(kind: Kind, seed: u64) -> Weights {
        let made = Synthetic { generator: Generator::cpu(seed), made: Vec::new() };
        Weights { synthetic: Some(RefCell::new(made)), ..Weights::from_index(Vec::new(), HashMap::new(), Device::Cpu, kind) }
    }

    /// Weights whose logical names are the stored names with `prefix` removed (tensors without the
    /// prefix are not visible).
    pub fn from_prefix(file: Rc<SafetensorsFile>, prefix: &str, device: Device, kind: Kind) -> Weights {
        let index = file.tensors().keys().filter_map(|k| k.strip_prefix(prefix).map(|l| (l.to_owned(), (0, k.clone())))).collect();
        Weights { prefix: prefix.to_owned(), ..Weights::from_index(vec![file], index, device, kind) }
    }

    /// Weights with an explicit name table (logical name → (file index, stored name)), for diffusers
    /// folders whose names are translated by `keymap`.
    pub fn from_index(files: Vec<Rc<SafetensorsFile>>, index: HashMap<String, (usize, String)>, device: Device, kind: Kind) -> Weights {
        let index = index.into_iter().map(|(l, (f, k))| (l, Source::File(f, k))).collect();
        Weights {
            files,
            index,
            device,
            kind,
            errors: RefCell::default(),
            bytes: Cell::new(0),
            prefix: String::new(),
            synthetic: None,
            loaded: RefCell::default(),
        }
    }

    /// Weights serving tensors already in memory (a model's [`Weights::into_state`], some replaced),
    /// without copying them.
    pub fn from_tensors(tensors: impl IntoIterator<Item = (String, Tensor)>, device: Device, kind: Kind) -> Weights {
        let mut w = Weights::from_index(Vec::new(), HashMap::new(), device, kind);
        w.index = tensors.into_iter().map(|(k, t)| (k, Source::Memory(t))).collect();
        w
    }

    /// The tensors handed out so far, by logical name: the state of the model just built.
    pub fn into_state(self) -> Vec<(String, Tensor)> {
        self.loaded.into_inner()
    }

    /// The root path.
    pub fn root(&self) -> WPath<'_> {
        WPath { w: self, prefix: String::new() }
    }

    /// Whether a logical name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The stored shape of a logical name.
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        match self.index.get(name)? {
            Source::File(f, stored) => self.files[*f].info(stored).map(|i| i.shape.clone()),
            Source::Memory(t) => Some(t.size()),
        }
    }

    /// Every logical name (for detection).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Bytes of the tensors loaded so far, in the target kind.
    pub fn loaded_bytes(&self) -> usize {
        self.bytes.get()
    }

    /// `Ok` when every lookup succeeded; otherwise the first problem, with a count of the others.
    pub fn finish(&self) -> Result<(), LoadError> {
        let mut errors = self.errors.take();
        if errors.is_empty() {
            return Ok(());
        }
        let more = errors.len() - 1;
        let first = errors.remove(0);
        Err(if more == 0 { first } else { LoadError::Many { first: Box::new(first), more } })
    }

    fn load(&self, name: &str, shape: Option<&[i64]>) -> Tensor {
        if let Some(synthetic) = &self.synthetic {
            let mut synthetic = synthetic.borrow_mut();
            let t = super::synthetic::init(&mut synthetic.generator, name, shape.unwrap_or(&[1]), self.kind);
            synthetic.made.push((name.to_owned(), t.shallow_clone()));
            return t;
        }
        let placeholder = |shape: Option<&[i64]>| Tensor::zeros(shape.unwrap_or(&[1]), (self.kind, Device::Cpu));
        let (f, stored) = match self.index.get(name) {
            Some(Source::File(f, stored)) => (f, stored),
            Some(Source::Memory(t)) => {
                // A model's own tensor, already in the right kind and shape.
                let t = match shape {
                    Some(want) if t.size() != want => t.reshape(want),
                    _ => t.shallow_clone(),
                };
                self.loaded.borrow_mut().push((name.to_owned(), t.shallow_clone()));
                return t;
            }
            None => {
                let file = self.files.first().map(|f| f.path.clone()).unwrap_or_default();
                self.errors.borrow_mut().push(LoadError::Missing { file, key: format!("{}{name}", self.prefix) });
                return placeholder(shape);
            }
        };
        let file = &self.files[*f];
        if let Some(info) = file.info(stored) {
            use safetensors::tensor::Dtype;
            if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
                self.errors.borrow_mut().push(LoadError::Dtype {
                    file: file.path.clone(),
                    key: stored.clone(),
                    found: format!("{:?} (model weights are floating point)", info.dtype),
                });
                return placeholder(shape);
            }
        }
        if let (Some(want), Some(info)) = (shape, file.info(stored)) {
            // A 1×1 convolution stored as a linear layer (or the reverse) has the same elements.
            let same_numel = want.iter().product::<i64>() == info.shape.iter().product::<i64>();
            let squeezed = |s: &[i64]| s.iter().copied().filter(|d| *d != 1).collect::<Vec<_>>();
            if info.shape != want && !(same_numel && squeezed(want) == squeezed(&info.shape)) {
                self.errors.borrow_mut().push(LoadError::Shape {
                    file: file.path.clone(),
                    key: stored.clone(),
                    expected: want.to_vec(),
                    found: info.shape.clone(),
                });
                return placeholder(shape);
            }
        }
        match file.load(stored, self.device, Some(self.kind)) {
            Ok(t) => {
                self.bytes.set(self.bytes.get() + t.numel() * t.kind().elt_size_in_bytes());
                let t = match shape {
                    Some(want) if t.size() != want => t.reshape(want),
                    _ => t,
                };
                self.loaded.borrow_mut().push((name.to_owned(), t.shallow_clone()));
                t
            }
            Err(e) => {
                self.errors.borrow_mut().push(e);
                placeholder(shape)
            }
        }
    }
}

/// A position in the key hierarchy (`input_blocks.1.0`).
#[derive(Clone)]
pub struct WPath<'a> {
    w: &'a Weights,
    prefix: String,
}

impl<'a> WPath<'a> {
    /// The sub-path `seg` (a name or an `nn.Sequential` index).
    pub fn pp(&self, seg: impl Display) -> WPath<'a> {
        let prefix = if self.prefix.is_empty() { seg.to_string() } else { format!("{}.{seg}", self.prefix) };
        WPath { w: self.w, prefix }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Tensor `name` under this path, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Tensor {
        self.w.load(&self.key(name), Some(shape))
    }

    /// Tensor `name` of whatever shape it has (embeddings whose size the config does not fix).
    pub fn get_any(&self, name: &str) -> Tensor {
        self.w.load(&self.key(name), None)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.w.contains(&self.key(name))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.w.shape(&self.key(name))
    }

    pub fn device(&self) -> Device {
        self.w.device
    }

    pub fn kind(&self) -> Kind {
        self.w.kind
    }
}
