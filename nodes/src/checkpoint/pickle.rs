//! PyTorch pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) read as `torch.load(weights_only=True)`
//! reads them, in Rust and without running any code: a restricted unpickler rebuilds tensors and plain
//! containers (dicts, lists, tuples, numbers, strings) from the zip archive torch.save writes, or from
//! the legacy non-zip format. Every callable outside torch's weights-only allow-list is refused with an
//! error naming it; the harmless globals ComfyUI lets through in real SD checkpoints (pytorch
//! lightning's `ModelCheckpoint`, numpy scalars and dtypes, `_codecs.encode`) become inert data, never
//! called. Sizes, nesting and memo are bounded against hostile files.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use tch::{Kind, Tensor};

use super::LoadError;

/// Deeper nesting than any checkpoint has; a hostile file stops here.
const MAX_DEPTH: usize = 1000;
const MAX_STACK: usize = 1 << 20;
const MAX_MEMO: usize = 1 << 24;
/// Largest string or bytes object in a pickle (tensor data is not inside the pickle).
const MAX_CHUNK: usize = 1 << 30;
/// Largest tensor (elements) or storage accepted.
const MAX_NUMEL: u64 = 1 << 40;

/// The legacy format's magic number (`torch.serialization.MAGIC_NUMBER`).
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;

/// A value the unpickler builds. Containers are shared, as in Python: the memo and the stack may hold
/// the same list, which later opcodes fill. Scalars keep their values, unread: the tree is data.
#[derive(Clone)]
#[allow(dead_code)]
enum Obj {
    None,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Rc<RefCell<Items>>),
    Tuple(Rc<Items>),
    Dict(Rc<RefCell<Pairs>>),
    /// An allowed global, not yet applied.
    Global(Rc<(String, String)>),
    /// A storage named by a persistent id: (key, element kind, elements).
    Storage(Rc<(String, Kind, u64)>),
    Tensor(Rc<TensorRef>),
    /// An allowed object kept as data and never used (numpy scalars, lightning callbacks).
    Inert,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<(String, Kind, u64)>,
    offset: u64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// A container's items. A hostile file can nest containers a million deep in a few megabytes; dropping
/// such a tree the usual way recurses once per level and overflows the stack, so containers are taken
/// apart iteratively ([`dismantle`]).
#[derive(Clone, Default)]
struct Items(Vec<Obj>);

#[derive(Clone, Default)]
struct Pairs(Vec<(Obj, Obj)>);

impl std::ops::Deref for Items {
    type Target = Vec<Obj>;
    fn deref(&self) -> &Vec<Obj> {
        &self.0
    }
}

impl std::ops::DerefMut for Items {
    fn deref_mut(&mut self) -> &mut Vec<Obj> {
        &mut self.0
    }
}

impl std::ops::Deref for Pairs {
    type Target = Vec<(Obj, Obj)>;
    fn deref(&self) -> &Vec<(Obj, Obj)> {
        &self.0
    }
}

impl std::ops::DerefMut for Pairs {
    fn deref_mut(&mut self) -> &mut Vec<(Obj, Obj)> {
        &mut self.0
    }
}

impl Drop for Items {
    fn drop(&mut self) {
        dismantle(std::mem::take(&mut self.0));
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        dismantle(std::mem::take(&mut self.0).into_iter().flat_map(|(k, v)| [k, v]).collect());
    }
}

/// Drops `stack` without recursion: a container whose last reference goes has its items moved onto the
/// stack first (a container still referenced elsewhere is dismantled when that reference goes).
fn dismantle(mut stack: Vec<Obj>) {
    while let Some(o) = stack.pop() {
        match o {
            Obj::List(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    stack.append(&mut cell.into_inner().0);
                }
            }
            Obj::Tuple(rc) => {
                if let Ok(mut items) = Rc::try_unwrap(rc) {
                    stack.append(&mut items.0);
                }
            }
            Obj::Dict(rc) => {
                if let Ok(cell) = Rc::try_unwrap(rc) {
                    stack.extend(std::mem::take(&mut cell.into_inner().0).into_iter().flat_map(|(k, v)| [k, v]));
                }
            }
            _ => {}
        }
    }
}

