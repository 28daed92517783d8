//! The persistent tier of the cache: results that are plain data (LATENT, IMAGE, MASK, SIGMAS,
//! CONDITIONING without models attached, numbers, strings, and lists of them) stored in a directory
//! under their node key, so that a second process re-executes only what changed, as `watch` does in
//! one. Models are never stored: they are loaded again (that is what their loaders are for).
//!
//! One entry is one safetensors file, `<dir>/v1/<2 hex>/<64 hex>.safetensors`, named by a BLAKE3 of
//! the node key and what else decides a result without being in the key (the build of diffloom, the
//! device, the weights' dtype). Its metadata holds the values' layout and a BLAKE3 checksum of layout
//! and tensor bytes: an entry that does not parse or check (truncated, corrupt, from another format) is
//! reported, deleted and recomputed, never used. Writes go to a temporary file renamed into place, so a
//! reader sees a whole entry or none; several processes (and machines on a shared mount) may use one
//! directory. The directory is bounded in bytes: after a write, the least recently used entries (by
//! modification time, which a read refreshes) are deleted until it fits.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::dtypes::{dtype_of, kind_of};
use crate::exec::key::Key;
use crate::value::{Area, CondEntry, Latent, Shared, Value};

/// The build that computes results: a BLAKE3 of the running executable's bytes (read once per process),
/// so that a rebuilt diffloom whose numerics changed never reads what an older build wrote under the same
/// version number; the version itself if the executable cannot be read. Processes of one binary
/// (`run`, `watch`, workers on a shared directory) share entries.
pub fn build_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let hash = std::env::current_exe().and_then(|exe| {
            let mut h = blake3::Hasher::new();
            h.update_reader(fs::File::open(exe)?)?;
            Ok(h.finalize().to_hex()[..16].to_owned())
        });
        hash.unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_owned())
    })
}

/// The layout version in entries' names and metadata; a new layout reads old entries as misses.
const FORMAT: &str = "v1";

/// A cache directory shared by runs, processes and machines.
pub struct DiskCache {
    root: PathBuf,
    limit: u64,
}

/// A value as the entry's metadata describes it; tensors are named by their index in the file.
#[derive(Serialize, Deserialize)]
enum Stored {
    /// i128 does not fit JSON numbers.
    Int(String),
    /// The bits, so NaN and infinities survive.
    Float(u64),
    String(String),
    Boolean(bool),
    Image(usize),
    Mask(usize),
    Sigmas(usize),
    Latent {
        samples: usize,
        noise_mask: Option<usize>,
        batch_index: Option<Vec<i64>>,
    },
    Conditioning(Vec<StoredCond>),
    List(Vec<Stored>),
}

/// A conditioning entry without models attached (one with a ControlNet or GLIGEN is not stored).
#[derive(Serialize, Deserialize)]
struct StoredCond {
    cross_attn: usize,
    pooled: Option<usize>,
    /// `(fraction?, h, w, y, x)`; a latent-pixel area's numbers are exact integers.
    area: Option<(bool, f64, f64, f64, f64)>,
    strength: f64,
    mask: Option<usize>,
    mask_strength: f64,
    area_from_mask: bool,
    concat_latent: Option<usize>,
    concat_mask: Option<usize>,
    timestep_range: Option<(f64, f64)>,
    control_apply_to_uncond: bool,
    /// unCLIPConditioning's `(image_embeds, strength, noise_augmentation)`.
    unclip: Vec<(usize, f64, f64)>,
}

/// Tensors gathered while describing values, moved to the CPU.
#[derive(Default)]
struct Tensors(Vec<Tensor>);

impl Tensors {
    fn add(&mut self, t: &Tensor) -> usize {
        self.0.push(t.to_device(Device::Cpu).contiguous());
        self.0.len() - 1
    }
}

