//! CUDA checks, run by `scripts/gpu_check.sh` on a machine with a GPU (`--ignored`; the CPU-only CI
//! compiles them but cannot run them). Each fails when CUDA is missing: a GPU check that passes
//! without a GPU would say nothing.
//!
//! - device selection and fp16 as the CUDA default, the weights really on the GPU;
//! - a txt2img graph on the GPU in fp32 equal to the CPU's within float tolerance;
//! - ancestral noise drawn on the device as torch draws it there (`torch.Generator("cuda")`, the
//!   machine's own PyTorch computing the reference);
//! - LoRA patching on the device, equal to the CPU's;
//! - a VAE decode that keeps to the GPU's free memory (fewer images at a time, then tiles), and one
//!   too large for the GPU retried in tiles when that estimate is set aside.

use std::path::{Path, PathBuf};
use std::process::Command;

use diffloom_core::graph::file;
use diffloom_core::validate::validate;
use diffloom_core::{Executor, RunOptions, RunReport, Value};
use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
use diffloom_nodes::sd::SdModel;
use tch::{Device, Kind, Tensor};

fn cuda() -> Device {
    assert!(tch::Cuda::is_available(), "CUDA is not available (libtorch sees no GPU): run these checks on a GPU machine");
    Device::Cuda(0)
}

fn tiny(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.safetensors");
    write_checkpoint(&path, &tiny_config(Family::Sd1, false), Kind::Float, 1, true).unwrap();
    path
}

/// Runs RON `nodes` on `device` (`dtype` None: the device's default) and returns the executor, the
/// resolved graph and the report.
fn run(dir: &Path, device: Device, dtype: Option<Kind>, nodes: &str) -> (Executor, diffloom_core::ResolvedGraph, RunReport) {
    let path = dir.join("graph.ron");
    std::fs::write(&path, format!("(version: 1, nodes: {{ {nodes} }})")).unwrap();
    let reg = diffloom_nodes::registry();
    let (_, graph) = file::read(&path).unwrap();
    let resolved = validate(&path, &graph, &reg).unwrap();
    let mut options = RunOptions::new(device, dir.join("out"));
    options.dtype = dtype;
    let mut ex = Executor::new(options, 1 << 34);
    let report = ex.run(&resolved);
    assert!(report.error.is_none(), "{}", report.error.as_ref().unwrap());
    (ex, resolved, report)
}

fn latent(ex: &mut Executor, g: &diffloom_core::ResolvedGraph, id: &str) -> Tensor {
    match ex.cached_output(g, id, 0) {
        Some(Value::Latent(l)) => l.samples.0.to_device(Device::Cpu).to_kind(Kind::Float),
        Some(Value::Image(t)) => t.0.to_device(Device::Cpu).to_kind(Kind::Float),
        other => panic!("{id}: {other:?}"),
    }
}