fn list(v: Vec<Obj>) -> Obj {
    Obj::List(Rc::new(RefCell::new(Items(v))))
}

fn tuple(v: Vec<Obj>) -> Obj {
    Obj::Tuple(Rc::new(Items(v)))
}

fn dict(v: Vec<(Obj, Obj)>) -> Obj {
    Obj::Dict(Rc::new(RefCell::new(Pairs(v))))
}

/// What kind of value `o` is, for messages (never the value itself: it may contain itself).
fn kind_of(o: Option<&Obj>) -> &'static str {
    match o {
        None => "nothing",
        Some(Obj::None) => "None",
        Some(Obj::Bool(_)) => "a boolean",
        Some(Obj::Int(_)) => "an integer",
        Some(Obj::Float(_)) => "a float",
        Some(Obj::Str(_)) => "a string",
        Some(Obj::Bytes(_)) => "bytes",
        Some(Obj::List(_)) => "a list",
        Some(Obj::Tuple(_)) => "a tuple",
        Some(Obj::Dict(_)) => "a dict",
        Some(Obj::Global(_)) => "a global",
        Some(Obj::Storage(_)) => "a storage",
        Some(Obj::Tensor(_)) => "a tensor",
        Some(Obj::Inert) => "an inert object",
    }
}

/// Storage classes torch pickles, by the element kind they hold.
fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" | "UntypedStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// torch dtypes as globals (`torch.float16`), which newer files pass to storages.
fn dtype_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "float32" | "float" => Kind::Float,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "float64" | "double" => Kind::Double,
        "int64" | "long" => Kind::Int64,
        "int32" | "int" => Kind::Int,
        "int16" | "short" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        _ => return None,
    })
}

/// Whether `module.name` may be named in the file: torch's weights-only allow-list (the globals
/// `weights_only=True` admits for plain state dicts) and the inert ones ComfyUI admits for real SD files.
fn allowed(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => matches!(name, "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_parameter" | "_rebuild_parameter_with_state"),
        "torch" => storage_kind(name).is_some() || dtype_kind(name).is_some() || name == "Size",
        "torch.storage" => matches!(name, "UntypedStorage" | "TypedStorage" | "_load_from_bytes"),
        "collections" => name == "OrderedDict",
        "builtins" | "__builtin__" => matches!(name, "set" | "frozenset" | "bytearray" | "slice"),
        _ => inert(module, name),
    }
}

