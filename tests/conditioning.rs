//! Area and mask conditioning, InpaintModelConditioning, LatentComposite, LatentFromBatch and bislerp
//! (issue 5): ComfyUI's semantics checked on values, and the sampler's per-entry averaging checked
//! against the UNet run by hand.

use diffloom_aten::Generator;
use diffloom_core::value::{Area, CondEntry, Shared};
use diffloom_core::{Latent, Value};
use diffloom_nodes::builtin::latent::LatentComposite;
use diffloom_nodes::checkpoint::detect::Prediction;
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::resample::common_upscale;
use diffloom_nodes::sampling::conds::{resolve_sides, Cond, Target};
use diffloom_nodes::sampling::guidance::Guidance;
use diffloom_nodes::sampling::guidance::{CfgDenoiser, Denoiser};
use diffloom_nodes::sampling::model_sampling::ModelSampling;
use tch::{Device, Kind, Tensor};

use crate::util::{call, max_abs_diff, outputs, tiny_sd1, Dir};

fn latent(v: &Value) -> &diffloom_core::Latent {
    match v {
        Value::Latent(l) => l,
        other => panic!("{other:?}"),
    }
}

fn conds(v: &Value) -> &Vec<CondEntry> {
    match v {
        Value::Conditioning(c) => c,
        other => panic!("{other:?}"),
    }
}

/// The SD schedule, for resolving timestep ranges (leaked: tests only).
fn sd_sampling() -> &'static ModelSampling {
    Box::leak(Box::new(ModelSampling::sd(Prediction::Eps)))
}

/// Positive and negative resolved as a CFG guider's two sides.
fn pair(positive: &[CondEntry], negative: &[CondEntry], target: &Target) -> Result<(Vec<Cond>, Vec<Cond>), diffloom_core::NodeError> {
    let mut sides = resolve_sides(&[("positive", positive), ("negative", negative)], target)?;
    let negative = sides.pop().unwrap_or_default();
    Ok((sides.pop().unwrap_or_default(), negative))
}

fn entry(dim: i64) -> CondEntry {
    CondEntry::new(Tensor::randn([1, 77, dim], (Kind::Float, Device::Cpu)))
}

#[test]
fn areas_fade_in_and_the_other_side_gets_a_same_area_entry() {
    let latent = Tensor::zeros([1, 4, 16, 24], (Kind::Float, Device::Cpu));
    let target =
        Target { latent_in: &latent, noise_mask: None, inpaint_unet: false, ip2p_unet: false, sampling: sd_sampling(), family: &diffloom_nodes::family::SD1 };
    // 64×64 pixels at x 32, y 0: latent area 8×8 at (y 0, x 4), strength 2.
    let mut area = entry(8);
    area.area = Some(Area::Latent { h: 8, w: 8, y: 0, x: 4 });
    area.strength = 2.0;
    let (pos, neg) = pair(&[entry(8), area], &[entry(8)], &target).unwrap();
    assert_eq!(pos.len(), 2);
    assert_eq!(pos[1].area, Some([8, 8, 0, 4]));
    // The edges inside the latent ramp over min(8, 8 / 4) = 2 pixels: 1/2, 1; the top edge (y = 0)
    // touches the border and does not.
    let row: Vec<f32> = Vec::try_from(&pos[1].mult.get(0).get(0).get(4)).unwrap();
    assert_eq!(row, [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0]);
    let col: Vec<f32> = Vec::try_from(&pos[1].mult.get(0).get(0).select(1, 4)).unwrap();
    assert_eq!(col, [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0]);
    // The negative gets a copy of the area entry carrying the negative's text states.
    assert_eq!(neg.len(), 2);
    assert_eq!(neg[1].area, Some([8, 8, 0, 4]));
    assert_eq!(max_abs_diff(&neg[1].context, &neg[0].context), 0.0);
    // Fractions resolve against the latent; an area outside the image is an error naming the input.
    let mut frac = entry(8);
    frac.area = Some(Area::Fraction { h: 0.5, w: 0.25, y: 0.5, x: 0.0 });
    let (pos, _) = pair(&[frac], &[entry(8)], &target).unwrap();
    assert_eq!(pos[0].area, Some([8, 6, 8, 0]));
    let mut outside = entry(8);
    outside.area = Some(Area::Latent { h: 8, w: 8, y: 0, x: 30 });
    let err = pair(&[entry(8)], &[outside], &target).err().unwrap().to_string();
    assert!(err.contains("negative") && err.contains("outside the 192×128 image"), "{err}");
}

