//! Unit tests of `disk.rs`: every plain value round-trips exactly, models are not stored, a damaged
//! entry is refused and deleted, the directory stays within its bound, and a second executor on the
//! same directory (another process) runs only what is not stored.
use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::*;
use crate::error::NodeError;
use crate::exec::{Executor, RunOptions};
use crate::graph::file::parse;
use crate::node::{Args, Ctx, Float, Node, Schema, Str};
use crate::registry::{Origin, Registry};
use crate::validate::validate;
use crate::value::{Handle, UnclipCond, ValueType};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.to_kind(Kind::Double).eq_tensor(&b.to_kind(Kind::Double)).all().int64_value(&[]) == 1
}

#[test]
fn plain_values_round_trip_exactly() {
    let d = tmp();
    let cache = DiskCache::open(d.path(), 1 << 30).unwrap();
    let r = |shape: &[i64], kind| Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(kind);
    let latent =
        Latent { samples: Shared(r(&[2, 4, 3, 5], Kind::Float)), noise_mask: Some(Shared(r(&[1, 1, 24, 40], Kind::Float))), batch_index: Some(vec![3, 7]) };
    let mut cond = CondEntry::new(r(&[1, 77, 8], Kind::Half));
    cond.pooled = Some(Shared(r(&[1, 8], Kind::BFloat16)));
    cond.area = Some(Area::Fraction { h: 0.5, w: 0.25, y: 0.1, x: 0.0 });
    cond.mask = Some(Shared(r(&[1, 6, 6], Kind::Float)));
    cond.timestep_range = Some((0.2, 0.9));
    cond.unclip = vec![UnclipCond { image_embeds: Shared(r(&[1, 16], Kind::Float)), strength: 0.7, noise_augmentation: 0.1 }];
    let mut cond2 = CondEntry::new(r(&[1, 77, 8], Kind::Float));
    cond2.area = Some(Area::Latent { h: 8, w: 16, y: 0, x: 8 });
    let values = vec![
        Value::Latent(latent.clone()),
        Value::Image(Shared(r(&[1, 4, 4, 3], Kind::Float))),
        Value::Mask(Shared(r(&[1, 4, 4], Kind::Float))),
        Value::Sigmas(Shared(r(&[11], Kind::Float))),
        Value::Int(u64::MAX as i128),
        Value::Float(f64::NAN),
        Value::String("ü\n".into()),
        Value::Boolean(true),
        Value::Conditioning(vec![cond, cond2]),
        Value::List(vec![Value::Int(1), Value::Int(-2)]),
    ];
    let key = [7u8; 32];
    assert!(matches!(cache.get(&key, "s"), Ok(None)));
    assert_eq!(cache.put(&key, "s", &values), Ok(true));
    // Another salt (device, dtype, version) is another entry.
    assert!(matches!(cache.get(&key, "other"), Ok(None)));
    let back = cache.get(&key, "s").unwrap().expect("stored");
    assert_eq!(back.len(), values.len());
    let Value::Latent(l) = &back[0] else { panic!() };
    assert!(same(&l.samples, &latent.samples) && same(l.noise_mask.as_ref().unwrap(), latent.noise_mask.as_ref().unwrap()));
    assert_eq!(l.batch_index, latent.batch_index);
    for k in 1..4 {
        let (Value::Image(a) | Value::Mask(a) | Value::Sigmas(a), Value::Image(b) | Value::Mask(b) | Value::Sigmas(b)) = (&back[k], &values[k]) else {
            panic!()
        };
        assert!(same(a, b), "value {k}");
    }
    assert!(matches!(back[4], Value::Int(i) if i == u64::MAX as i128));
    assert!(matches!(back[5], Value::Float(f) if f.is_nan()));
    assert!(matches!(&back[6], Value::String(s) if s == "ü\n"));
    assert!(matches!(back[7], Value::Boolean(true)));
    let (Value::Conditioning(got), Value::Conditioning(want)) = (&back[8], &values[8]) else { panic!() };
    for (g, w) in got.iter().zip(want) {
        assert!(same(&g.cross_attn, &w.cross_attn));
        assert_eq!(g.pooled.is_some(), w.pooled.is_some());
        assert_eq!(g.area, w.area);
        assert_eq!(g.timestep_range, w.timestep_range);
        assert_eq!(g.unclip.len(), w.unclip.len());
    }
    assert!(same(got[0].pooled.as_ref().unwrap(), want[0].pooled.as_ref().unwrap()));
    assert!(same(&got[0].unclip[0].image_embeds, &want[0].unclip[0].image_embeds) && got[0].unclip[0].strength == 0.7);
    assert!(matches!(&back[9], Value::List(items) if matches!(items[..], [Value::Int(1), Value::Int(-2)])));
}