/// Globals ComfyUI admits in SD checkpoints that are kept as data, never called.
fn inert(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
            | ("numpy.core.multiarray", "scalar")
            | ("numpy._core.multiarray", "scalar")
            | ("numpy", "dtype")
            | ("_codecs", "encode")
    ) || module == "numpy.dtypes" && name.ends_with("DType")
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Obj>,
    marks: Vec<usize>,
    memo: HashMap<u64, Obj>,
    file: &'a Path,
    /// Storage key → (kind, elements), as the persistent ids name them.
    storages: HashMap<String, Rc<(String, Kind, u64)>>,
    legacy: bool,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], file: &'a Path, legacy: bool) -> Unpickler<'a> {
        Unpickler { data, pos: 0, stack: Vec::new(), marks: Vec::new(), memo: HashMap::new(), file, storages: HashMap::new(), legacy }
    }

    fn err(&self, message: impl std::fmt::Display) -> LoadError {
        LoadError::Corrupt { file: self.file.to_path_buf(), message: format!("pickle at byte {}: {message}", self.pos) }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        if n > MAX_CHUNK {
            return Err(self.err(format!("an object of {n} bytes is larger than any checkpoint holds")));
        }
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len()).ok_or_else(|| self.err("the pickle ends early (truncated)"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, LoadError> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Result<u64, LoadError> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, x| (acc << 8) | *x as u64))
    }

    fn line(&mut self) -> Result<&'a str, LoadError> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|b| *b == b'\n').ok_or_else(|| self.err("a text opcode has no end of line"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.err("a text opcode is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, o: Obj) -> Result<(), LoadError> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("the pickle stack is deeper than any checkpoint's"));
        }
        self.stack.push(o);
        Ok(())
    }

    fn pop(&mut self) -> Result<Obj, LoadError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("pop from an empty stack"));
        }
        self.stack.pop().ok_or_else(|| self.err("pop from an empty stack"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Obj>, LoadError> {
        let m = self.marks.pop().ok_or_else(|| self.err("no MARK to pop to"))?;
        if m > self.stack.len() {
            return Err(self.err("the MARK is above the stack"));
        }
        Ok(self.stack.split_off(m))
    }

    fn top(&mut self) -> Result<&mut Obj, LoadError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("no object on the stack"));
        }
        let e = self.err("no object on the stack");
        self.stack.last_mut().ok_or(e)
    }

    fn memo_put(&mut self, key: u64) -> Result<(), LoadError> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.err("the memo is larger than any checkpoint's"));
        }
        let top = self.top()?.clone();
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), LoadError> {
        let o = self.memo.get(&key).cloned().ok_or_else(|| self.err(format!("memo key {key} was never stored")))?;
        self.push(o)
    }

    fn int_bytes(&self, b: &[u8]) -> Result<Obj, LoadError> {
        if b.is_empty() {
            return Ok(Obj::Int(0));
        }
        if b.len() > 16 {
            return Err(self.err(format!("an integer of {} bytes", b.len())));
        }
        let mut v: i128 = 0;
        for (i, x) in b.iter().enumerate() {
            v |= (*x as i128) << (8 * i);
        }
        let bits = 8 * b.len() as u32;
        if bits < 128 && b[b.len() - 1] & 0x80 != 0 {
            v -= 1i128 << bits;
        }
        Ok(Obj::Int(v))
    }

    fn set_items(&mut self, target: &Obj, items: Vec<Obj>) -> Result<(), LoadError> {
        match target {
            Obj::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    match d.iter_mut().find(|(old, _)| same_key(old, &k)) {
                        Some(slot) => slot.1 = v,
                        None => d.push((k, v)),
                    }
                }
                Ok(())
            }
            Obj::Inert => Ok(()),
            _ => Err(self.err("SETITEM on something that is not a dict")),
        }
    }

    fn append(&mut self, target: &Obj, items: Vec<Obj>) -> Result<(), LoadError> {
        match target {
            Obj::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            Obj::Inert => Ok(()),
            _ => Err(self.err("APPEND on something that is not a list")),
        }
    }

    /// The persistent id of a storage: `('storage', StorageType, key, location, numel[, view])`.
    fn persistent(&mut self, pid: Obj) -> Result<Obj, LoadError> {
        let Obj::Tuple(t) = &pid else { return Err(self.err("a persistent id that is not a tuple")) };
        match t.first() {
            Some(Obj::Str(s)) if s == "storage" => {}
            _ => return Err(self.err("a persistent id that is not a storage")),
        }
        let kind = match t.get(1) {
            Some(Obj::Global(g)) => storage_kind(&g.1).or_else(|| dtype_kind(&g.1)),
            _ => None,
        }
        .ok_or_else(|| self.err(format!("the storage type is {}, not a torch storage class", kind_of(t.get(1)))))?;
        let key = match t.get(2) {
            Some(Obj::Str(s)) => s.clone(),
            Some(Obj::Int(i)) => i.to_string(),
            other => return Err(self.err(format!("the storage key is {}", kind_of(other)))),
        };
        let numel = match t.get(4) {
            Some(Obj::Int(n)) if *n >= 0 && (*n as u64) <= MAX_NUMEL => *n as u64,
            other => return Err(self.err(format!("the storage size is {}", kind_of(other)))),
        };
        if self.legacy && !matches!(t.get(5), None | Some(Obj::None)) {
            return Err(self.err("legacy storage views are not supported"));
        }
        let s = self.storages.entry(key.clone()).or_insert_with(|| Rc::new((key, kind, numel))).clone();
        Ok(Obj::Storage(s))
    }

    /// Applies an allowed callable to its arguments (REDUCE).
    fn call(&mut self, f: Obj, args: Obj) -> Result<Obj, LoadError> {
        let Obj::Global(g) = f else { return Err(self.err("REDUCE of something that is not an allowed global")) };
        let (module, name) = (g.0.as_str(), g.1.as_str());
        let args: Vec<Obj> = match &args {
            Obj::Tuple(t) => t.to_vec(),
            Obj::List(l) => l.borrow().to_vec(),
            _ => return Err(self.err(format!("{module}.{name}: arguments are not a tuple"))),
        };
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                let storage = match args.first() {
                    Some(Obj::Storage(s)) => s.clone(),
                    _ => return Err(self.err("_rebuild_tensor without a storage")),
                };
                let offset = match args.get(1) {
                    Some(Obj::Int(o)) if *o >= 0 => *o as u64,
                    _ => return Err(self.err("_rebuild_tensor: bad storage offset")),
                };
                let dims = |o: Option<&Obj>| -> Option<Vec<i64>> {
                    match o? {
                        Obj::Tuple(t) => t.iter().map(|x| if let Obj::Int(i) = x { i64::try_from(*i).ok() } else { None }).collect(),
                        _ => None,
                    }
                };
                let size = dims(args.get(2)).ok_or_else(|| self.err("_rebuild_tensor: bad size"))?;
                let stride = dims(args.get(3)).ok_or_else(|| self.err("_rebuild_tensor: bad stride"))?;
                Ok(Obj::Tensor(Rc::new(TensorRef { storage, offset, size, stride })))
            }
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                args.into_iter().next().ok_or_else(|| self.err("_rebuild_parameter without data"))
            }
            ("collections", "OrderedDict") => {
                let d = dict(Vec::new());
                if let Some(Obj::List(items)) = args.first() {
                    for pair in items.borrow().iter() {
                        if let Obj::Tuple(kv) = pair {
                            if kv.len() == 2 {
                                self.set_items(&d, vec![kv[0].clone(), kv[1].clone()])?;
                            }
                        }
                    }
                }
                Ok(d)
            }
            ("torch", "Size") => Ok(args.into_iter().next().unwrap_or(tuple(Vec::new()))),
            ("builtins" | "__builtin__", "set" | "frozenset") => Ok(list(match args.into_iter().next() {
                Some(Obj::List(l)) => l.borrow().to_vec(),
                _ => Vec::new(),
            })),
            _ if inert(module, name) || allowed(module, name) => Ok(Obj::Inert),
            _ => Err(self.err(format!("{module}.{name} may not be called"))),
        }
    }

    fn run(&mut self) -> Result<Obj, LoadError> {
        loop {
            if self.marks.len() > MAX_DEPTH {
                return Err(self.err("containers nest deeper than any checkpoint's"));
            }
            let op = self.u8()?;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} is not supported")));
                    }
                }
                0x95 => {
                    self.le(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?.clone();
                    self.push(t)?;
                }
                b'N' => self.push(Obj::None)?,
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.push(Obj::Int(v as i128))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i128))?
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.push(Obj::Int(v as i128))?
                }
                b'I' => {
                    let l = self.line()?;
                    let o = match l {
                        "00" => Obj::Bool(false),
                        "01" => Obj::Bool(true),
                        _ => Obj::Int(l.parse().map_err(|_| self.err(format!("INT {l:?}")))?),
                    };
                    self.push(o)?
                }
                b'L' => {
                    let l = self.line()?.trim_end_matches('L');
                    let v = l.parse().map_err(|_| self.err(format!("LONG {l:?}")))?;
                    self.push(Obj::Int(v))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let o = self.int_bytes(b)?;
                    self.push(o)?
                }
                0x8b => {
                    let n = self.le(4)? as usize;
                    let b = self.take(n)?;
                    let o = self.int_bytes(b)?;
                    self.push(o)?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let bytes: [u8; 8] = b.try_into().expect("8 bytes"); // invariant: take(8) returned exactly 8 bytes.
                    self.push(Obj::Float(f64::from_be_bytes(bytes)))?
                }
                b'F' => {
                    let l = self.line()?;
                    let v = l.parse().map_err(|_| self.err(format!("FLOAT {l:?}")))?;
                    self.push(Obj::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.le(4)?,
                        0x8c => self.u8()? as u64,
                        _ => self.le(8)?,
                    } as usize;
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b).map_err(|_| self.err("a string is not UTF-8"))?.to_owned();
                    self.push(Obj::Str(s))?
                }
                b'V' => {
                    let s = self.line()?.to_owned();
                    self.push(Obj::Str(s))?
                }
                b'S' => {
                    let l = self.line()?;
                    let s = l.trim_matches(|c| c == '\'' || c == '"').to_owned();
                    self.push(Obj::Str(s))?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' { self.le(4)? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?;
                    // Python 2 strings: torch's legacy files use them for keys, as Latin-1.
                    self.push(Obj::Str(b.iter().map(|c| *c as char).collect()))?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.le(4)?,
                        b'C' => self.u8()? as u64,
                        _ => self.le(8)?,
                    } as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Obj::Bytes(b))?
                }
                b']' => self.push(list(Vec::new()))?,
                b'}' => self.push(dict(Vec::new()))?,
                b')' => self.push(tuple(Vec::new()))?,
                0x8f => self.push(list(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(list(items))?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(tuple(items))?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(list(items))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = dict(Vec::new());
                    self.set_items(&d, items)?;
                    self.push(d)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(tuple(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    self.append(&target, vec![v])?
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.append(&target, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    self.set_items(&target, items)?
                }
                b'p' => {
                    let l = self.line()?;
                    let k = l.parse().map_err(|_| self.err(format!("PUT {l:?}")))?;
                    self.memo_put(k)?
                }
                b'q' => {
                    let k = self.u8()? as u64;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.le(4)?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                b'g' => {
                    let l = self.line()?;
                    let k = l.parse().map_err(|_| self.err(format!("GET {l:?}")))?;
                    self.memo_get(k)?
                }
                b'h' => {
                    let k = self.u8()? as u64;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.le(4)?;
                    self.memo_get(k)?
                }
                b'c' => {
                    let module = self.line()?.to_owned();
                    let name = self.line()?.to_owned();
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Obj::Str(m), Obj::Str(n)) => self.global(m, n)?,
                        _ => return Err(self.err("STACK_GLOBAL of something that is not two strings")),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let o = self.call(f, args)?;
                    self.push(o)?
                }
                0x81 => {
                    let _args = self.pop()?;
                    let cls = self.pop()?;
                    let o = match &cls {
                        Obj::Global(g) if g.0 == "collections" && g.1 == "OrderedDict" => dict(Vec::new()),
                        Obj::Global(g) if inert(&g.0, &g.1) => Obj::Inert,
                        Obj::Global(g) => return Err(self.err(format!("{}.{} may not be instantiated", g.0, g.1))),
                        _ => return Err(self.err("NEWOBJ of something that is not a class")),
                    };
                    self.push(o)?
                }
                b'b' => {
                    // Object state: kept for nothing diffloom reads (an OrderedDict's `_metadata`).
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let o = self.persistent(pid)?;
                    self.push(o)?
                }
                b'P' => {
                    let l = self.line()?.to_owned();
                    return Err(self.err(format!("text persistent id {l:?} (not a torch file)")));
                }
                other => {
                    let name = match other {
                        b'i' => "INST",
                        b'o' => "OBJ",
                        0x82..=0x84 => "EXT",
                        0x92 => "NEWOBJ_EX",
                        0x97 => "NEXT_BUFFER",
                        0x98 => "READONLY_BUFFER",
                        _ => "an unknown opcode",
                    };
                    self.pos -= 1;
                    return Err(self.err(format!("{name} (0x{other:02x}) is not allowed")));
                }
            }
        }
    }

    fn global(&mut self, module: String, name: String) -> Result<(), LoadError> {
        if !allowed(&module, &name) {
            return Err(LoadError::Unsupported {
                file: self.file.to_path_buf(),
                message: format!(
                    "the pickle names {module}.{name}, which a weights-only load refuses; no pickle code is run. Convert the file to .safetensors"
                ),
            });
        }
        self.push(Obj::Global(Rc::new((module, name))))
    }
}

