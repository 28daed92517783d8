//! First image from a cold start: process start → PNG written, txt2img 512², 20 Euler steps, cfg 7,
//! on the full-size random SD 1.5 checkpoint (fp16 on disk, fp32 compute on the CPU), for `diffloom
//! run graphs/txt2img.ron` and for diffusers' StableDiffusionPipeline (tests/bench/coldstart_reference.py)
//! in the same run, each a fresh process; diffloom with its disk cache off (a cold start). Prints wall
//! times, their ratio, each side's phases and peak resident memory against the weights; not a timed test.
//!
//! Run: scripts/bench.sh coldstart   (targets: diffloom clearly ahead; peak ≤ weights + 1.5 GiB)

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::synthetic::full_config;

fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let ckpt = root.join("models/bench/full-sd1.safetensors");
    assert!(ckpt.exists(), "{} is missing: scripts/bench.sh coldstart makes it", ckpt.display());
    let out = tempfile::tempdir().unwrap();
    let steps = std::env::var("DIFFLOOM_BENCH_STEPS").unwrap_or_else(|_| "20".into());

    // Weights as loaded: fp32 on the CPU.
    let config = full_config(Family::Sd1);
    let weights = {
        let file = diffloom_nodes::checkpoint::load::CheckpointFile::open(&ckpt).expect("open");
        let (u, c, v) = file.bytes_of_parts(tch::Kind::Float);
        (u + c + v) as f64
    };

    let started = Instant::now();
    let ours = Command::new(env!("CARGO_BIN_EXE_diffloom"))
        .args(["run", root.join("graphs/txt2img.ron").to_str().unwrap(), "-o"])
        .arg(out.path().join("diffloom"))
        .args(["--no-disk-cache", "-v", "--set"])
        .arg(format!("ckpt={}", ckpt.display()))
        .args(["--set", &format!("steps={steps}"), "--set", "width=512", "--set", "height=512"])
        .output()
        .unwrap();
    let ours_s = started.elapsed().as_secs_f64();
    let report = String::from_utf8_lossy(&ours.stdout);
    assert!(ours.status.success(), "diffloom: {report}\n{}", String::from_utf8_lossy(&ours.stderr));
    let peak: f64 = report
        .lines()
        .find_map(|l| l.trim().strip_prefix("peak resident memory "))
        .and_then(|v| v.trim_end_matches(" GiB").parse::<f64>().ok())
        .map_or(f64::NAN, |g| g * (1u64 << 30) as f64);

    let cfg_path = out.path().join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string(&config).unwrap()).unwrap();
    let py = root.join(".venv/bin/python");
    let started = Instant::now();
    let theirs = Command::new(&py)
        .arg(root.join("tests/bench/coldstart_reference.py"))
        .arg(&ckpt)
        .arg(&cfg_path)
        .arg(out.path().join("diffusers.png"))
        .env("DIFFLOOM_STEPS", &steps)
        .output()
        .unwrap();
    let theirs_s = started.elapsed().as_secs_f64();
    let line = String::from_utf8_lossy(&theirs.stdout);
    let phases: serde_json::Value = line
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("coldstart_reference.py: {line}\n{}", String::from_utf8_lossy(&theirs.stderr)));

    println!("cold start → PNG, txt2img 512², {steps} steps, full-size SD 1.5, CPU fp32 ({} threads)", tch::get_num_threads());
    println!("  diffloom   {ours_s:>8.1} s   peak RSS {:.2} GiB (weights {:.2} GiB + {:.2} GiB)", gib(peak), gib(weights), gib(peak - weights));
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        println!("      {line}");
    }
    let their_peak = phases["peak_rss"].as_f64().unwrap_or(f64::NAN);
    println!(
        "  diffusers  {theirs_s:>8.1} s   peak RSS {:.2} GiB   (imports {:.1} s, load {:.1} s, pipeline {:.1} s, save {:.2} s)",
        gib(their_peak),
        phases["import_s"].as_f64().unwrap_or(f64::NAN),
        phases["load_s"].as_f64().unwrap_or(f64::NAN),
        phases["generate_s"].as_f64().unwrap_or(f64::NAN),
        phases["save_s"].as_f64().unwrap_or(f64::NAN)
    );
    println!("  ratio diffloom / diffusers: {:.3}× (time), {:.3}× (peak memory)", ours_s / theirs_s, peak / their_peak);
}
