//! Latent, mask and conditioning nodes (part of issue 5): shapes, ComfyUI's semantics, bad input.

use diffloom_core::{Registry, Value};
use tch::Kind;

use crate::util::{executor, run_graph, Dir};

fn output(d: &Dir, nodes: &str, id: &str, out: usize) -> Result<Value, String> {
    let (mut ex, reg): (_, Registry) = executor(d, 1 << 30);
    let r = run_graph(
        &mut ex,
        &reg,
        d,
        &format!("(version: 1, nodes: {{ {nodes} \"zz\": (type: \"PreviewAny\", inputs: {{\"source\": Link({id:?}, \"{}\")}}) }})", out_name(id, out)),
        &[],
    );
    if let Some(e) = r.error {
        return Err(e.to_string());
    }
    let path = d.join("graph.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
    Ok(ex.cached_output(&resolved, id, out).expect("cached"))
}

/// The output names the tests read (every node here has a single output named after its type).
fn out_name(id: &str, _out: usize) -> &'static str {
    match id.chars().next() {
        Some('m') => "MASK",
        Some('i') => "IMAGE",
        Some('c') => "CONDITIONING",
        _ => "LATENT",
    }
}

fn t(v: Value) -> tch::Tensor {
    match v {
        Value::Mask(t) | Value::Image(t) => t.0,
        Value::Latent(l) => l.samples.0,
        other => panic!("{other:?}"),
    }
}

const SOLID: &str = r#""msolid": (type: "SolidMask", inputs: {"value": 0.0, "width": 9, "height": 7}),
    "mdot": (type: "SolidMask", inputs: {"value": 1.0, "width": 1, "height": 1}),
    "mone": (type: "MaskComposite", inputs: {"destination": Link("msolid", "MASK"), "source": Link("mdot", "MASK"), "x": 4, "y": 3, "operation": "add"}),"#;