fn same_key(a: &Obj, b: &Obj) -> bool {
    match (a, b) {
        (Obj::Str(x), Obj::Str(y)) => x == y,
        (Obj::Int(x), Obj::Int(y)) => x == y,
        _ => false,
    }
}

/// The state dict the way ComfyUI's `load_torch_file` finds it: `state_dict` if present, else the only
/// value of a one-key dict when that is a dict (Real-ESRGAN's `params_ema`), else the root; nested
/// dicts flattened with `.` (a textual inversion's `string_to_param.*`). Non-tensor values are dropped.
fn state_dict(root: &Obj, file: &Path) -> Result<(Vec<(String, Rc<TensorRef>)>, Vec<(String, String)>), LoadError> {
    let Obj::Dict(d) = root else {
        return Err(LoadError::Unsupported { file: file.to_path_buf(), message: "the pickle holds no dict of tensors (not a checkpoint)".into() });
    };
    let d = d.borrow();
    let get = |k: &str| d.iter().find(|(key, _)| matches!(key, Obj::Str(s) if s == k)).map(|(_, v)| v.clone());
    let sd = match get("state_dict") {
        Some(sd @ Obj::Dict(_)) => sd,
        _ => match d.as_slice() {
            [(_, inner @ Obj::Dict(_))] => inner.clone(),
            _ => root.clone(),
        },
    };
    let (mut out, mut values) = (Vec::new(), Vec::new());
    flatten(&sd, "", &mut out, &mut values, 0);
    Ok((out, values))
}

