//! `diffloom watch` on the tiny model: latency from a save to the start of re-execution, and the time of
//! a re-run after changing only the seed against a cold run. Prints figures; it is not a timed test.
//!
//! Run: scripts/bench.sh watch

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};

/// The total of a run report ("N nodes: … , 123.4 ms in all"), in ms.
fn total_ms(block: &[String]) -> f64 {
    let line = block.iter().find(|l| l.contains(" in all")).expect("report line");
    let v: Vec<&str> = line.rsplit(", ").next().unwrap_or("").split_whitespace().collect();
    let x: f64 = v[0].parse().unwrap_or(f64::NAN);
    match v.get(1).copied() {
        Some("s") => x * 1e3,
        Some("µs") => x / 1e3,
        _ => x,
    }
}

fn graph(root: &Path, ckpt: &Path, seed: u32) -> String {
    std::fs::read_to_string(root.join("graphs/txt2img.ron"))
        .expect("txt2img.ron")
        .replace("\"../models/test/tiny-sd1.safetensors\"", &format!("{:?}", ckpt.display().to_string()))
        .replace("\"seed\": 42", &format!("\"seed\": {seed}"))
        .replace("\"width\": 512", "\"width\": 256")
        .replace("\"height\": 512", "\"height\": 256")
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("temp dir");
    let ckpt = dir.path().join("tiny.safetensors");
    write_checkpoint(&ckpt, &tiny_config(Family::Sd1, false), tch::Kind::Float, 1, true).expect("tiny model");
    let g = dir.path().join("t2i.ron");
    std::fs::write(&g, graph(&root, &ckpt, 1)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffloom"))
        .args(["watch", g.to_str().unwrap(), "-o", dir.path().join("out").to_str().unwrap(), "--debounce-ms", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn diffloom watch");
    let (tx, rx) = channel::<(String, Instant)>();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send((line, Instant::now()));
        }
    });
    let block = |rx: &std::sync::mpsc::Receiver<(String, Instant)>| -> (Vec<String>, Instant) {
        let mut lines = Vec::new();
        let mut header_at = Instant::now();
        loop {
            let (line, at) = rx.recv_timeout(Duration::from_secs(120)).expect("watch output");
            if line.starts_with("== run") {
                header_at = at;
            }
            if line.starts_with("watching ") {
                return (lines, header_at);
            }
            lines.push(line);
        }
    };
    let (cold, _) = block(&rx);
    let cold_ms = total_ms(&cold);
    let mut latencies = Vec::new();
    let mut reruns = Vec::new();
    for seed in 2..7 {
        std::thread::sleep(Duration::from_millis(300));
        let saved = Instant::now();
        std::fs::write(&g, graph(&root, &ckpt, seed)).unwrap();
        let (run, started) = block(&rx);
        latencies.push(started.duration_since(saved).as_secs_f64() * 1e3);
        reruns.push(total_ms(&run));
    }
    let _ = child.kill();
    let _ = child.wait();
    latencies.sort_by(f64::total_cmp);
    reruns.sort_by(f64::total_cmp);
    let (lat, rerun) = (latencies[latencies.len() / 2], reruns[reruns.len() / 2]);
    println!("diffloom watch, tiny SD1 txt2img 256×256, 20 steps (median of {}):", reruns.len());
    println!("  save → re-execution starts   {lat:>8.1} ms  (includes the 50 ms debounce)");
    println!("  cold run                     {cold_ms:>8.1} ms");
    println!("  re-run after a seed change   {rerun:>8.1} ms  ({:.2}× the cold run: checkpoint and prompts come from the cache)", rerun / cold_ms);
}
