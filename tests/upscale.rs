//! Upscale models (issue 5): RRDBNet parity with spandrel on both key layouts and both scales, tiling
//! without seams, the ImageUpscaleWithModel node in a graph, and files that are not upscalers.

use diffloom_aten::Generator;
use std::path::{Path, PathBuf};

use diffloom_core::Value;
use diffloom_nodes::checkpoint::load::load_upscale_model;
use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
use diffloom_nodes::checkpoint::synthetic::{write_rrdbnet, write_safetensors};
use diffloom_nodes::models::rrdbnet::{RrdbConfig, RrdbNet};
use diffloom_nodes::tiles::tiled_scale;
use tch::{Device, Kind, Tensor};

use crate::parity::run_reference;
use crate::util::{executor, max_abs_diff, run_graph, tiny_sd1, Dir};

fn rrdb(nf: i64, nb: i64, upsamples: i64, shuffle: i64) -> RrdbConfig {
    RrdbConfig { in_nc: 3, out_nc: 3, nf, gc: 32, nb, upsamples, shuffle }
}

/// Writes the four layouts/scales the tests use: (file, expected scale).
fn write_models(d: &Dir) -> Vec<(PathBuf, i64)> {
    [
        ("realesrgan-x4.safetensors", rrdb(16, 2, 2, 1), false, 21, 4),
        ("realesrgan-x2.safetensors", rrdb(16, 2, 2, 2), false, 22, 2),
        ("esrgan-x4.safetensors", rrdb(16, 2, 2, 1), true, 23, 4),
        ("esrgan-x2.safetensors", rrdb(16, 1, 1, 1), true, 24, 2),
    ]
    .into_iter()
    .map(|(name, config, original, seed, scale)| {
        let path = d.join(name);
        write_rrdbnet(&path, &config, original, seed).unwrap();
        (path, scale)
    })
    .collect()
}

/// A copy of a Real-ESRGAN-layout file in ESRGAN's second layout (`RRDB_trunk`, `trunk_conv`,
/// `upconvK`, `HRconv`), as BSRGAN ships.
fn write_trunk_layout(from: &Path, to: &Path) {
    let file = SafetensorsFile::open(from).unwrap();
    let renamed: Vec<(String, Tensor)> = file
        .tensors()
        .keys()
        .map(|k| {
            let new = k
                .replace("body.", "RRDB_trunk.")
                .replace(".rdb", ".RDB")
                .replace("conv_RRDB_trunk.", "trunk_conv.")
                .replace("conv_up", "upconv")
                .replace("conv_hr.", "HRconv.");
            (new, file.load(k, Device::Cpu, None).unwrap())
        })
        .collect();
    write_safetensors(to, &renamed, None).unwrap();
}

fn load(path: &Path) -> RrdbNet {
    load_upscale_model(path, Device::Cpu, Kind::Float).unwrap().0
}

#[test]
fn rrdbnet_matches_spandrel_on_both_layouts_and_scales() {
    let d = Dir::new();
    let models = write_models(&d);
    let mut g = Generator::cpu(5);
    // Odd sides: the x2 Real-ESRGAN model pads them for its pixel-unshuffle and crops the output.
    let image = g.rand(&[2, 3, 21, 26], Kind::Float).unwrap();
    // Smaller than the x2 model's minimum of 4: reflected, then replicated.
    let small = g.rand(&[1, 3, 3, 1], Kind::Float).unwrap();
    let input = d.join("in.safetensors");
    write_safetensors(&input, &[("image".into(), image.shallow_clone()), ("small".into(), small.shallow_clone())], None).unwrap();
    let mut models = models;
    let trunk = d.join("bsrgan-x4.safetensors");
    write_trunk_layout(&models[0].0, &trunk);
    models.push((trunk, 4));
    let reference = d.join("out.safetensors");
    let mut args: Vec<&Path> = vec![&input, &reference];
    args.extend(models.iter().map(|(p, _)| p.as_path()));
    run_reference("upscale_reference.py", &args);
    let r = SafetensorsFile::open(&reference).unwrap();
    let _guard = tch::no_grad_guard();
    let mut outputs = Vec::new();
    for (i, (path, scale)) in models.iter().enumerate() {
        let model = load(path);
        assert_eq!(model.config.scale(), *scale, "{}", path.display());
        let spandrel_scale = r.load(&format!("scale.{i}"), Device::Cpu, None).unwrap().int64_value(&[0]);
        assert_eq!(model.config.scale(), spandrel_scale);
        let ours = model.forward(&image);
        assert_eq!(ours.size(), [2, 3, 21 * scale, 26 * scale]);
        let reference = |k: &str| r.load(&format!("{k}.{i}"), Device::Cpu, None).unwrap();
        let err = max_abs_diff(&ours, &reference("out"));
        let err_call = max_abs_diff(&model.upscale(&image), &reference("call"));
        let err_small = max_abs_diff(&model.upscale(&small), &reference("small"));
        println!("{}: max abs error vs spandrel: net {err:.2e}, call {err_call:.2e}, small image {err_small:.2e}", path.display());
        assert!(err < 1e-4 && err_call < 1e-4 && err_small < 1e-4, "{}", path.display());
        outputs.push(ours);
    }
    // The models differ (other seeds), so agreeing with spandrel is not agreeing with anything.
    assert!(max_abs_diff(&outputs[0], &outputs[2]) > 1e-2);
    // The BSRGAN-layout copy is the first model under other names.
    assert!(max_abs_diff(&outputs[0], &outputs[4]) == 0.0);
}