/// Tensors under dotted names (dicts by key, lists by index: a hypernetwork's `768.0.linear.0.weight`),
/// and the strings, numbers and booleans beside them as text (a hypernetwork's `activation_func`).
fn flatten(o: &Obj, prefix: &str, out: &mut Vec<(String, Rc<TensorRef>)>, values: &mut Vec<(String, String)>, depth: usize) {
    if depth > 8 {
        return;
    }
    let entries: Vec<(String, Obj)> = match o {
        Obj::Dict(d) => d
            .borrow()
            .iter()
            .filter_map(|(k, v)| match k {
                Obj::Str(s) => Some((s.clone(), v.clone())),
                Obj::Int(i) => Some((i.to_string(), v.clone())),
                _ => None,
            })
            .collect(),
        Obj::List(items) => items.borrow().iter().enumerate().map(|(i, v)| (i.to_string(), v.clone())).collect(),
        Obj::Tuple(items) => items.iter().enumerate().map(|(i, v)| (i.to_string(), v.clone())).collect(),
        _ => return,
    };
    for (key, v) in entries {
        let name = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
        match &v {
            Obj::Tensor(t) => out.push((name, t.clone())),
            Obj::Dict(_) | Obj::List(_) | Obj::Tuple(_) => flatten(&v, &name, out, values, depth + 1),
            Obj::Str(s) => values.push((name, s.clone())),
            Obj::Bool(b) => values.push((name, if *b { "True" } else { "False" }.to_owned())),
            Obj::Int(i) => values.push((name, i.to_string())),
            Obj::Float(f) => values.push((name, f.to_string())),
            _ => {}
        }
    }
}