#[test]
fn grow_mask_dilates_and_erodes_with_square_or_tapered_kernels() {
    let d = Dir::new();
    let grown = |expand: i64, tapered: bool| {
        let nodes = format!(r#"{SOLID} "mg": (type: "GrowMask", inputs: {{"mask": Link("mone", "MASK"), "expand": {expand}, "tapered_corners": {tapered}}}),"#);
        t(output(&d, &nodes, "mg", 0).unwrap())
    };
    // One pixel grown by 1: a 3×3 square (9), or a plus sign (5) with tapered corners.
    assert_eq!(grown(1, false).sum(Kind::Float).double_value(&[]), 9.0);
    assert_eq!(grown(1, true).sum(Kind::Float).double_value(&[]), 5.0);
    assert_eq!(grown(2, true).sum(Kind::Float).double_value(&[]), 13.0);
    // Shrinking the grown square by 1 gives the pixel back.
    let nodes = format!(
        r#"{SOLID} "mg": (type: "GrowMask", inputs: {{"mask": Link("mone", "MASK"), "expand": 1, "tapered_corners": false}}),
        "ms": (type: "GrowMask", inputs: {{"mask": Link("mg", "MASK"), "expand": -1, "tapered_corners": false}}),"#
    );
    assert_eq!(t(output(&d, &nodes, "ms", 0).unwrap()).sum(Kind::Float).double_value(&[]), 1.0);
}

#[test]
fn mask_image_conversions_composite_and_feather() {
    let d = Dir::new();
    let nodes = format!(
        r#"{SOLID} "imask": (type: "MaskToImage", inputs: {{"mask": Link("mone", "MASK")}}),
        "mback": (type: "ImageToMask", inputs: {{"image": Link("imask", "IMAGE"), "channel": "green"}}),
        "minv": (type: "InvertMask", inputs: {{"mask": Link("mback", "MASK")}}),"#
    );
    let img = t(output(&d, &nodes, "imask", 0).unwrap());
    assert_eq!(img.size(), [1, 7, 9, 3]);
    let inv = t(output(&d, &nodes, "minv", 0).unwrap());
    assert_eq!(inv.sum(Kind::Float).double_value(&[]), 62.0);
    let err =
        output(&d, &format!(r#"{nodes} "ma": (type: "ImageToMask", inputs: {{"image": Link("imask", "IMAGE"), "channel": "alpha"}}),"#), "ma", 0).unwrap_err();
    assert!(err.contains("input \"channel\": the image has no alpha channel"), "{err}");
    // Feathering a full mask: the left ramp is 1/4, 2/4, 3/4, 1 over the first four columns.
    let nodes = r#""mfull": (type: "SolidMask", inputs: {"value": 1.0, "width": 8, "height": 2}),
        "mf": (type: "FeatherMask", inputs: {"mask": Link("mfull", "MASK"), "left": 4}),"#;
    let f = t(output(&d, nodes, "mf", 0).unwrap());
    let row: Vec<f32> = Vec::try_from(&f.get(0).get(0)).unwrap();
    assert_eq!(row, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0]);
}

fn ckpt(d: &Dir) -> String {
    crate::util::tiny_sd1(d, "tiny.safetensors").display().to_string()
}

#[test]
fn latent_upscale_noise_masks_and_inpaint_encoding() {
    let d = Dir::new();
    let ck = ckpt(&d);
    d.png("in.png", 70, 45, 2);
    let base = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "img": (type: "LoadImage", inputs: {{"image": "in.png"}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 48, "batch_size": 2}}),"#
    );
    let up = |w: i64, h: i64| {
        let nodes = format!(r#"{base} "lu": (type: "LatentUpscale", inputs: {{"samples": Link("e", "LATENT"), "width": {w}, "height": {h}}}),"#);
        t(output(&d, &nodes, "lu", 0).unwrap()).size()
    };
    assert_eq!(up(128, 96), [2, 4, 12, 16]);
    // 0 keeps the aspect ratio (64×48 → width 128 → height 96); sides are at least 64 pixels.
    assert_eq!(up(128, 0), [2, 4, 12, 16]);
    assert_eq!(up(16, 16), [2, 4, 8, 8]);
    let nodes = format!(
        r#"{base} "lb": (type: "LatentUpscaleBy", inputs: {{"samples": Link("e", "LATENT"), "scale_by": 1.5}}),
        "lr": (type: "RepeatLatentBatch", inputs: {{"samples": Link("lb", "LATENT"), "amount": 3}}),"#
    );
    assert_eq!(t(output(&d, &nodes, "lr", 0).unwrap()).size(), [6, 4, 9, 12]);

    // Inpaint encoding: a 70×45 image is cropped to 64×40; the noise mask covers the grown mask.
    let nodes = format!(
        r#"{base} "mhalf": (type: "SolidMask", inputs: {{"value": 1.0, "width": 70, "height": 45}}),
        "lin": (type: "VAEEncodeForInpaint", inputs: {{"pixels": Link("img", "IMAGE"), "vae": Link("c", "VAE"), "mask": Link("mhalf", "MASK"), "grow_mask_by": 6}}),"#
    );
    let Value::Latent(l) = output(&d, &nodes, "lin", 0).unwrap() else { panic!() };
    assert_eq!(l.samples.size(), [1, 4, 5, 8]);
    let m = l.noise_mask.unwrap();
    assert_eq!(m.size(), [1, 1, 40, 64]);
    assert_eq!(m.min().double_value(&[]), 1.0);
    // A single mask applies to every latent of a batch, at any resolution.
    let nodes = format!(
        r#"{base} "m2": (type: "SolidMask", inputs: {{"value": 1.0, "width": 8, "height": 8}}),
        "e3": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64, "batch_size": 3}}),
        "lm": (type: "SetLatentNoiseMask", inputs: {{"samples": Link("e3", "LATENT"), "mask": Link("m2", "MASK")}}),"#
    );
    let Value::Latent(l) = output(&d, &nodes, "lm", 0).unwrap() else { panic!() };
    assert_eq!(l.noise_mask.unwrap().size(), [1, 1, 8, 8]);
}

