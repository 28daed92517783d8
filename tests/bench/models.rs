//! Model benchmark on a full-size SD 1.5 single-file checkpoint (random weights, the real key layout):
//! checkpoint load time against reading the file, peak resident memory during load against the size of
//! the weights, and UNet forward time (batch 2, 64×64 latents) and VAE decode time (one 64×64 latent:
//! a 512² image) for diffloom and diffusers in the same run, fp32 and bf16: each diffloom call is
//! followed by one of diffusers' (`unet_reference.py`, kept running), so both sides meet the same
//! machine conditions, and the ratio is the median of the pairs' ratios. Prints figures; it is not a
//! timed test.
//!
//! Run: scripts/bench.sh models   (targets: forward ≤ 1.0× diffusers; peak memory ≤ 1.3× weights)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use diffloom_nodes::checkpoint::load::load_checkpoint;
use tch::{Device, Kind, Tensor};

/// Timed pairs (diffloom call, diffusers call) per measurement, after one warm-up call each.
const REPS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss() -> u64 {
    diffloom_nodes::builtin::loaders::peak_rss().unwrap_or(0)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// In a child process (so the peak is the load's alone): load `path` as `kind`, print bytes and peak.
fn load_only(path: &Path, kind: Kind) {
    let before = peak_rss();
    let t = Instant::now();
    let ck = load_checkpoint(path, Device::Cpu, kind).expect("load");
    println!("{} {} {} {}", t.elapsed().as_secs_f64(), ck.bytes, before, peak_rss());
}

/// diffusers' side, `unet_reference.py` running beside: one timed call per request.
struct Reference {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    threads: serde_json::Value,
}

impl Reference {
    fn start(root: &Path, ckpt: &Path) -> Reference {
        let script = root.join("tests/bench/unet_reference.py");
        let mut child = Command::new(root.join(".venv/bin/python"))
            .args([script.as_os_str(), ckpt.as_os_str()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unet_reference.py");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut r = Reference { child, out, threads: serde_json::Value::Null };
        r.threads = r.line()["threads"].clone();
        r
    }

    fn line(&mut self) -> serde_json::Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        serde_json::from_str(line.trim()).unwrap_or_else(|_| panic!("unet_reference.py said {line:?} (its errors are above)"))
    }

    /// One timed call of diffusers' `part` ("unet" or "vae") in `dtype` ("fp32" or "bf16").
    fn time(&mut self, part: &str, dtype: &str) -> f64 {
        use std::io::Write;
        writeln!(self.child.stdin.as_mut().unwrap(), "{part} {dtype}").unwrap();
        self.line()["s"].as_f64().unwrap()
    }
}

/// Alternates `ours` with diffusers' same call, REPS timed pairs after a warm-up each: the medians of
/// each side and the median of the pairs' ratios.
fn paired(mut ours: impl FnMut(), reference: &mut Reference, part: &str, dtype: &str) -> (f64, f64, f64) {
    ours();
    let (mut a, mut b, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..REPS {
        let s = Instant::now();
        ours();
        let mine = s.elapsed().as_secs_f64();
        let theirs = reference.time(part, dtype);
        a.push(mine);
        b.push(theirs);
        ratios.push(mine / theirs);
    }
    (median(a), median(b), median(ratios))
}

fn unet_pairs(path: &Path, kind: Kind, reference: &mut Reference, dtype: &str) -> (f64, f64, f64) {
    let ck = load_checkpoint(path, Device::Cpu, kind).expect("load");
    let unet = ck.unet.expect("unet");
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let x = Tensor::randn([2, 4, 64, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
    let t = Tensor::from_slice(&[500f32, 500.0]);
    let ctx = Tensor::randn([2, 77, 768], (Kind::Float, Device::Cpu)).to_kind(kind);
    paired(
        || {
            let _ = unet.forward(&x, &t, &ctx);
        },
        reference,
        "unet",
        dtype,
    )
}

fn vae_pairs(path: &Path, kind: Kind, reference: &mut Reference, dtype: &str) -> (f64, f64, f64) {
    let ck = load_checkpoint(path, Device::Cpu, kind).expect("load");
    let vae = ck.vae.expect("vae");
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let z = Tensor::randn([1, 4, 64, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
    paired(
        || {
            let _ = vae.decode(&z);
        },
        reference,
        "vae",
        dtype,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if args.first().map(String::as_str) == Some("load-only") {
        load_only(Path::new(&args[1]), if args[2] == "bf16" { Kind::BFloat16 } else { Kind::Float });
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ckpt = root.join("models/bench/full-sd1.safetensors");
    assert!(ckpt.exists(), "{} is missing: scripts/bench.sh models makes it", ckpt.display());
    let size = std::fs::metadata(&ckpt).unwrap().len();

    let t = Instant::now();
    let bytes = std::fs::read(&ckpt).unwrap();
    let read = t.elapsed();
    drop(bytes);
    println!("full-size SD 1.5 checkpoint (fp16 on disk, {:.2} GiB), {} threads", gib(size), tch::get_num_threads());
    println!("  read the file                {:>8.2} s", read.as_secs_f64());
    let exe = std::env::current_exe().unwrap();
    for (name, kind) in [("fp32", "fp32"), ("bf16", "bf16")] {
        let out = Command::new(&exe).args(["load-only", ckpt.to_str().unwrap(), kind]).output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        assert_eq!(f.len(), 4, "load-only printed {line:?} {}", String::from_utf8_lossy(&out.stderr));
        println!(
            "  load as {name}                 {:>8.2} s ({:.2}× reading the file); weights {:.2} GiB, peak RSS {:.2} GiB ({:.2}× the weights)",
            f[0],
            f[0] / read.as_secs_f64(),
            gib(f[1] as u64),
            gib(f[3] as u64),
            f[3] / f[1]
        );
    }

    let mut reference = Reference::start(&root, &ckpt);
    println!("UNet forward, batch 2, 64×64 latents, {REPS} alternating pairs, medians (diffusers with {} threads):", reference.threads);
    for (name, kind) in [("fp32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let (ours, theirs, ratio) = unet_pairs(&ckpt, kind, &mut reference, name);
        println!("  {name}: diffloom {ours:>7.2} s   diffusers {theirs:>7.2} s   ratio {ratio:.3}× (target ≤ 0.8×)");
    }
    println!("VAE decode, one 64×64 latent (a 512² image), {REPS} alternating pairs, medians:");
    for (name, kind) in [("fp32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let (ours, theirs, ratio) = vae_pairs(&ckpt, kind, &mut reference, name);
        println!("  {name}: diffloom {ours:>7.2} s   diffusers {theirs:>7.2} s   ratio {ratio:.3}× (target ≤ 0.8×)");
    }
    drop(reference.child.stdin.take());
    let _ = reference.child.wait();
}
