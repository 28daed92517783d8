//! SD 2.1 unCLIP: the tiny unCLIP checkpoint's UNet (with its class embedding) against diffusers, its
//! OpenCLIP image encoder against transformers after ComfyUI's key conversion, the noise augmentation
//! and ADM vector against ComfyUI's code (tests/parity/unclip_reference.py), the nodes in a sampling
//! graph, and the errors.

use std::path::{Path, PathBuf};

use diffloom_core::value::{Shared, UnclipCond};
use diffloom_core::Value;
use diffloom_nodes::builtin::loaders;
use diffloom_nodes::checkpoint::detect::Prediction;
use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, tiny_unclip_config, write_checkpoint, write_unclip_checkpoint};
use diffloom_nodes::models::clip_vision::ClipVisionModel;
use diffloom_nodes::models::noise_aug::{unclip_adm, NoiseAugmentor, UnclipInput};
use diffloom_nodes::sampling::adm::attach_adm;
use diffloom_nodes::sampling::conds::Cond;
use diffloom_nodes::sampling::guidance::{CfgDenoiser, Denoiser, Guidance};
use diffloom_nodes::sampling::model_sampling::ModelSampling;
use diffloom_nodes::sampling::noise::seed_bits;
use diffloom_nodes::sd::SdModel;
use tch::{Device, Kind, Tensor};

use crate::util::{call, max_abs_diff, outputs, Dir};

/// The cases of unclip_reference.py's CASES: (name, sampler seed, [(embeds, strength, noise)]).
const CASES: &[(&str, i128, &[(&str, f64, f64)])] = &[
    ("one", 3, &[("a", 1.0, 0.0)]),
    ("noised", 123456789, &[("a", 0.7, 0.3)]),
    ("full_noise", 10, &[("a", 2.0, 1.0)]),
    ("half_level", 5, &[("a", 1.0, 0.5)]),
    ("merged", 42, &[("a", 1.0, 0.25), ("b", -0.5, 0.6)]),
    ("batch", 18446744073709551615, &[("b", 1.5, 0.1)]),
];

fn tiny_unclip(d: &Dir) -> PathBuf {
    let path = d.join("unclip.safetensors");
    let (config, vision) = tiny_unclip_config();
    write_unclip_checkpoint(&path, &config, &vision, Kind::Float, 7).unwrap();
    path
}

fn load(path: &Path, name: &str) -> Tensor {
    SafetensorsFile::open(path).unwrap().load(name, Device::Cpu, None).unwrap()
}

fn string(p: &Path) -> Option<Value> {
    Some(Value::String(p.display().to_string()))
}