#[test]
fn masks_weight_entries_and_mask_bounds_set_the_area() {
    let latent = Tensor::zeros([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let target =
        Target { latent_in: &latent, noise_mask: None, inpaint_unet: false, ip2p_unet: false, sampling: sd_sampling(), family: &diffloom_nodes::family::SD1 };
    // A 16×16 pixel-space mask with a 4×4 square: resized to the 8×8 latent bilinearly.
    let m = Tensor::zeros([1, 16, 16], (Kind::Float, Device::Cpu));
    let _ = m.narrow(1, 4, 4).narrow(2, 8, 4).fill_(1.0);
    let mut e = entry(8);
    e.mask = Some(Shared(m.shallow_clone()));
    e.mask_strength = 0.5;
    let (pos, _) = pair(&[e.clone()], &[entry(8)], &target).unwrap();
    let want = common_upscale(&m.unsqueeze(1), 8, 8, "bilinear", "disabled").unwrap() * 0.5;
    assert_eq!(pos[0].mult.size(), [2, 4, 8, 8]);
    assert!(max_abs_diff(&pos[0].mult.narrow(0, 1, 1).narrow(1, 3, 1), &want) < 1e-7);
    // "mask bounds": the bounding box of the resized mask's nonzero pixels, at least 8×8.
    e.area_from_mask = true;
    let (pos, _) = pair(&[e], &[entry(8)], &target).unwrap();
    // The square covers latent rows 2..3, columns 4..5 after resizing: an 8×8 box there, clamped to
    // the latent.
    assert_eq!(pos[0].area, Some([6, 4, 2, 4]));
}

#[test]
fn the_denoiser_averages_entries_by_their_weights_as_comfyui() {
    let d = Dir::new();
    let ck = load_checkpoint(&tiny_sd1(&d, "m.safetensors"), Device::Cpu, Kind::Float).unwrap();
    let unet = ck.unet.unwrap();
    let ms = ModelSampling::sd(Prediction::Eps);
    let _g = tch::no_grad_guard();
    let mut g = Generator::cpu(3);
    let x = g.randn_f32(&[1, 4, 16, 16]) * 3.0;
    let target =
        Target { latent_in: &x, noise_mask: None, inpaint_unet: false, ip2p_unet: false, sampling: sd_sampling(), family: &diffloom_nodes::family::SD1 };
    let (full, part) = (entry(32), {
        let mut e = entry(32);
        e.area = Some(Area::Latent { h: 8, w: 16, y: 8, x: 0 });
        e.strength = 3.0;
        e
    });
    let neg = entry(32);
    let (cond, uncond) = pair(&[full.clone(), part.clone()], std::slice::from_ref(&neg), &target).unwrap();
    assert_eq!(uncond.len(), 2, "the uncond side got the same-area entry");
    let mult = cond[1].mult.shallow_clone();
    let sigma = 3.0;
    let run = |xs: &Tensor, ctx: &Tensor| {
        let t = ms.timestep(&Tensor::from_slice(&[sigma as f32]));
        ms.calculate_denoised(sigma, &unet.forward(&ms.calculate_input(sigma, xs), &t, ctx), xs)
    };
    // By hand, per side: the full entry everywhere, the area entry on its crop (the uncond side's copy
    // with the negative's text), averaged with weights 1 and 3·ramp; then CFG.
    let side = |full_ctx: &Tensor, area_ctx: &Tensor| {
        let p_full = run(&x, full_ctx);
        let p_area = run(&x.narrow(2, 8, 8), area_ctx);
        let want = p_full.copy();
        let mut region = want.narrow(2, 8, 8);
        region.copy_(&((p_full.narrow(2, 8, 8) + &p_area * &mult) / (mult.ones_like() + &mult)));
        (want, p_full)
    };
    let (c, c_full) = side(&full.cross_attn, &part.cross_attn);
    let (u, _) = side(&neg.cross_attn, &neg.cross_attn);
    let mut den = CfgDenoiser::new(&unet, &ms, vec![cond, uncond], Guidance::Cfg(2.5));
    let got = den.denoise(&x, sigma).unwrap();
    let want = &u + (&c - &u) * 2.5;
    let err = max_abs_diff(&got, &want);
    println!("area averaging with CFG vs by hand: {err:.2e}");
    // (Rounding only: the denoiser batches cond and uncond rows together.)
    assert!(err < 1e-4, "{err}");
    assert!(max_abs_diff(&got, &(&u + (&c_full - &u) * 2.5)) > 1e-3, "the area entry changed nothing");
    let p_full = c_full;
    // A single entry over the whole latent is the plain prediction, bit for bit.
    let mut one = CfgDenoiser::new(&unet, &ms, vec![vec![Cond::whole(full.cross_attn.0.shallow_clone(), &x.size())]], Guidance::Basic);
    assert_eq!(max_abs_diff(&one.denoise(&x, sigma).unwrap(), &p_full), 0.0);
}

#[test]
fn area_and_mask_nodes_in_a_sampled_graph() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors").display().to_string();
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a meadow", "clip": Link("c", "CLIP")}}),
        "q": (type: "CLIPTextEncode", inputs: {{"text": "a red barn", "clip": Link("c", "CLIP")}}),
        "n": (type: "CLIPTextEncode", inputs: {{"text": "", "clip": Link("c", "CLIP")}}),
        "qa": (type: "ConditioningSetArea", inputs: {{"conditioning": Link("q", "CONDITIONING"), "width": 64, "height": 64, "x": 64, "y": 0, "strength": 1.5}}),
        "mk": (type: "SolidMask", inputs: {{"value": 1.0, "width": 32, "height": 32}}),
        "qm": (type: "ConditioningSetMask", inputs: {{"conditioning": Link("q", "CONDITIONING"), "mask": Link("mk", "MASK"), "strength": 0.7, "set_cond_area": "mask bounds"}}),
        "qp": (type: "ConditioningSetAreaPercentage", inputs: {{"conditioning": Link("q", "CONDITIONING"), "width": 0.5, "height": 1.0, "x": 0.5, "y": 0.0}}),
        "qs": (type: "ConditioningSetAreaStrength", inputs: {{"conditioning": Link("qp", "CONDITIONING"), "strength": 0.25}}),
        "all": (type: "ConditioningCombine", inputs: {{"conditioning_1": Link("p", "CONDITIONING"), "conditioning_2": Link("qa", "CONDITIONING")}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 128, "height": 64, "batch_size": 1}}),
        "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 1, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("all", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
        "s0": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 1, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),"#
    );
    let v = outputs(&d, &nodes, &[("qa", "CONDITIONING", 0), ("qm", "CONDITIONING", 0), ("qs", "CONDITIONING", 0), ("s", "LATENT", 0), ("s0", "LATENT", 0)])
        .unwrap();
    let qa = &conds(&v[0])[0];
    assert_eq!((qa.area, qa.strength), (Some(Area::Latent { h: 8, w: 8, y: 0, x: 8 }), 1.5));
    let qm = &conds(&v[1])[0];
    assert!(qm.area_from_mask && qm.mask_strength == 0.7 && qm.mask.as_ref().unwrap().size() == [1, 32, 32]);
    let qs = &conds(&v[2])[0];
    assert_eq!((qs.area, qs.strength), (Some(Area::Fraction { h: 1.0, w: 0.5, y: 0.0, x: 0.5 }), 0.25));
    // The area prompt changes the result, most of all where it applies (the right half).
    let (with, without) = (&latent(&v[3]).samples.0, &latent(&v[4]).samples.0);
    let diff = (with - without).abs();
    let (left, right) = (diff.narrow(3, 0, 8).mean(Kind::Float).double_value(&[]), diff.narrow(3, 8, 8).mean(Kind::Float).double_value(&[]));
    println!("area prompt: mean change left {left:.4}, right {right:.4}");
    assert!(right > left && right > 1e-3, "{left} {right}");
}

