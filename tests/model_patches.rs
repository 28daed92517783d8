//! Model patches and weight merges: each changes sampling, equals the unpatched model at its neutral
//! setting, stacks with others, and leaves the model it was applied to untouched; the hooks' math
//! equals ComfyUI's closures on the same tensors (tests/parity/patches_reference.py).

use std::path::Path;

use diffloom_core::Value;
use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
use tch::{Kind, Tensor};

use crate::util::{max_abs_diff, outputs, tiny_sd1, Dir};

fn samples(v: &Value) -> Tensor {
    match v {
        Value::Latent(l) => l.samples.0.shallow_clone(),
        other => panic!("{other:?}"),
    }
}

/// A graph sampling the base model ("c") and each patched model in `patches` (node entries whose ids
/// are listed in `models`, each producing a MODEL), with the same seed, prompt and cfg.
fn sample_each(d: &Dir, ck: &Path, patches: &str, models: &[(&str, &str)], cfg: f64) -> Vec<Tensor> {
    let mut nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a lighthouse", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 1}}),
        {patches}"#
    );
    let mut wanted = Vec::new();
    for (i, (id, output)) in models.iter().enumerate() {
        nodes += &format!(
            r#""s{i}": (type: "KSampler", inputs: {{"model": Link({id:?}, {output:?}), "seed": 2, "steps": 3, "cfg": {cfg:?}, "sampler_name": "euler", "scheduler": "normal",
                "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
        );
        wanted.push(format!("s{i}"));
    }
    let wanted: Vec<(&str, &str, usize)> = wanted.iter().map(|s| (s.as_str(), "LATENT", 0)).collect();
    outputs(d, &nodes, &wanted).unwrap_or_else(|e| panic!("{e}")).iter().map(samples).collect()
}

#[test]
fn hook_patches_change_sampling_stack_and_leave_the_base_untouched() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let patches = r#"
        "freeu": (type: "FreeU", inputs: {"model": Link("c", "MODEL"), "b1": 1.3, "b2": 1.4, "s1": 0.5, "s2": 0.3}),
        "freeu2": (type: "FreeU_V2", inputs: {"model": Link("c", "MODEL")}),
        "rescale": (type: "RescaleCFG", inputs: {"model": Link("c", "MODEL"), "multiplier": 0.7}),
        "zero": (type: "CFGZeroStar", inputs: {"model": Link("c", "MODEL")}),
        "norm": (type: "CFGNorm", inputs: {"model": Link("c", "MODEL"), "strength": 0.9}),
        "apg": (type: "APG", inputs: {"model": Link("c", "MODEL"), "eta": 0.5, "norm_threshold": 2.0, "momentum": 0.3}),
        "shrink": (type: "PatchModelAddDownscale", inputs: {"model": Link("c", "MODEL"), "block_number": 1, "downscale_factor": 2.0, "start_percent": 0.0, "end_percent": 0.6}),
        "stack": (type: "RescaleCFG", inputs: {"model": Link("freeu", "MODEL"), "multiplier": 0.7}),
        "freeu_neutral": (type: "FreeU", inputs: {"model": Link("c", "MODEL"), "b1": 1.0, "b2": 1.0, "s1": 1.0, "s2": 1.0}),
        "rescale_neutral": (type: "RescaleCFG", inputs: {"model": Link("c", "MODEL"), "multiplier": 0.0}),
        "shrink_never": (type: "PatchModelAddDownscale", inputs: {"model": Link("c", "MODEL"), "start_percent": 1.0, "end_percent": 1.0}),
        "shrink_before": (type: "PatchModelAddDownscale", inputs: {"model": Link("c", "MODEL"), "block_number": 1, "start_percent": 0.0, "end_percent": 0.6, "downscale_after_skip": false}),
        "pag": (type: "PerturbedAttentionGuidance", inputs: {"model": Link("c", "MODEL"), "scale": 3.0}),
        "pag_zero": (type: "PerturbedAttentionGuidance", inputs: {"model": Link("c", "MODEL"), "scale": 0.0}),
        "pag_freeu": (type: "PerturbedAttentionGuidance", inputs: {"model": Link("freeu", "MODEL"), "scale": 3.0}),
        "sag": (type: "SelfAttentionGuidance", inputs: {"model": Link("c", "MODEL"), "scale": 0.8, "blur_sigma": 2.0}),
        "sag_zero": (type: "SelfAttentionGuidance", inputs: {"model": Link("c", "MODEL"), "scale": 0.0}),
        "tile": (type: "HyperTile", inputs: {"model": Link("c", "MODEL"), "tile_size": 32}),
        "tile_none": (type: "HyperTile", inputs: {"model": Link("c", "MODEL")}),
        "tome": (type: "TomePatchModel", inputs: {"model": Link("c", "MODEL"), "ratio": 0.5}),
        "tome_zero": (type: "TomePatchModel", inputs: {"model": Link("c", "MODEL"), "ratio": 0.0}),
        "eps": (type: "Epsilon Scaling", inputs: {"model": Link("c", "MODEL"), "scaling_factor": 1.05}),
        "tsr": (type: "TemporalScoreRescaling", inputs: {"model": Link("c", "MODEL"), "tsr_k": 0.8}),
        "tsr_off": (type: "TemporalScoreRescaling", inputs: {"model": Link("c", "MODEL"), "tsr_k": 1.0}),
        "tcfg": (type: "TCFG", inputs: {"model": Link("c", "MODEL")}),
        "freeu2_neutral": (type: "FreeU_V2", inputs: {"model": Link("c", "MODEL"), "b1": 1.0, "b2": 1.0, "s1": 1.0, "s2": 1.0}),
        "apg_neutral": (type: "APG", inputs: {"model": Link("c", "MODEL"), "eta": 1.0, "norm_threshold": 0.0, "momentum": 0.0}),
        "eps_one": (type: "Epsilon Scaling", inputs: {"model": Link("c", "MODEL"), "scaling_factor": 1.0}),"#;
    let ids = [
        "c",
        "freeu",
        "freeu2",
        "rescale",
        "zero",
        "norm",
        "apg",
        "shrink",
        "stack",
        "freeu_neutral",
        "rescale_neutral",
        "shrink_never",
        "shrink_before",
        "pag",
        "pag_zero",
        "pag_freeu",
        "sag",
        "sag_zero",
        "tile",
        "tile_none",
        "tome",
        "tome_zero",
        "eps",
        "tsr",
        "tsr_off",
        "tcfg",
        "freeu2_neutral",
        "apg_neutral",
        "eps_one",
    ];
    let models: Vec<(&str, &str)> =
        ids.iter().map(|id| (*id, if ["zero", "norm", "tsr", "tsr_off", "tcfg"].contains(id) { "patched_model" } else { "MODEL" })).collect();
    let out = sample_each(&d, &ck, patches, &models, 5.0);
    let by = |id: &str| &out[ids.iter().position(|i| *i == id).unwrap()];
    let base = by("c");
    for id in ["freeu", "freeu2", "rescale", "zero", "norm", "apg", "shrink", "shrink_before", "pag", "sag", "tile", "tome", "eps", "tsr", "tcfg"] {
        let moved = max_abs_diff(by(id), base);
        println!("{id}: moved the latent by {moved:.4}");
        assert!(moved > 1e-3, "{id} changed nothing");
    }
    assert!(max_abs_diff(by("stack"), by("freeu")) > 1e-3 && max_abs_diff(by("stack"), by("rescale")) > 1e-3, "stacked patches");
    // Neutral settings: a deep shrink that never applies is the model itself; FreeU at 1 and RescaleCFG
    // at 0 differ only by the FFT's and the v-prediction round trip's rounding.
    assert_eq!(max_abs_diff(by("shrink_never"), base), 0.0);
    assert_eq!(max_abs_diff(by("pag_zero"), base), 0.0);
    // HyperTile with tiles as large as the latent (the default 256 pixels on this 64-pixel image) tiles
    // nothing; 32-pixel tiles split the full-resolution level 2 × 2.
    assert_eq!(max_abs_diff(by("tile_none"), base), 0.0);
    // ToMe merging no token (ratio 0) is the model itself.
    assert_eq!(max_abs_diff(by("tome_zero"), base), 0.0);
    assert_eq!(max_abs_diff(by("tsr_off"), base), 0.0);
    // SAG at scale 0 differs only by its recorded attention being computed without a fused kernel.
    assert!(max_abs_diff(by("sag_zero"), base) < 1e-3, "{}", max_abs_diff(by("sag_zero"), base));
    // PAG's extra pass runs with the model's own patches (FreeU here) under its perturbation.
    assert!(max_abs_diff(by("pag_freeu"), by("pag")) > 1e-3 && max_abs_diff(by("pag_freeu"), by("freeu")) > 1e-3);
    assert!(max_abs_diff(by("freeu_neutral"), base) < 1e-3, "{}", max_abs_diff(by("freeu_neutral"), base));
    assert!(max_abs_diff(by("rescale_neutral"), base) < 1e-3, "{}", max_abs_diff(by("rescale_neutral"), base));
    // FreeU_V2 at 1 (the FFT's rounding only), Epsilon Scaling by 1.
    for id in ["freeu2_neutral", "eps_one"] {
        assert!(max_abs_diff(by(id), base) < 1e-3, "{id}: {}", max_abs_diff(by(id), base));
    }
    // APG keeping the whole guidance (eta 1, no norm threshold, no momentum) is plain CFG one scale up:
    // ComfyUI's modified cond adds (cond − uncond) / cond_scale to uncond + guidance.
    let cfg6 = sample_each(&Dir::new(), &ck, "", &[("c", "MODEL")], 6.0);
    assert!(max_abs_diff(by("apg_neutral"), &cfg6[0]) < 1e-3, "{}", max_abs_diff(by("apg_neutral"), &cfg6[0]));
    // The base model is untouched: sampled alone, in a graph without any patch node, it gives the same.
    let alone = sample_each(&Dir::new(), &ck, "", &[("c", "MODEL")], 5.0);
    assert_eq!(max_abs_diff(&alone[0], base), 0.0);
    // At cfg 1 the negative side is not run, and CFG-Zero* leaves the result as it is.
    let one = sample_each(&d, &ck, patches, &[("c", "MODEL"), ("zero", "patched_model")], 1.0);
    assert_eq!(max_abs_diff(&one[0], &one[1]), 0.0);
}