#[test]
fn unclip_parts_match_diffusers_transformers_and_comfyui() {
    let d = Dir::new();
    let ckpt = tiny_unclip(&d);
    let reference = d.join("reference.safetensors");
    crate::parity::run_reference("unclip_reference.py", &[&ckpt, &reference]);
    let e = |name: &str| load(&reference, name);
    let _guard = tch::no_grad_guard();

    let loaded = call(&loaders::UnClipCheckpointLoader, vec![("ckpt_name", string(&ckpt))]).unwrap();
    assert_eq!(loaded.len(), 4);
    let model: &SdModel = loaded[0].handle().unwrap().downcast().unwrap();
    let vision: &ClipVisionModel = loaded[3].handle().unwrap().downcast().unwrap();
    assert_eq!(model.unet.config.adm_in_channels, Some(48));

    // The UNet's class embedding (label_emb → diffusers' "projection" class embedding).
    let (x, t, ctx) = (e("input.latent"), e("input.timesteps"), e("input.context"));
    for (name, y) in [("unet.out", e("input.y")), ("unet.no_class", Tensor::zeros([2, 48], (Kind::Float, Device::Cpu)))] {
        let got = model.unet.forward_with_class(&x, &t, &ctx, Some(&y));
        let err = max_abs_diff(&got, &e(name));
        println!("{name}: {err:e}");
        assert!(err <= 1e-4, "{name}: {err}");
    }
    // The class input matters (the test could fail).
    assert!(max_abs_diff(&e("unet.out"), &e("unet.no_class")) > 1e-3);

    // The OpenCLIP image encoder read in place against transformers on ComfyUI's converted keys.
    let out = vision.forward(&e("input.pixels"));
    for (name, got) in [("image_embeds", &out.image_embeds), ("last_hidden_state", &out.last_hidden_state), ("penultimate", &out.penultimate_hidden_states)] {
        let err = max_abs_diff(got, &e(&format!("vision.{name}")));
        println!("vision {name}: {err:e}");
        assert!(err <= 1e-4, "vision {name}: {err}");
    }

    // The noise augmentation and the ADM vector, with ComfyUI's seeds (the sampler's minus 10).
    let aug = NoiseAugmentor::new(24);
    let embeds = |n: &str| e(&format!("input.embeds_{n}"));
    for (name, seed, entries) in CASES {
        let tensors: Vec<Tensor> = entries.iter().map(|(n, _, _)| embeds(n)).collect();
        let inputs: Vec<UnclipInput> =
            entries.iter().zip(&tensors).map(|((_, s, n), t)| UnclipInput { image_embeds: t, strength: *s, noise_augmentation: *n }).collect();
        let got = unclip_adm(&inputs, &aug, seed_bits(seed - 10), Device::Cpu).unwrap();
        let err = max_abs_diff(&got, &e(&format!("adm.{name}")));
        println!("adm.{name}: {err:e}");
        assert!(err <= 1e-6, "adm.{name}: {err}");
    }
    // Noise augmentation 0 is noise level 0, which in ComfyUI's schedule still mixes in a little noise
    // (sqrt(1 - alphas_cumprod[0]) ≈ 0.0066): close to the embedding, not equal.
    let one = e("adm.one");
    let level0 = max_abs_diff(&one.narrow(1, 0, 24), &embeds("a"));
    println!("noise augmentation 0 moves the embedding by {level0:e}");
    assert!(level0 > 0.0 && level0 < 0.05, "{level0}");

    // The sampler's path: the y each cond gets (the seed minus 10; zeros without unCLIP entries).
    let mut with = Cond::whole(ctx.narrow(0, 0, 1), &[1, 4, 8, 8]);
    with.unclip = vec![UnclipCond { image_embeds: Shared(embeds("a")), strength: 1.0, noise_augmentation: 0.0 }];
    let without = Cond::whole(ctx.narrow(0, 0, 1), &[1, 4, 8, 8]);
    let mut sides = vec![vec![with], vec![without]];
    attach_adm(&mut sides, &["positive", "negative"], &model.unet, "unclip.safetensors", 3).unwrap();
    assert_eq!(max_abs_diff(sides[0][0].y.as_ref().unwrap(), &one), 0.0);
    assert_eq!(sides[1][0].y.as_ref().unwrap().abs().max().double_value(&[]), 0.0);
    assert_eq!(sides[1][0].y.as_ref().unwrap().size(), [1, 48]);
    // The denoiser batches both sides, each row with its own y: CFG of the two plain predictions.
    let ms = ModelSampling::sd(Prediction::Eps);
    let (sigma, x1) = (3.0, e("input.latent").narrow(0, 0, 1));
    let predict = |y: &Tensor| {
        let t = ms.timestep(&Tensor::from_slice(&[sigma as f32]));
        ms.calculate_denoised(sigma, &model.unet.forward_with_class(&ms.calculate_input(sigma, &x1), &t, &ctx.narrow(0, 0, 1), Some(y)), &x1)
    };
    let (c, u) = (predict(&one), predict(&Tensor::zeros([1, 48], (Kind::Float, Device::Cpu))));
    let mut den = CfgDenoiser::new(&model.unet, &ms, sides, Guidance::Cfg(2.5));
    let err = max_abs_diff(&den.denoise(&x1, sigma).unwrap(), &(&u + (&c - &u) * 2.5));
    println!("CFG with per-side y vs by hand: {err:e}");
    assert!(err <= 1e-4, "{err}");

    // The same image encoder as a standalone OpenCLIP file (`visual.*`) with a config.json beside it.
    let dir = d.join("open_clip");
    std::fs::create_dir_all(&dir).unwrap();
    let f = SafetensorsFile::open(&ckpt).unwrap();
    let visual: Vec<(String, Tensor)> =
        f.tensors().keys().filter_map(|k| k.strip_prefix("embedder.model.").map(|rest| (rest.to_owned(), f.load(k, Device::Cpu, None).unwrap()))).collect();
    Tensor::write_safetensors(&visual, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "patch_size": 4, "image_size": 16, "projection_dim": 24, "hidden_act": "gelu"});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let cv = call(&loaders::CLIPVisionLoader, vec![("clip_name", string(&dir.join("model.safetensors")))]).unwrap();
    let standalone: &ClipVisionModel = cv[0].handle().unwrap().downcast().unwrap();
    assert_eq!(max_abs_diff(&standalone.forward(&e("input.pixels")).image_embeds, &out.image_embeds), 0.0);
}