/// Describes a value, or None when it holds something that is not plain data (a model, a ControlNet).
fn describe(v: &Value, t: &mut Tensors) -> Option<Stored> {
    Some(match v {
        Value::Int(i) => Stored::Int(i.to_string()),
        Value::Float(f) => Stored::Float(f.to_bits()),
        Value::String(s) => Stored::String(s.clone()),
        Value::Boolean(b) => Stored::Boolean(*b),
        Value::Image(x) => Stored::Image(t.add(x)),
        Value::Mask(x) => Stored::Mask(t.add(x)),
        Value::Sigmas(x) => Stored::Sigmas(t.add(x)),
        Value::Latent(Latent { samples, noise_mask, batch_index }) => {
            Stored::Latent { samples: t.add(samples), noise_mask: noise_mask.as_ref().map(|m| t.add(m)), batch_index: batch_index.clone() }
        }
        Value::Conditioning(entries) => Stored::Conditioning(entries.iter().map(|e| describe_cond(e, t)).collect::<Option<_>>()?),
        Value::List(items) => Stored::List(items.iter().map(|v| describe(v, t)).collect::<Option<_>>()?),
        _ => return None,
    })
}

fn describe_cond(e: &CondEntry, t: &mut Tensors) -> Option<StoredCond> {
    // Every field named: a field added to CondEntry must be decided on here.
    let CondEntry {
        cross_attn,
        pooled,
        area,
        gligen,
        strength,
        mask,
        mask_strength,
        area_from_mask,
        concat_latent,
        concat_mask,
        timestep_range,
        control,
        control_apply_to_uncond,
        unclip,
    } = e;
    if control.is_some() || gligen.is_some() {
        return None;
    }
    let area = area.map(|a| match a {
        Area::Latent { h, w, y, x } => (false, h as f64, w as f64, y as f64, x as f64),
        Area::Fraction { h, w, y, x } => (true, h, w, y, x),
    });
    Some(StoredCond {
        cross_attn: t.add(cross_attn),
        pooled: pooled.as_ref().map(|p| t.add(p)),
        area,
        strength: *strength,
        mask: mask.as_ref().map(|m| t.add(m)),
        mask_strength: *mask_strength,
        area_from_mask: *area_from_mask,
        concat_latent: concat_latent.as_ref().map(|c| t.add(c)),
        concat_mask: concat_mask.as_ref().map(|c| t.add(c)),
        timestep_range: *timestep_range,
        control_apply_to_uncond: *control_apply_to_uncond,
        unclip: unclip.iter().map(|u| (t.add(&u.image_embeds), u.strength, u.noise_augmentation)).collect(),
    })
}

/// Rebuilds a value from its description and the entry's tensors.
fn rebuild(s: Stored, t: &[Tensor]) -> Result<Value, String> {
    let get = |i: usize| t.get(i).map(|x| Shared(x.shallow_clone())).ok_or_else(|| format!("tensor {i} is missing"));
    Ok(match s {
        Stored::Int(i) => Value::Int(i.parse().map_err(|_| format!("bad INT {i:?}"))?),
        Stored::Float(bits) => Value::Float(f64::from_bits(bits)),
        Stored::String(s) => Value::String(s),
        Stored::Boolean(b) => Value::Boolean(b),
        Stored::Image(i) => Value::Image(get(i)?),
        Stored::Mask(i) => Value::Mask(get(i)?),
        Stored::Sigmas(i) => Value::Sigmas(get(i)?),
        Stored::Latent { samples, noise_mask, batch_index } => {
            Value::Latent(Latent { samples: get(samples)?, noise_mask: noise_mask.map(get).transpose()?, batch_index })
        }
        Stored::Conditioning(entries) => {
            Value::Conditioning(
                entries
                    .into_iter()
                    .map(|c| {
                        let mut e = CondEntry::new(get(c.cross_attn)?.0);
                        e.pooled = c.pooled.map(get).transpose()?;
                        e.area = c.area.map(|(fraction, h, w, y, x)| {
                            if fraction {
                                Area::Fraction { h, w, y, x }
                            } else {
                                Area::Latent { h: h as i64, w: w as i64, y: y as i64, x: x as i64 }
                            }
                        });
                        e.strength = c.strength;
                        e.mask = c.mask.map(get).transpose()?;
                        e.mask_strength = c.mask_strength;
                        e.area_from_mask = c.area_from_mask;
                        e.concat_latent = c.concat_latent.map(get).transpose()?;
                        e.concat_mask = c.concat_mask.map(get).transpose()?;
                        e.timestep_range = c.timestep_range;
                        e.control_apply_to_uncond = c.control_apply_to_uncond;
                        e.unclip = c
                            .unclip
                            .into_iter()
                            .map(|(i, strength, noise_augmentation)| Ok(crate::value::UnclipCond { image_embeds: get(i)?, strength, noise_augmentation }))
                            .collect::<Result<_, String>>()?;
                        Ok(e)
                    })
                    .collect::<Result<_, String>>()?,
            )
        }
        Stored::List(items) => Value::List(items.into_iter().map(|s| rebuild(s, t)).collect::<Result<_, _>>()?),
    })
}