#[test]
fn models_and_conditioning_with_models_are_not_stored() {
    let d = tmp();
    let cache = DiskCache::open(d.path(), 1 << 30).unwrap();
    assert_eq!(cache.put(&[1; 32], "s", &[Value::Model(Handle::new(3u8, 1, "m"))]), Ok(false));
    let mut cond = CondEntry::new(Tensor::zeros([1, 2, 3], (Kind::Float, Device::Cpu)));
    cond.control = Some(Handle::new(3u8, 1, "cn"));
    assert_eq!(cache.put(&[2; 32], "s", &[Value::Conditioning(vec![cond])]), Ok(false));
    assert!(matches!(cache.get(&[2; 32], "s"), Ok(None)));
}

/// Every `.safetensors` entry under the cache.
fn entries(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(d.join("v1")).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "safetensors") {
                out.push(f.path());
            }
        }
    }
    out
}

#[test]
fn a_damaged_entry_is_refused_and_deleted() {
    let d = tmp();
    let cache = DiskCache::open(d.path(), 1 << 30).unwrap();
    let v = vec![Value::Image(Shared(Tensor::rand([1, 8, 8, 3], (Kind::Float, Device::Cpu))))];
    for damage in ["truncate", "flip"] {
        cache.put(&[9; 32], "s", &v).unwrap();
        let [path] = &entries(d.path())[..] else { panic!("one entry") };
        let mut bytes = std::fs::read(path).unwrap();
        if damage == "truncate" {
            bytes.truncate(bytes.len() - 10);
        } else {
            let n = bytes.len() - 5;
            bytes[n] ^= 0x40;
        }
        std::fs::write(path, bytes).unwrap();
        let err = cache.get(&[9; 32], "s").expect_err(damage);
        assert!(err.contains("corrupt cache entry"), "{err}");
        assert!(!path.exists(), "{damage}: the entry is deleted");
        assert!(matches!(cache.get(&[9; 32], "s"), Ok(None)));
    }
}

#[test]
fn the_directory_keeps_within_its_bound_dropping_the_least_recently_used() {
    let d = tmp();
    let one = vec![Value::Image(Shared(Tensor::zeros([1, 32, 32, 3], (Kind::Float, Device::Cpu))))];
    // Room for two entries of about 12 KiB each, not three.
    let cache = DiskCache::open(d.path(), 30_000).unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(100);
    cache.put(&[1; 32], "s", &one).unwrap();
    cache.put(&[2; 32], "s", &one).unwrap();
    for p in entries(d.path()) {
        std::fs::File::options().append(true).open(&p).unwrap().set_modified(old).unwrap();
    }
    // Reading entry 1 makes it recent; entry 3 then pushes out entry 2.
    assert!(cache.get(&[1; 32], "s").unwrap().is_some());
    cache.put(&[3; 32], "s", &one).unwrap();
    assert_eq!(entries(d.path()).len(), 2);
    assert!(cache.get(&[1; 32], "s").unwrap().is_some());
    assert!(cache.get(&[2; 32], "s").unwrap().is_none());
    assert!(cache.get(&[3; 32], "s").unwrap().is_some());
}