/// The graph: unCLIPCheckpointLoader → CLIPVisionEncode → unCLIPConditioning → KSampler.
fn graph(ck: &Path, image: &Path, strength: f64, noise: f64) -> String {
    format!(
        r#""c": (type: "unCLIPCheckpointLoader", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a house by a lake", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "img": (type: "LoadImage", inputs: {{"image": {image:?}}}),
        "enc": (type: "CLIPVisionEncode", inputs: {{"clip_vision": Link("c", "CLIP_VISION"), "image": Link("img", "IMAGE"), "crop": "center"}}),
        "u": (type: "unCLIPConditioning", inputs: {{"conditioning": Link("p", "CONDITIONING"), "clip_vision_output": Link("enc", "CLIP_VISION_OUTPUT"),
              "strength": {strength:?}, "noise_augmentation": {noise:?}}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 2}}),
        "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("u", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
        "plain": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
    )
}

#[test]
fn unclip_conditioning_guides_ksampler_on_the_tiny_unclip_model() {
    let d = Dir::new();
    let ck = tiny_unclip(&d);
    let image = d.png("image.png", 40, 24, 9);
    let run = |strength: f64, noise: f64| {
        let v = outputs(&d, &graph(&ck, &image, strength, noise), &[("s", "LATENT", 0), ("plain", "LATENT", 0), ("u", "CONDITIONING", 0)]).unwrap();
        let latent = |v: &Value| match v {
            Value::Latent(l) => l.samples.0.shallow_clone(),
            other => panic!("{other:?}"),
        };
        let Value::Conditioning(c) = &v[2] else { panic!("{:?}", v[2]) };
        (latent(&v[0]), latent(&v[1]), c[0].unclip.len())
    };
    let (guided, plain, n) = run(1.0, 0.0);
    assert_eq!(n, 1);
    let effect = max_abs_diff(&guided, &plain);
    println!("the image embedding moves the latent by {effect:.4}");
    assert!(effect > 1e-3, "unCLIPConditioning changed nothing ({effect})");
    // Strength 0 returns the conditioning unchanged: the same as no unCLIP entry (zeros as y).
    let (zero, plain0, n) = run(0.0, 0.5);
    assert_eq!(n, 0);
    assert_eq!(max_abs_diff(&zero, &plain0), 0.0);
    // Noise augmentation changes the vector; strength scales it.
    let (noised, _, _) = run(1.0, 0.5);
    assert!(max_abs_diff(&noised, &guided) > 1e-4);
    let (weaker, _, _) = run(0.5, 0.0);
    assert!(max_abs_diff(&weaker, &guided) > 1e-4);
}

#[test]
fn other_checkpoints_and_models_are_refused_by_name() {
    let d = Dir::new();
    let sd2 = d.join("plain-sd2.safetensors");
    write_checkpoint(&sd2, &tiny_config(diffloom_nodes::checkpoint::detect::Family::Sd2, false), Kind::Float, 2, true).unwrap();
    let e = call(&loaders::UnClipCheckpointLoader, vec![("ckpt_name", string(&sd2))]).err().unwrap().to_string();
    println!("{e}");
    assert!(e.contains("plain-sd2.safetensors") && e.contains("not an SD 2.1 unCLIP checkpoint") && e.contains("embedder.model.visual."), "{e}");

    // unCLIPConditioning reaching a model without the class-label input: the input and model are named.
    let ck = tiny_unclip(&d);
    let image = d.png("image.png", 16, 16, 3);
    let text = graph(&ck, &image, 1.0, 0.0).replace(r#""model": Link("c", "MODEL"), "seed": 3"#, r#""model": Link("m2", "MODEL"), "seed": 3"#);
    let text = format!(r#"{text} "m2": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {sd2:?}}}),"#);
    let e = outputs(&d, &text, &[("s", "LATENT", 0)]).err().unwrap();
    println!("{e}");
    assert!(e.contains("positive") && e.contains("unCLIP") && e.contains("plain-sd2.safetensors"), "{e}");

    // Without diffloom's metadata, the shapes say SD 2.x with a 48-wide class-label input, not SDXL
    // (label_emb alone would).
    use diffloom_nodes::checkpoint::detect::{detect, Family};
    let f = SafetensorsFile::open(&ck).unwrap();
    let mut shapes: diffloom_nodes::checkpoint::detect::Shapes = f.tensors().iter().map(|(k, i)| (k.clone(), i.shape.clone())).collect();
    let detected = detect(&ck, &shapes, &Default::default()).unwrap();
    assert_eq!((detected.family, detected.unet.and_then(|u| u.adm_in_channels)), (Family::Sd2, Some(48)));
    shapes.retain(|k, _| !k.starts_with("embedder.") && !k.starts_with("noise_augmentor."));
    let e = detect(&ck, &shapes, &Default::default()).err().unwrap().to_string();
    assert!(e.contains("SDXL"), "{e}");

    // The unCLIP checkpoint still loads as a plain checkpoint (y is zeros without unCLIPConditioning).
    let plain = call(&loaders::CheckpointLoaderSimple, vec![("ckpt_name", string(&ck))]).unwrap();
    assert_eq!(plain.len(), 3);
}