/// A contiguous CPU tensor's bytes.
fn bytes_of(t: &Tensor) -> Result<Vec<u8>, String> {
    let flat = t.f_reshape([-1]).and_then(|f| f.f_view_dtype(Kind::Uint8)).map_err(|e| e.to_string())?;
    Vec::<u8>::try_from(&flat).map_err(|e| e.to_string())
}

/// Whether every output is plain data the disk tier can hold.
pub fn storable(values: &[Value]) -> bool {
    let mut t = Tensors::default();
    values.iter().all(|v| describe(v, &mut t).is_some())
}

impl DiskCache {
    /// The cache in `dir` (created if missing), holding at most `limit_bytes` of entries.
    pub fn open(dir: &Path, limit_bytes: u64) -> std::io::Result<DiskCache> {
        let root = dir.join(FORMAT);
        fs::create_dir_all(&root)?;
        Ok(DiskCache { root, limit: limit_bytes })
    }

    /// The directory entries live in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the entry for `key` lives, given the run's `salt` (version, device, dtype).
    fn path(&self, key: &Key, salt: &str) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(b"diffloom disk cache ");
        h.update(FORMAT.as_bytes());
        h.update(&(salt.len() as u64).to_le_bytes());
        h.update(salt.as_bytes());
        h.update(key);
        let hex = h.finalize().to_hex();
        self.root.join(&hex[..2]).join(format!("{hex}.safetensors"))
    }

    /// The outputs stored for `key`: `Ok(None)` when there is no entry, `Err` (with the reason) when an
    /// entry was there but unusable; it is then deleted, so the result is computed and stored afresh.
    pub fn get(&self, key: &Key, salt: &str) -> Result<Option<Vec<Value>>, String> {
        let path = self.path(key, salt);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: unreadable cache entry: {e}", path.display())),
        };
        match decode(&bytes) {
            Ok(values) => {
                // A read makes the entry recently used for eviction (best effort).
                if let Ok(f) = fs::File::options().append(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Ok(Some(values))
            }
            Err(why) => {
                let _ = fs::remove_file(&path);
                Err(format!("{}: corrupt cache entry ({why}); deleted, the node runs again", path.display()))
            }
        }
    }

    /// Stores `values` for `key`; `Ok(false)` when they are not plain data (nothing is written).
    pub fn put(&self, key: &Key, salt: &str, values: &[Value]) -> Result<bool, String> {
        let mut tensors = Tensors::default();
        let Some(described) = values.iter().map(|v| describe(v, &mut tensors)).collect::<Option<Vec<_>>>() else { return Ok(false) };
        let bytes = encode(&described, &tensors.0)?;
        let path = self.path(key, salt);
        let dir = path.parent().expect("entries live in a subfolder"); // invariant: `path` is root/xx/name
        let fail = |e: std::io::Error| format!("{}: cannot write cache entry: {e}", path.display());
        fs::create_dir_all(dir).map_err(fail)?;
        // A unique temporary name in the same folder, then an atomic rename.
        let tmp = dir.join(format!(".{}.{}.{}.tmp", path.file_name().unwrap_or_default().to_string_lossy(), std::process::id(), unique()));
        let written = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(fail(e));
        }
        self.evict();
        Ok(true)
    }

    /// Deletes the least recently used entries until the directory fits its bound. Another process
    /// may delete the same entry at the same time; a missing file is simply skipped.
    fn evict(&self) {
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let Ok(dirs) = fs::read_dir(&self.root) else { return };
        for dir in dirs.flatten() {
            let Ok(files) = fs::read_dir(dir.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name();
                if !name.to_string_lossy().ends_with(".safetensors") {
                    continue;
                }
                if let Ok(meta) = f.metadata() {
                    entries.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), f.path()));
                }
            }
        }
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        if total <= self.limit {
            return;
        }
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.limit {
                break;
            }
            if fs::remove_file(&path).is_ok() || !path.exists() {
                total = total.saturating_sub(len);
            }
        }
    }
}