/// A pickle checkpoint's tensors, in file order, as contiguous CPU tensors, bit-identical to
/// `torch.load(path, weights_only=True)`'s.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, LoadError> {
    read_with_values(path).map(|(tensors, _)| tensors)
}

/// [`read`], and the strings, numbers and booleans of the state dict as text, by dotted name.
pub fn read_with_values(path: &Path) -> Result<(Vec<(String, Tensor)>, Vec<(String, String)>), LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::Io { file: path.to_path_buf(), message: e.to_string() })?;
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip(path, &bytes)
    } else {
        read_legacy(path, &bytes)
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Corrupt { file: path.to_path_buf(), message: message.into() }
}

fn read_zip(path: &Path, bytes: &[u8]) -> Result<(Vec<(String, Tensor)>, Vec<(String, String)>), LoadError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| corrupt(path, format!("not a readable zip archive: {e}")))?;
    let pkl_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") || *n == "data.pkl")
        .map(str::to_owned)
        .ok_or_else(|| corrupt(path, "the archive has no data.pkl"))?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_owned();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        let _ = f.read_to_string(&mut order);
        if order.trim() == "big" {
            return Err(LoadError::Unsupported {
                file: path.to_path_buf(),
                message: "a big-endian checkpoint; convert it on the machine that wrote it".into(),
            });
        }
    }
    let pkl = read_entry(&mut zip, &pkl_name, path, bytes.len())?;
    let mut u = Unpickler::new(&pkl, path, false);
    let root = u.run()?;
    let (tensors, values) = state_dict(&root, path)?;
    let mut data: HashMap<String, Vec<u8>> = HashMap::new();
    for (key, _, _) in u.storages.values().map(|s| (**s).clone()) {
        let entry = format!("{prefix}data/{key}");
        data.insert(key, read_entry(&mut zip, &entry, path, bytes.len())?);
    }
    Ok((build(path, tensors, &data)?, values))
}