#[test]
fn merges_and_attention_multipliers_follow_comfyui_weights() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let other = d.join("other.safetensors");
    write_checkpoint(&other, &tiny_config(Family::Sd1, false), Kind::Float, 9, true).unwrap();
    let patches = format!(
        r#""c2": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {other:?}}}),
        "keep": (type: "ModelMergeSimple", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL"), "ratio": 1.0}}),
        "take": (type: "ModelMergeSimple", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL"), "ratio": 0.0}}),
        "half": (type: "ModelMergeSimple", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL"), "ratio": 0.5}}),
        "sum": (type: "ModelMergeAdd", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL")}}),
        "back": (type: "ModelMergeSubtract", inputs: {{"model1": Link("sum", "MODEL"), "model2": Link("c2", "MODEL"), "multiplier": 1.0}}),
        "blocks": (type: "ModelMergeBlocks", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL"), "input": 1.0, "middle": 1.0, "out": 0.0}}),
        "sd1": (type: "ModelMergeSD1", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL"), "output_blocks.0.": 0.0, "out.": 0.3}}),
        "self1": (type: "UNetSelfAttentionMultiply", inputs: {{"model": Link("c", "MODEL")}}),
        "self2": (type: "UNetSelfAttentionMultiply", inputs: {{"model": Link("c", "MODEL"), "q": 1.5, "out": 0.8}}),
        "cross2": (type: "UNetCrossAttentionMultiply", inputs: {{"model": Link("c", "MODEL"), "k": 1.3}}),"#
    );
    let ids = ["c", "c2", "keep", "take", "half", "sum", "back", "blocks", "sd1", "self1", "self2", "cross2"];
    let models: Vec<(&str, &str)> = ids.iter().map(|id| (*id, "MODEL")).collect();
    let out = sample_each(&d, &ck, &patches, &models, 5.0);
    let by = |id: &str| &out[ids.iter().position(|i| *i == id).unwrap()];
    // Ratio 1 is model1 and ratio 0 model2, exactly (w·1 + 0 and w·0 + w2·1); all multipliers 1 is the
    // model itself.
    assert_eq!(max_abs_diff(by("keep"), by("c")), 0.0);
    assert_eq!(max_abs_diff(by("take"), by("c2")), 0.0);
    assert_eq!(max_abs_diff(by("self1"), by("c")), 0.0);
    // (m1 + m2) − m2 is m1 up to rounding; the others differ from both inputs.
    assert!(max_abs_diff(by("back"), by("c")) < 1e-3, "{}", max_abs_diff(by("back"), by("c")));
    for id in ["half", "blocks", "sd1", "self2", "cross2"] {
        assert!(max_abs_diff(by(id), by("c")) > 1e-3 && max_abs_diff(by(id), by("c2")) > 1e-3, "{id}");
    }

    // Weight by weight, as ComfyUI's calculate_weight: ModelMergeBlocks takes the output blocks (and
    // `out.`) from model2 and the rest from model1; ModelMergeSD1's unnamed blocks keep ratio 1.
    let weights = |id: &str| -> Vec<(String, Tensor)> {
        let v = outputs(&d, &format!(r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}), {patches}"#), &[(id, "MODEL", 0)]).unwrap();
        let Value::Model(h) = &v[0] else { panic!() };
        let m: &diffloom_nodes::sd::SdModel = h.downcast().unwrap();
        m.unet.state.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
    };
    let (w1, w2, blocks, sd1, self2) = (weights("c"), weights("c2"), weights("blocks"), weights("sd1"), weights("self2"));
    let get = |w: &[(String, Tensor)], k: &str| w.iter().find(|(n, _)| n == k).unwrap().1.shallow_clone();
    for (k, t) in &blocks {
        let want = if k.starts_with("output_blocks.") || k.starts_with("out.") { get(&w2, k) } else { get(&w1, k) };
        assert_eq!(max_abs_diff(t, &want), 0.0, "{k}");
    }
    let k = "out.2.weight";
    assert!(max_abs_diff(&get(&sd1, k), &(get(&w1, k) * 0.3 + get(&w2, k) * 0.7)) < 1e-7);
    assert_eq!(max_abs_diff(&get(&sd1, "output_blocks.0.0.out_layers.3.weight"), &get(&w2, "output_blocks.0.0.out_layers.3.weight")), 0.0);
    assert_eq!(max_abs_diff(&get(&sd1, "input_blocks.1.0.out_layers.3.weight"), &get(&w1, "input_blocks.1.0.out_layers.3.weight")), 0.0);
    let q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
    assert_eq!(max_abs_diff(&get(&self2, q), &(get(&w1, q) * 1.5)), 0.0);
    let o = "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias";
    assert_eq!(max_abs_diff(&get(&self2, o), &(get(&w1, o) * 0.8)), 0.0);
    let k2 = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
    assert_eq!(max_abs_diff(&get(&self2, k2), &get(&w1, k2)), 0.0);
    // The inputs are untouched: model1's weights are what its file holds.
    let again = diffloom_nodes::checkpoint::load::load_checkpoint(&ck, tch::Device::Cpu, Kind::Float).unwrap();
    for (k, t) in again.unet.as_ref().unwrap().state.iter() {
        assert_eq!(max_abs_diff(t, &get(&w1, k)), 0.0, "{k}");
    }
}

#[test]
fn clip_attention_multiply_scales_both_text_encoder_layouts() {
    let d = Dir::new();
    for (family, name) in [(Family::Sd1, "sd1.safetensors"), (Family::Sd2, "sd2.safetensors")] {
        let ck = d.join(name);
        write_checkpoint(&ck, &tiny_config(family, false), Kind::Float, 3, true).unwrap();
        let nodes = format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "same": (type: "CLIPAttentionMultiply", inputs: {{"clip": Link("c", "CLIP")}}),
            "scaled": (type: "CLIPAttentionMultiply", inputs: {{"clip": Link("c", "CLIP"), "q": 1.2, "k": 0.9, "v": 1.1, "out": 0.7}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a red fox", "clip": Link("c", "CLIP")}}),
            "p1": (type: "CLIPTextEncode", inputs: {{"text": "a red fox", "clip": Link("same", "CLIP")}}),
            "p2": (type: "CLIPTextEncode", inputs: {{"text": "a red fox", "clip": Link("scaled", "CLIP")}}),"#
        );
        let v = outputs(&d, &nodes, &[("p", "CONDITIONING", 0), ("p1", "CONDITIONING", 0), ("p2", "CONDITIONING", 0)]).unwrap();
        let c = |v: &Value| match v {
            Value::Conditioning(c) => c[0].cross_attn.0.shallow_clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(max_abs_diff(&c(&v[0]), &c(&v[1])), 0.0, "{name}");
        assert!(max_abs_diff(&c(&v[0]), &c(&v[2])) > 1e-3, "{name}");
    }
}

/// CheckpointSave writes a merged model as a single-file checkpoint that diffusers' own single-file
/// conversion loads (tests/parity/reference.py, every tensor consumed, outputs compared) and that
/// samples as the model it was saved from; a second save gets the next number, never the same file.
#[test]
fn checkpoint_save_writes_loadable_checkpoints_and_never_overwrites() {
    let d = Dir::new();
    for family in [Family::Sd1, Family::Sd2] {
        let ck = d.join(&format!("{family:?}.safetensors"));
        let other = d.join(&format!("{family:?}-other.safetensors"));
        // (Seed 11: the parity tests' model, whose timestep response the parity check's control needs.)
        write_checkpoint(&ck, &tiny_config(family, false), Kind::Float, 11, true).unwrap();
        write_checkpoint(&other, &tiny_config(family, false), Kind::Float, 4, true).unwrap();
        let prefix = format!("merged/{family:?}");
        let nodes = format!(
            r#""c2": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {other:?}}}),
            "half": (type: "ModelMergeSimple", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL"), "ratio": 0.9}}),
            "save": (type: "CheckpointSave", inputs: {{"model": Link("half", "MODEL"), "clip": Link("c", "CLIP"), "vae": Link("c", "VAE"), "filename_prefix": {prefix:?}}}),"#
        );
        let merged = sample_each(&d, &ck, &nodes, &[("half", "MODEL")], 4.0);
        let saved = d.join(&format!("output/{prefix}_00001_.safetensors"));
        assert!(saved.exists(), "{}", saved.display());
        // Run again (a new executor: nothing cached): the next number, the first file untouched.
        let first = std::fs::read(&saved).unwrap();
        let _ = sample_each(&d, &ck, &nodes, &[("half", "MODEL")], 4.0);
        assert!(d.join(&format!("output/{prefix}_00002_.safetensors")).exists());
        assert_eq!(std::fs::read(&saved).unwrap(), first);
        // The saved file samples as the merged model did.
        let reloaded = sample_each(&Dir::new(), &saved, "", &[("c", "MODEL")], 4.0);
        assert_eq!(max_abs_diff(&reloaded[0], &merged[0]), 0.0, "{family:?}");
        // diffusers' single-file conversion takes it, and its outputs agree with diffloom's.
        let reference = d.join(&format!("{family:?}-ref.safetensors"));
        crate::parity::run_reference("reference.py", &[&saved, &reference]);
        crate::parity::compare(&saved, &reference, family, false);
    }
}

/// Each hook equals ComfyUI's closure on the same tensors (tests/parity/patches_reference.py copies
/// them from comfy_extras): FreeU/FreeU_V2 (odd sizes and a one-pixel-high activation included),
/// RescaleCFG, CFGZeroStar, CFGNorm, APG with its momentum state and restart, Differential
/// Diffusion's mask schedule, and deep shrink's resizes (Python's round-half-even sizes).
#[test]
fn hooks_equal_comfyui_closures() {
    use diffloom_core::value::Handle;
    use diffloom_nodes::builtin::loaders::CheckpointLoaderSimple;
    use diffloom_nodes::builtin::model_patches as mp;
    use diffloom_nodes::checkpoint::detect::Prediction;
    use diffloom_nodes::checkpoint::synthetic::tiny_four_level_config;
    use diffloom_nodes::patches::{BlockId, CallCx, CfgArgs, ModelPatches};
    use diffloom_nodes::sampling::model_sampling::ModelSampling;
    use diffloom_nodes::sd::SdModel;
    use std::rc::Rc;
    let d = Dir::new();
    crate::parity::run_reference("patches_reference.py", &[d.path()]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&d.join("patches_expected.safetensors")).unwrap();
    let get = |k: &str| r.load(k, tch::Device::Cpu, None).unwrap_or_else(|e| panic!("{k}: {e}"));
    // A model whose first level is 32 wide, as the reference's FreeU assumes.
    let ck = d.join("four.safetensors");
    write_checkpoint(&ck, &tiny_four_level_config(), Kind::Float, 1, true).unwrap();
    let loaded = crate::util::call(&CheckpointLoaderSimple, vec![("ckpt_name", Some(Value::String(ck.display().to_string())))]).unwrap();
    let model = loaded[0].clone();
    let patches = |node: &dyn diffloom_core::Node, args: Vec<(&str, Option<Value>)>| -> Rc<ModelPatches> {
        let mut all = vec![("model", Some(model.clone()))];
        all.extend(args);
        let out = crate::util::call(node, all).unwrap();
        let Value::Model(h) = &out[0] else { panic!() };
        let h: &Handle = h;
        h.downcast::<SdModel>().unwrap().patches.clone()
    };
    let f = |v: f64| Some(Value::Float(v));
    let mut worst = 0f64;
    let mut check = |what: &str, got: &Tensor, want: &Tensor| {
        let e = max_abs_diff(got, want);
        worst = worst.max(e / (1.0 + want.abs().max().double_value(&[])));
        assert!(e <= 1e-5 * (1.0 + want.abs().max().double_value(&[])), "{what}: {e}");
    };
    let cx = |sigma: f32| (sigma, vec![1i64, 4, 8, 8]);
    let (sigma_any, shape) = cx(3.2);
    let call = CallCx { sigma: sigma_any, original_shape: &shape, cond_or_uncond: &[], run: 0 };

    for (v, node, b1, b2) in [("v1", &mp::FreeUNode as &dyn diffloom_core::Node, 1.1, 1.2), ("v2", &mp::FreeUV2, 1.3, 1.4)] {
        let p = patches(node, vec![("b1", f(b1)), ("b2", f(b2)), ("s1", f(0.9)), ("s2", f(0.2))]);
        for (case, skip) in [("h128", "skip128"), ("h64", "skip64"), ("h32", "skip32"), ("h128_odd", "skip128_odd"), ("h64_thin", "skip64_thin")] {
            let (h, s) = p.unet.output_block[0].apply(get(&format!("freeu.{case}")), get(&format!("freeu.{skip}")), BlockId::Output(0), &call).unwrap();
            check(&format!("freeu {v} {case} h"), &h, &get(&format!("freeu.{v}.{case}.h")));
            check(&format!("freeu {v} {case} skip"), &s, &get(&format!("freeu.{v}.{case}.skip")));
        }
    }

    let (x, cond, uncond) = (get("cfg.x"), get("cfg.cond"), get("cfg.uncond"));
    fn cfg_args<'a>(x: &'a Tensor, c: &'a Tensor, u: &'a Tensor, sigma: f64) -> CfgArgs<'a> {
        CfgArgs { input: x, sigma, cond_scale: 6.5, cond_denoised: c, uncond_denoised: u, sides: None, run: 0 }
    }
    for m in [0.7, 0.0] {
        let p = patches(&mp::RescaleCFG, vec![("multiplier", f(m))]);
        check(&format!("rescale {m}"), &p.guide(&cfg_args(&x, &cond, &uncond, 3.2)).unwrap(), &get(&format!("rescale.{m:?}")));
    }
    let p = patches(&mp::CFGZeroStar, vec![]);
    check("cfgzero", &p.guide(&cfg_args(&x, &cond, &uncond, 3.2)).unwrap(), &get("cfgzero"));
    for s in [1.0, 0.5] {
        let p = patches(&mp::CFGNorm, vec![("strength", f(s))]);
        check(&format!("cfgnorm {s}"), &p.guide(&cfg_args(&x, &cond, &uncond, 3.2)).unwrap(), &get(&format!("cfgnorm.{s:?}")));
    }
    let p = patches(&mp::EpsilonScaling, vec![("scaling_factor", f(1.05))]);
    check("epsilon scaling", &p.guide(&cfg_args(&x, &cond, &uncond, 3.2)).unwrap(), &get("eps.1.05"));
    let p = patches(&mp::TemporalScoreRescaling, vec![("tsr_k", f(0.9)), ("tsr_sigma", f(1.3))]);
    check("tsr", &p.guide(&cfg_args(&x, &cond, &uncond, 3.2)).unwrap(), &get("tsr.0.9"));
    let p = patches(&mp::TCFG, vec![]);
    let pre = p.pre(vec![cond.shallow_clone(), uncond.shallow_clone()], &[true, true], &x, 3.2, 6.5).unwrap();
    check("tcfg", &p.guide(&cfg_args(&x, &pre[0], &pre[1], 3.2)).unwrap(), &get("tcfg"));
    let apg = patches(&mp::APG, vec![("eta", f(0.5)), ("norm_threshold", f(5.0)), ("momentum", f(0.3))]);
    let sigmas = get("apg.sigmas");
    for i in 0..3 {
        let (c, u) = (get(&format!("apg.cond.{i}")), get(&format!("apg.uncond.{i}")));
        let sigma = sigmas.double_value(&[i]);
        let pre = apg.pre(vec![c, u], &[true, true], &x, sigma, 6.5).unwrap();
        check(&format!("apg {i}"), &apg.guide(&cfg_args(&x, &pre[0], &pre[1], sigma)).unwrap(), &get(&format!("apg.out.{i}")));
    }
    let plain = patches(&mp::APG, vec![("eta", f(1.0)), ("norm_threshold", f(0.0)), ("momentum", f(0.0))]);
    let pre = plain.pre(vec![get("apg.cond.0"), get("apg.uncond.0")], &[true, true], &x, 3.2, 6.5).unwrap();
    check("apg plain", &plain.guide(&cfg_args(&x, &pre[0], &pre[1], 3.2)).unwrap(), &get("apg.plain"));

    let ms = ModelSampling::sd(Prediction::Eps);
    let run: Vec<f64> = Vec::<f32>::try_from(get("diff.run_sigmas")).unwrap().into_iter().map(f64::from).collect();
    let mask = get("diff.mask");
    for s in [1.0, 0.4] {
        let p = patches(&mp::DifferentialDiffusion, vec![("strength", f(s))]);
        for k in 0..5 {
            let got = p.denoise_mask.as_ref().unwrap().apply(run[k], &mask, &run, &ms).unwrap();
            check(&format!("differential {s} {k}"), &got, &get(&format!("diff.{s:?}.{k}")));
        }
    }

    let shrink = |method: &str| {
        patches(
            &mp::PatchModelAddDownscale,
            vec![
                ("block_number", Some(Value::Int(3))),
                ("downscale_factor", f(2.0)),
                ("start_percent", f(0.0)),
                ("end_percent", f(0.35)),
                ("downscale_after_skip", Some(Value::Boolean(true))),
                ("downscale_method", Some(Value::String("bicubic".into()))),
                ("upscale_method", Some(Value::String(method.into()))),
            ],
        )
    };
    let p = shrink("bilinear");
    let (s5, shape5) = cx(5.0);
    let down = p.unet.input_block_after_skip[0]
        .apply(get("shrink.h"), BlockId::Input(3), &CallCx { sigma: s5, original_shape: &shape5, cond_or_uncond: &[], run: 0 })
        .unwrap();
    assert_eq!(down.size(), [1, 32, 6, 8], "Python's round: 6.5 → 6, 8.5 → 8");
    check("shrink down", &down, &get("shrink.down"));
    // Below the range's end sigma, and at another block, nothing happens.
    let (s1, shape1) = cx(1.0);
    assert_eq!(
        p.unet.input_block_after_skip[0]
            .apply(get("shrink.h"), BlockId::Input(3), &CallCx { sigma: s1, original_shape: &shape1, cond_or_uncond: &[], run: 0 })
            .unwrap()
            .size(),
        [1, 32, 13, 17]
    );
    assert_eq!(
        p.unet.input_block_after_skip[0]
            .apply(get("shrink.h"), BlockId::Input(2), &CallCx { sigma: s5, original_shape: &shape5, cond_or_uncond: &[], run: 0 })
            .unwrap()
            .size(),
        [1, 32, 13, 17]
    );
    let (up, _) = p.unet.output_block[0].apply(get("shrink.up_h"), get("shrink.up_skip"), BlockId::Output(0), &call).unwrap();
    check("shrink up", &up, &get("shrink.up"));
    // SAG: its recorded attention computes what ComfyUI's attention_basic_with_sim does, and the blur map.
    let sag = patches(&mp::SelfAttentionGuidance, vec![("scale", f(0.5)), ("blur_sigma", f(2.0))]);
    let chunks = [0usize, 1];
    let sag_call = CallCx { sigma: 3.2, original_shape: &shape, cond_or_uncond: &chunks, run: 0 };
    let acx = diffloom_nodes::patches::AttnCx { block: BlockId::Middle, transformer: 0, heads: 2, call: &sag_call };
    let attended = sag.unet.attn1_replace[0].1.attend(&get("sag.q"), &get("sag.k"), &get("sag.v"), &acx).unwrap();
    check("sag attention", &attended, &get("sag.out"));
    let blurred = mp::blur_map(&get("sag.x0"), &(get("sag.sim").narrow(0, 0, 2) * 4.0), 2.0).unwrap();
    check("sag blur map", &blurred, &get("sag.blurred"));
    println!("hooks vs ComfyUI's closures: worst relative difference {worst:.2e}");
}

/// LoraSave extracts a LoRA from a model difference (ModelMergeSubtract), in ComfyUI's names; LoraLoader
/// reads it back: full differences restore the other model's weights (to fp16 precision), a full-rank
/// SVD extraction comes close (its values clamped at their 0.99 quantile, as ComfyUI does).
#[test]
fn lora_save_extracts_a_difference_that_lora_loader_applies() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let other = d.join("other.safetensors");
    write_checkpoint(&other, &tiny_config(Family::Sd1, false), Kind::Float, 9, true).unwrap();
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "c2": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {other:?}}}),
        "diff": (type: "ModelMergeSubtract", inputs: {{"model1": Link("c2", "MODEL"), "model2": Link("c", "MODEL"), "multiplier": 1.0}}),
        "full": (type: "LoraSave", inputs: {{"filename_prefix": "loras/full", "rank": 8, "lora_type": "full_diff", "model_diff": Link("diff", "MODEL")}}),
        "svd": (type: "LoraSave", inputs: {{"filename_prefix": "loras/svd", "rank": 4096, "lora_type": "standard", "model_diff": Link("diff", "MODEL")}}),
        "low": (type: "LoraSave", inputs: {{"filename_prefix": "loras/low", "rank": 2, "lora_type": "standard", "model_diff": Link("diff", "MODEL")}}),"#
    );
    outputs(&d, &nodes, &[]).unwrap();
    let saved = |name: &str| d.join(&format!("output/loras/{name}_00001_.safetensors"));
    let f = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&saved("svd")).unwrap();
    assert!(f.tensors().contains_key("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight"));
    assert!(f.tensors().contains_key("diffusion_model.input_blocks.1.0.in_layers.0.diff") && f.tensors().contains_key("diffusion_model.out.2.diff_b"));
    let weights = |lora: &std::path::Path| -> Vec<(String, Tensor)> {
        let nodes = format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "l": (type: "LoraLoaderModelOnly", inputs: {{"model": Link("c", "MODEL"), "lora_name": {lora:?}, "strength_model": 1.0}}),"#
        );
        let v = outputs(&d, &nodes, &[("l", "MODEL", 0)]).unwrap();
        let Value::Model(h) = &v[0] else { panic!() };
        h.downcast::<diffloom_nodes::sd::SdModel>().unwrap().unet.state.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
    };
    let target = diffloom_nodes::checkpoint::load::load_checkpoint(&other, tch::Device::Cpu, Kind::Float).unwrap().unet.unwrap();
    let base = diffloom_nodes::checkpoint::load::load_checkpoint(&ck, tch::Device::Cpu, Kind::Float).unwrap().unet.unwrap();
    // The squared distance to model2's weights, summed over every weight.
    let distance = |w: &[(String, Tensor)]| -> f64 {
        w.iter().map(|(k, t)| (t - &target.state.iter().find(|(n, _)| n == k).unwrap().1).square().sum(Kind::Double).double_value(&[])).sum()
    };
    let start = distance(&base.state);
    let (full, svd, low) = (distance(&weights(&saved("full"))), distance(&weights(&saved("svd"))), distance(&weights(&saved("low"))));
    println!("squared distance to model2: base {start:.3}, full_diff {full:.2e}, full-rank SVD {svd:.3}, rank 2 {low:.3}");
    assert!(full < 1e-6 * start, "full_diff: {full} vs {start}");
    assert!(svd < 0.5 * start && low > svd, "svd {svd}, rank 2 {low}, start {start}");
}

