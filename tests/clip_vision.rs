//! CLIP vision models and T2I style adapters: parity with transformers' CLIPVisionModelWithProjection,
//! ComfyUI's clip_preprocess and ComfyUI's StyleAdapter (tests/parity/clip_vision_reference.py), the
//! nodes in a sampling graph on the tiny SD1 model, and clear errors for files of other kinds.

use std::path::{Path, PathBuf};

use diffloom_core::value::{CondEntry, Shared};
use diffloom_core::{Handle, Value};
use diffloom_nodes::builtin::{conditioning, loaders};
use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
use diffloom_nodes::models::clip_vision::{clip_preprocess, ClipVisionOutput, CLIP_MEAN, CLIP_STD};
use tch::{Device, Kind, Tensor};

use crate::util::{call, max_abs_diff, outputs, tiny_sd1, Dir};

/// The reference files, written once per test into `d/reference`.
fn reference(d: &Dir) -> PathBuf {
    let out = d.join("reference");
    crate::parity::run_reference("clip_vision_reference.py", &[&out]);
    out
}

fn load(path: &Path, name: &str) -> Tensor {
    SafetensorsFile::open(path).unwrap().load(name, Device::Cpu, None).unwrap()
}

fn handle(v: &Value) -> &Handle {
    v.handle().unwrap_or_else(|| panic!("{v:?}"))
}

#[test]
fn clip_vision_and_style_adapter_match_transformers_and_comfyui() {
    let d = Dir::new();
    let r = reference(&d);
    let expected = r.join("expected.safetensors");
    let e = |name: &str| load(&expected, name);

    // ComfyUI's clip_preprocess: bicubic with antialiasing, crop or squash, an RGBA image at the size.
    for image in ["a", "b"] {
        for crop in ["center", "none"] {
            let got = clip_preprocess(&e(&format!("input.image_{image}")), 16, CLIP_MEAN, CLIP_STD, crop == "center").unwrap();
            let err = max_abs_diff(&got, &e(&format!("pre.{image}.{crop}")));
            println!("clip_preprocess image {image}, crop {crop}: {err:e}");
            assert!(err <= 1e-5, "clip_preprocess {image} {crop}: {err}");
        }
    }

    let style = call(&loaders::StyleModelLoader, vec![("style_model_name", Some(Value::String(r.join("style.safetensors").display().to_string())))]).unwrap();
    for act in ["quick_gelu", "gelu"] {
        let file = r.join(format!("clip_vision_{act}/model.safetensors"));
        let cv = call(&loaders::CLIPVisionLoader, vec![("clip_name", Some(Value::String(file.display().to_string())))]).unwrap();
        let encoded = call(
            &conditioning::CLIPVisionEncode,
            vec![
                ("clip_vision", Some(cv[0].clone())),
                ("image", Some(Value::Image(Shared(e("input.image_a"))))),
                ("crop", Some(Value::String("center".into()))),
            ],
        )
        .unwrap();
        let out: &ClipVisionOutput = handle(&encoded[0]).downcast().unwrap();
        for (name, got) in [("image_embeds", &out.image_embeds), ("last_hidden_state", &out.last_hidden_state), ("penultimate", &out.penultimate_hidden_states)]
        {
            let err = max_abs_diff(got, &e(&format!("{act}.{name}")));
            println!("{act} {name}: {err:e}");
            assert!(err <= 1e-4, "{act} {name}: {err}");
        }

        // StyleModelApply appends the adapter's tokens (one row for the two images) to each entry,
        // multiplied by strength; attn_bias leaves them at full strength (SD 1.x/2.x ignore its mask).
        let text = Tensor::randn([1, 5, 32], (Kind::Float, Device::Cpu));
        let cond = Value::Conditioning(vec![CondEntry::new(text.shallow_clone()), CondEntry::new(&text * 2.0)]);
        let apply = |strength: f64, kind: &str| {
            let v = call(
                &conditioning::StyleModelApply,
                vec![
                    ("conditioning", Some(cond.clone())),
                    ("style_model", Some(style[0].clone())),
                    ("clip_vision_output", Some(encoded[0].clone())),
                    ("strength", Some(Value::Float(strength))),
                    ("strength_type", Some(Value::String(kind.into()))),
                ],
            )
            .unwrap();
            let Value::Conditioning(c) = &v[0] else { panic!("{v:?}") };
            c.iter().map(|e| e.cross_attn.0.shallow_clone()).collect::<Vec<_>>()
        };
        let tokens = e(&format!("{act}.style")).flatten(0, 1).unsqueeze(0);
        assert_eq!(tokens.size(), [1, 6, 32]);
        for (strength, kind, scale) in [(1.0, "multiply", 1.0), (0.4, "multiply", 0.4), (0.4, "attn_bias", 1.0)] {
            let got = apply(strength, kind);
            assert_eq!(got.len(), 2);
            for (i, g) in got.iter().enumerate() {
                assert_eq!(g.size(), [1, 11, 32]);
                assert_eq!(max_abs_diff(&g.narrow(1, 0, 5), &(&text * (i as f64 + 1.0))), 0.0);
                let err = max_abs_diff(&g.narrow(1, 5, 6), &(&tokens * scale));
                println!("{act} style tokens, {kind} {strength}: {err:e}");
                assert!(err <= 1e-4, "{act} {kind} {strength}: {err}");
            }
        }
    }
}

