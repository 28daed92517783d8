//! Image nodes that go through Pillow in ComfyUI: SaveAnimatedPNG (Pillow's APNG writer), SaveAnimatedWEBP
//! (its libwebp calls) and ImageQuantize (its median cut and dithering), checked against ComfyUI's node
//! bodies by tests/parity/apng_reference.py, webp_reference.py and quantize_reference.py.

use std::path::Path;

use diffloom_core::value::Shared;
use diffloom_core::{Args, Ctx, Folders, Locator, Node, Registry, Value};
use diffloom_nodes::builtin::animation;
use tch::{Device, Kind, Tensor};

use crate::util::Dir;

fn img(t: &Tensor) -> Option<Value> {
    Some(Value::Image(Shared(t.shallow_clone())))
}

/// Runs `node` with `output` as the output directory and `texts` as the run's prompt/workflow.
fn call_in(
    node: &dyn Node,
    args: Vec<(&str, Option<Value>)>,
    output: &Path,
    texts: &[(&str, &str)],
) -> (Result<Vec<Value>, String>, serde_json::Map<String, serde_json::Value>) {
    let args = Args::new(args.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let folders = Folders { input_dir: output.to_path_buf(), temp_dir: output.join("temp"), ..Folders::default() };
    let texts = |_: u32, _: u32| texts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let registry = Registry::new();
    let mut cx = Ctx {
        device: Device::Cpu,
        node_id: "n",
        files: Locator { graph_dir: output, folders: &folders, output_dir: output },
        output_dir: output,
        image_texts: &texts,
        cancel: &cancel,
        dtype: Kind::Float,
        messages: Vec::new(),
        ui: serde_json::Map::new(),
        progress: &|_, _, _| {},
        registry: &registry,
    };
    let r = node.execute(&mut cx, &args).map_err(|e| e.to_string());
    (r, cx.ui)
}

/// A batch whose frames 1 and 2 are identical (Pillow merges them) and whose frame 3 changes a patch
/// only (Pillow crops it), with values outside 0..1 (clipped).
fn frames(c: i64) -> Tensor {
    let base = Tensor::rand([1, 9, 13, c], (Kind::Float, Device::Cpu)).f_mul_scalar(1.2).unwrap().f_sub_scalar(0.1).unwrap();
    let changed = base.copy();
    let _ = changed.narrow(1, 2, 3).narrow(2, 4, 5).f_fill_(0.5).unwrap();
    let other = Tensor::rand([1, 9, 13, c], (Kind::Float, Device::Cpu));
    Tensor::cat(&[&other, &base, &base, &changed], 0)
}

#[test]
fn save_animated_png_matches_comfyui() {
    let d = Dir::new();
    let output = d.join("output");
    let texts =
        [("prompt", r#"{"1":{"class_type":"SaveAnimatedPNG","inputs":{"fps":6.0,"t":"café"}}}"#), ("workflow", r#"{"nodes":[]}"#), ("parameters", "a1111")];
    let spec = animation::SaveAnimatedPNG.schema();
    assert!(matches!(spec.input_spec("filename_prefix").unwrap().kind.default_value(), Some(Value::String(p)) if p == "ComfyUI"));
    for (c, fps, level) in [(3i64, 6.0, 4i128), (4, 7.0, 0), (3, 0.3, 9)] {
        let x = frames(c);
        let save = |x: &Tensor| {
            let args = vec![
                ("images", img(x)),
                ("filename_prefix", Some(Value::String("anim/ComfyUI".into()))),
                ("fps", Some(Value::Float(fps))),
                ("compress_level", Some(Value::Int(level))),
            ];
            call_in(&animation::SaveAnimatedPNG, args, &output, &texts)
        };
        let (r, ui) = save(&x);
        r.unwrap();
        let name = ui["images"][0]["filename"].as_str().unwrap().to_owned();
        assert_eq!(ui["images"][0]["subfolder"], "anim");
        assert_eq!(ui["animated"], serde_json::json!([true]));
        let frames_path = d.join("frames.safetensors");
        diffloom_nodes::checkpoint::synthetic::write_safetensors(&frames_path, &[("images".into(), x.shallow_clone())], None).unwrap();
        let theirs = d.join("comfy.png");
        crate::parity::run_reference(
            "apng_reference.py",
            &[
                &frames_path,
                Path::new(&format!("{fps:?}")),
                Path::new(&level.to_string()),
                Path::new(texts[0].1),
                Path::new(texts[1].1),
                &output.join("anim").join(&name),
                &theirs,
            ],
        );
    }
    // Numbering as ComfyUI's; nothing is overwritten.
    assert_eq!(d.files("output/anim"), vec!["ComfyUI_00001_.png", "ComfyUI_00002_.png", "ComfyUI_00003_.png"]);
    // One frame: a plain PNG, no "animated" flag.
    let one = Tensor::rand([1, 4, 5, 3], (Kind::Float, Device::Cpu));
    let (r, ui) = call_in(
        &animation::SaveAnimatedPNG,
        vec![
            ("images", img(&one)),
            ("filename_prefix", Some(Value::String("one".into()))),
            ("fps", Some(Value::Float(6.0))),
            ("compress_level", Some(Value::Int(4))),
        ],
        &output,
        &[],
    );
    r.unwrap();
    assert!(!ui.contains_key("animated"));
    let bytes = std::fs::read(output.join("one_00001_.png")).unwrap();
    assert!(!bytes.windows(4).any(|w| w == b"acTL"));
    // Errors name the input.
    let bad = |args: Vec<(&str, Option<Value>)>| call_in(&animation::SaveAnimatedPNG, args, &output, &[]).0.unwrap_err();
    let two = Tensor::rand([2, 4, 5, 2], (Kind::Float, Device::Cpu));
    assert!(bad(vec![
        ("images", img(&two)),
        ("filename_prefix", Some(Value::String("x".into()))),
        ("fps", Some(Value::Float(6.0))),
        ("compress_level", Some(Value::Int(4)))
    ])
    .contains("images"));
    let two = Tensor::rand([2, 4, 5, 3], (Kind::Float, Device::Cpu));
    // 99999 ms is 99999/1000 s, whose numerator fcTL cannot hold (Pillow: "cannot write duration").
    assert!(bad(vec![
        ("images", img(&two)),
        ("filename_prefix", Some(Value::String("x".into()))),
        ("fps", Some(Value::Float(0.0100001))),
        ("compress_level", Some(Value::Int(4)))
    ])
    .contains("fps"));
    assert!(bad(vec![
        ("images", img(&two)),
        ("filename_prefix", Some(Value::String("../x".into()))),
        ("fps", Some(Value::Float(6.0))),
        ("compress_level", Some(Value::Int(4)))
    ])
    .contains("filename_prefix"));
}

/// Smooth frames (a moving gradient with a soft disc) for the lossy encodes, whose PSNR says something;
/// a shade outside 0..1 is clipped.
fn smooth_frames(n: i64, c: i64) -> Tensor {
    let opts = (Kind::Float, Device::Cpu);
    let y = Tensor::linspace(0.0, 1.0, 40, opts).view([1, 40, 1, 1]);
    let x = Tensor::linspace(0.0, 1.0, 56, opts).view([1, 1, 56, 1]);
    let k = Tensor::arange(n, opts).view([n, 1, 1, 1]).f_mul_scalar(0.1).unwrap();
    let ch = Tensor::arange(c, opts).view([1, 1, 1, c]).f_mul_scalar(0.1).unwrap();
    let r2 = (&x - 0.5 - &k).square() + (&y - 0.5).square();
    let disc = r2.f_mul_scalar(-20.0).unwrap().exp();
    (&x * 0.4 + &y * 0.2 + ch + disc * 0.3).f_mul_scalar(0.9).unwrap().f_sub_scalar(0.05).unwrap()
}

/// SaveAnimatedWEBP against ComfyUI's node body on Pillow 13 (tests/parity/webp_reference.py): the chunk
/// layout, EXIF bytes and what Pillow reads (frames, durations, loop, background, tags); lossless frames
/// exactly the input, lossy ones as close to it as Pillow's own encode.
#[test]
fn save_animated_webp_matches_comfyui() {
    let d = Dir::new();
    let output = d.join("output");
    let texts =
        [("prompt", r#"{"1":{"class_type":"SaveAnimatedWEBP","inputs":{"fps":6.0,"t":"café"}}}"#), ("workflow", r#"{"nodes":[]}"#), ("parameters", "a1111")];
    let spec = animation::SaveAnimatedWEBP.schema();
    assert!(matches!(spec.input_spec("filename_prefix").unwrap().kind.default_value(), Some(Value::String(p)) if p == "ComfyUI"));
    assert!(matches!(spec.input_spec("lossless").unwrap().kind.default_value(), Some(Value::Boolean(true))));
    assert!(matches!(spec.input_spec("method").unwrap().kind.default_value(), Some(Value::String(m)) if m == "default"));
    let cases = [
        (frames(3), 6.0, true, 80i128, "default"),
        (frames(4), 7.0, true, 50, "fastest"),
        (smooth_frames(3, 3), 0.3, false, 80, "default"),
        (smooth_frames(4, 4), 24.0, false, 30, "slowest"),
        (smooth_frames(2, 3), 1000.0, false, 95, "fastest"),
        (smooth_frames(1, 3), 6.0, true, 80, "default"),
        (smooth_frames(1, 4), 6.0, false, 70, "slowest"),
    ];
    let (n_cases, mut names) = (cases.len(), Vec::new());
    for (x, fps, lossless, quality, method) in cases {
        let args = vec![
            ("images", img(&x)),
            ("filename_prefix", Some(Value::String("anim/ComfyUI".into()))),
            ("fps", Some(Value::Float(fps))),
            ("lossless", Some(Value::Boolean(lossless))),
            ("quality", Some(Value::Int(quality))),
            ("method", Some(Value::String(method.into()))),
        ];
        let (r, ui) = call_in(&animation::SaveAnimatedWEBP, args, &output, &texts);
        r.unwrap();
        let name = ui["images"][0]["filename"].as_str().unwrap().to_owned();
        assert_eq!(ui["images"][0]["subfolder"], "anim");
        assert_eq!(ui["images"][0]["type"], "output");
        assert_eq!(ui.get("animated"), (x.size()[0] > 1).then(|| serde_json::json!([true])).as_ref());
        let frames_path = d.join("frames.safetensors");
        diffloom_nodes::checkpoint::synthetic::write_safetensors(&frames_path, &[("images".into(), x.shallow_clone())], None).unwrap();
        let theirs = d.join("comfy.webp");
        let _ = std::fs::remove_file(&theirs);
        crate::parity::run_reference(
            "webp_reference.py",
            &[
                &frames_path,
                Path::new(&format!("{fps:?}")),
                Path::new(if lossless { "1" } else { "0" }),
                Path::new(&quality.to_string()),
                Path::new(method),
                Path::new(texts[0].1),
                Path::new(texts[1].1),
                &output.join("anim").join(&name),
                &theirs,
            ],
        );
        names.push(name);
    }
    // Numbering as ComfyUI's; nothing is overwritten.
    let want: Vec<String> = (1..=n_cases).map(|i| format!("ComfyUI_{i:05}_.webp")).collect();
    assert_eq!(names, want);
    assert_eq!(d.files("output/anim"), want);
    // Errors name the input.
    let bad = |x: &Tensor, prefix: &str| {
        let args = vec![
            ("images", img(x)),
            ("filename_prefix", Some(Value::String(prefix.into()))),
            ("fps", Some(Value::Float(6.0))),
            ("lossless", Some(Value::Boolean(true))),
            ("quality", Some(Value::Int(80))),
            ("method", Some(Value::String("default".into()))),
        ];
        call_in(&animation::SaveAnimatedWEBP, args, &output, &[]).0.unwrap_err()
    };
    assert!(bad(&Tensor::rand([2, 4, 5, 2], (Kind::Float, Device::Cpu)), "x").contains("images"));
    assert!(bad(&Tensor::rand([2, 4, 5, 3], (Kind::Float, Device::Cpu)), "../x").contains("filename_prefix"));
}

/// ImageQuantize against ComfyUI's node body on Pillow 13 (tests/parity/quantize_reference.py): the
/// median-cut palette, the cached nearest-colour mapping, Floyd-Steinberg and the Bayer modes, bit for bit.
#[test]
fn image_quantize_matches_pillow() {
    use diffloom_nodes::builtin::quantize::ImageQuantize;
    let d = Dir::new();
    crate::parity::run_reference("quantize_reference.py", &[d.path()]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&d.join("quantize_expected.safetensors")).unwrap();
    let get = |k: &str| r.load(k, Device::Cpu, None).unwrap();
    let mut failures = Vec::new();
    for name in ["noise", "smooth", "few", "small"] {
        let input = get(&format!("input.{name}"));
        for colors in [256i128, 17, 4, 1] {
            for dither in ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"] {
                let args = vec![("image", img(&input)), ("colors", Some(Value::Int(colors))), ("dither", Some(Value::String(dither.into())))];
                let got = call_in(&ImageQuantize, args, d.path(), &[]).0.unwrap();
                let Value::Image(got) = &got[0] else { panic!("not an image") };
                let want = get(&format!("{name}.{colors}.{dither}"));
                let differ = got.0.ne_tensor(&want).any_dim(-1, false).sum(Kind::Int64).int64_value(&[]);
                if differ != 0 {
                    failures.push(format!("{name} {colors} {dither}: {differ} pixels differ"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Errors name the input.
    let rgba = Tensor::rand([1, 4, 4, 4], (Kind::Float, Device::Cpu));
    let e =
        call_in(&ImageQuantize, vec![("image", img(&rgba)), ("colors", Some(Value::Int(4))), ("dither", Some(Value::String("none".into())))], d.path(), &[])
            .0
            .unwrap_err();
    assert!(e.contains("image"), "{e}");
}
