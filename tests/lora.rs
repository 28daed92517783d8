//! LoRA (issue 5): parity with diffusers' own kohya loading (SD1 and SD2, linear, 1×1 and 3×3 conv
//! modules, separate strengths), strength 0 as identity, no compounding on shared base weights,
//! stacking, and the report of keys that cannot be applied.

use diffloom_aten::Generator;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use diffloom_core::Executor;
use diffloom_core::{Registry, Value};
use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint, write_lora, write_safetensors};
use diffloom_nodes::lora::{patch_state, unet_key_map, LoraFile};
use diffloom_nodes::models::clip::ClipOutput;
use diffloom_nodes::sd::{SdClip, SdModel};
use tch::{Device, Kind, Tensor};

use crate::parity::run_reference;
use crate::util::{executor, max_abs_diff, run_graph, Dir};

/// A tiny checkpoint of `family` and a kohya LoRA for it, in `d`.
fn model_and_lora(d: &Dir, family: Family) -> (PathBuf, PathBuf) {
    let ckpt = d.join("model.safetensors");
    write_checkpoint(&ckpt, &tiny_config(family, false), Kind::Float, 31, true).unwrap();
    let ck = load_checkpoint(&ckpt, Device::Cpu, Kind::Float).unwrap();
    let lora = d.join("lora.safetensors");
    write_lora(&lora, ck.unet.as_ref().unwrap(), ck.clip.as_ref().unwrap(), 4, 32).unwrap();
    (ckpt, lora)
}