#[test]
fn inpaint_model_conditioning_for_standard_and_inpainting_unets() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors").display().to_string();
    let inpaint = d.join("inpaint.safetensors");
    diffloom_nodes::checkpoint::synthetic::write_checkpoint(
        &inpaint,
        &diffloom_nodes::checkpoint::synthetic::tiny_config(diffloom_nodes::checkpoint::detect::Family::Sd1, true),
        Kind::Float,
        3,
        true,
    )
    .unwrap();
    // Sides that are multiples of 8, so SetLatentNoiseMask's mask and InpaintModelConditioning's
    // (resized to the cropped pixels) are the same.
    d.png("in.png", 64, 40, 2);
    let graph = |model: &str, noise_mask: bool| {
        format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {model:?}}}),
            "img": (type: "LoadImage", inputs: {{"image": "in.png"}}),
            "m0": (type: "SolidMask", inputs: {{"value": 0.0, "width": 64, "height": 40}}),
            "m1": (type: "SolidMask", inputs: {{"value": 1.0, "width": 20, "height": 20}}),
            "m": (type: "MaskComposite", inputs: {{"destination": Link("m0", "MASK"), "source": Link("m1", "MASK"), "x": 30, "y": 10, "operation": "add"}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a window", "clip": Link("c", "CLIP")}}),
            "n": (type: "CLIPTextEncode", inputs: {{"text": "", "clip": Link("c", "CLIP")}}),
            "imc": (type: "InpaintModelConditioning", inputs: {{"positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "vae": Link("c", "VAE"), "pixels": Link("img", "IMAGE"), "mask": Link("m", "MASK"), "noise_mask": {noise_mask}}}),
            "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 2, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                  "positive": Link("imc", "positive"), "negative": Link("imc", "negative"), "latent_image": Link("imc", "latent"), "denoise": 0.8}}),
            "ve": (type: "VAEEncode", inputs: {{"pixels": Link("img", "IMAGE"), "vae": Link("c", "VAE")}}),
            "sm": (type: "SetLatentNoiseMask", inputs: {{"samples": Link("ve", "LATENT"), "mask": Link("m", "MASK")}}),
            "s2": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 2, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                  "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("sm", "LATENT"), "denoise": 0.8}}),"#
        )
    };
    // A standard UNet ignores the inpainting channels: the result is VAEEncode + SetLatentNoiseMask's.
    let v =
        outputs(&d, &graph(&ck, true), &[("imc", "positive", 0), ("imc", "latent", 2), ("ve", "LATENT", 0), ("s", "LATENT", 0), ("s2", "LATENT", 0)]).unwrap();
    let p = &conds(&v[0])[0];
    assert_eq!(p.concat_latent.as_ref().unwrap().size(), [1, 4, 5, 8]);
    assert_eq!(p.concat_mask.as_ref().unwrap().size(), [1, 1, 40, 64]);
    let l = latent(&v[1]);
    assert_eq!(max_abs_diff(&l.samples, &latent(&v[2]).samples), 0.0);
    assert_eq!(l.noise_mask.as_ref().unwrap().size(), [1, 1, 40, 64]);
    assert!(max_abs_diff(&latent(&v[3]).samples, &latent(&v[4]).samples) < 1e-5);
    // The masked image (grey under the mask) encodes to another latent than the image.
    assert!(max_abs_diff(p.concat_latent.as_ref().unwrap(), &l.samples) > 1e-3);
    // noise_mask false: no noise mask on the latent.
    let v = outputs(&d, &graph(&ck, false), &[("imc", "latent", 2)]).unwrap();
    assert!(latent(&v[0]).noise_mask.is_none());
    // An inpainting UNet samples with the 9-channel input (its values are checked against diffusers'
    // inpainting pipeline in tests/pipelines.rs).
    let inp = inpaint.display().to_string();
    let v = outputs(&d, &graph(&inp, false), &[("s", "LATENT", 0)]).unwrap();
    assert_eq!(latent(&v[0]).samples.size(), [1, 4, 5, 8]);
    // One mask per image, or one for all: two masks for one image is refused by name.
    let c = load_checkpoint(std::path::Path::new(&ck), Device::Cpu, Kind::Float).unwrap();
    let vae = diffloom_core::Handle::new(diffloom_nodes::sd::SdVae { model: c.vae.unwrap() }, 0, "vae");
    let cond = Value::Conditioning(vec![entry(32)]);
    let err = call(
        &diffloom_nodes::builtin::conditioning::InpaintModelConditioning,
        vec![
            ("positive", Some(cond.clone())),
            ("negative", Some(cond)),
            ("vae", Some(Value::Vae(vae))),
            ("pixels", Some(Value::Image(Shared(Tensor::rand([1, 16, 16, 3], (Kind::Float, Device::Cpu)))))),
            ("mask", Some(Value::Mask(Shared(Tensor::ones([2, 16, 16], (Kind::Float, Device::Cpu)))))),
            ("noise_mask", Some(Value::Boolean(true))),
        ],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("mask") && err.contains("2 masks for 1 images"), "{err}");
    // VAEEncodeForInpaint checks the same way (the mask is resized to the image; only batches clash).
    let err = call(
        &diffloom_nodes::builtin::latent::VAEEncodeForInpaint,
        vec![
            ("pixels", Some(Value::Image(Shared(Tensor::rand([3, 16, 16, 3], (Kind::Float, Device::Cpu)))))),
            (
                "vae",
                Some(Value::Vae(diffloom_core::Handle::new(
                    diffloom_nodes::sd::SdVae { model: load_checkpoint(std::path::Path::new(&ck), Device::Cpu, Kind::Float).unwrap().vae.unwrap() },
                    0,
                    "vae",
                ))),
            ),
            ("mask", Some(Value::Mask(Shared(Tensor::ones([2, 7, 9], (Kind::Float, Device::Cpu)))))),
            ("grow_mask_by", Some(Value::Int(6))),
        ],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("2 masks for 3 images"), "{err}");
}

#[test]
fn latent_composite_pastes_with_feathered_inner_edges() {
    let ones = Tensor::ones([1, 4, 4, 4], (Kind::Float, Device::Cpu));
    let to = Tensor::zeros([2, 4, 8, 8], (Kind::Float, Device::Cpu));
    let out = composite(&to, &ones, 16, 8, 16);
    // Pasted at latent (y 1, x 2); feather 2 latent pixels on the edges inside the target: all four.
    let row: Vec<f32> = Vec::try_from(&out.get(1).get(0).get(3)).unwrap();
    assert_eq!(row, [0.0, 0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0]);
    let corner = out.get(0).get(2).get(1).get(2).double_value(&[]);
    assert_eq!(corner, 0.25);
    // At the border no fade, and the source is clipped at the right edge.
    let out = composite(&to, &ones, 48, 0, 16);
    let row: Vec<f32> = Vec::try_from(&out.get(0).get(0).get(0)).unwrap();
    assert_eq!(row, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 1.0]);
    // Channels must match; a batch of 3 does not go into a batch of 2.
    let three = Tensor::ones([3, 4, 4, 4], (Kind::Float, Device::Cpu));
    let lat = |t: &Tensor| Some(Value::Latent(Latent { samples: Shared(t.shallow_clone()), noise_mask: None, batch_index: None }));
    let err = call(
        &LatentComposite,
        vec![("samples_to", lat(&to)), ("samples_from", lat(&three)), ("x", Some(Value::Int(0))), ("y", Some(Value::Int(0))), ("feather", Some(Value::Int(0)))],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("samples_from") && err.contains("batch 1 or 2"), "{err}");
}

/// LatentComposite on raw tensors.
fn composite(to: &Tensor, from: &Tensor, x: i64, y: i64, feather: i64) -> Tensor {
    let lat = |t: &Tensor| Some(Value::Latent(Latent { samples: Shared(t.shallow_clone()), noise_mask: None, batch_index: None }));
    let int = |v: i64| Some(Value::Int(v as i128));
    let out = call(&LatentComposite, vec![("samples_to", lat(to)), ("samples_from", lat(from)), ("x", int(x)), ("y", int(y)), ("feather", int(feather))]);
    match out.unwrap().remove(0) {
        Value::Latent(l) => l.samples.0,
        other => panic!("{other:?}"),
    }
}

#[test]
fn latent_from_batch_keeps_each_items_noise() {
    let d = Dir::new();
    let ck = tiny_sd1(&d, "m.safetensors").display().to_string();
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a cat", "clip": Link("c", "CLIP")}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 4}}),
        "one": (type: "LatentFromBatch", inputs: {{"samples": Link("e", "LATENT"), "batch_index": 2, "length": 1}}),
        "rep": (type: "RepeatLatentBatch", inputs: {{"samples": Link("one", "LATENT"), "amount": 3}}),
        "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 9, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("p", "CONDITIONING"), "latent_image": Link("e", "LATENT"), "denoise": 1.0}}),
        "s1": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 9, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": Link("p", "CONDITIONING"), "negative": Link("p", "CONDITIONING"), "latent_image": Link("one", "LATENT"), "denoise": 1.0}}),"#
    );
    let v = outputs(&d, &nodes, &[("one", "LATENT", 0), ("rep", "LATENT", 0), ("s", "LATENT", 0), ("s1", "LATENT", 0)]).unwrap();
    assert_eq!(latent(&v[0]).batch_index, Some(vec![2]));
    assert_eq!(latent(&v[1]).batch_index, Some(vec![2, 3, 4]));
    // Item 2 sampled alone is item 2 of the whole batch (its noise is the batch's third draw).
    let (whole, alone) = (&latent(&v[2]).samples, &latent(&v[3]).samples);
    // (Up to float rounding: the UNet runs on batches of 4 and 1.)
    let err = max_abs_diff(&whole.narrow(0, 2, 1), alone);
    assert!(err < 1e-4, "{err}");
    assert!(max_abs_diff(&whole.narrow(0, 1, 1), alone) > 1e-2);
    // An index past the batch is clamped to the last item.
    let nodes = r#""e": (type: "EmptyLatentImage", inputs: {"width": 64, "height": 64, "batch_size": 2}),
        "x": (type: "LatentFromBatch", inputs: {"samples": Link("e", "LATENT"), "batch_index": 9, "length": 4}),"#;
    let v = outputs(&d, nodes, &[("x", "LATENT", 0)]).unwrap();
    assert_eq!((latent(&v[0]).samples.size()[0], latent(&v[0]).batch_index.clone()), (1, Some(vec![1])));
}