/// HypernetworkLoader reads A1111 hypernetwork pickles and changes the cross-attention's text states as
/// ComfyUI's patch does (tests/parity/hypernetwork_reference.py copies it): ReLU with layer norms, and
/// Mish with an activated output; sampling changes, and strength 0 is the model itself.
#[test]
fn hypernetworks_patch_the_text_states_as_comfyui() {
    use diffloom_nodes::builtin::loaders::{CheckpointLoaderSimple, HypernetworkLoader};
    use diffloom_nodes::patches::{AttnCx, BlockId, CallCx};
    let d = Dir::new();
    crate::parity::run_reference("hypernetwork_reference.py", &[d.path()]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&d.join("hypernetwork_expected.safetensors")).unwrap();
    let get = |k: &str| r.load(k, tch::Device::Cpu, None).unwrap();
    let ck = tiny_sd1(&d, "m.safetensors");
    let model = crate::util::call(&CheckpointLoaderSimple, vec![("ckpt_name", Some(Value::String(ck.display().to_string())))]).unwrap()[0].clone();
    let context = get("input.context");
    let call = CallCx { sigma: 1.0, original_shape: &[1, 4, 8, 8], cond_or_uncond: &[], run: 0 };
    let cx = AttnCx { block: BlockId::Middle, transformer: 0, heads: 2, call: &call };
    for name in ["relu_ln", "mish_out"] {
        let path = d.join(&format!("{name}.pt")).display().to_string();
        let out = crate::util::call(
            &HypernetworkLoader,
            vec![("model", Some(model.clone())), ("hypernetwork_name", Some(Value::String(path))), ("strength", Some(Value::Float(0.8)))],
        )
        .unwrap();
        let Value::Model(h) = &out[0] else { panic!() };
        let p = h.downcast::<diffloom_nodes::sd::SdModel>().unwrap().patches.clone();
        let (_, k, v) = p.unet.attn2_patch[0].apply(context.zeros_like(), context.shallow_clone(), context.shallow_clone(), &cx).unwrap();
        let (ek, ev) = (max_abs_diff(&k, &get(&format!("{name}.k"))), max_abs_diff(&v, &get(&format!("{name}.v"))));
        println!("{name}: k {ek:.2e}, v {ev:.2e}");
        assert!(ek < 1e-5 && ev < 1e-5, "{name}");
        assert!(max_abs_diff(&k, &context) > 1e-2);
    }
    let hn = d.join("relu_ln.pt");
    let patches = format!(
        r#""h": (type: "HypernetworkLoader", inputs: {{"model": Link("c", "MODEL"), "hypernetwork_name": {hn:?}, "strength": 1.0}}),
        "h0": (type: "HypernetworkLoader", inputs: {{"model": Link("c", "MODEL"), "hypernetwork_name": {hn:?}, "strength": 0.0}}),"#
    );
    let out = sample_each(&d, &ck, &patches, &[("c", "MODEL"), ("h", "MODEL"), ("h0", "MODEL")], 5.0);
    assert!(max_abs_diff(&out[1], &out[0]) > 1e-3);
    assert_eq!(max_abs_diff(&out[2], &out[0]), 0.0);
}