/// A number unique within this process, for temporary names.
fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The checksum over the layout and every tensor's dtype, shape and bytes.
fn checksum(layout: &str, tensors: &[(Dtype, Vec<usize>, &[u8])]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(layout.as_bytes());
    for (dtype, shape, data) in tensors {
        h.update(format!("|{dtype:?}{shape:?}{}|", data.len()).as_bytes());
        h.update(data);
    }
    h.finalize().to_hex().to_string()
}

fn encode(values: &[Stored], tensors: &[Tensor]) -> Result<Vec<u8>, String> {
    let layout = serde_json::to_string(values).map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(tensors.len());
    for t in tensors {
        let dtype = dtype_of(t.kind()).ok_or_else(|| format!("a {:?} tensor cannot be stored", t.kind()))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        data.push((dtype, shape, bytes_of(t)?));
    }
    let refs: Vec<(Dtype, Vec<usize>, &[u8])> = data.iter().map(|(d, s, b)| (*d, s.clone(), b.as_slice())).collect();
    let check = checksum(&layout, &refs);
    let views = refs
        .iter()
        .enumerate()
        .map(|(i, (dtype, shape, bytes))| Ok((i.to_string(), TensorView::new(*dtype, shape.clone(), bytes).map_err(|e| e.to_string())?)))
        .collect::<Result<Vec<_>, String>>()?;
    let metadata = HashMap::from([("diffloom.cache".to_owned(), FORMAT.to_owned()), ("values".to_owned(), layout), ("check".to_owned(), check)]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

fn decode(bytes: &[u8]) -> Result<Vec<Value>, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let md = meta.metadata().as_ref().ok_or("no metadata")?;
    if md.get("diffloom.cache").map(String::as_str) != Some(FORMAT) {
        return Err("not a diffloom cache entry of this format".into());
    }
    let layout = md.get("values").ok_or("no layout")?;
    let mut views = Vec::with_capacity(file.len());
    for i in 0..file.len() {
        let v = file.tensor(&i.to_string()).map_err(|e| e.to_string())?;
        views.push((v.dtype(), v.shape().to_vec(), v.data()));
    }
    if md.get("check") != Some(&checksum(layout, &views)) {
        return Err("checksum mismatch".into());
    }
    let tensors = views
        .iter()
        .map(|(dtype, shape, data)| {
            let kind = kind_of(*dtype).ok_or_else(|| format!("unexpected dtype {dtype:?}"))?;
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            Tensor::f_from_slice(data).and_then(|t| t.f_view_dtype(kind)).and_then(|t| t.f_reshape(&shape)).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    let stored: Vec<Stored> = serde_json::from_str(layout).map_err(|e| e.to_string())?;
    stored.into_iter().map(|s| rebuild(s, &tensors)).collect()
}

#[cfg(test)]
#[path = "tests/disk.rs"]
mod tests;
