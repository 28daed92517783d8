//! ControlNet cost on full-size SD 1.5 (random weights, real key layout): the time of one CFG sampling
//! step (batch 2, 64×64 latents: a 512×512 image) with no, one and two ControlNets, as ratios to the
//! plain UNet step measured in the same run, and each configuration's peak resident memory (each in a
//! child process, so the peak is its own). Prints figures; it is not a timed test.
//!
//! Run: scripts/bench.sh controlnet   (expectation: one ControlNet ≈ 1.4× the plain step, it is about
//! 40% of a UNet; two ≈ 1.8×)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use diffloom_nodes::checkpoint::control::{load_control, ControlModel};
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::checkpoint::synthetic::{tiny_controlnet_config, write_controlnet};
use diffloom_nodes::models::unet::{Residuals, UnetConfig};
use tch::{Device, Kind, Tensor};

const REPS: usize = 3;

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// In this process: load the model and `n` ControlNets, time the step, print seconds and peak RSS.
fn step(ckpt: &Path, controlnet: &Path, n: usize) {
    let unet = load_checkpoint(ckpt, Device::Cpu, Kind::Float).expect("load").unet.expect("unet");
    let nets: Vec<_> = (0..n)
        .map(|_| match load_control(controlnet, Device::Cpu, Kind::Float, None).expect("controlnet").0 {
            ControlModel::ControlNet(c) => c,
            ControlModel::Adapter(_) => panic!("not a ControlNet"),
        })
        .collect();
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let x = Tensor::randn([2, 4, 64, 64], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[500f32, 500.0]);
    let ctx = Tensor::randn([2, 77, 768], (Kind::Float, Device::Cpu));
    let hint = Tensor::rand([1, 3, 512, 512], (Kind::Float, Device::Cpu));
    let run = || {
        // The residuals of each ControlNet at strength 1, summed as chained ControlNets are.
        let mut sum: Option<Residuals> = None;
        for net in &nets {
            let r = net.forward(&x, &hint, &t, &ctx);
            sum = Some(match sum {
                None => r,
                Some(s) => Residuals {
                    input: Vec::new(),
                    middle: r.middle.zip(s.middle).map(|(a, b)| a + b),
                    output: r.output.into_iter().zip(s.output).map(|(a, b)| a.zip(b).map(|(a, b)| a + b)).collect(),
                },
            });
        }
        let _ = unet.forward_controlled(&x, &t, &ctx, None, sum.as_ref());
    };
    run();
    let mut times: Vec<Duration> = (0..REPS)
        .map(|_| {
            let s = Instant::now();
            run();
            s.elapsed()
        })
        .collect();
    times.sort();
    println!("{} {}", times[REPS / 2].as_secs_f64(), diffloom_nodes::builtin::loaders::peak_rss().unwrap_or(0));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if args.first().map(String::as_str) == Some("step") {
        step(Path::new(&args[1]), Path::new(&args[2]), args[3].parse().expect("count"));
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ckpt = root.join("models/bench/full-sd1.safetensors");
    assert!(ckpt.exists(), "{} is missing: scripts/bench.sh controlnet makes it", ckpt.display());
    // A full-size SD 1.5 ControlNet in ControlNet 1.1's layout, fp16 as released (made once).
    let controlnet = root.join("models/bench/full-controlnet-sd15.safetensors");
    if !controlnet.exists() {
        let tmp = controlnet.with_extension("tmp");
        write_controlnet(&tmp, &tiny_controlnet_config(&UnetConfig::sd1()), Kind::Half, 40).expect("write the ControlNet");
        std::fs::rename(&tmp, &controlnet).unwrap();
    }
    println!(
        "one CFG step (batch 2, 64×64 latents), full-size SD 1.5 + ControlNet ({:.2} GiB fp16 on disk), fp32, {} threads, median of {REPS}",
        gib(std::fs::metadata(&controlnet).unwrap().len()),
        tch::get_num_threads()
    );
    let exe = std::env::current_exe().unwrap();
    let mut plain = 0.0;
    for n in 0..=2usize {
        let out = Command::new(&exe).args(["step", ckpt.to_str().unwrap(), controlnet.to_str().unwrap(), &n.to_string()]).output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        assert_eq!(f.len(), 2, "step printed {line:?} {}", String::from_utf8_lossy(&out.stderr));
        if n == 0 {
            plain = f[0];
        }
        println!("  {n} ControlNet(s): {:>7.2} s per step  ({:.2}× the plain step), peak memory {:.2} GiB", f[0], f[0] / plain, gib(f[1] as u64));
    }
}