#[test]
fn style_model_apply_guides_ksampler_on_the_tiny_sd1_model() {
    let d = Dir::new();
    let r = reference(&d);
    let ck = tiny_sd1(&d, "m.safetensors");
    let image = d.png("style.png", 40, 24, 9);
    let cv = r.join("clip_vision_quick_gelu/model.safetensors");
    let style = r.join("style.safetensors");
    let graph = |strength: f64, kind: &str| {
        format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a house by a lake", "clip": Link("c", "CLIP")}}),
            "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
            "cv": (type: "CLIPVisionLoader", inputs: {{"clip_name": {cv:?}}}),
            "img": (type: "LoadImage", inputs: {{"image": {image:?}}}),
            "enc": (type: "CLIPVisionEncode", inputs: {{"clip_vision": Link("cv", "CLIP_VISION"), "image": Link("img", "IMAGE")}}),
            "sm": (type: "StyleModelLoader", inputs: {{"style_model_name": {style:?}}}),
            "ap": (type: "StyleModelApply", inputs: {{"conditioning": Link("p", "CONDITIONING"), "style_model": Link("sm", "STYLE_MODEL"),
                  "clip_vision_output": Link("enc", "CLIP_VISION_OUTPUT"), "strength": {strength:?}, "strength_type": {kind:?}}}),
            "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 1}}),
            "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                  "positive": Link("ap", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
            "plain": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                  "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
        )
    };
    let run = |strength: f64, kind: &str| {
        let v = outputs(&d, &graph(strength, kind), &[("s", "LATENT", 0), ("plain", "LATENT", 0), ("ap", "CONDITIONING", 0)]).unwrap();
        let latent = |v: &Value| match v {
            Value::Latent(l) => l.samples.0.shallow_clone(),
            other => panic!("{other:?}"),
        };
        let Value::Conditioning(c) = &v[2] else { panic!("{:?}", v[2]) };
        (latent(&v[0]), latent(&v[1]), c[0].cross_attn.size())
    };
    let (styled, plain, shape) = run(1.0, "multiply");
    // 77 text tokens and the adapter's 3 (one image), as wide as the text encoder.
    assert_eq!(shape, [1, 80, 32]);
    let effect = max_abs_diff(&styled, &plain);
    println!("the style tokens move the latent by {effect:.3}");
    assert!(effect > 1e-3, "the style model changed nothing ({effect})");
    let (bias, _, _) = run(0.5, "attn_bias");
    assert_eq!(max_abs_diff(&bias, &styled), 0.0, "attn_bias is full strength on SD 1.x");
    let (half, _, _) = run(0.5, "multiply");
    assert!(max_abs_diff(&half, &styled) > 0.0);
}

#[test]
fn other_files_are_refused_naming_the_file() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    for (node, input) in [(&loaders::CLIPVisionLoader as &dyn diffloom_core::Node, "clip_name"), (&loaders::StyleModelLoader, "style_model_name")] {
        let e = call(node, vec![(input, Some(Value::String(ck.display().to_string())))]).err().unwrap().to_string();
        println!("{e}");
        assert!(e.contains("m.safetensors") && e.contains("not a"), "{e}");
    }
    // An OpenCLIP-layout file (converted as ComfyUI does) of an unknown size, and a Flux Redux file, are named.
    let z = || Tensor::zeros([4, 4], (Kind::Float, Device::Cpu));
    let open_clip = d.join("open_clip.safetensors");
    Tensor::write_safetensors(&[("visual.transformer.resblocks.0.attn.in_proj_weight", z())], &open_clip).unwrap();
    let redux = d.join("redux.safetensors");
    Tensor::write_safetensors(&[("redux_down.weight", z())], &redux).unwrap();
    let e = call(&loaders::CLIPVisionLoader, vec![("clip_name", Some(Value::String(open_clip.display().to_string())))]).err().unwrap().to_string();
    assert!(e.contains("open_clip.safetensors") && e.contains("0 layers") && e.contains("config.json"), "{e}");
    let e = call(&loaders::StyleModelLoader, vec![("style_model_name", Some(Value::String(redux.display().to_string())))]).err().unwrap().to_string();
    assert!(e.contains("Flux Redux"), "{e}");
}
