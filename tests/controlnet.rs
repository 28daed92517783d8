//! ControlNets and T2I-Adapters: loading every layout, the apply nodes' semantics (chains, ranges,
//! strength 0, the deprecated node's negative side, batches, hint sizes), clear errors, and parity with
//! diffusers' own single-file conversion and T2IAdapter (tests/parity/controlnet_reference.py).

use std::path::{Path, PathBuf};

use diffloom_core::Value;
use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, tiny_controlnet_config, write_checkpoint, write_controlnet, write_safetensors};
use tch::{Device, Kind, Tensor};

use crate::util::{max_abs_diff, outputs, tiny_sd1, Dir};

/// Writes the tiny SD1 model's ControlNet as `dir/name`.
pub fn tiny_controlnet(d: &Dir, name: &str) -> PathBuf {
    let path = d.join(name);
    let unet = tiny_config(Family::Sd1, false).unet.unwrap();
    write_controlnet(&path, &tiny_controlnet_config(&unet), Kind::Float, 21).unwrap();
    path
}

fn samples(v: &Value) -> Tensor {
    match v {
        Value::Latent(l) => l.samples.0.shallow_clone(),
        other => panic!("{other:?}"),
    }
}

/// A txt2img graph on `ck` with the ControlNet `cn` (a path) applied by the node entries `apply`, which
/// read "cn" (CONTROL_NET), "hint" (IMAGE), "p" and "n" and produce "ap"'s positive and negative.
fn graph(ck: &Path, cn: &Path, hint: &Path, apply: &str, batch: i64) -> String {
    format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a house by a lake", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "cn": (type: "ControlNetLoader", inputs: {{"control_net_name": {cn:?}}}),
        "img": (type: "LoadImage", inputs: {{"image": {hint:?}}}),
        "hint": (type: "Canny", inputs: {{"image": Link("img", "IMAGE"), "low_threshold": 0.2, "high_threshold": 0.5}}),
        {apply}
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": {batch}}}),
        "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("ap", "positive"), "negative": Link("ap", "negative"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
        "plain": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
    )
}

fn advanced(strength: f64, start: f64, end: f64) -> String {
    format!(
        r#""ap": (type: "ControlNetApplyAdvanced", inputs: {{"positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"),
              "control_net": Link("cn", "CONTROL_NET"), "image": Link("hint", "IMAGE"), "strength": {strength:?}, "start_percent": {start:?}, "end_percent": {end:?}}}),"#
    )
}

/// (controlled, plain) final latents.
fn run(d: &Dir, ck: &Path, cn: &Path, hint: &Path, apply: &str, batch: i64) -> (Tensor, Tensor) {
    let v = outputs(d, &graph(ck, cn, hint, apply, batch), &[("s", "LATENT", 0), ("plain", "LATENT", 0)]).unwrap();
    (samples(&v[0]), samples(&v[1]))
}