/// `x * factor` on an IMAGE of ones; counts its calls.
struct Scale(Rc<Cell<usize>>);
impl Node for Scale {
    fn schema(&self) -> Schema {
        Schema::new("Scale", "test").input("factor", Float::new(1.0)).optional("image", ValueType::Image).output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        self.0.set(self.0.get() + 1);
        let base = match a.get("image") {
            Some(Value::Image(t)) => t.0.shallow_clone(),
            _ => Tensor::ones([1, 2, 2, 3], (Kind::Float, Device::Cpu)),
        };
        Ok(vec![Value::Image(Shared(base * a.float("factor")?))])
    }
}

/// An output node that records the mean of what it gets.
struct Out(Rc<Cell<f64>>);
impl Node for Out {
    fn schema(&self) -> Schema {
        Schema::new("Out", "test").input("image", ValueType::Image).input("name", Str::new("x")).output_node()
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        self.0.set(a.image("image")?.mean(Kind::Double).double_value(&[]));
        Ok(vec![])
    }
}

#[test]
fn a_second_process_runs_only_what_changed() {
    let d = tmp();
    let (calls, seen) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0.0)));
    let mut reg = Registry::new();
    reg.register(Rc::new(Scale(calls.clone())), Origin::Builtin).unwrap();
    reg.register(Rc::new(Out(seen.clone())), Origin::Builtin).unwrap();
    let graph = |f: f64| {
        let text = format!(
            r#"(version: 1, nodes: {{"a": (type: "Scale", inputs: {{"factor": 2.0}}), "b": (type: "Scale", inputs: {{"image": Link("a", "IMAGE"), "factor": {f:?}}}),
            "o": (type: "Out", inputs: {{"image": Link("b", "IMAGE")}})}})"#
        );
        let file = Path::new("g.ron");
        validate(file, &parse(file, &text).unwrap(), &reg).unwrap()
    };
    // Each executor stands for a new process: an empty memory cache over the shared directory.
    let process = || {
        let mut o = RunOptions::new(Device::Cpu, "unused");
        o.disk_cache = Some(Arc::new(DiskCache::open(d.path(), 1 << 30).unwrap()));
        Executor::new(o, 1 << 20)
    };
    assert_eq!(process().run(&graph(3.0)).ran(), ["a", "b", "o"]);
    assert_eq!((calls.get(), seen.get()), (2, 6.0));
    // Nothing changed: only the output node runs, on the stored result.
    let r = process().run(&graph(3.0));
    assert_eq!(r.ran(), ["o"]);
    assert_eq!((calls.get(), seen.get()), (2, 6.0));
    assert!(r.to_string().contains("from the disk cache"));
    // An edit re-runs the edited node from the stored result of the one before it.
    assert_eq!(process().run(&graph(5.0)).ran(), ["b", "o"]);
    assert_eq!((calls.get(), seen.get()), (3, 10.0));
    // Damaged entries are reported, deleted and recomputed (b's, then a's, which b now needs).
    for p in entries(d.path()) {
        std::fs::write(&p, b"not a cache entry").unwrap();
    }
    let r = process().run(&graph(5.0));
    assert!(r.error.is_none());
    assert_eq!(r.ran(), ["a", "b", "o"]);
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert_eq!((calls.get(), seen.get()), (5, 10.0));
    assert_eq!(process().run(&graph(5.0)).ran(), ["o"], "stored afresh");
}

#[test]
fn the_build_id_is_the_executables_content() {
    // Not the version number: a rebuilt binary must not read what an older build of that version wrote.
    let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(build_id(), &blake3::hash(&exe).to_hex()[..16]);
    assert_ne!(build_id(), env!("CARGO_PKG_VERSION"));
    assert_eq!(build_id(), build_id());
}
