//! GLIGEN (GLIGENLoader, GLIGENTextBoxApply): parity of the position net, a fuser and the whole UNet
//! with diffusers' GLIGEN modules (tests/parity/gligen_reference.py), the boxes steering KSampler, the
//! UNet untouched without them, and clear errors for a wrong file or a GLIGEN model for another UNet.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use diffloom_core::value::Shared;
use diffloom_core::Value;
use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, tiny_four_level_config, write_checkpoint, write_gligen};
use diffloom_nodes::models::gligen::{load_gligen, GligenBox, GligenPatch};
use diffloom_nodes::patches::{CallCx, UnetPatches};
use tch::{Device, Kind, Tensor};

use crate::util::{max_abs_diff, outputs, tiny_sd1, Dir};

const TOLERANCE: f64 = 1e-4;

/// Writes the tiny SD1 model's GLIGEN file as make-test-models does.
fn tiny_gligen(d: &Dir, name: &str) -> PathBuf {
    let path = d.join(name);
    let c = tiny_config(Family::Sd1, false);
    write_gligen(&path, c.unet.as_ref().unwrap(), c.clip.as_ref().unwrap().hidden_size, 24).unwrap();
    path
}

#[test]
fn gligen_matches_diffusers() {
    use diffloom_nodes::checkpoint::load::load_checkpoint;
    let d = Dir::new();
    tiny_sd1(&d, "tiny-sd1.safetensors");
    let gligen_path = tiny_gligen(&d, "tiny-sd1-gligen.safetensors");
    let out = d.join("gligen_expected.safetensors");
    crate::parity::run_reference("gligen_reference.py", &[d.path(), &out]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&out).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    let _g = tch::no_grad_guard();

    let (gligen, _) = load_gligen(&gligen_path, Device::Cpu, Kind::Float).unwrap();
    let gligen = Rc::new(gligen);
    let (pooled, b) = (get("input.pooled"), get("input.box"));
    let boxes: Vec<GligenBox> = (0..pooled.size()[0])
        .map(|i| {
            let v = |j: i64| b.int64_value(&[i, j]);
            GligenBox { pooled: Shared(pooled.get(i).unsqueeze(0)), height: v(0), width: v(1), y: v(2), x: v(3) }
        })
        .collect();
    let objs = gligen.position_tokens(2, 8, 8, &boxes, Device::Cpu).unwrap();
    let e_objs = max_abs_diff(&objs, &get("out.objs"));

    let (_, fuser) = gligen.fusers.iter().find(|(k, _)| k == "output_blocks.1.1.transformer_blocks.0.fuser").expect("output_blocks.1's fuser");
    let e_fuser = max_abs_diff(&fuser.forward(&get("input.fuser_x"), &get("out.objs")), &get("out.fuser"));

    let unet = load_checkpoint(&d.join("tiny-sd1.safetensors"), Device::Cpu, Kind::Float).unwrap().unet.unwrap();
    let (x, t, context) = (get("input.latent"), get("input.timesteps"), get("input.context"));
    let shape = x.size();
    let cx = CallCx { sigma: 1.0, original_shape: &shape, cond_or_uncond: &[0], run: 0 };
    let plain = unet.forward(&x, &t, &context);
    let unpatched = unet.forward_patched(&x, &t, &context, None, None, &UnetPatches::default(), &cx).unwrap();
    let mut patches = UnetPatches::default();
    patches.middle_patch.push(Rc::new(GligenPatch { model: gligen.clone(), objs: objs.shallow_clone() }));
    let grounded = unet.forward_patched(&x, &t, &context, None, None, &patches, &cx).unwrap();
    let e_plain = max_abs_diff(&plain, &get("out.unet_plain"));
    let e_unet = max_abs_diff(&grounded, &get("out.unet_gligen"));
    let moved = max_abs_diff(&grounded, &plain);
    println!("position net {e_objs:.2e}, fuser {e_fuser:.2e}, UNet plain {e_plain:.2e}, UNet with GLIGEN {e_unet:.2e}; the boxes move it by {moved:.3}");
    for (what, e) in [("position net", e_objs), ("fuser", e_fuser), ("plain UNet", e_plain), ("UNet with GLIGEN", e_unet)] {
        assert!(e < TOLERANCE, "{what}: {e:.2e}");
    }
    // Without the middle patch the UNet is exactly what it was.
    assert_eq!(max_abs_diff(&unpatched, &plain), 0.0);
    assert!(moved > 100.0 * TOLERANCE, "GLIGEN hardly changes the UNet output ({moved})");
    // Another box gives other grounding tokens and another output.
    let mut moved_boxes = boxes.clone();
    moved_boxes[0].x += 3;
    let other = gligen.position_tokens(2, 8, 8, &moved_boxes, Device::Cpu).unwrap();
    let mut patches = UnetPatches::default();
    patches.middle_patch.push(Rc::new(GligenPatch { model: gligen.clone(), objs: other }));
    let elsewhere = unet.forward_patched(&x, &t, &context, None, None, &patches, &cx).unwrap();
    let shifted = max_abs_diff(&elsewhere, &grounded);
    println!("moving a box by 3 latent pixels moves the output by {shifted:.2e}");
    assert!(shifted > 10.0 * TOLERANCE);
}

fn samples(v: &Value) -> Tensor {
    match v {
        Value::Latent(l) => l.samples.0.shallow_clone(),
        other => panic!("{other:?}"),
    }
}