#[test]
fn controlnets_guide_sampling_as_comfyui_applies_them() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let cn = tiny_controlnet(&d, "cn.safetensors");
    let hint = d.png("hint.png", 64, 64, 5);

    let (full, plain) = run(&d, &ck, &cn, &hint, &advanced(1.0, 0.0, 1.0), 1);
    let effect = max_abs_diff(&full, &plain);
    println!("ControlNet at strength 1 moves the latent by {effect:.3}");
    assert!(effect > 1e-2, "the ControlNet changed nothing ({effect})");

    // Strength 0 returns the conditioning as it was: the plain result, bit for bit. So does a range
    // that no step falls in (start = end = 1: sigma 0, below every step's).
    for apply in [advanced(0.0, 0.0, 1.0), advanced(1.0, 1.0, 1.0)] {
        let (s, plain) = run(&d, &ck, &cn, &hint, &apply, 1);
        assert_eq!(max_abs_diff(&s, &plain), 0.0, "{apply}");
    }
    // Half the strength and a partial range each give something in between.
    let (half, _) = run(&d, &ck, &cn, &hint, &advanced(0.5, 0.0, 1.0), 1);
    let (late, _) = run(&d, &ck, &cn, &hint, &advanced(1.0, 0.4, 1.0), 1);
    for (what, t) in [("strength 0.5", &half), ("from 40%", &late)] {
        assert!(max_abs_diff(t, &plain) > 1e-3 && max_abs_diff(t, &full) > 1e-3, "{what}");
    }

    // The deprecated node puts the ControlNet on the positive side only; at sampling the negative side
    // gets that same application (control_apply_to_uncond), so both sides batch together exactly as
    // with the advanced node over the whole run.
    let old = r#""ap0": (type: "ControlNetApply", inputs: {"conditioning": Link("p", "CONDITIONING"), "control_net": Link("cn", "CONTROL_NET"), "image": Link("hint", "IMAGE"), "strength": 1.0}),
        "ap": (type: "ConditioningZeroOut", inputs: {"conditioning": Link("n", "CONDITIONING")}),"#;
    let nodes = graph(&ck, &cn, &hint, old, 1).replace(
        r#""positive": Link("ap", "positive"), "negative": Link("ap", "negative")"#,
        r#""positive": Link("ap0", "CONDITIONING"), "negative": Link("n", "CONDITIONING")"#,
    );
    let v = outputs(&d, &nodes, &[("s", "LATENT", 0)]).unwrap();
    assert_eq!(max_abs_diff(&samples(&v[0]), &full), 0.0, "ControlNetApply ≠ ControlNetApplyAdvanced over the whole run");

    // Two ControlNets chained, each with its own image and strength: their residuals add up.
    let chain = format!(
        r#"{}
        "inv": (type: "ImageInvert", inputs: {{"image": Link("hint", "IMAGE")}}),
        "ap": (type: "ControlNetApplyAdvanced", inputs: {{"positive": Link("ap1", "positive"), "negative": Link("ap1", "negative"),
              "control_net": Link("cn", "CONTROL_NET"), "image": Link("inv", "IMAGE"), "strength": 0.6, "start_percent": 0.0, "end_percent": 1.0}}),"#,
        advanced(1.0, 0.0, 1.0).replacen("\"ap\"", "\"ap1\"", 1)
    );
    let (two, _) = run(&d, &ck, &cn, &hint, &chain, 1);
    assert!(max_abs_diff(&two, &full) > 1e-3, "the second ControlNet changed nothing");

    // A batch of two latents with one hint image, and a hint of another size and aspect (resized and
    // centre-cropped to the latent's pixels as ComfyUI does).
    let (batch, plain2) = run(&d, &ck, &cn, &hint, &advanced(1.0, 0.0, 1.0), 2);
    assert_eq!(batch.size(), [2, 4, 8, 8]);
    assert!(max_abs_diff(&batch, &plain2) > 1e-2);
    let wide = d.png("wide.png", 96, 40, 9);
    let (resized, _) = run(&d, &ck, &cn, &wide, &advanced(1.0, 0.0, 1.0), 1);
    assert!(max_abs_diff(&resized, &plain) > 1e-2 && max_abs_diff(&resized, &full) > 1e-3);
}

/// Rewrites the ControlNet `cn` as a "diff" ControlNet for the UNet of checkpoint `ck`.
fn write_diff(cn: &Path, ck: &Path, out: &Path) {
    use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
    let (c, m) = (SafetensorsFile::open(cn).unwrap(), SafetensorsFile::open(ck).unwrap());
    let mut tensors: Vec<(String, Tensor)> = c
        .tensors()
        .keys()
        .map(|k| {
            let t = c.load(k, Device::Cpu, None).unwrap();
            let base = k.strip_prefix("control_model.").and_then(|n| m.load(&format!("model.diffusion_model.{n}"), Device::Cpu, None).ok());
            (
                k.clone(),
                match base {
                    Some(b) if b.size() == t.size() => t - b,
                    _ => t,
                },
            )
        })
        .collect();
    tensors.push(("difference".into(), Tensor::from_slice(&[0f32])));
    write_safetensors(out, &tensors, Some(c.metadata.clone())).unwrap();
}

