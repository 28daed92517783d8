//! GPU benchmark, run by `scripts/gpu_check.sh` on a machine with a GPU: the full-size SD 1.5 UNet's
//! iterations per second in fp16 at 512² and 1024² (64² and 128² latents), batch 1 and 2, for diffloom
//! and for diffusers (tests/bench/gpu_reference.py on the machine's own PyTorch: channels-last, SDPA's
//! flash/efficient kernels, cuDNN benchmark mode) in the same run, as a table with ratios.
//!
//! Run: gpu_bench CKPT [ITERS]

use std::process::Command;
use std::time::Instant;

use diffloom_nodes::checkpoint::load::load_checkpoint;
use tch::{Device, Kind, Tensor};

const SHAPES: [(i64, i64); 4] = [(64, 1), (64, 2), (128, 1), (128, 2)];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let Some(ckpt) = args.first() else {
        eprintln!("usage: gpu_bench CKPT [ITERS]");
        std::process::exit(2);
    };
    let iters: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    assert!(tch::Cuda::is_available(), "no GPU visible to libtorch");
    tch::Cuda::cudnn_set_benchmark(true);
    let dev = Device::Cuda(0);
    let _g = tch::no_grad_guard();
    let ck = load_checkpoint(std::path::Path::new(ckpt), dev, Kind::Half).expect("load");
    let unet = ck.unet.expect("a UNet");
    let mut ours = Vec::new();
    for (side, batch) in SHAPES {
        let x = Tensor::randn([batch, 4, side, side], (Kind::Half, dev));
        let t = Tensor::full([batch], 500.0, (Kind::Float, dev));
        let ctx = Tensor::randn([batch, 77, 768], (Kind::Half, dev));
        for _ in 0..3 {
            let _ = unet.model.forward(&x, &t, &ctx);
        }
        tch::Cuda::synchronize(0);
        let start = Instant::now();
        for _ in 0..iters {
            let _ = unet.model.forward(&x, &t, &ctx);
        }
        tch::Cuda::synchronize(0);
        ours.push(iters as f64 / start.elapsed().as_secs_f64());
    }
    let py = std::env::var("DIFFLOOM_GPU_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = std::env::var("DIFFLOOM_GPU_REFERENCE").unwrap_or_else(|_| "tests/bench/gpu_reference.py".into());
    let out = Command::new(py).args([&script, ckpt, &iters.to_string()]).output().expect("run the diffusers reference");
    let text = String::from_utf8_lossy(&out.stdout);
    let theirs: Option<serde_json::Value> = text.lines().last().and_then(|l| serde_json::from_str(l).ok());
    if theirs.is_none() {
        eprintln!("gpu_reference.py failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    println!("UNet fp16 iterations per second ({iters} after 3 warm-ups), diffloom vs diffusers:");
    println!("| image | batch | diffloom it/s | diffusers it/s | ratio (target ≥ 1.2) |");
    println!("| --- | --- | --- | --- | --- |");
    for ((side, batch), o) in SHAPES.iter().zip(&ours) {
        let key = format!("{side}x{batch}");
        let t = theirs.as_ref().and_then(|v| v[&key].as_f64());
        let (ts, ratio) = match t {
            Some(t) => (format!("{t:.2}"), format!("{:.2}×", o / t)),
            None => ("n/a".into(), "n/a".into()),
        };
        println!("| {}² | {batch} | {o:.2} | {ts} | {ratio} |", side * 8);
    }
}