/// An archive entry's bytes; `zip_len` (the archive's size) bounds what a lying header can reserve.
fn read_entry(zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str, path: &Path, zip_len: usize) -> Result<Vec<u8>, LoadError> {
    let mut f = zip.by_name(name).map_err(|e| corrupt(path, format!("archive entry {name}: {e}")))?;
    let size = f.size();
    if size > MAX_NUMEL {
        return Err(corrupt(path, format!("archive entry {name} claims {size} bytes")));
    }
    // The claimed size only caps the reservation: a lying header cannot reserve more than the file.
    let mut out = Vec::with_capacity((size as usize).min(zip_len));
    f.read_to_end(&mut out).map_err(|e| corrupt(path, format!("archive entry {name}: {e}")))?;
    Ok(out)
}

fn read_legacy(path: &Path, bytes: &[u8]) -> Result<(Vec<(String, Tensor)>, Vec<(String, String)>), LoadError> {
    let not_torch = || LoadError::Unsupported { file: path.to_path_buf(), message: "a pickle file, but not one torch.save wrote (no magic number)".into() };
    let mut u = Unpickler::new(bytes, path, true);
    match u.run() {
        Ok(Obj::Int(m)) if m == LEGACY_MAGIC => {}
        _ => return Err(not_torch()),
    }
    for _ in 0..2 {
        // Protocol version and system info.
        let (pos, data) = (u.pos, u.data);
        u = Unpickler::new(data, path, true);
        u.pos = pos;
        u.run()?;
    }
    let pos = u.pos;
    let mut main = Unpickler::new(bytes, path, true);
    main.pos = pos;
    let root = main.run()?;
    let mut keys_pickle = Unpickler::new(bytes, path, true);
    keys_pickle.pos = main.pos;
    let keys: Vec<String> = match keys_pickle.run()? {
        Obj::List(l) => l.borrow().iter().filter_map(|k| if let Obj::Str(s) = k { Some(s.clone()) } else { None }).collect(),
        _ => return Err(corrupt(path, "the storage key list is missing")),
    };
    let mut at = keys_pickle.pos;
    let mut data = HashMap::new();
    for key in keys {
        let s = main.storages.get(&key).cloned().ok_or_else(|| corrupt(path, format!("storage {key} is not used by the pickle")))?;
        let head = bytes.get(at..at + 8).ok_or_else(|| corrupt(path, "the storages are truncated"))?;
        let numel = u64::from_le_bytes(head.try_into().expect("8 bytes")); // invariant: `head` is the 8-byte slice at..at + 8.
        let len =
            numel.checked_mul(s.1.elt_size_in_bytes() as u64).filter(|l| *l <= MAX_NUMEL).ok_or_else(|| corrupt(path, "a storage's size overflows"))? as usize;
        let body = bytes.get(at + 8..at + 8 + len).ok_or_else(|| corrupt(path, format!("storage {key} is truncated")))?;
        data.insert(key, body.to_vec());
        at += 8 + len;
    }
    let (tensors, values) = state_dict(&root, path)?;
    Ok((build(path, tensors, &data)?, values))
}