#[test]
fn controlnet_files_of_every_kind_and_clear_errors() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let cn = tiny_controlnet(&d, "cn.safetensors");
    let hint = d.png("hint.png", 64, 64, 5);
    let (reference, _) = run(&d, &ck, &cn, &hint, &advanced(1.0, 0.0, 1.0), 1);

    // Without the `control_model.` prefix, in fp16, and as a .pth pickle: the same ControlNet.
    let c = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&cn).unwrap();
    let all: Vec<(String, Tensor)> = c.tensors().keys().map(|k| (k.clone(), c.load(k, Device::Cpu, None).unwrap())).collect();
    let bare: Vec<(String, Tensor)> = all.iter().map(|(k, t)| (k.trim_start_matches("control_model.").to_owned(), t.shallow_clone())).collect();
    write_safetensors(&d.join("bare.safetensors"), &bare, Some(c.metadata.clone())).unwrap();
    let (s, _) = run(&d, &ck, &d.join("bare.safetensors"), &hint, &advanced(1.0, 0.0, 1.0), 1);
    assert_eq!(max_abs_diff(&s, &reference), 0.0, "no prefix");
    let half: Vec<(String, Tensor)> = all.iter().map(|(k, t)| (k.clone(), t.to_kind(Kind::Half))).collect();
    write_safetensors(&d.join("half.safetensors"), &half, Some(c.metadata.clone())).unwrap();
    let (s, _) = run(&d, &ck, &d.join("half.safetensors"), &hint, &advanced(1.0, 0.0, 1.0), 1);
    let err = max_abs_diff(&s, &reference);
    assert!(err > 0.0 && err < 5e-2, "fp16 weights: {err}");
    let pth = d.join("cn.pth");
    let script = "import sys, torch; from safetensors.torch import load_file; torch.save({'state_dict': load_file(sys.argv[1])}, sys.argv[2])";
    let out = std::process::Command::new(crate::parity::python()).args(["-c", script]).arg(&cn).arg(&pth).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // (A pickle has no metadata: the tiny head layout is not detectable, so compare the loaded config.)
    let e = outputs(&d, &format!(r#""cn": (type: "ControlNetLoader", inputs: {{"control_net_name": {pth:?}}}),"#), &[("cn", "CONTROL_NET", 0)]);
    assert!(e.is_ok(), "{e:?}");

    // A diff ControlNet: the model's weights added back give the same ControlNet; ControlNetLoader
    // alone says which loader it needs.
    let diff = d.join("diff.safetensors");
    write_diff(&cn, &ck, &diff);
    let e = run_err(&d, &ck, &diff, &hint);
    assert!(e.contains("diff.safetensors") && e.contains("DiffControlNetLoader"), "{e}");
    let nodes = graph(&ck, &diff, &hint, &advanced(1.0, 0.0, 1.0), 1).replace(
        &format!(r#""cn": (type: "ControlNetLoader", inputs: {{"control_net_name": {diff:?}}})"#),
        &format!(r#""cn": (type: "DiffControlNetLoader", inputs: {{"model": Link("c", "MODEL"), "control_net_name": {diff:?}}})"#),
    );
    let v = outputs(&d, &nodes, &[("s", "LATENT", 0)]).unwrap();
    let err = max_abs_diff(&samples(&v[0]), &reference);
    assert!(err < 1e-4, "diff ControlNet: {err}");

    // A ControlNet for SD 1.x on an SD 2.x model names both files.
    let sd2 = d.join("sd2.safetensors");
    write_checkpoint(&sd2, &tiny_config(Family::Sd2, false), Kind::Float, 2, true).unwrap();
    let mut sd2_unet = tiny_config(Family::Sd2, false).unet.unwrap();
    sd2_unet.context_dim = 48;
    let wide = d.join("wide-context.safetensors");
    write_controlnet(&wide, &tiny_controlnet_config(&sd2_unet), Kind::Float, 4).unwrap();
    let e = run_err(&d, &sd2, &wide, &hint);
    assert!(e.contains("wide-context.safetensors") && e.contains("sd2.safetensors") && e.contains("48"), "{e}");

    // Other families are named and refused; a file that is neither is an error naming it.
    for (name, key, what) in [
        ("xl.safetensors", "control_model.label_emb.0.0.weight", "SDXL"),
        ("flux.safetensors", "controlnet_x_embedder.weight", "Flux"),
        ("cascade.safetensors", "backbone.0.0.weight", "Stable Cascade"),
        ("other.safetensors", "something.weight", "neither a ControlNet"),
    ] {
        let path = d.join(name);
        write_safetensors(&path, &[(key.to_owned(), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)))], None).unwrap();
        let e = run_err(&d, &ck, &path, &hint);
        assert!(e.contains(name) && e.contains(what), "{e}");
    }
}

/// The error of the ControlNet graph on `ck` with `cn`.
fn run_err(d: &Dir, ck: &Path, cn: &Path, hint: &Path) -> String {
    outputs(d, &graph(ck, cn, hint, &advanced(1.0, 0.0, 1.0), 1), &[("s", "LATENT", 0)]).expect_err("an error")
}

fn image(v: &Value) -> Tensor {
    match v {
        Value::Image(t) => t.0.shallow_clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn canny_and_morphology_equal_kornia() {
    use diffloom_core::value::Shared;
    use diffloom_nodes::builtin::preprocessors::{Canny, Morphology};
    let d = Dir::new();
    crate::parity::run_reference("kornia_reference.py", &[d.path()]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&d.join("kornia_expected.safetensors")).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    let mut checked = 0;
    for name in ["noise", "shapes", "large"] {
        let input = get(&format!("input.{name}"));
        let (magnitude, _) = diffloom_nodes::filters::canny(&input.permute([0, 3, 1, 2]), 0.4, 0.8).unwrap();
        assert_eq!(max_abs_diff(&magnitude, &get(&format!("canny_magnitude.{name}"))), 0.0, "magnitude of {name}");
        for (low, high) in [(0.4, 0.8), (0.1, 0.3), (0.05, 0.95), (0.5, 0.5)] {
            let args = vec![
                ("image", Some(Value::Image(Shared(input.shallow_clone())))),
                ("low_threshold", Some(Value::Float(low))),
                ("high_threshold", Some(Value::Float(high))),
            ];
            let got = image(&crate::util::call(&Canny, args).unwrap()[0]);
            let want = get(&format!("canny.{name}.{low:?}_{high:?}"));
            let wrong = got.ne_tensor(&want).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(wrong, 0, "Canny {name} ({low}, {high}): {wrong} pixels differ");
            checked += 1;
        }
        if name == "large" {
            continue;
        }
        for op in diffloom_nodes::filters::MORPHOLOGY_OPS {
            for k in [1i128, 3, 4] {
                let args = vec![
                    ("image", Some(Value::Image(Shared(input.shallow_clone())))),
                    ("operation", Some(Value::String(op.into()))),
                    ("kernel_size", Some(Value::Int(k))),
                ];
                let got = image(&crate::util::call(&Morphology, args).unwrap()[0]);
                assert_eq!(max_abs_diff(&got, &get(&format!("morph.{name}.{op}.{k}"))), 0.0, "{op} {k} on {name}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 12 + 2 * 21);
    // A low threshold above the high one is an error naming the input (kornia raises too).
    let args = vec![
        ("image", Some(Value::Image(Shared(get("input.shapes"))))),
        ("low_threshold", Some(Value::Float(0.6))),
        ("high_threshold", Some(Value::Float(0.3))),
    ];
    let e = crate::util::call(&Canny, args).err().unwrap().to_string();
    assert!(e.contains("low_threshold") && e.contains("above the high"), "{e}");
}

/// The files tests/parity/controlnet_reference.py reads, written as make-test-models writes them.
fn write_control_models(d: &Dir) {
    use diffloom_nodes::checkpoint::synthetic::{tiny_adapter_config, tiny_four_level_config, write_t2i_adapter};
    tiny_sd1(d, "tiny-sd1.safetensors");
    tiny_controlnet(d, "tiny-sd1-controlnet.safetensors");
    write_checkpoint(&d.join("tiny-sd1-4level.safetensors"), &tiny_four_level_config(), Kind::Float, 6, true).unwrap();
    write_t2i_adapter(&d.join("tiny-t2i-adapter.safetensors"), &tiny_adapter_config(false), 22).unwrap();
    write_t2i_adapter(&d.join("tiny-t2i-adapter-light.safetensors"), &tiny_adapter_config(true), 23).unwrap();
}

#[test]
fn controlnet_and_adapters_match_diffusers() {
    use diffloom_nodes::checkpoint::control::{load_control, ControlModel};
    use diffloom_nodes::checkpoint::load::load_checkpoint;
    use diffloom_nodes::models::unet::Residuals;
    let d = Dir::new();
    write_control_models(&d);
    let out = d.join("reference");
    crate::parity::run_reference("controlnet_reference.py", &[d.path(), &out]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&out.join("controlnet_expected.safetensors")).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    let _g = tch::no_grad_guard();
    let (x, t, context, hint) = (get("input.x"), get("input.t"), get("input.context"), get("input.hint"));
    let unet = load_checkpoint(&d.join("tiny-sd1.safetensors"), Device::Cpu, Kind::Float).unwrap().unet.unwrap();
    let scaled = |r: &Residuals, s: f64| Residuals {
        input: Vec::new(),
        middle: r.middle.as_ref().map(|m| m * s),
        output: r.output.iter().map(|o| o.as_ref().map(|o| o * s)).collect(),
    };
    // The original single file and the diffusers folder diffusers saved from it.
    for file in [d.join("tiny-sd1-controlnet.safetensors"), out.join("diffusers_controlnet/diffusion_pytorch_model.safetensors")] {
        let Ok((ControlModel::ControlNet(net), _)) = load_control(&file, Device::Cpu, Kind::Float, None) else {
            panic!("{} is not a ControlNet", file.display())
        };
        let res = net.forward(&x, &hint, &t, &context);
        let mut worst = 0f64;
        for (i, o) in res.output.iter().enumerate() {
            worst = worst.max(max_abs_diff(o.as_ref().unwrap(), &get(&format!("cn.down.{i}"))));
        }
        assert_eq!(res.output.len(), 4);
        worst = worst.max(max_abs_diff(res.middle.as_ref().unwrap(), &get("cn.mid")));
        let full = unet.forward_controlled(&x, &t, &context, None, Some(&res));
        let half = unet.forward_controlled(&x, &t, &context, None, Some(&scaled(&res, 0.5)));
        let (e_full, e_half) = (max_abs_diff(&full, &get("unet.controlled")), max_abs_diff(&half, &get("unet.controlled_half")));
        println!("{}: residuals {worst:.2e}, UNet with them {e_full:.2e} (strength 0.5: {e_half:.2e})", file.display());
        assert!(worst < 1e-4 && e_full < 1e-4 && e_half < 1e-4);
        // Strength 0 adds zeros: the plain UNet result, bit for bit.
        let zero = unet.forward_controlled(&x, &t, &context, None, Some(&scaled(&res, 0.0)));
        assert_eq!(max_abs_diff(&zero, &unet.forward(&x, &t, &context)), 0.0);
        assert!(max_abs_diff(&zero, &get("unet.plain")) < 1e-4);
    }

    // T2I-Adapters: features, and the four-level UNet with the full adapter's features added.
    let unet4 = load_checkpoint(&d.join("tiny-sd1-4level.safetensors"), Device::Cpu, Kind::Float).unwrap().unet.unwrap();
    let (x4, context4) = (get("input.x4"), get("input.context4"));
    for (kind, file, hint) in
        [("full", "tiny-t2i-adapter.safetensors", get("input.hint_grey")), ("light", "tiny-t2i-adapter-light.safetensors", hint.shallow_clone())]
    {
        let Ok((ControlModel::Adapter(a), _)) = load_control(&d.join(file), Device::Cpu, Kind::Float, None) else { panic!("{file} is not an adapter") };
        let features = a.forward(&hint);
        assert_eq!(features.len(), 4);
        let worst = features.iter().enumerate().map(|(i, f)| max_abs_diff(f, &get(&format!("t2i.{kind}.{i}")))).fold(0f64, f64::max);
        let mut input: Vec<Option<Tensor>> = (0..12).map(|_| None).collect();
        for (i, f) in features.iter().enumerate() {
            input[3 * i + 2] = Some(f.shallow_clone());
        }
        let got = unet4.forward_controlled(&x4, &t, &context4, None, Some(&Residuals { input, ..Default::default() }));
        let e = max_abs_diff(&got, &get(&format!("unet4.adapter_{kind}")));
        println!("T2I-Adapter {kind}: features {worst:.2e}, UNet with them {e:.2e}");
        assert!(worst < 1e-4 && e < 1e-4);
    }
}

/// End to end: the Canny ControlNet txt2img graph a ComfyUI user builds (euler/normal, cfg 5, 6 steps)
/// against diffusers' own StableDiffusionControlNetPipeline on the same files, hint, seed and prompt
/// embeddings (tests/parity/pipeline_reference.py, mode controlnet: ComfyUI's integer timesteps, and its
/// initial noise scale √(1+σ₀²) through the scheduler's "leading" spacing, checked while it runs).
#[test]
fn canny_controlnet_txt2img_matches_diffusers_controlnet_pipeline() {
    use diffloom_nodes::checkpoint::detect::Prediction;
    use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
    use diffloom_nodes::sampling::ksampler::ksampler_sigmas;
    use diffloom_nodes::sampling::model_sampling::ModelSampling;
    const STEPS: i64 = 6;
    const SEED: i64 = 42;
    let d = Dir::new();
    let ck = tiny_sd1(&d, "tiny-sd1.safetensors");
    let cn = tiny_controlnet(&d, "tiny-sd1-controlnet.safetensors");
    std::fs::copy(crate::util::repo().join("graphs/inputs/house.png"), d.join("house.png")).unwrap();
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a cottage in a meadow, watercolor", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "img": (type: "LoadImage", inputs: {{"image": "house.png"}}),
        "small": (type: "ImageScale", inputs: {{"image": Link("img", "IMAGE"), "upscale_method": "area", "width": 64, "height": 64, "crop": "disabled"}}),
        "hint": (type: "Canny", inputs: {{"image": Link("small", "IMAGE"), "low_threshold": 0.2, "high_threshold": 0.5}}),
        "cn": (type: "ControlNetLoader", inputs: {{"control_net_name": {cn:?}}}),
        "ap": (type: "ControlNetApplyAdvanced", inputs: {{"positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"),
              "control_net": Link("cn", "CONTROL_NET"), "image": Link("hint", "IMAGE"), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 1}}),
        "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": {SEED}, "steps": {STEPS}, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("ap", "positive"), "negative": Link("ap", "negative"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
        "dec": (type: "VAEDecode", inputs: {{"samples": Link("s", "LATENT"), "vae": Link("c", "VAE")}}),
        "plain": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": {SEED}, "steps": {STEPS}, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
    );
    let v = outputs(
        &d,
        &nodes,
        &[("hint", "IMAGE", 0), ("p", "CONDITIONING", 0), ("n", "CONDITIONING", 0), ("s", "LATENT", 0), ("dec", "IMAGE", 0), ("plain", "LATENT", 0)],
    )
    .unwrap();
    let cond = |v: &Value| match v {
        Value::Conditioning(c) => c[0].cross_attn.0.shallow_clone(),
        other => panic!("{other:?}"),
    };
    let hint = image(&v[0]);
    let edge_share = hint.mean(Kind::Float).double_value(&[]);
    assert!(edge_share > 0.02 && edge_share < 0.5, "the hint has {edge_share} edge pixels");
    let ms = ModelSampling::sd(Prediction::Eps);
    let sigmas = ksampler_sigmas(&ms, "euler", "normal", STEPS, 1.0).unwrap();
    let sig32: Vec<f32> = sigmas.iter().map(|s| *s as f32).collect();
    let timesteps = ms.timestep(&Tensor::from_slice(&sig32[..sig32.len() - 1])).to_kind(Kind::Float);
    let input = d.join("in.safetensors");
    let named = |k: &str, t: Tensor| (k.to_string(), t.contiguous());
    write_safetensors(
        &input,
        &[
            named("hint", hint),
            named("prompt_embeds", cond(&v[1])),
            named("negative_prompt_embeds", cond(&v[2])),
            named("sigmas", Tensor::from_slice(&sig32)),
            named("timesteps", timesteps),
            named("seed", Tensor::from_slice(&[SEED])),
            named("cfg", Tensor::from_slice(&[5f32])),
        ],
        None,
    )
    .unwrap();
    let reference = d.join("out.safetensors");
    crate::parity::run_reference("pipeline_reference.py", &[Path::new("controlnet"), &ck, &input, &reference, &cn]);
    let r = SafetensorsFile::open(&reference).unwrap();
    let (want_latent, want_image) = (r.load("out.latent", Device::Cpu, None).unwrap(), r.load("out.image", Device::Cpu, None).unwrap());
    let (latent, decoded) = (samples(&v[3]), image(&v[4]));
    let excess = ((&latent - &want_latent).abs() - (want_latent.abs() * 1e-5 + 1e-4)).max().double_value(&[]);
    let (e_latent, e_image) = (max_abs_diff(&latent, &want_latent), max_abs_diff(&decoded, &want_image));
    let moved = max_abs_diff(&latent, &samples(&v[5]));
    println!(
        "ControlNet txt2img vs diffusers: latent {e_latent:.2e} (|latent| up to {:.1}), image {e_image:.2e}; the ControlNet moved the latent by {moved:.2}",
        want_latent.abs().max().double_value(&[])
    );
    assert!(excess <= 0.0 && e_image < 1e-4, "latent {e_latent}, image {e_image}");
    assert!(moved > 1e3 * e_latent.max(1e-6), "{moved} vs {e_latent}");
}

/// Files without diffloom's metadata (every real one) get their configuration from the shapes: SD 1.x's
/// 8 heads, or SD 2.x's 64-wide heads when the text states are 1024 wide.
#[test]
fn controlnet_configs_are_detected_from_shapes() {
    use diffloom_nodes::checkpoint::control::{load_control, ControlModel};
    use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
    use diffloom_nodes::checkpoint::synthetic::detectable_tiny_config;
    let d = Dir::new();
    let sd1 = detectable_tiny_config(Family::Sd1).unet.unwrap();
    let mut sd2 = tiny_config(Family::Sd2, false).unet.unwrap();
    (sd2.context_dim, sd2.num_heads, sd2.num_head_channels) = (1024, -1, 64);
    for (name, unet) in [("sd1", sd1), ("sd2", sd2)] {
        let config = tiny_controlnet_config(&unet);
        let with_meta = d.join(&format!("{name}-meta.safetensors"));
        write_controlnet(&with_meta, &config, Kind::Float, 8).unwrap();
        let f = SafetensorsFile::open(&with_meta).unwrap();
        let tensors: Vec<(String, Tensor)> = f.tensors().keys().map(|k| (k.clone(), f.load(k, Device::Cpu, None).unwrap())).collect();
        let bare = d.join(&format!("{name}.safetensors"));
        write_safetensors(&bare, &tensors, None).unwrap();
        let Ok((ControlModel::ControlNet(net), _)) = load_control(&bare, Device::Cpu, Kind::Float, None) else { panic!("{name}") };
        assert_eq!(net.config, config, "{name}");
    }
}

/// ControlNets with the rest of the stack: an area entry (the hint is resized to the area's pixels), an
/// inpainting UNet (the ControlNet sees the 4 latent channels), a LoRA-patched model, img2img, and
/// samplers of each kind.
#[test]
fn controlnets_work_with_areas_inpainting_lora_img2img_and_samplers() {
    use diffloom_nodes::checkpoint::load::load_checkpoint;
    use diffloom_nodes::checkpoint::synthetic::write_lora;
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let inpaint = d.join("inpaint.safetensors");
    write_checkpoint(&inpaint, &tiny_config(Family::Sd1, true), Kind::Float, 1, true).unwrap();
    let cn = tiny_controlnet(&d, "cn.safetensors");
    let loaded = load_checkpoint(&ck, Device::Cpu, Kind::Float).unwrap();
    let lora = d.join("lora.safetensors");
    write_lora(&lora, loaded.unet.as_ref().unwrap(), loaded.clip.as_ref().unwrap(), 4, 3).unwrap();
    d.png("in.png", 128, 96, 3);
    let graph = |ckpt: &Path, model: &str, positive: &str, latent: &str, sampler: &str, denoise: f64| {
        format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ckpt:?}}}),
            "lo": (type: "LoraLoaderModelOnly", inputs: {{"model": Link("c", "MODEL"), "lora_name": {lora:?}, "strength_model": 0.8}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a barn", "clip": Link("c", "CLIP")}}),
            "q": (type: "CLIPTextEncode", inputs: {{"text": "a red door", "clip": Link("c", "CLIP")}}),
            "qa": (type: "ConditioningSetArea", inputs: {{"conditioning": Link("q", "CONDITIONING"), "width": 64, "height": 64, "x": 64, "y": 0, "strength": 1.0}}),
            "both": (type: "ConditioningCombine", inputs: {{"conditioning_1": Link("p", "CONDITIONING"), "conditioning_2": Link("qa", "CONDITIONING")}}),
            "n": (type: "CLIPTextEncode", inputs: {{"text": "", "clip": Link("c", "CLIP")}}),
            "img": (type: "LoadImage", inputs: {{"image": "in.png"}}),
            "hint": (type: "Canny", inputs: {{"image": Link("img", "IMAGE"), "low_threshold": 0.1, "high_threshold": 0.3}}),
            "cn": (type: "ControlNetLoader", inputs: {{"control_net_name": {cn:?}}}),
            "ap": (type: "ControlNetApplyAdvanced", inputs: {{"positive": Link({positive:?}, "CONDITIONING"), "negative": Link("n", "CONDITIONING"),
                  "control_net": Link("cn", "CONTROL_NET"), "image": Link("hint", "IMAGE"), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}),
            "mask": (type: "SolidMask", inputs: {{"value": 1.0, "width": 128, "height": 96}}),
            "imc": (type: "InpaintModelConditioning", inputs: {{"positive": Link("ap", "positive"), "negative": Link("ap", "negative"), "vae": Link("c", "VAE"),
                  "pixels": Link("img", "IMAGE"), "mask": Link("mask", "MASK"), "noise_mask": true}}),
            "e": (type: "EmptyLatentImage", inputs: {{"width": 128, "height": 96, "batch_size": 1}}),
            "enc": (type: "VAEEncode", inputs: {{"pixels": Link("img", "IMAGE"), "vae": Link("c", "VAE")}}),
            "s": (type: "KSampler", inputs: {{"model": Link({model:?}, "MODEL"), "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": {sampler:?}, "scheduler": "karras",
                  "positive": Link("ap", "positive"), "negative": Link("ap", "negative"), "latent_image": Link({latent:?}, "LATENT"), "denoise": {denoise:?}}}),
            "s0": (type: "KSampler", inputs: {{"model": Link({model:?}, "MODEL"), "seed": 5, "steps": 3, "cfg": 4.0, "sampler_name": {sampler:?}, "scheduler": "karras",
                  "positive": Link({positive:?}, "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link({latent:?}, "LATENT"), "denoise": {denoise:?}}}),"#
        )
    };
    let cases = [
        ("area entry", graph(&ck, "c", "both", "e", "euler", 1.0)),
        ("LoRA model", graph(&ck, "lo", "p", "e", "dpmpp_2m", 1.0)),
        ("img2img", graph(&ck, "c", "p", "enc", "euler_ancestral", 0.6)),
        ("SDE sampler", graph(&ck, "c", "both", "e", "dpmpp_sde", 1.0)),
        ("CFG++ sampler", graph(&ck, "c", "p", "e", "euler_cfg_pp", 1.0)),
        (
            "inpainting model",
            graph(&inpaint, "c", "p", "e", "euler", 1.0).replace(
                r#"Link("ap", "positive"), "negative": Link("ap", "negative"), "latent_image": Link("e", "LATENT")"#,
                r#"Link("imc", "positive"), "negative": Link("imc", "negative"), "latent_image": Link("imc", "latent")"#,
            ),
        ),
    ];
    for (what, nodes) in cases {
        let v = outputs(&d, &nodes, &[("s", "LATENT", 0), ("s0", "LATENT", 0)]).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (s, s0) = (samples(&v[0]), samples(&v[1]));
        assert!(s.isfinite().all().int64_value(&[]) == 1, "{what}");
        let moved = max_abs_diff(&s, &s0);
        println!("{what}: the ControlNet moved the latent by {moved:.3}");
        assert!(moved > 1e-3, "{what}: the ControlNet changed nothing");
    }
}

/// The shuffle ControlNet (a file named `*_shuffle`) gets ComfyUI's global average pooling: each
/// residual is its spatial mean everywhere; other files keep their residuals' detail.
#[test]
fn shuffle_controlnets_pool_their_residuals() {
    use diffloom_nodes::builtin::loaders::ControlNetLoader;
    use diffloom_nodes::control::{AppliedControl, ControlNetValue};
    use diffloom_nodes::sampling::model_sampling::ModelSampling;
    let d = Dir::new();
    let plain = tiny_controlnet(&d, "control_v11e_sd15.safetensors");
    let shuffle = d.join("control_v11e_sd15_shuffle.safetensors");
    std::fs::copy(&plain, &shuffle).unwrap();
    let _g = tch::no_grad_guard();
    let ms = ModelSampling::sd(diffloom_nodes::checkpoint::detect::Prediction::Eps);
    tch::manual_seed(1);
    let x = Tensor::randn([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let t = ms.timestep(&Tensor::from_slice(&[3f32, 3.0]));
    let context = Tensor::randn([2, 77, 32], (Kind::Float, Device::Cpu));
    let hint = Tensor::rand([1, 3, 64, 64], (Kind::Float, Device::Cpu));
    for (path, pooled) in [(&plain, false), (&shuffle, true)] {
        let v = crate::util::call(&ControlNetLoader, vec![("control_net_name", Some(Value::String(path.display().to_string())))]).unwrap();
        let Value::ControlNet(h) = &v[0] else { panic!("{v:?}") };
        let value: &ControlNetValue = h.downcast().unwrap();
        assert_eq!(value.global_average_pooling, pooled);
        let applied = AppliedControl::new(value, hint.shallow_clone(), 0.7, (0.0, 1.0), None);
        let r = applied.residuals(&x, &t, &context, 2, 3.0, &ms).unwrap().unwrap();
        for o in r.output.iter().flatten().chain(r.middle.iter()) {
            let spread = (o - o.mean_dim(&[2i64, 3][..], true, None)).abs().max().double_value(&[]);
            assert_eq!(spread < 1e-6, pooled, "{}: spatial spread {spread}", path.display());
        }
    }
}