/// CLIP merges weigh the text encoders as the model merges do (ratio 1 is clip1, 0 is clip2, exactly),
/// and LoraSave extracts a text-encoder difference that LoraLoader applies back (full differences).
#[test]
fn clip_merges_and_text_encoder_lora_extraction() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let other = d.join("other.safetensors");
    write_checkpoint(&other, &tiny_config(Family::Sd1, false), Kind::Float, 9, true).unwrap();
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "c2": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {other:?}}}),
        "keep": (type: "CLIPMergeSimple", inputs: {{"clip1": Link("c", "CLIP"), "clip2": Link("c2", "CLIP"), "ratio": 1.0}}),
        "take": (type: "CLIPMergeSimple", inputs: {{"clip1": Link("c", "CLIP"), "clip2": Link("c2", "CLIP"), "ratio": 0.0}}),
        "sum": (type: "CLIPMergeAdd", inputs: {{"clip1": Link("c", "CLIP"), "clip2": Link("c2", "CLIP")}}),
        "back": (type: "CLIPMergeSubtract", inputs: {{"clip1": Link("sum", "CLIP"), "clip2": Link("c2", "CLIP"), "multiplier": 1.0}}),
        "diff": (type: "CLIPMergeSubtract", inputs: {{"clip1": Link("c2", "CLIP"), "clip2": Link("c", "CLIP"), "multiplier": 1.0}}),
        "save": (type: "LoraSave", inputs: {{"filename_prefix": "loras/te", "rank": 8, "lora_type": "full_diff", "text_encoder_diff": Link("diff", "CLIP")}}),"#
    );
    let enc = |id: &str| format!(r#""p_{id}": (type: "CLIPTextEncode", inputs: {{"text": "a red fox", "clip": Link({id:?}, "CLIP")}}),"#);
    let all = ["c", "c2", "keep", "take", "back"].iter().map(|id| enc(id)).collect::<String>();
    let wanted: Vec<String> = ["c", "c2", "keep", "take", "back"].iter().map(|id| format!("p_{id}")).collect();
    let wanted: Vec<(&str, &str, usize)> = wanted.iter().map(|w| (w.as_str(), "CONDITIONING", 0)).collect();
    let v = outputs(&d, &format!("{nodes}{all}"), &wanted).unwrap();
    let c = |v: &Value| match v {
        Value::Conditioning(c) => c[0].cross_attn.0.shallow_clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(max_abs_diff(&c(&v[2]), &c(&v[0])), 0.0);
    assert_eq!(max_abs_diff(&c(&v[3]), &c(&v[1])), 0.0);
    assert!(max_abs_diff(&c(&v[4]), &c(&v[0])) < 1e-4);
    // The extracted text-encoder LoRA on clip1 gives clip2's conditioning (fp16 differences).
    let lora = d.join("output/loras/te_00001_.safetensors");
    assert!(lora.exists());
    let nodes2 = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "l": (type: "LoraLoader", inputs: {{"model": Link("c", "MODEL"), "clip": Link("c", "CLIP"), "lora_name": {lora:?}, "strength_model": 0.0, "strength_clip": 1.0}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a red fox", "clip": Link("l", "CLIP")}}),"#
    );
    let v2 = outputs(&d, &nodes2, &[("p", "CONDITIONING", 0)]).unwrap();
    let (err, start) = (max_abs_diff(&c(&v2[0]), &c(&v[1])), max_abs_diff(&c(&v[0]), &c(&v[1])));
    println!("text encoder via the extracted LoRA vs clip2: {err:.2e} (clip1 vs clip2: {start:.2})");
    assert!(err < 1e-2 * start, "{err} vs {start}");
}

/// ModelSave, CLIPSave and VAESave write the parts in the names ComfyUI uses; UNETLoader, CLIPLoader
/// and VAELoader read them back into a model that samples exactly as the checkpoint (a merged UNet
/// here, so the saved weights are the patched ones).
#[test]
fn part_savers_round_trip_through_the_part_loaders() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let other = d.join("other.safetensors");
    write_checkpoint(&other, &tiny_config(Family::Sd1, false), Kind::Float, 9, true).unwrap();
    let nodes = format!(
        r#""c2": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {other:?}}}),
        "half": (type: "ModelMergeSimple", inputs: {{"model1": Link("c", "MODEL"), "model2": Link("c2", "MODEL"), "ratio": 0.7}}),
        "sm": (type: "ModelSave", inputs: {{"model": Link("half", "MODEL"), "filename_prefix": "parts/unet"}}),
        "sc": (type: "CLIPSave", inputs: {{"clip": Link("c", "CLIP"), "filename_prefix": "parts/te"}}),
        "sv": (type: "VAESave", inputs: {{"vae": Link("c", "VAE"), "filename_prefix": "parts/vae"}}),"#
    );
    let merged = sample_each(&d, &ck, &nodes, &[("half", "MODEL")], 4.0);
    let out = |name: &str| d.join(&format!("output/parts/{name}_00001_.safetensors"));
    for f in ["unet", "te_clip_l", "vae"] {
        assert!(out(f).exists(), "{f}");
    }
    let te = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&out("te_clip_l")).unwrap();
    assert!(te.tensors().keys().all(|k| k.starts_with("text_model.")));
    let graph = format!(
        r#""u": (type: "UNETLoader", inputs: {{"unet_name": {:?}, "weight_dtype": "default"}}),
        "t": (type: "CLIPLoader", inputs: {{"clip_name": {:?}, "type": "stable_diffusion"}}),
        "v": (type: "VAELoader", inputs: {{"vae_name": {:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a lighthouse", "clip": Link("t", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("t", "CLIP")}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 1}}),
        "s": (type: "KSampler", inputs: {{"model": Link("u", "MODEL"), "seed": 2, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
        "dec": (type: "VAEDecode", inputs: {{"samples": Link("s", "LATENT"), "vae": Link("v", "VAE")}}),"#,
        out("unet"),
        out("te_clip_l"),
        out("vae")
    );
    let v = outputs(&d, &graph, &[("s", "LATENT", 0), ("dec", "IMAGE", 0)]).unwrap();
    assert_eq!(max_abs_diff(&samples(&v[0]), &merged[0]), 0.0);
}

/// PerturbedAttentionGuidance against diffusers' PAG (tests/parity/pag_reference.py): the tiny SD1 model
/// loaded into diffusers' UNet, PAG's layers and processors chosen by diffusers' own PAGMixin
/// (`pag_applied_layers="mid"`, the identity self-attention processors). The perturbed pass (ComfyUI's
/// `("middle", 0)` attn1 replacement) equals diffusers' perturbed rows, and ComfyUI's post-CFG
/// `cfg_result + scale·(cond − perturbed)` on denoised predictions equals diffusers'
/// `uncond + g·(text − uncond) + s·(text − perturb)` on noise predictions, CFG 1 (no unconditional
/// pass, diffusers' two-chunk path) and scale 0 included.
#[test]
fn pag_matches_diffusers() {
    use diffloom_core::value::Handle;
    use diffloom_nodes::builtin::loaders::CheckpointLoaderSimple;
    use diffloom_nodes::builtin::model_patches as mp;
    use diffloom_nodes::patches::ModelRunner;
    use diffloom_nodes::sampling::conds::Cond;
    use diffloom_nodes::sampling::guidance::{CfgDenoiser, Denoiser, Guidance};
    use diffloom_nodes::sampling::model_sampling::ModelSampling;
    use diffloom_nodes::sd::SdModel;
    let d = Dir::new();
    let ck = tiny_sd1(&d, "tiny-sd1.safetensors");
    let out = d.join("pag.safetensors");
    crate::parity::run_reference("pag_reference.py", &[&ck, &out]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&out).unwrap();
    let get = |k: &str| r.load(k, tch::Device::Cpu, None).unwrap_or_else(|e| panic!("{k}: {e}"));
    let _g = tch::no_grad_guard();
    let (x, cond, uncond) = (get("input.x"), get("input.cond"), get("input.uncond"));
    let sigma = get("input.sigma").double_value(&[0]);
    let model = crate::util::call(&CheckpointLoaderSimple, vec![("ckpt_name", Some(Value::String(ck.display().to_string())))]).unwrap()[0].clone();
    let pag = |scale: f64| {
        let out = crate::util::call(&mp::PerturbedAttentionGuidance, vec![("model", Some(model.clone())), ("scale", Some(Value::Float(scale)))]).unwrap();
        let Value::Model(h) = &out[0] else { panic!() };
        let h: &Handle = h;
        h.downcast::<SdModel>().unwrap().patches.clone()
    };
    let Value::Model(h) = &model else { panic!() };
    let m: &SdModel = h.downcast().unwrap();
    let ms = ModelSampling::new(m.sampling);
    let sides = || vec![vec![Cond::whole(cond.shallow_clone(), &x.size())], vec![Cond::whole(uncond.shallow_clone(), &x.size())]];
    let check = |what: &str, got: &Tensor, want: &Tensor| {
        let e = max_abs_diff(got, want);
        println!("PAG {what}: max |diffloom - diffusers| = {e:.2e}");
        assert!(e < 1e-4, "{what}: {e}");
    };

    // (a) The perturbed pass alone, with the overlay PAG's post-CFG function uses.
    let den = CfgDenoiser::new(&m.unet, &ms, sides(), Guidance::Cfg(5.0));
    check("cond", &den.side_prediction(0, &x, sigma, &Default::default()).unwrap(), &get("pag.cond"));
    let perturbed = den.side_prediction(0, &x, sigma, &mp::pag_perturbation()).unwrap();
    check("perturbed", &perturbed, &get("pag.perturbed"));
    assert!(max_abs_diff(&perturbed, &get("pag.cond")) > 1e-3, "the perturbation changed nothing");

    // (b) One guided prediction through the node's post-CFG function.
    for (g, s) in [(5.0, 3.0), (1.0, 2.5), (7.5, 0.0)] {
        let mut den = CfgDenoiser::new(&m.unet, &ms, sides(), Guidance::Cfg(g));
        den.patches = pag(s);
        check(&format!("guided cfg {g} scale {s}"), &den.denoise(&x, sigma).unwrap(), &get(&format!("pag.guided.{g:?}.{s:?}")));
    }
}

/// FreeU and FreeU_V2 on a whole UNet against diffusers (tests/parity/freeu_reference.py): the tiny
/// four-level model (32, 64, 128, 128 channels, so both of ComfyUI's keys occur) in diffusers' UNet with
/// FreeU enabled, its factors chosen as ComfyUI chooses them (by the backbone's channel count) and applied
/// by diffusers' own `apply_freeu` (v1) or ComfyUI's V2 body. diffusers' native selection (its first two up
/// blocks) is another model: diffloom, following ComfyUI, must differ from it (the docstring says where).
#[test]
fn freeu_matches_diffusers() {
    use diffloom_core::value::Handle;
    use diffloom_nodes::builtin::loaders::CheckpointLoaderSimple;
    use diffloom_nodes::builtin::model_patches as mp;
    use diffloom_nodes::checkpoint::synthetic::tiny_four_level_config;
    use diffloom_nodes::patches::CallCx;
    use diffloom_nodes::sd::SdModel;
    let d = Dir::new();
    let ck = d.join("four.safetensors");
    write_checkpoint(&ck, &tiny_four_level_config(), Kind::Float, 6, true).unwrap();
    let out = d.join("freeu.safetensors");
    crate::parity::run_reference("freeu_reference.py", &[&ck, &out]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&out).unwrap();
    let get = |k: &str| r.load(k, tch::Device::Cpu, None).unwrap_or_else(|e| panic!("{k}: {e}"));
    let _g = tch::no_grad_guard();
    let (x, t, context) = (get("input.x"), get("input.t"), get("input.context"));
    let model = crate::util::call(&CheckpointLoaderSimple, vec![("ckpt_name", Some(Value::String(ck.display().to_string())))]).unwrap()[0].clone();
    let f = |v: f64| Some(Value::Float(v));
    let run = |node: Option<(&dyn diffloom_core::Node, [f64; 4])>| {
        let m = match node {
            Some((node, [b1, b2, s1, s2])) => {
                crate::util::call(node, vec![("model", Some(model.clone())), ("b1", f(b1)), ("b2", f(b2)), ("s1", f(s1)), ("s2", f(s2))]).unwrap()[0].clone()
            }
            None => model.clone(),
        };
        let Value::Model(h) = &m else { panic!() };
        let h: &Handle = h;
        let m: &SdModel = h.downcast().unwrap();
        let cx = CallCx { sigma: 0.0, original_shape: &x.size(), cond_or_uncond: &[0], run: 0 };
        m.unet.forward_patched(&x, &t, &context, None, None, &m.patches.unet, &cx).unwrap()
    };
    let check = |what: &str, got: &Tensor, want: &Tensor| {
        let e = max_abs_diff(got, want);
        println!("{what}: max |diffloom - diffusers| = {e:.2e}");
        assert!(e < 1e-4, "{what}: {e}");
    };
    let plain = run(None);
    check("no FreeU", &plain, &get("freeu.plain"));
    let v1 = run(Some((&mp::FreeUNode, [1.1, 1.2, 0.9, 0.2])));
    check("FreeU (ComfyUI's blocks, diffusers' apply_freeu)", &v1, &get("freeu.v1"));
    check("FreeU_V2 (ComfyUI's blocks and body in diffusers' UNet)", &run(Some((&mp::FreeUV2, [1.3, 1.4, 0.9, 0.2]))), &get("freeu.v2"));
    assert!(max_abs_diff(&v1, &plain) > 1e-3, "FreeU changed nothing");
    let native = max_abs_diff(&v1, &get("freeu.diffusers_v1"));
    println!("FreeU vs diffusers' own enable_freeu (its first two up blocks): {native:.2e}");
    assert!(native > 1e-3, "diffusers' block selection should differ from ComfyUI's here");
}