/// Mean absolute step between neighbouring output columns at `cols`.
fn step_at(x: &Tensor, cols: &[i64]) -> f64 {
    let steps: Vec<f64> = cols.iter().map(|c| (x.narrow(3, *c, 1) - x.narrow(3, c - 1, 1)).abs().mean(Kind::Float).double_value(&[])).collect();
    steps.iter().sum::<f64>() / steps.len() as f64
}

#[test]
fn tiles_blend_without_seams_and_match_the_untiled_output() {
    let d = Dir::new();
    let models = write_models(&d);
    let model = load(&models[0].0);
    let _guard = tch::no_grad_guard();
    // A smooth image: any seam would be a step the untiled output does not have.
    let ys = Tensor::linspace(0.0, 1.0, 40, (Kind::Float, Device::Cpu)).view([1, 1, 40, 1]);
    let xs = Tensor::linspace(0.0, 1.0, 100, (Kind::Float, Device::Cpu)).view([1, 1, 1, 100]);
    let channels = [&ys * &xs, (&ys + &xs) / 2.0, (&xs * 6.0).sin() * 0.5 + 0.5 + &ys * 0.0];
    let image = Tensor::cat(&channels, 1);
    let whole = model.forward(&image);
    let tiled = |overlap: i64| {
        let mut f = |t: &Tensor| Ok(model.forward(t));
        tiled_scale(&image, &mut f, 40, 40, overlap, 4.0, 3).unwrap()
    };
    let blended = tiled(16);
    let pasted = tiled(0);
    // Tile edges along the width, in output pixels: with overlap 16 the tiles span 0..40, 24..64,
    // 48..88, 72..100 (input pixels); without overlap 0..40, 40..80, 80..100.
    let blended_edges: Vec<i64> = [24, 40, 48, 64, 72, 88].iter().map(|c| c * 4).collect();
    let pasted_edges = [40 * 4, 80 * 4];
    let seams_blended = step_at(&blended, &blended_edges);
    let seams_pasted = step_at(&pasted, &pasted_edges);
    let whole_blended = step_at(&whole, &blended_edges);
    let whole_pasted = step_at(&whole, &pasted_edges);
    let (e_blend, e_paste) = (max_abs_diff(&blended, &whole), max_abs_diff(&pasted, &whole));
    println!("steps at tile edges: blended {seams_blended:.4} (untiled {whole_blended:.4}), pasted {seams_pasted:.4} (untiled {whole_pasted:.4}); max diff to untiled: blended {e_blend:.4}, pasted {e_paste:.4}");
    assert!(seams_blended < 1.25 * whole_blended, "a seam: {seams_blended} vs {whole_blended}");
    // The control: pasting tiles without overlap does leave seams, so the measure can see one.
    assert!(seams_pasted > 1.5 * whole_pasted, "{seams_pasted} vs {whole_pasted}");
    assert!(e_blend < e_paste);
}

