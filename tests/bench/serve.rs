//! `diffloom serve` latency on an idle server (tiny SD1 model, the API test workflow): from
//! `POST /prompt` to the client's `execution_start`, and a cached re-queue of the same prompt (which
//! executes nothing) from POST to `execution_success`, against the same graph re-run cached in-process
//! by an executor (the reference measured in the same run). Prints figures; it is not a timed test.
//!
//! Run: scripts/bench.sh serve

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diffloom_core::validate::validate;
use diffloom_core::{Executor, RunOptions};
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

fn until(ws: &mut WebSocket<MaybeTlsStream<TcpStream>>, kind: &str) {
    loop {
        if let Message::Text(t) = ws.read().expect("ws") {
            let v: Value = serde_json::from_str(&t).expect("json");
            if v["type"] == kind {
                return;
            }
        }
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("models/checkpoints/SD1.5")).unwrap();
    let ckpt = d.join("models/checkpoints/SD1.5/tiny-sd1.safetensors");
    use diffloom_nodes::checkpoint::detect::Family;
    use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
    write_checkpoint(&ckpt, &tiny_config(Family::Sd1, false), tch::Kind::Float, 1, true).unwrap();
    let mut folders = diffloom_core::Folders { input_dir: d.join("input"), ..Default::default() };
    folders.add_models_dir(&d.join("models"));
    let config = diffloom_server::Config {
        folders: folders.clone(),
        output_dir: d.join("output"),
        graphs_dir: d.to_path_buf(),
        user_dir: d.join("user"),
        frontend_root: None,
        token: None,
        device: tch::Device::Cpu,
        dtype: None,
        cache_bytes: 1 << 30,
        registry: Arc::new(diffloom_nodes::registry),
        max_body: 1 << 20,
        preview_method: "none".to_owned(),
        queue: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(diffloom_server::serve(config, listener));
    let prompt: Value = serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/comfy/api.json")).unwrap()).unwrap();
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws?clientId=bench")).expect("ws");
    until(&mut ws, "status");
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let post = |p: &Value| {
        agent
            .post(&format!("http://{addr}/prompt"))
            .header("Content-Type", "application/json")
            .send(json!({"prompt": p, "client_id": "bench"}).to_string())
            .expect("post");
    };

    // Distinct seeds: each prompt runs the sampler; only the start latency is measured.
    let mut start = Vec::new();
    for seed in 0..20 {
        let mut p = prompt.clone();
        p["3"]["inputs"]["seed"] = json!(1000 + seed);
        let t = Instant::now();
        post(&p);
        until(&mut ws, "execution_start");
        start.push(t.elapsed());
        until(&mut ws, "execution_success");
    }
    // The same prompt again and again: everything cached.
    post(&prompt);
    until(&mut ws, "execution_success");
    let mut cached = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        post(&prompt);
        until(&mut ws, "execution_success");
        cached.push(t.elapsed());
    }

    // Reference: the same graph, cached, re-run by an executor in this process.
    let registry = diffloom_nodes::registry();
    let map = prompt.as_object().unwrap();
    let path = d.join("prompt");
    let mut reference_folders = folders;
    reference_folders.confined = true;
    let graph = diffloom_comfy::graph_from_prompt(map, &registry, &path).unwrap();
    let resolved = validate(&path, &graph, &registry).unwrap();
    let mut options = RunOptions::new(tch::Device::Cpu, d.join("ref-output"));
    options.folders = reference_folders;
    let mut exec = Executor::new(options, 1 << 30);
    assert!(exec.run(&resolved).error.is_none());
    let mut reference = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let g = diffloom_comfy::graph_from_prompt(map, &registry, &path).unwrap();
        let r = validate(&path, &g, &registry).unwrap();
        assert!(exec.run(&r).error.is_none());
        reference.push(t.elapsed());
    }
    let (s, c, r) = (median(start), median(cached), median(reference));
    println!("serve, tiny SD1 workflow (7 nodes), medians of 20 on an idle server:");
    println!("  POST /prompt → execution_start        {:8.2} ms", ms(s));
    println!("  cached re-queue, POST → success        {:8.2} ms", ms(c));
    println!("  reference: convert + validate + cached run in-process {:8.2} ms", ms(r));
    println!("  ratio cached re-queue / reference      {:8.2}×", c.as_secs_f64() / r.as_secs_f64());
}