/// Runs `nodes` (RON entries; a CheckpointLoaderSimple "ck" reading `ckpt` is added) and returns the
/// executor and registry holding the results, and the run's messages by node id.
fn run(d: &Dir, ckpt: &Path, nodes: &str) -> (Executor, Registry, Result<Vec<(String, Vec<String>)>, String>) {
    let (mut ex, reg) = executor(d, 1 << 32);
    let text =
        format!(r#"(version: 1, nodes: {{ "ck": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {:?}}}), {nodes} }})"#, ckpt.display().to_string());
    let r = run_graph(&mut ex, &reg, d, &text, &[]);
    let result = match r.error {
        Some(e) => Err(e.to_string()),
        None => Ok(r.nodes.iter().map(|n| (n.id.clone(), n.messages.clone())).collect()),
    };
    (ex, reg, result)
}

/// The cached outputs `(id, output index)` of the last run.
fn cached(ex: &mut Executor, reg: &Registry, d: &Dir, outputs: &[(&str, usize)]) -> HashMap<(String, usize), Value> {
    let path = d.join("graph.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, reg).unwrap();
    outputs.iter().map(|(id, i)| ((id.to_string(), *i), ex.cached_output(&resolved, id, *i).expect("cached output"))).collect()
}

fn model(v: &Value) -> &SdModel {
    match v {
        Value::Model(h) => h.downcast::<SdModel>().unwrap(),
        other => panic!("{other:?}"),
    }
}

fn clip(v: &Value) -> &SdClip {
    match v {
        Value::Clip(h) => h.downcast::<SdClip>().unwrap(),
        other => panic!("{other:?}"),
    }
}

/// A LoraLoader node "l" on "ck" with the given strengths, previewed so it runs.
fn lora_node(id: &str, from: &str, lora: &Path, sm: f64, sc: f64) -> String {
    format!(
        r#""{id}": (type: "LoraLoader", inputs: {{"model": Link("{from}", "MODEL"), "clip": Link("{from}", "CLIP"), "lora_name": {:?}, "strength_model": {sm:?}, "strength_clip": {sc:?}}}),
        "{id}_m": (type: "PreviewAny", inputs: {{"source": Link("{id}", "MODEL")}}),
        "{id}_c": (type: "PreviewAny", inputs: {{"source": Link("{id}", "CLIP")}}),"#,
        lora.display().to_string()
    )
}

fn check_parity(family: Family) {
    let d = Dir::new();
    let (ckpt, lora) = model_and_lora(&d, family);
    let reference = d.join("reference.safetensors");
    let peft_dir = d.join("peft");
    run_reference("lora_reference.py", &[&ckpt, &lora, &reference, Path::new("0.7"), Path::new("0.3"), &peft_dir]);
    let r = SafetensorsFile::open(&reference).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    // The kohya file, and the same LoRA as diffusers saves it (PEFT names, alphas in the metadata).
    for file in [lora.clone(), peft_dir.join("pytorch_lora_weights.safetensors")] {
        compare_lora(&d, &ckpt, &file, family, &get);
    }
}

fn compare_lora(d: &Dir, ckpt: &Path, lora: &Path, family: Family, get: &dyn Fn(&str) -> Tensor) {
    let (mut ex, reg, result) = run(d, ckpt, &lora_node("l", "ck", lora, 0.7, 0.3));
    let messages = result.unwrap();
    let v = cached(&mut ex, &reg, d, &[("l", 0), ("l", 1), ("ck", 0), ("ck", 1)]);
    let at = |id: &str, i: usize| &v[&(id.to_string(), i)];
    let report = &messages.iter().find(|(id, _)| id == "l").unwrap().1;
    // Besides the patch line only the checkpoint parts' loads, which the LoRA was the first to need.
    assert!(report[0].contains("UNet weights (strength 0.7)") && report[1..].iter().all(|m| m.starts_with("loaded the ")), "{report:?}");
    let _guard = tch::no_grad_guard();
    let (patched, patched_clip) = (at("l", 0), at("l", 1));
    let (base, base_clip) = (at("ck", 0), at("ck", 1));
    let unet_out = |m: &Value| model(m).unet.forward(&get("input.latent"), &get("input.timesteps"), &get("input.context"));
    let layer = if family == Family::Sd2 { ClipOutput::Hidden { index: -2, layer_norm: true } } else { ClipOutput::Last };
    let clip_key = if family == Family::Sd2 { "out.clip_hidden_m2_ln" } else { "out.clip_last" };
    let clip_out = |c: &Value| clip(c).model.encode(&get("input.tokens"), layer);
    let want_unet = get("out.unet");
    let scale = want_unet.abs().max().double_value(&[]).max(1.0);
    let (e_unet, e_clip) = (max_abs_diff(&unet_out(patched), &want_unet) / scale, max_abs_diff(&clip_out(patched_clip), &get(clip_key)));
    // The control: without the LoRA the outputs are far from diffusers' LoRA outputs.
    let (c_unet, c_clip) = (max_abs_diff(&unet_out(base), &want_unet) / scale, max_abs_diff(&clip_out(base_clip), &get(clip_key)));
    let name = lora.file_name().unwrap().to_string_lossy();
    println!("{family:?}, {name}: LoRA vs diffusers: UNet {e_unet:.2e} (relative to max {scale:.1}), text {e_clip:.2e}; without the LoRA: {c_unet:.2e}, {c_clip:.2e}");
    assert!(e_unet < 1e-5 && e_clip < 1e-4, "{e_unet} {e_clip}");
    assert!(c_unet > 1e-2 && c_clip > 1e-2, "{c_unet} {c_clip}");
}

#[test]
fn lora_matches_diffusers_kohya_loading_sd1() {
    check_parity(Family::Sd1);
}

#[test]
fn lora_matches_diffusers_kohya_loading_sd2_openclip_qkv_rows() {
    check_parity(Family::Sd2);
}

#[test]
fn strength_zero_is_identity_and_strengths_never_compound() {
    let d = Dir::new();
    let (ckpt, lora) = model_and_lora(&d, Family::Sd1);
    let nodes = [
        lora_node("zero", "ck", &lora, 0.0, 0.0),
        lora_node("half", "ck", &lora, 0.5, 0.0),
        lora_node("one", "ck", &lora, 1.0, 1.0),
        lora_node("again", "half", &lora, 0.5, 0.0),
    ]
    .join("\n");
    let (mut ex, reg, result) = run(&d, &ckpt, &nodes);
    result.unwrap();
    let ids = ["ck", "zero", "half", "one", "again"];
    let wanted: Vec<(&str, usize)> = ids.iter().flat_map(|id| [(*id, 0), (*id, 1)]).collect();
    let v = cached(&mut ex, &reg, &d, &wanted);
    let at = |id: &str, i: usize| &v[&(id.to_string(), i)];
    let _guard = tch::no_grad_guard();
    let mut g = Generator::cpu(1);
    let context_dim = model(at("ck", 0)).unet.config.context_dim;
    let (x, t) = (g.randn_f32(&[1, 4, 8, 8]), Tensor::from_slice(&[500f32]));
    let ctx = g.randn_f32(&[1, 77, context_dim]);
    let out = |id: &str| model(at(id, 0)).unet.forward(&x, &t, &ctx);
    let base_before = out("ck");
    // Strength 0: the very same model and text encoder.
    assert_eq!(max_abs_diff(&out("zero"), &base_before), 0.0);
    let tokens = Tensor::from_slice(&[49406i64, 320, 1929, 49407]).view([1, 4]);
    let enc = |id: &str, i: usize| clip(at(id, i)).model.encode(&tokens, ClipOutput::Last);
    assert_eq!(max_abs_diff(&enc("zero", 1), &enc("ck", 1)), 0.0);
    // strength_clip 0 leaves the text encoder as it was while the UNet is patched.
    assert_eq!(max_abs_diff(&enc("half", 1), &enc("ck", 1)), 0.0);
    assert!(max_abs_diff(&out("half"), &base_before) > 1e-3);
    // Patching 0.5 and 1.0 from the same base: the base is untouched, and 0.5 + 0.5 stacked equals 1.0.
    let (half, one, again) = (out("half"), out("one"), out("again"));
    let fresh = load_checkpoint(&ckpt, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(max_abs_diff(&fresh.unet.unwrap().forward(&x, &t, &ctx), &base_before), 0.0, "the base model changed");
    assert!(max_abs_diff(&half, &one) > 1e-3);
    let stacked = max_abs_diff(&again, &one);
    println!("0.5 then 0.5 vs 1.0: {stacked:.2e}");
    assert!(stacked < 1e-4, "{stacked}");
    // Untouched tensors are shared with the base, so a patched copy costs only the patched weights.
    let (b, h) = (model(at("ck", 0)), model(at("half", 0)));
    let shared = b.unet.state.iter().zip(h.unet.state.iter()).filter(|((_, x), (_, y))| x.data_ptr() == y.data_ptr()).count();
    assert!(shared > 0 && shared < b.unet.state.len(), "{shared} of {}", b.unet.state.len());
    // The arithmetic itself (not only the node's shortcut): strength 0 patches to the same values.
    let file = LoraFile::open(&lora).unwrap();
    let map = unet_key_map(&b.unet.config, &b.unet.state);
    let patches: Vec<_> = file.modules.iter().filter_map(|m| map.get(&m.name).map(|t| (t, m, 0.0))).collect();
    assert_eq!(patches.len(), 115);
    let state = patch_state(&b.unet.state, &patches).unwrap();
    for ((k, x), (_, y)) in b.unet.state.iter().zip(state.iter()) {
        assert_eq!(max_abs_diff(x, y), 0.0, "{k}");
    }
}

#[test]
fn keys_that_cannot_be_applied_are_reported_or_refused() {
    let d = Dir::new();
    let (ckpt, lora) = model_and_lora(&d, Family::Sd1);
    let file = SafetensorsFile::open(&lora).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file.tensors().keys().map(|k| (k.clone(), file.load(k, Device::Cpu, None).unwrap())).collect();
    let z = |s: &[i64]| Tensor::zeros(s, (Kind::Float, Device::Cpu));
    tensors.push(("lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight".into(), z(&[4, 64])));
    tensors.push(("lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight".into(), z(&[64, 4])));
    tensors.push(("lora_unet_mid_block_resnets_0_conv1.hada_w1_a".into(), z(&[4, 4])));
    let extra = d.join("extra.safetensors");
    write_safetensors(&extra, &tensors, None).unwrap();
    let (_, _, result) = run(&d, &ckpt, &lora_node("l", "ck", &extra, 1.0, 1.0));
    let messages = result.unwrap();
    let report = messages.iter().find(|(id, _)| id == "l").unwrap().1.join("\n");
    assert!(report.contains("2 LoRA keys not loaded"), "{report}");
    assert!(report.contains("lora_unet_down_blocks_7_attentions_0_proj_in (no such module in this model)"), "{report}");
    assert!(report.contains("hada_w1_a (LoHa)"), "{report}");

    // A pair whose shapes do not chain (rank 4 down, rank 3 up) is reported, not applied.
    let bad = d.join("bad.safetensors");
    let mut t2: Vec<(String, Tensor)> = file.tensors().keys().map(|k| (k.clone(), file.load(k, Device::Cpu, None).unwrap())).collect();
    let up = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight";
    let entry = t2.iter_mut().find(|(k, _)| k == up).unwrap();
    entry.1 = entry.1.narrow(1, 0, 3);
    write_safetensors(&bad, &t2, None).unwrap();
    let (_, _, result) = run(&d, &ckpt, &lora_node("l", "ck", &bad, 1.0, 1.0));
    let report = result.unwrap().into_iter().find(|(id, _)| id == "l").unwrap().1.join("\n");
    assert!(report.contains("1 LoRA keys not loaded") && report.contains("attn1_to_q.lora_down.weight (malformed pair"), "{report}");

    // Model-only: the text-encoder modules are counted as not applied, the UNet is patched.
    let only = format!(
        r#""l": (type: "LoraLoaderModelOnly", inputs: {{"model": Link("ck", "MODEL"), "lora_name": {:?}, "strength_model": 1.0}}),
        "p": (type: "PreviewAny", inputs: {{"source": Link("l", "MODEL")}}),"#,
        lora.display().to_string()
    );
    let (_, _, result) = run(&d, &ckpt, &only);
    let report = result.unwrap().into_iter().find(|(id, _)| id == "l").unwrap().1.join("\n");
    assert!(report.contains("text-encoder modules not applied") && report.contains("0 text-encoder weights"), "{report}");
    // … and a text-encoder-only LoRA there is an error saying so.
    let te_only = d.join("te.safetensors");
    let te: Vec<(String, Tensor)> = tensors.iter().filter(|(k, _)| k.starts_with("lora_te_")).map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    write_safetensors(&te_only, &te, None).unwrap();
    let (_, _, result) = run(&d, &ckpt, &only.replace(&lora.display().to_string(), &te_only.display().to_string()));
    let err = result.unwrap_err();
    assert!(err.contains("0 UNet and 18 text-encoder modules are all for a part this node does not patch"), "{err}");

    // A file for another model: nothing fits, an error names the file and the first module.
    let sdxl = d.join("sdxl.safetensors");
    write_safetensors(
        &sdxl,
        &[
            ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight".into(), z(&[4, 640])),
            ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight".into(), z(&[640, 4])),
        ],
        None,
    )
    .unwrap();
    let (_, _, result) = run(&d, &ckpt, &lora_node("l", "ck", &sdxl, 1.0, 1.0));
    let err = result.unwrap_err();
    assert!(err.contains("sdxl.safetensors") && err.contains("another model family") && err.contains("lora_name"), "{err}");

    // A module whose shapes do not fit (an SD 2.x LoRA on SD 1.x): an error naming the module.
    let wrong = d.join("wrong.safetensors");
    write_safetensors(
        &wrong,
        &[
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight".into(), z(&[4, 1024])),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight".into(), z(&[64, 4])),
        ],
        None,
    )
    .unwrap();
    let (_, _, result) = run(&d, &ckpt, &lora_node("l", "ck", &wrong, 1.0, 1.0));
    let err = result.unwrap_err();
    assert!(err.contains("attn2_to_k") && err.contains("does not fit"), "{err}");
}

/// Editing the strength and re-running in the same executor (what `watch` does) patches the cached base
/// again: UNet strength 0.5 → 1.0 → 0.5 gives back the first result exactly, and the checkpoint is not
/// reloaded. (The last run changes strength_clip too, so the node runs rather than coming from the cache.)
#[test]
fn re_running_with_another_strength_starts_from_the_unpatched_base() {
    let d = Dir::new();
    let (ckpt, lora) = model_and_lora(&d, Family::Sd1);
    let (mut ex, reg) = executor(&d, 1 << 32);
    let graph = |sm: f64, sc: f64| {
        format!(
            r#"(version: 1, nodes: {{ "ck": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {:?}}}), {} }})"#,
            ckpt.display().to_string(),
            lora_node("l", "ck", &lora, sm, sc)
        )
    };
    let _guard = tch::no_grad_guard();
    let mut g = Generator::cpu(2);
    let (x, t) = (g.randn_f32(&[1, 4, 8, 8]), Tensor::from_slice(&[300f32]));
    let mut outs = Vec::new();
    for (sm, sc) in [(0.5, 0.5), (1.0, 1.0), (0.5, 1.0)] {
        let r = run_graph(&mut ex, &reg, &d, &graph(sm, sc), &[]);
        assert!(r.error.is_none(), "{:?}", r.error);
        let status = |id: &str| r.nodes.iter().find(|n| n.id == id).map(|n| n.status);
        assert_eq!(status("l"), Some(diffloom_core::NodeStatus::Ran));
        if !outs.is_empty() {
            assert_eq!(status("ck"), Some(diffloom_core::NodeStatus::Cached), "the checkpoint was reloaded");
        }
        let v = cached(&mut ex, &reg, &d, &[("l", 0)]);
        let m = model(&v[&("l".to_string(), 0)]);
        let ctx = Tensor::ones([1, 77, m.unet.config.context_dim], (Kind::Float, Device::Cpu));
        outs.push(m.unet.forward(&x, &t, &ctx));
    }
    assert!(max_abs_diff(&outs[0], &outs[1]) > 1e-3);
    assert_eq!(max_abs_diff(&outs[0], &outs[2]), 0.0, "patching compounded");
}