fn txt2img(ck: &Path, sampler: &str, model: &str, extra: &str) -> String {
    format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}), {extra}
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a lighthouse", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 2}}),
        "s": (type: "KSampler", inputs: {{"model": Link({model}), "seed": 7, "steps": 4, "cfg": 6.0, "sampler_name": {sampler:?},
            "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("s", "LATENT")}}),"#
    )
}

#[test]
#[ignore = "needs a GPU: scripts/gpu_check.sh"]
fn gpu_device_and_fp16_default() {
    let dev = cuda();
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path());
    let (mut ex, g, _) = run(d.path(), dev, None, &txt2img(&ck, "euler", r#""c", "MODEL""#, ""));
    let Some(Value::Model(h)) = ex.cached_output(&g, "c", 0) else { panic!("no model") };
    let m: &SdModel = h.downcast().expect("an SD model");
    let (name, w) = m.unet.state.first().expect("a weight");
    assert_eq!((w.device(), w.kind()), (dev, Kind::Half), "{name}");
    let x = latent(&mut ex, &g, "s");
    assert!(x.isfinite().all().int64_value(&[]) == 1 && x.abs().max().double_value(&[]) > 0.0);
}

#[test]
#[ignore = "needs a GPU: scripts/gpu_check.sh"]
fn gpu_fp32_matches_the_cpu() {
    let dev = cuda();
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path());
    let g = txt2img(&ck, "euler", r#""c", "MODEL""#, "");
    let (mut a, ga, _) = run(d.path(), dev, Some(Kind::Float), &g);
    let (mut b, gb, _) = run(d.path(), Device::Cpu, Some(Kind::Float), &g);
    let e = (latent(&mut a, &ga, "s") - latent(&mut b, &gb, "s")).abs().max().double_value(&[]);
    println!("txt2img, euler, fp32: GPU vs CPU max difference {e:.2e}");
    assert!(e < 1e-3, "{e}");
}

#[test]
#[ignore = "needs a GPU: scripts/gpu_check.sh"]
fn gpu_ancestral_noise_is_torchs_on_the_device() {
    let dev = cuda();
    // diffloom's private CUDA generator against torch's own, on this machine's PyTorch.
    let mut g = diffloom_aten::Generator::new(dev, 12345).unwrap();
    let ours = g.randn(&[2, 4, 8, 8], Kind::Float).unwrap().to_device(Device::Cpu);
    let py = std::env::var("DIFFLOOM_GPU_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import torch\ng = torch.Generator(device='cuda').manual_seed(12345)\nx = torch.randn(2, 4, 8, 8, generator=g, device='cuda')\nprint(' '.join(repr(v) for v in x.flatten().tolist()))";
    let out = Command::new(py).args(["-c", script]).output().expect("run python3 with torch");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: Vec<f32> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(|v| v.parse().unwrap()).collect();
    let ours: Vec<f32> = Vec::try_from(ours.flatten(0, -1)).unwrap();
    assert_eq!(ours, theirs, "the CUDA generator's draws");
    // And through a sampler: euler_ancestral on the GPU runs, differs from euler, stays finite.
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path());
    let (mut a, ga, _) = run(d.path(), dev, Some(Kind::Float), &txt2img(&ck, "euler_ancestral", r#""c", "MODEL""#, ""));
    let (mut b, gb, _) = run(d.path(), dev, Some(Kind::Float), &txt2img(&ck, "euler", r#""c", "MODEL""#, ""));
    let (x, y) = (latent(&mut a, &ga, "s"), latent(&mut b, &gb, "s"));
    assert!(x.isfinite().all().int64_value(&[]) == 1 && (x - y).abs().max().double_value(&[]) > 1e-3);
}

#[test]
#[ignore = "needs a GPU: scripts/gpu_check.sh"]
fn gpu_lora_patching_matches_the_cpu() {
    let dev = cuda();
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path());
    let lora = d.path().join("lora.safetensors");
    let parts = diffloom_nodes::checkpoint::load::load_checkpoint(&ck, Device::Cpu, Kind::Float).unwrap();
    diffloom_nodes::checkpoint::synthetic::write_lora(&lora, parts.unet.as_ref().unwrap(), parts.clip.as_ref().unwrap(), 4, 9).expect("tiny LoRA");
    let extra = format!(
        r#""l": (type: "LoraLoader", inputs: {{"model": Link("c", "MODEL"), "clip": Link("c", "CLIP"), "lora_name": {lora:?}, "strength_model": 0.8, "strength_clip": 0.5}}),"#
    );
    let g = txt2img(&ck, "euler", r#""l", "MODEL""#, &extra).replace(r#""clip": Link("c", "CLIP")}}), "#, r#""clip": Link("l", "CLIP")}}), "#);
    let (mut a, ga, _) = run(d.path(), dev, Some(Kind::Float), &g);
    let (mut b, gb, _) = run(d.path(), Device::Cpu, Some(Kind::Float), &g);
    let (plain, gp, _) = run(d.path(), dev, Some(Kind::Float), &txt2img(&ck, "euler", r#""c", "MODEL""#, ""));
    let mut plain = plain;
    let x = latent(&mut a, &ga, "s");
    let e = (&x - latent(&mut b, &gb, "s")).abs().max().double_value(&[]);
    println!("LoRA on the GPU vs the CPU: {e:.2e}");
    assert!(e < 1e-3, "{e}");
    assert!((x - latent(&mut plain, &gp, "s")).abs().max().double_value(&[]) > 1e-3, "the LoRA changed nothing");
}

#[test]
#[ignore = "needs a GPU: scripts/gpu_check.sh"]
fn gpu_vae_decode_out_of_memory_retries_in_tiles() {
    let dev = cuda();
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path());
    // A latent whose whole decode cannot fit the GPU (a 16384² image), decoded in fp16.
    let side = std::env::var("DIFFLOOM_GPU_OOM_SIDE").unwrap_or_else(|_| "16384".into());
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": {side}, "height": {side}}}),
        "v": (type: "VAEDecode", inputs: {{"samples": Link("e", "LATENT"), "vae": Link("c", "VAE")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("v", "IMAGE")}}),"#
    );
    // The free-memory estimate would tile this decode before it starts: set aside, the decode runs
    // out of memory and is retried.
    diffloom_nodes::budget::set_use_free_memory(false);
    let (mut ex, g, report) = run(d.path(), dev, None, &nodes);
    diffloom_nodes::budget::set_use_free_memory(true);
    let said = report.nodes.iter().find(|n| n.id == "v").map(|n| n.messages.join("\n")).unwrap_or_default();
    println!("VAEDecode of a {side}² image on the GPU: {said}");
    assert!(said.contains("ran out of memory") && said.contains("tiles"), "the decode fit: raise DIFFLOOM_GPU_OOM_SIDE ({said})");
    let img = latent(&mut ex, &g, "v");
    assert_eq!(img.size()[1], side.parse::<i64>().unwrap());
}

#[test]
#[ignore = "needs a GPU: scripts/gpu_check.sh"]
fn gpu_vae_decode_keeps_to_free_memory() {
    let dev = cuda();
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path());
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 512, "height": 512, "batch_size": 4}}),
        "v": (type: "VAEDecode", inputs: {{"samples": Link("e", "LATENT"), "vae": Link("c", "VAE")}}),
        "t": (type: "VAEDecodeTiled", inputs: {{"samples": Link("e", "LATENT"), "vae": Link("c", "VAE"), "tile_size": 512, "overlap": 128}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("v", "IMAGE")}}),
        "o2": (type: "PreviewAny", inputs: {{"source": Link("t", "IMAGE")}}),"#
    );
    let said = |r: &RunReport| r.nodes.iter().find(|n| n.id == "v").map(|n| n.messages.join("\n")).unwrap_or_default();
    let (mut ex, g, report) = run(d.path(), dev, None, &nodes);
    assert!(!said(&report).contains("decoded"), "the whole decode did not fit an idle GPU: {}", said(&report));
    let whole = latent(&mut ex, &g, "v");
    drop(ex);
    // ComfyUI's estimate of one 64×64 latent's decode in fp16.
    let per_item = 2178 * 64 * 64 * 64 * 2u64;
    // Occupies the GPU but for `left` bytes, runs the graph and says what the decode reported.
    let with_free = |left: u64| {
        let (free, _) = diffloom_aten::cuda_free_memory(0).unwrap();
        assert!(free > left + (1 << 30), "the GPU has {free} bytes free");
        let hog = Tensor::empty([(free - left) as i64], (Kind::Uint8, dev));
        let (mut ex, g, report) = run(d.path(), dev, None, &nodes);
        drop(hog);
        println!("VAEDecode of 4 × 512² with {:.2} GiB free: {}", left as f64 / (1u64 << 30) as f64, said(&report));
        (said(&report), latent(&mut ex, &g, "v"), latent(&mut ex, &g, "t"))
    };
    let (message, batched, _) = with_free(per_item * 5 / 2);
    assert!(message.contains("decoded 2 at a time") && message.contains("free on cuda:0"), "{message}");
    assert!((&batched - &whole).abs().max().double_value(&[]) < 1e-2);
    let (message, tiled, tiled_node) = with_free(per_item / 2);
    assert!(message.contains("decoded in tiles") && message.contains("free on cuda:0"), "{message}");
    // ComfyUI's fallback tiles (64 latent pixels, overlap 16) are VAEDecodeTiled's 512 and 128.
    assert!((&tiled - &tiled_node).abs().max().double_value(&[]) < 1e-2);
}
