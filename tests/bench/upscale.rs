//! Upscale-model benchmark: a 4× RRDBNet (Real-ESRGAN x4plus's width, 64 features; 2 blocks instead of
//! 23, which changes the time but hardly the memory, dominated by the full-resolution layers) on
//! 512×512 and 1024×1024 images. diffloom runs it as ImageUpscaleWithModel does (512 tiles, 32 overlap);
//! the reference is spandrel running the same file untiled, as a program without tiling would. Each run
//! is a child process, so its peak resident memory is its own. Prints figures; it is not a timed test.
//!
//! Run: scripts/bench.sh upscale   (target: the 4× upscale of 1024² runs tiled in bounded memory)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use diffloom_nodes::builtin::image::upscale_tiled;
use diffloom_nodes::checkpoint::load::load_upscale_model;
use diffloom_nodes::checkpoint::synthetic::write_rrdbnet;
use diffloom_nodes::models::rrdbnet::RrdbConfig;
use tch::{Device, Kind, Tensor};

fn peak_rss() -> u64 {
    diffloom_nodes::builtin::loaders::peak_rss().unwrap_or(0)
}

fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

/// In this (child) process: upscale a `size`² image tiled; print seconds and the peak RSS increase.
fn upscale_only(model: &Path, size: i64) {
    let (net, _) = load_upscale_model(model, Device::Cpu, Kind::Float).expect("load");
    tch::manual_seed(0);
    let image = Tensor::rand([1, 3, size, size], (Kind::Float, Device::Cpu));
    let cancel = AtomicBool::new(false);
    let cx = diffloom_core::Ctx {
        device: Device::Cpu,
        node_id: "upscale",
        files: diffloom_core::Locator {
            graph_dir: std::path::Path::new("."),
            folders: &diffloom_core::Folders::default(),
            output_dir: std::path::Path::new("."),
        },
        output_dir: std::path::Path::new("."),
        image_texts: &|_, _| Vec::new(),
        cancel: &cancel,
        dtype: Kind::Float,
        messages: Vec::new(),
        ui: serde_json::Map::new(),
        progress: &|_, _, _| {},
        registry: &diffloom_core::Registry::new(),
    };
    let before = peak_rss();
    let started = Instant::now();
    let _g = tch::no_grad_guard();
    let out = upscale_tiled(&net, &image, &cx, 512, 32).expect("upscale");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(out.size(), [1, 3, size * 4, size * 4]);
    println!("{seconds} {}", peak_rss() - before);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if args.first().map(String::as_str) == Some("upscale-only") {
        upscale_only(Path::new(&args[1]), args[2].parse().expect("size"));
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/bench/rrdbnet-x4-nf64-nb2.safetensors");
    if !model.exists() {
        std::fs::create_dir_all(model.parent().unwrap()).unwrap();
        let config = RrdbConfig { in_nc: 3, out_nc: 3, nf: 64, gc: 32, nb: 2, upsamples: 2, shuffle: 1 };
        write_rrdbnet(&model, &config, false, 1).expect("write model");
    }
    let exe = std::env::current_exe().unwrap();
    let python = root.join(".venv/bin/python");
    println!("4× RRDBNet (64 features, 2 blocks), fp32 CPU, {} threads", tch::get_num_threads());
    for size in [512i64, 1024] {
        let out = Command::new(&exe).args(["upscale-only", model.to_str().unwrap(), &size.to_string()]).output().unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        assert_eq!(f.len(), 2, "upscale-only printed {line:?} {}", String::from_utf8_lossy(&out.stderr));
        let output_bytes = (size * 4 * size * 4 * 3 * 4) as f64;
        let r = Command::new(&python).arg(root.join("tests/bench/upscale_reference.py")).arg(&model).arg(size.to_string()).output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap_or_else(|_| panic!("reference: {}", String::from_utf8_lossy(&r.stderr)));
        let (rs, rp) = (json["seconds"].as_f64().unwrap(), json["peak_rss"].as_f64().unwrap());
        println!(
            "  {size}² → {}²: diffloom tiled {:>6.1} s, peak RSS +{:.2} GiB (output image {:.2} GiB) | spandrel untiled {:>6.1} s, peak RSS +{:.2} GiB | memory {:.2}×, time {:.2}× the reference",
            size * 4,
            f[0],
            gib(f[1]),
            gib(output_bytes),
            rs,
            gib(rp),
            f[1] / rp,
            f[0] / rs
        );
    }
}