#[test]
fn bislerp_interpolates_lengths_bilinearly_and_directions_on_the_sphere() {
    let mut g = Generator::cpu(4);
    let x = g.randn_f32(&[1, 4, 5, 6]);
    let up = common_upscale(&x, 13, 9, "bislerp", "disabled").unwrap();
    assert_eq!(up.size(), [1, 4, 9, 13]);
    // Lengths: exactly the bilinear resize of the length map (slerp keeps unit length, the length is
    // blended linearly in both passes).
    let norms = |t: &Tensor| t.norm_scalaropt_dim(2, [1], true);
    let want = common_upscale(&norms(&x), 13, 9, "bilinear", "disabled").unwrap();
    let err = max_abs_diff(&norms(&up), &want);
    assert!(err < 1e-4, "{err}");
    // Directions differ from a plain bilinear resize (which shortens vectors between neighbours).
    let lin = common_upscale(&x, 13, 9, "bilinear", "disabled").unwrap();
    assert!(max_abs_diff(&up, &lin) > 1e-2);
    // The same size is the identity; zero vectors stay finite.
    assert!(max_abs_diff(&common_upscale(&x, 6, 5, "bislerp", "disabled").unwrap(), &x) < 1e-5);
    let z = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
    assert_eq!(common_upscale(&z, 4, 4, "bislerp", "disabled").unwrap().abs().max().double_value(&[]), 0.0);
}