#[test]
fn image_upscale_with_model_in_a_graph() {
    let d = Dir::new();
    let models = write_models(&d);
    d.png("in.png", 24, 20, 3);
    let graph = |model: &Path| {
        format!(
            r#"(version: 1, nodes: {{
            "load": (type: "LoadImage", inputs: {{"image": "in.png"}}),
            "m": (type: "UpscaleModelLoader", inputs: {{"model_name": {:?}}}),
            "up": (type: "ImageUpscaleWithModel", inputs: {{"upscale_model": Link("m", "UPSCALE_MODEL"), "image": Link("load", "IMAGE")}}),
            "out": (type: "PreviewAny", inputs: {{"source": Link("up", "IMAGE")}}),
        }})"#,
            model.display().to_string()
        )
    };
    let (mut ex, reg) = executor(&d, 1 << 30);
    for (path, scale) in &models {
        let r = run_graph(&mut ex, &reg, &d, &graph(path), &[]);
        assert!(r.error.is_none(), "{:?}", r.error);
        let path_graph = d.join("graph.ron");
        let (_, parsed) = diffloom_core::graph::file::read(&path_graph).unwrap();
        let resolved = diffloom_core::validate::validate(&path_graph, &parsed, &reg).unwrap();
        let Some(Value::Image(img)) = ex.cached_output(&resolved, "up", 0) else { panic!("no image") };
        assert_eq!(img.0.size(), [1, 20 * scale, 24 * scale, 3]);
        // Clamped to the IMAGE range (the random model's raw output is not).
        assert!(img.0.min().double_value(&[]) >= 0.0 && img.0.max().double_value(&[]) <= 1.0);
        let loader = r.nodes.iter().find(|n| n.id == "m").unwrap();
        assert!(loader.messages.iter().any(|m| m.contains(&format!("RRDBNet ×{scale}"))), "{:?}", loader.messages);
    }
}

#[test]
fn files_that_are_not_upscalers_are_refused_by_name() {
    let d = Dir::new();
    let ckpt = tiny_sd1(&d, "sd.safetensors");
    let err = load_upscale_model(&ckpt, Device::Cpu, Kind::Float).err().unwrap().to_string();
    assert!(err.contains("sd.safetensors") && err.contains("not an upscale model") && err.contains("conv_first"), "{err}");
    // An ESRGAN+ file (the original layout with conv1x1 branches) is named as such, and a tensor no
    // ESRGAN layer has is refused (spandrel loads strictly, so it would be another architecture).
    let models = write_models(&d);
    let old = SafetensorsFile::open(&models[2].0).unwrap();
    let with = |extra: &str, shape: &[i64]| {
        let mut t: Vec<(String, Tensor)> = old.tensors().keys().map(|k| (k.clone(), old.load(k, Device::Cpu, None).unwrap())).collect();
        t.push((extra.into(), Tensor::zeros(shape, (Kind::Float, Device::Cpu))));
        let p = d.join(&format!("{}.safetensors", extra.replace('.', "_")));
        write_safetensors(&p, &t, None).unwrap();
        load_upscale_model(&p, Device::Cpu, Kind::Float).err().unwrap().to_string()
    };
    let err = with("model.1.sub.0.RDB1.conv1x1.weight", &[32, 16, 1, 1]);
    assert!(err.contains("conv1x1") && err.contains("ESRGAN+"), "{err}");
    let err = with("model.1.sub.0.RDB1.attn.weight", &[16, 16]);
    assert!(err.contains("unexpected tensor") && err.contains("RDB1.attn"), "{err}");
    // A truncated file: a load error naming the missing tensor, no panic.
    let file = SafetensorsFile::open(&models[0].0).unwrap();
    let mut kept: Vec<(String, Tensor)> = Vec::new();
    for name in file.tensors().keys().filter(|k| !k.starts_with("conv_hr")) {
        kept.push((name.clone(), file.load(name, Device::Cpu, None).unwrap()));
    }
    let broken = d.join("broken.safetensors");
    write_safetensors(&broken, &kept, None).unwrap();
    let err = load_upscale_model(&broken, Device::Cpu, Kind::Float).err().unwrap().to_string();
    assert!(err.contains("broken.safetensors") && err.contains("conv_hr"), "{err}");
}
