//! Model benchmark on a full-size SD 1.5 single-file checkpoint (random weights, the real key layout):
//! checkpoint load time against reading the file, peak resident memory during load against the size of
//! the weights, and UNet forward time (batch 2, 64×64 latents) and VAE decode time (one 64×64 latent:
//! a 512² image) for diffloom and diffusers in the same run, fp32 and bf16. Prints figures; it is not
//! a timed test.
//!
//! Run: scripts/bench.sh models   (targets: forward ≤ 1.0× diffusers; peak memory ≤ 1.3× weights)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use diffloom_nodes::checkpoint::load::load_checkpoint;
use tch::{Device, Kind, Tensor};

const REPS: usize = 3;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
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

fn unet_forward(path: &Path, kind: Kind) -> Duration {
    let ck = load_checkpoint(path, Device::Cpu, kind).expect("load");
    let unet = ck.unet.expect("unet");
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let x = Tensor::randn([2, 4, 64, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
    let t = Tensor::from_slice(&[500f32, 500.0]);
    let ctx = Tensor::randn([2, 77, 768], (Kind::Float, Device::Cpu)).to_kind(kind);
    let _ = unet.forward(&x, &t, &ctx);
    median(
        (0..REPS)
            .map(|_| {
                let s = Instant::now();
                let _ = unet.forward(&x, &t, &ctx);
                s.elapsed()
            })
            .collect(),
    )
}

fn vae_decode(path: &Path, kind: Kind) -> Duration {
    let ck = load_checkpoint(path, Device::Cpu, kind).expect("load");
    let vae = ck.vae.expect("vae");
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let z = Tensor::randn([1, 4, 64, 64], (Kind::Float, Device::Cpu)).to_kind(kind);
    let _ = vae.decode(&z);
    median(
        (0..REPS)
            .map(|_| {
                let s = Instant::now();
                let _ = vae.decode(&z);
                s.elapsed()
            })
            .collect(),
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

    let ours32 = unet_forward(&ckpt, Kind::Float);
    let ours16 = unet_forward(&ckpt, Kind::BFloat16);
    let (vae32, vae16) = (vae_decode(&ckpt, Kind::Float), vae_decode(&ckpt, Kind::BFloat16));
    let py = root.join(".venv/bin/python");
    let out =
        Command::new(&py).args([root.join("tests/bench/unet_reference.py").to_str().unwrap(), ckpt.to_str().unwrap(), &REPS.to_string()]).output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout);
    let reference: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|_| panic!("unet_reference.py: {line} {}", String::from_utf8_lossy(&out.stderr)));
    let (ref32, ref16) = (reference["fp32_s"].as_f64().unwrap(), reference["bf16_s"].as_f64().unwrap());
    println!("UNet forward, batch 2, 64×64 latents, median of {REPS} (diffusers with {} threads):", reference["threads"]);
    for (name, ours, theirs) in [("fp32", ours32.as_secs_f64(), ref32), ("bf16", ours16.as_secs_f64(), ref16)] {
        println!("  {name}: diffloom {ours:>7.2} s   diffusers {theirs:>7.2} s   ratio {:.3}× (target ≤ 0.8×)", ours / theirs);
    }
    let (refv32, refv16) = (reference["vae_fp32_s"].as_f64().unwrap(), reference["vae_bf16_s"].as_f64().unwrap());
    println!("VAE decode, one 64×64 latent (a 512² image), median of {REPS}:");
    for (name, ours, theirs) in [("fp32", vae32.as_secs_f64(), refv32), ("bf16", vae16.as_secs_f64(), refv16)] {
        println!("  {name}: diffloom {ours:>7.2} s   diffusers {theirs:>7.2} s   ratio {:.3}× (target ≤ 0.8×)", ours / theirs);
    }
}