/// An InstructPix2Pix UNet (8 input channels) takes InstructPixToPixConditioning's image latent as its
/// extra channels: the result follows the image, and without the node the extra channels are zeros.
#[test]
fn instruct_pix2pix_models_take_the_image_latent() {
    use diffloom_nodes::checkpoint::detect::Family;
    use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
    let d = Dir::new();
    let mut config = tiny_config(Family::Sd1, false);
    if let Some(u) = &mut config.unet {
        u.in_channels = 8;
    }
    let ck = d.join("ip2p.safetensors");
    write_checkpoint(&ck, &config, Kind::Float, 4, true).unwrap();
    d.png("a.png", 64, 64, 1);
    d.png("b.png", 64, 64, 200);
    let graph = |image: &str| {
        format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "make it snowy", "clip": Link("c", "CLIP")}}),
            "n": (type: "CLIPTextEncode", inputs: {{"text": "", "clip": Link("c", "CLIP")}}),
            "img": (type: "LoadImage", inputs: {{"image": {image:?}}}),
            "ip": (type: "InstructPixToPixConditioning", inputs: {{"positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "vae": Link("c", "VAE"), "pixels": Link("img", "IMAGE")}}),
            "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 1, "steps": 2, "cfg": 5.0, "positive": Link("ip", "positive"), "negative": Link("ip", "negative"), "latent_image": Link("ip", "latent")}}),
            "s0": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 1, "steps": 2, "cfg": 5.0, "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("ip", "latent")}}),"#
        )
    };
    let a = outputs(&d, &graph("a.png"), &[("s", "LATENT", 0), ("s0", "LATENT", 0), ("ip", "latent", 2)]).unwrap();
    let b = outputs(&d, &graph("b.png"), &[("s", "LATENT", 0)]).unwrap();
    let (sa, s0, sb) = (latent(&a[0]).samples.0.shallow_clone(), latent(&a[1]).samples.0.shallow_clone(), latent(&b[0]).samples.0.shallow_clone());
    assert_eq!(latent(&a[2]).samples.abs().max().double_value(&[]), 0.0, "the latent to sample is zeros");
    assert!(max_abs_diff(&sa, &sb) > 1e-3, "the image changed nothing");
    assert!(max_abs_diff(&sa, &s0) > 1e-3, "the image latent changed nothing against zeros");
}
