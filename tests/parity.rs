//! Parity with the reference implementations: tests/parity/reference.py loads the same tiny single-file
//! checkpoints with diffusers' and transformers' own conversion code and computes the UNet, text encoder
//! and VAE outputs for the inputs it stores beside them; diffloom must agree within 1e-4 (fp32, CPU).

use std::path::Path;
use std::process::Command;

use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
use diffloom_nodes::models::clip::ClipOutput;
use tch::{Device, Kind, Tensor};

use crate::util::{max_abs_diff, repo, Dir};

const TOLERANCE: f64 = 1e-4;

/// The project venv's Python (scripts/setup.sh made it; CI runs setup first).
pub fn python() -> std::path::PathBuf {
    let p = repo().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup.sh", p.display());
    p
}

/// Runs a reference script with `args`, failing the test with its output when it fails.
pub fn run_reference(script: &str, args: &[&Path]) {
    let out = Command::new(python()).arg(repo().join("tests/parity").join(script)).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run python");
    assert!(out.status.success(), "{script} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn check_model_parity(family: Family, inpaint: bool) {
    let d = Dir::new();
    let ckpt = d.join("model.safetensors");
    write_checkpoint(&ckpt, &tiny_config(family, inpaint), Kind::Float, 11, true).unwrap();
    let reference = d.join("reference.safetensors");
    let folder = d.join("diffusers");
    run_reference("reference.py", &[&ckpt, &reference, Path::new("--save-diffusers"), &folder]);
    // The single file, and the diffusers folder diffusers itself wrote from it, give the same outputs.
    compare(&ckpt, &reference, family, inpaint);
    compare(&folder, &reference, family, inpaint);
    // Issue 11: diffusers' list form of transformer_layers_per_block loads when the levels agree and is a
    // clear error when they differ (it was read as 1 whatever it held).
    let config_path = folder.join("unet/config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["transformer_layers_per_block"] = serde_json::json!([1, 1]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    compare(&folder, &reference, family, inpaint);
    config["transformer_layers_per_block"] = serde_json::json!([1, 2]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_checkpoint(&folder, Device::Cpu, Kind::Float).err().expect("per-level depths are refused").to_string();
    assert!(err.contains("config.json") && err.contains("[1, 2]") && err.contains("not supported"), "{err}");
}

pub fn compare(model: &Path, reference: &Path, family: Family, inpaint: bool) {
    let r = SafetensorsFile::open(reference).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    let source = model.file_name().unwrap().to_string_lossy().into_owned();
    let model = load_checkpoint(model, Device::Cpu, Kind::Float).unwrap();
    let _guard = tch::no_grad_guard();
    let mut report = Vec::new();
    let mut check = |name: &str, ours: Tensor| {
        let err = max_abs_diff(&ours, &get(name));
        report.push(format!("{name}: {err:.2e}"));
        err
    };
    let unet = model.unet.unwrap();
    let e_unet = check("out.unet", unet.forward(&get("input.latent"), &get("input.timesteps"), &get("input.context")));
    // The comparison is sensitive to the timestep path: other timesteps are far outside the tolerance.
    let shifted = unet.forward(&get("input.latent"), &Tensor::from_slice(&[500f32, 500.0]), &get("input.context"));
    let e_shift = max_abs_diff(&shifted, &get("out.unet"));
    println!("control: other timesteps differ by {e_shift:.3e}");
    assert!(e_shift > 100.0 * TOLERANCE);
    let clip = model.clip.unwrap();
    let tokens = get("input.tokens");
    let e_last = check("out.clip_last", clip.encode(&tokens, ClipOutput::Last));
    let e_m2 = check("out.clip_hidden_m2", clip.encode(&tokens, ClipOutput::Hidden { index: -2, layer_norm: false }));
    let e_m2ln = check("out.clip_hidden_m2_ln", clip.encode(&tokens, ClipOutput::Hidden { index: -2, layer_norm: true }));
    let vae = model.vae.unwrap();
    let e_mean = check("out.vae_mean", vae.encode_mean(&get("input.image")));
    let e_dec = check("out.vae_decoded", vae.decode(&get("input.z")));
    println!("{family:?} inpaint={inpaint} ({source}): {}", report.join(", "));
    for (name, e) in [("unet", e_unet), ("clip_last", e_last), ("clip_m2", e_m2), ("clip_m2_ln", e_m2ln), ("vae_mean", e_mean), ("vae_decoded", e_dec)] {
        assert!(e <= TOLERANCE, "{family:?} inpaint={inpaint}: {name} differs by {e:.3e} (> {TOLERANCE}); all: {report:?}");
    }
}

#[test]
fn sd1_matches_diffusers_and_transformers() {
    check_model_parity(Family::Sd1, false);
}

#[test]
fn sd2_matches_diffusers_and_transformers() {
    check_model_parity(Family::Sd2, false);
}

#[test]
fn sd1_inpainting_matches_diffusers() {
    check_model_parity(Family::Sd1, true);
}

#[test]
fn tokenizer_ids_match_transformers_clip_tokenizer() {
    let d = Dir::new();
    let vocab = diffloom_nodes::tokenizer::ClipTokenizer::locate_default().unwrap();
    let out = d.join("ids.json");
    run_reference("tokenizer_reference.py", &[&vocab, &repo().join("tests/data/prompts.txt"), &out]);
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let tok = diffloom_nodes::tokenizer::ClipTokenizer::from_dir(&vocab).unwrap();
    let prompts = reference["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 20);
    for (prompt, want) in prompts.iter().zip(reference["ids"].as_array().unwrap()) {
        let prompt = prompt.as_str().unwrap();
        let mut ours = vec![diffloom_nodes::tokenizer::START];
        ours.extend(tok.ids(prompt).unwrap());
        ours.push(diffloom_nodes::tokenizer::END);
        let want: Vec<u32> = want.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ours, want, "prompt {prompt:?}");
    }
}

/// TAESD's decoder (live previews) against diffusers' AutoencoderTiny on the same weights, from both
/// the diffusers file and the released file's key layout.
#[test]
fn taesd_decoder_matches_diffusers_autoencoder_tiny() {
    let d = Dir::new();
    run_reference("taesd_reference.py", &[d.path()]);
    let expected = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&d.join("expected.safetensors")).unwrap();
    let latent = expected.load("latent", Device::Cpu, None).unwrap();
    let want = expected.load("image", Device::Cpu, None).unwrap();
    let _g = tch::no_grad_guard();
    for file in ["diffusers/diffusion_pytorch_model.safetensors", "taesd_decoder.safetensors"] {
        let decoder = diffloom_nodes::checkpoint::load::load_taesd(&d.join(file), Device::Cpu).unwrap();
        let got = decoder.forward(&latent);
        assert_eq!(got.size(), [1, 3, 48, 64]);
        let diff = crate::util::max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{file}: max |diff| {diff}");
    }
}