/// KSampler on `ck` with the positive prompt grounded by GLIGENTextBoxApply (box `x, y, w, h` in
/// pixels) as "s", and on the plain prompts as "plain".
fn graph(ck: &Path, gligen: &Path, (x, y, w, h): (i64, i64, i64, i64)) -> String {
    format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a house by a lake", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "g": (type: "GLIGENLoader", inputs: {{"gligen_name": {gligen:?}}}),
        "box": (type: "GLIGENTextBoxApply", inputs: {{"conditioning_to": Link("p", "CONDITIONING"), "clip": Link("c", "CLIP"),
              "gligen_textbox_model": Link("g", "GLIGEN"), "text": "a red house", "width": {w}, "height": {h}, "x": {x}, "y": {y}}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 1}}),
        "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("box", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
        "plain": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
    )
}

/// The same KSampler with no GLIGEN node in the graph at all.
fn plain_graph(ck: &Path) -> String {
    format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a house by a lake", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 1}}),
        "plain": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
    )
}

#[test]
fn gligen_boxes_steer_ksampler() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    let gl = tiny_gligen(&d, "gligen.safetensors");
    let run = |b| {
        let v = outputs(&d, &graph(&ck, &gl, b), &[("s", "LATENT", 0), ("plain", "LATENT", 0)]).unwrap();
        (samples(&v[0]), samples(&v[1]))
    };
    let (left, plain) = run((0, 0, 32, 64));
    let (right, plain2) = run((32, 0, 32, 64));
    let baseline = samples(&outputs(&d, &plain_graph(&ck), &[("plain", "LATENT", 0)]).unwrap()[0]);
    let (effect, moved) = (max_abs_diff(&left, &plain), max_abs_diff(&left, &right));
    println!("GLIGEN moves the latent by {effect:.3}; moving the box moves it by {moved:.3}");
    assert!(effect > 1e-3, "the GLIGEN box changed nothing ({effect})");
    assert!(moved > 1e-3, "moving the box changed nothing ({moved})");
    // Conditioning without GLIGEN samples exactly as before, whether or not GLIGEN ran beside it.
    assert_eq!(max_abs_diff(&plain, &baseline), 0.0);
    assert_eq!(max_abs_diff(&plain2, &baseline), 0.0);
}

#[test]
fn gligen_errors_are_clear() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors");
    // A checkpoint is not a GLIGEN model.
    let err = load_gligen(&ck, Device::Cpu, Kind::Float).err().expect("a checkpoint is refused").to_string();
    assert!(err.contains("m.safetensors") && err.contains("not a GLIGEN model"), "{err}");
    let err = outputs(&d, &format!(r#""g": (type: "GLIGENLoader", inputs: {{"gligen_name": {ck:?}}}),"#), &[("g", "GLIGEN", 0)]).expect_err("refused");
    assert!(err.contains("not a GLIGEN model"), "{err}");
    // A GLIGEN model made for another UNet layout is refused when sampling, naming both.
    let four = d.join("four.safetensors");
    write_checkpoint(&four, &tiny_four_level_config(), Kind::Float, 6, true).unwrap();
    let gl = tiny_gligen(&d, "gligen.safetensors");
    let err = outputs(&d, &graph(&four, &gl, (0, 0, 32, 32)), &[("s", "LATENT", 0)]).expect_err("refused");
    assert!(err.contains("gligen.safetensors") && err.contains("fusers") && err.contains("another UNet"), "{err}");
}

#[test]
fn gligen_boxes_reach_the_negative_as_comfyui_copies_them() {
    use diffloom_core::value::{Area, CondEntry};
    use diffloom_core::Handle;
    use diffloom_nodes::checkpoint::detect::Prediction;
    use diffloom_nodes::sampling::conds::{resolve_sides, Target};
    use diffloom_nodes::sampling::model_sampling::ModelSampling;
    let latent = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let sampling = ModelSampling::sd(Prediction::Eps);
    let target =
        Target { latent_in: &latent, noise_mask: None, inpaint_unet: false, ip2p_unet: false, sampling: &sampling, family: &diffloom_nodes::family::SD1 };
    let entry = || CondEntry::new(Tensor::zeros([1, 77, 32], (Kind::Float, Device::Cpu)));
    let boxes = Handle::new((), 0, "boxes");
    let own = Handle::new((), 0, "own boxes");
    let grounded = [CondEntry { gligen: Some(boxes.clone()), ..entry() }];
    let same = |c: &diffloom_nodes::sampling::conds::Cond, h: &Handle| c.gligen.as_ref().is_some_and(|g| g.same(h));
    // A whole-image negative without boxes gets the positive's (apply_empty_x_to_equal_area).
    let sides = resolve_sides(&[("positive", &grounded), ("negative", &[entry()])], &target).unwrap();
    assert!(same(&sides[0][0], &boxes) && same(&sides[1][0], &boxes));
    // A negative with boxes of its own keeps them; an area-only negative gets none.
    let sides = resolve_sides(&[("positive", &grounded), ("negative", &[CondEntry { gligen: Some(own.clone()), ..entry() }])], &target).unwrap();
    assert!(same(&sides[1][0], &own));
    let area = CondEntry { area: Some(Area::Latent { h: 4, w: 4, y: 0, x: 0 }), ..entry() };
    let sides = resolve_sides(&[("positive", &grounded), ("negative", &[area])], &target).unwrap();
    assert!(sides[1].iter().all(|c| c.gligen.is_none()));
}