/// Rebuilds each tensor from its storage's bytes, checking that the view lies inside the storage.
fn build(path: &Path, tensors: Vec<(String, Rc<TensorRef>)>, data: &HashMap<String, Vec<u8>>) -> Result<Vec<(String, Tensor)>, LoadError> {
    let mut cache: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (key, kind, numel) = (*t.storage).clone();
        let bad = |m: String| corrupt(path, format!("tensor {name:?}: {m}"));
        let bytes = data.get(&key).ok_or_else(|| bad(format!("its storage {key} is missing")))?;
        let elt = kind.elt_size_in_bytes() as u64;
        let have = bytes.len() as u64 / elt;
        if bytes.len() as u64 != numel.saturating_mul(elt) {
            return Err(bad(format!("storage {key} holds {} bytes, the pickle says {numel} elements of {elt}", bytes.len())));
        }
        if t.size.len() != t.stride.len() || t.size.iter().chain(&t.stride).any(|d| *d < 0) {
            return Err(bad(format!("size {:?} and stride {:?} do not match", t.size, t.stride)));
        }
        let count =
            t.size.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d as u64)).filter(|c| *c <= MAX_NUMEL).ok_or_else(|| bad("too many elements".into()))?;
        if count > 0 {
            let last = t.size.iter().zip(&t.stride).try_fold(t.offset, |acc, (d, s)| acc.checked_add((*d as u64 - 1).checked_mul(*s as u64)?));
            if last.is_none_or(|l| l >= have) {
                return Err(bad(format!("the view (offset {}, size {:?}, stride {:?}) runs past its storage of {have} elements", t.offset, t.size, t.stride)));
            }
        }
        let storage = match cache.get(&key) {
            Some(s) => s.shallow_clone(),
            None => {
                let s = Tensor::f_from_data_size(&bytes[..(have * elt) as usize], &[have as i64], kind)?;
                cache.insert(key.clone(), s.shallow_clone());
                s
            }
        };
        let view = if count == 0 {
            Tensor::f_empty(&t.size, (kind, tch::Device::Cpu))?
        } else {
            storage.f_as_strided(&t.size, &t.stride, Some(t.offset as i64))?.f_contiguous()?
        };
        out.push((name, view));
    }
    Ok(out)
}