#[test]
fn conditioning_combine_concat_and_zero_out() {
    let d = Dir::new();
    let ck = ckpt(&d);
    let base = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "ca": (type: "CLIPTextEncode", inputs: {{"text": "a fox", "clip": Link("c", "CLIP")}}),
        "cb": (type: "CLIPTextEncode", inputs: {{"text": "snow", "clip": Link("c", "CLIP")}}),
        "cc": (type: "ConditioningCombine", inputs: {{"conditioning_1": Link("ca", "CONDITIONING"), "conditioning_2": Link("cb", "CONDITIONING")}}),
        "ct": (type: "ConditioningConcat", inputs: {{"conditioning_to": Link("ca", "CONDITIONING"), "conditioning_from": Link("cb", "CONDITIONING")}}),
        "cz": (type: "ConditioningZeroOut", inputs: {{"conditioning": Link("ca", "CONDITIONING")}}),"#
    );
    let Value::Conditioning(c) = output(&d, &base, "cc", 0).unwrap() else { panic!() };
    assert_eq!(c.len(), 2);
    let Value::Conditioning(c) = output(&d, &base, "ct", 0).unwrap() else { panic!() };
    assert_eq!(c[0].cross_attn.size(), [1, 154, 32]);
    let Value::Conditioning(c) = output(&d, &base, "cz", 0).unwrap() else { panic!() };
    assert_eq!(c[0].cross_attn.abs().max().double_value(&[]), 0.0);
}

#[test]
fn outpaint_padding_and_masked_composites() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 4);
    let nodes = r#""iload": (type: "LoadImage", inputs: {"image": "in.png"}),
        "ipad": (type: "ImagePadForOutpaint", inputs: {"image": Link("iload", "IMAGE"), "left": 8, "right": 0, "top": 0, "bottom": 4, "feathering": 4}),
        "mpad": (type: "ImageToMask", inputs: {"image": Link("ipad", "IMAGE"), "channel": "red"}),"#;
    let img = t(output(&d, nodes, "ipad", 0).unwrap());
    assert_eq!(img.size(), [1, 16, 24, 3]);
    // The padding is grey; the original sits at (8, 0).
    assert_eq!(img.get(0).get(15).get(0).double_value(&[0]), 0.5);
    let orig = t(output(&d, nodes, "iload", 0).unwrap());
    assert_eq!((img.narrow(1, 0, 12).narrow(2, 8, 16) - &orig).abs().max().double_value(&[]), 0.0);
    // The mask: 1 on the padding, fading in over 4 pixels from the padded left and bottom edges, 0 inside.
    let (mut ex, reg) = executor(&d, 1 << 30);
    let r = run_graph(
        &mut ex,
        &reg,
        &d,
        &format!("(version: 1, nodes: {{ {nodes} \"o\": (type: \"PreviewAny\", inputs: {{\"source\": Link(\"ipad\", \"MASK\")}}) }})"),
        &[],
    );
    assert!(r.error.is_none());
    let path = d.join("graph.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
    let m = t(ex.cached_output(&resolved, "ipad", 1).unwrap());
    assert_eq!(m.size(), [1, 16, 24]);
    assert_eq!(m.get(0).get(0).get(0).double_value(&[]), 1.0);
    assert_eq!(m.get(0).get(5).get(8).double_value(&[]), 1.0, "d = 0 at the padded edge: ((4 - 0) / 4)^2");
    assert_eq!(m.get(0).get(5).get(9).double_value(&[]), 0.5625, "d = 1: (3/4)^2");
    assert_eq!(m.get(0).get(5).get(20).double_value(&[]), 0.0);
    // Composite: a white image through a half mask onto a black one.
    let nodes = r#""wm": (type: "SolidMask", inputs: {"value": 1.0, "width": 8, "height": 8}),
        "white": (type: "MaskToImage", inputs: {"mask": Link("wm", "MASK")}),
        "bm": (type: "SolidMask", inputs: {"value": 0.0, "width": 16, "height": 16}),
        "black": (type: "MaskToImage", inputs: {"mask": Link("bm", "MASK")}),
        "hm": (type: "SolidMask", inputs: {"value": 0.5, "width": 8, "height": 8}),
        "icomp": (type: "ImageCompositeMasked", inputs: {"destination": Link("black", "IMAGE"), "source": Link("white", "IMAGE"), "x": 12, "y": 4, "mask": Link("hm", "MASK")}),"#;
    let c = t(output(&d, nodes, "icomp", 0).unwrap());
    assert_eq!(c.size(), [1, 16, 16, 3]);
    // Only the visible 4×8 part lands, at half strength.
    assert_eq!(c.sum(Kind::Float).double_value(&[]), 4.0 * 8.0 * 3.0 * 0.5);
    assert_eq!(c.get(0).get(4).get(12).double_value(&[0]), 0.5);
}
