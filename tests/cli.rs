//! The CLI end to end: example graphs, the written PNGs, no overwriting, and bad input.

use std::fs::File;

use crate::util::{repo, stderr, stdout, Dir};

/// The text chunks of a PNG (tEXt and iTXt), and its size.
fn png_info(path: &std::path::Path) -> (u32, u32, Vec<(String, String)>) {
    let dec = png::Decoder::new(std::io::BufReader::new(File::open(path).unwrap()));
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    let mut texts: Vec<(String, String)> = info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    for t in &info.utf8_text {
        texts.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    (info.width, info.height, texts)
}

fn example(name: &str) -> String {
    repo().join("graphs").join(name).to_str().unwrap().to_owned()
}

#[test]
fn image_ops_example_writes_pngs_with_the_graph_embedded() {
    let d = Dir::new();
    let out = d.diffloom(&["run", &example("image_ops.ron"), "-o", "out", "--set", "prefix=ops", "--set", "scale=2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.files("out"), ["ops_00001_.png", "ops_00002_.png"]);
    let report = stdout(&out);
    assert!(report.contains("8 nodes: 8 ran, 0 cached"), "{report}");
    // Nodes run in file order where dependencies allow: "save" (128×128) before "save_mask" (a 64×64
    // crop of the inverted image).
    let (w, h, texts) = png_info(&d.join("out/ops_00001_.png"));
    assert_eq!((w, h), (128, 128));
    let (w, h, _) = png_info(&d.join("out/ops_00002_.png"));
    assert_eq!((w, h), (64, 64));
    let (_, graph_text) = texts.iter().find(|(k, _)| k == "diffloom").expect("graph chunk");
    let graph = diffloom_core::graph::file::parse(std::path::Path::new("embedded"), graph_text).unwrap();
    // The embedded graph carries the parameters as run.
    assert_eq!(graph.params.get("scale"), Some(&diffloom_core::graph::Literal::Float(2.0)));
    assert_eq!(graph.params.get("prefix"), Some(&diffloom_core::graph::Literal::String("ops".into())));
    assert_eq!(graph.nodes.0.len(), 8);
}

#[test]
fn a_second_run_never_overwrites() {
    let d = Dir::new();
    let out = d.diffloom(&["run", &example("image_ops.ron"), "-o", "out"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = std::fs::read(d.join("out/image_ops_00002_.png")).unwrap();
    // A file the user made with the next number must survive too.
    d.write("out/image_ops_00003_.png", b"mine");
    let out = d.diffloom(&["run", &example("image_ops.ron"), "-o", "out", "--set", "scale=1.0"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(d.files("out"), ["image_ops_00001_.png", "image_ops_00002_.png", "image_ops_00003_.png", "image_ops_00004_.png", "image_ops_00005_.png"]);
    assert_eq!(std::fs::read(d.join("out/image_ops_00002_.png")).unwrap(), first);
    assert_eq!(std::fs::read(d.join("out/image_ops_00003_.png")).unwrap(), b"mine");
}

#[test]
fn unicode_graph_text_goes_into_an_itxt_chunk() {
    let d = Dir::new();
    d.png("in.png", 8, 8, 3);
    d.write(
        "g.ron",
        r#"(version: 1, nodes: {
            "load": (type: "LoadImage", title: "入力 — ☂", inputs: {"image": "in.png"}),
            "save": (type: "SaveImage", inputs: {"images": Link("load", "IMAGE")}),
        })"#,
    );
    let out = d.diffloom(&["run", "g.ron"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, _, texts) = png_info(&d.join("output/diffloom_00001_.png"));
    assert!(texts.iter().any(|(k, t)| k == "diffloom" && t.contains("入力 — ☂")));
}

/// A one-node-plus-save graph around LoadImage of `image`.
fn load_save(image: &str) -> String {
    format!(
        r#"(version: 1, nodes: {{
            "load": (type: "LoadImage", inputs: {{"image": {image:?}}}),
            "save": (type: "SaveImage", inputs: {{"images": Link("load", "IMAGE")}}),
        }})"#
    )
}

#[test]
fn bad_image_files_name_the_node_input_and_file_and_leave_no_output() {
    let d = Dir::new();
    d.png("good.png", 8, 8, 1);
    let good = std::fs::read(d.join("good.png")).unwrap();
    d.write("truncated.png", &good[..good.len() / 2]);
    d.write("text.png", b"hello, I am not an image");
    std::fs::create_dir(d.join("folder.png")).unwrap();
    for (file, want) in [
        ("truncated.png", "node \"load\" (LoadImage): truncated.png: cannot decode the image"),
        ("text.png", "node \"load\" (LoadImage): text.png: not a PNG, JPEG or WebP image"),
        ("folder.png", "node \"load\" (LoadImage): folder.png: is a directory, expected an image file"),
        ("missing.png", "node \"load\" (LoadImage): input \"image\": file \"missing.png\" not found"),
    ] {
        d.write("g.ron", load_save(file));
        let out = d.diffloom(&["run", "g.ron"]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        assert!(stderr(&out).contains(&format!("error: g.ron: {want}")), "{file}: {}", stderr(&out));
        assert!(d.files("output").is_empty(), "{file}: {:?}", d.files("output"));
    }
}

#[test]
fn unwritable_output_directory_is_a_clear_error_with_nothing_left_behind() {
    let d = Dir::new();
    d.png("in.png", 8, 8, 1);
    d.write("g.ron", load_save("in.png"));
    d.write("afile", b"x");
    let out = d.diffloom(&["run", "g.ron", "-o", "afile/out"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("node \"save\" (SaveImage): afile/out: cannot create the output directory"), "{}", stderr(&out));
    assert_eq!(std::fs::read(d.join("afile")).unwrap(), b"x");
}

#[test]
fn filename_prefix_cannot_escape_the_output_directory() {
    let d = Dir::new();
    d.png("in.png", 8, 8, 1);
    d.write(
        "g.ron",
        r#"(version: 1, nodes: {
            "load": (type: "LoadImage", inputs: {"image": "in.png"}),
            "save": (type: "SaveImage", inputs: {"images": Link("load", "IMAGE"), "filename_prefix": "../escape"}),
        })"#,
    );
    let out = d.diffloom(&["run", "g.ron", "-o", "out"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("input \"filename_prefix\": \"../escape\" must be a relative name"), "{}", stderr(&out));
    assert!(!d.join("escape_00001_.png").exists());
}

#[test]
fn relative_paths_are_found_next_to_the_graph() {
    // The example's image is graphs/inputs/gradient.png; run from an unrelated directory.
    let d = Dir::new();
    let out = d.diffloom(&["run", &example("image_ops.ron")]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn show_prints_dot_and_the_execution_order() {
    let d = Dir::new();
    let out = d.diffloom(&["show", &example("image_ops.ron"), "--format", "dot"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dot = stdout(&out);
    assert!(dot.starts_with("digraph {"), "{dot}");
    assert!(dot.contains("label = \"bigger\\lImageScaleBy\""), "{dot}");
    assert!(dot.contains("label = \"IMAGE → image1\""), "{dot}");
    assert_eq!(dot.matches(" -> ").count(), 8);
    let out = d.diffloom(&["show", &example("image_ops.ron")]);
    let text = stdout(&out);
    let pos = |id: &str| text.find(&format!("{id} (")).unwrap();
    assert!(pos("load") < pos("bigger") && pos("bigger") < pos("blend") && pos("blend") < pos("save"));
}

#[test]
fn nodes_lists_schemas_as_text_and_json() {
    let d = Dir::new();
    let out = d.diffloom(&["nodes", "--json"]);
    assert!(out.status.success());
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let scale = list.iter().find(|n| n["name"] == "ImageScale").unwrap();
    let width = scale["inputs"].as_array().unwrap().iter().find(|i| i["name"] == "width").unwrap();
    assert_eq!(width["kind"]["kind"], "int");
    assert_eq!(width["kind"]["max"], 16384);
    assert_eq!(scale["outputs"][0]["type"], "IMAGE");
    let out = d.diffloom(&["nodes", "ImageScale"]);
    assert!(stdout(&out).contains("upscale_method     one of nearest-exact | bilinear | area | bicubic | lanczos"), "{}", stdout(&out));
    let out = d.diffloom(&["nodes", "ImageScal"]);
    assert_eq!(stderr(&out), "error: unknown node type \"ImageScal\" (did you mean \"ImageScale\"?)\n");
}

#[test]
fn device_flag_is_checked() {
    let d = Dir::new();
    let out = d.diffloom(&["run", &example("image_ops.ron"), "--device", "tpu"]);
    assert_eq!(stderr(&out), "error: --device tpu: expected cpu, cuda or cuda:N\n");
    if !tch::Cuda::is_available() {
        let out = d.diffloom(&["run", &example("image_ops.ron"), "--device", "cuda"]);
        assert!(stderr(&out).contains("CUDA is not available"), "{}", stderr(&out));
    }
    let out = d.diffloom(&["run", &example("image_ops.ron"), "--device", "cpu", "-o", "o"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_long_chain_runs() {
    let d = Dir::new();
    let mut g = String::from("(version: 1, nodes: {\n\"n0\": (type: \"PrimitiveString\", inputs: {\"value\": \"a\"}),\n");
    for i in 1..3000 {
        g.push_str(&format!("\"n{i}\": (type: \"StringConcatenate\", inputs: {{\"string_a\": Link(\"n{}\", \"STRING\"), \"string_b\": \"b\"}}),\n", i - 1));
    }
    g.push_str("\"show\": (type: \"PreviewAny\", inputs: {\"source\": Link(\"n2999\", \"STRING\")}),\n})");
    d.write("chain.ron", g);
    let out = d.diffloom(&["run", "chain.ron"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&format!("a{}… (2000 more characters)", "b".repeat(999))), "preview truncated");
    assert!(stdout(&out).contains("3001 nodes: 3001 ran, 0 cached"));
}

#[test]
fn image_nodes_behave_as_comfyui() {
    let d = Dir::new();
    // RGBA: alpha 255 left half, 0 right half. LoadImage's MASK is 1 - alpha.
    let img = image::RgbaImage::from_fn(8, 4, |x, _| image::Rgba([200, 100, 50, if x < 4 { 255 } else { 0 }]));
    img.save(d.join("rgba.png")).unwrap();
    image::RgbImage::from_fn(8, 4, |x, y| image::Rgb([x as u8 * 30, y as u8 * 60, 128])).save(d.join("photo.jpg")).unwrap();
    d.write(
        "g.ron",
        r#"(version: 1, nodes: {
            "rgba": (type: "LoadImage", inputs: {"image": "rgba.png"}),
            "jpg": (type: "LoadImage", inputs: {"image": "photo.jpg"}),
            "mask": (type: "PreviewAny", inputs: {"source": Link("rgba", "MASK")}),
            "nomask": (type: "PreviewAny", inputs: {"source": Link("jpg", "MASK")}),
            "crop": (type: "ImageCrop", inputs: {"image": Link("jpg", "IMAGE"), "width": 100, "height": 2, "x": 50, "y": 1}),
            "cropped": (type: "PreviewAny", inputs: {"source": Link("crop", "IMAGE")}),
            "scaled": (type: "ImageScale", inputs: {"image": Link("jpg", "IMAGE"), "width": 0, "height": 8}),
            "s": (type: "PreviewAny", inputs: {"source": Link("scaled", "IMAGE")}),
        })"#,
    );
    let out = d.diffloom(&["run", "g.ron"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("MASK [1, 4, 8]"), "{text}");
    assert!(text.contains("MASK [1, 64, 64]"), "no alpha: ComfyUI's 64×64 empty mask\n{text}");
    // x clamps to width-1 = 7, so the crop is 1 pixel wide, 2 high.
    assert!(text.contains("IMAGE [1, 2, 1, 3]"), "{text}");
    // width 0 keeps the aspect ratio: 8×4 → 16×8.
    assert!(text.contains("IMAGE [1, 8, 16, 3]"), "{text}");
}

#[test]
fn blend_modes_follow_comfyuis_formulas() {
    use diffloom_core::value::Shared;
    use diffloom_core::Value;
    use tch::Tensor;
    let a = Tensor::from_slice(&[0.2f32, 0.7]).view([1, 1, 2, 1]).expand([1, 1, 2, 3], false).contiguous();
    let b = Tensor::from_slice(&[0.6f32, 0.3]).view([1, 1, 2, 1]).expand([1, 1, 2, 3], false).contiguous();
    let blend = |mode: &str, f: f64| -> Vec<f32> {
        let args = vec![
            ("image1", Some(Value::Image(Shared(a.shallow_clone())))),
            ("image2", Some(Value::Image(Shared(b.shallow_clone())))),
            ("blend_factor", Some(Value::Float(f))),
            ("blend_mode", Some(Value::String(mode.into()))),
        ];
        let out = crate::util::call(&diffloom_nodes::builtin::image::ImageBlend, args).unwrap();
        let Value::Image(t) = &out[0] else { panic!() };
        Vec::<f32>::try_from(&t.select(3, 0).flatten(0, -1)).unwrap()
    };
    let close = |got: Vec<f32>, want: [f32; 2]| {
        assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6), "{got:?} vs {want:?}");
    };
    close(blend("multiply", 1.0), [0.12, 0.21]);
    close(blend("screen", 1.0), [1.0 - 0.8 * 0.4, 1.0 - 0.3 * 0.7]);
    // overlay: a <= 0.5 → 2ab, else 1 - 2(1-a)(1-b)
    close(blend("overlay", 1.0), [2.0 * 0.2 * 0.6, 1.0 - 2.0 * 0.3 * 0.7]);
    // The mix with image1 comes before the clamp: 0.5·0.2 + 0.5·(0.2 − 0.6) = −0.1 → 0.
    close(blend("difference", 0.5), [0.0, 0.5 * 0.7 + 0.5 * 0.4]);
    close(blend("normal", 0.25), [0.75 * 0.2 + 0.25 * 0.6, 0.75 * 0.7 + 0.25 * 0.3]);
}

#[test]
fn plugins_come_from_the_shipped_folder_the_config_file_and_the_flag() {
    let d = Dir::new();
    let node = |name: &str| format!("diffloom.node {{ name = '{name}', outputs = {{}}, output_node = true, execute = function() end }}\n");
    d.write("cfgplugins/a.lua", node("FromConfig"));
    d.write("flagplugins/b.lua", node("FromFlag"));
    d.write("config/diffloom.ron", "(plugins: [\"../cfgplugins\"])");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffloom"))
        .args(["nodes", "--json", "--plugins", "flagplugins"])
        .current_dir(d.path())
        .env("DIFFLOOM_CONFIG", d.join("config/diffloom.ron"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let origin = |n: &str| list.iter().find(|e| e["name"] == n).map(|e| e["origin"].as_str().unwrap().to_owned());
    assert!(origin("FromConfig").unwrap().ends_with("cfgplugins/a.lua"));
    assert!(origin("FromFlag").unwrap().ends_with("flagplugins/b.lua"));
    assert!(origin("ColorLevels").unwrap().ends_with("plugins/lua/levels.lua"), "the shipped plugins load");
    // A broken configuration is reported, not fatal.
    d.write("config/diffloom.ron", "(plugns: [])");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffloom"))
        .args(["nodes", "ColorLevels"])
        .current_dir(d.path())
        .env("DIFFLOOM_CONFIG", d.join("config/diffloom.ron"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(stderr(&out).contains("diffloom.ron:1:2: Unexpected field named `plugns`"), "{}", stderr(&out));
}

/// Every example graph runs as the README runs it (`diffloom run graphs/NAME.ron`) on the project's
/// tiny models, and writes its images with the sizes its nodes imply.
#[test]
fn every_example_graph_runs_as_it_is() {
    let mut ran = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(repo().join("graphs")).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries.iter().filter(|p| p.extension().is_some_and(|e| e == "ron")) {
        let d = Dir::new();
        let started = std::time::Instant::now();
        let out = d.diffloom(&["run", path.to_str().unwrap(), "-o", "out"]);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(out.status.success(), "{name}: {}\n{}", stdout(&out), stderr(&out));
        let files = d.files("out");
        assert!(!files.is_empty() && files.iter().all(|f| f.ends_with(".png")), "{name}: {files:?}");
        for f in &files {
            let (w, h, _) = png_info(&d.join(&format!("out/{f}")));
            assert!(w >= 64 && h >= 64, "{name}: {f} is {w}×{h}");
        }
        ran.push(format!("{name} ({} images, {:.1} s)", files.len(), started.elapsed().as_secs_f64()));
    }
    println!("{}", ran.join("\n"));
    assert!(ran.len() >= 12, "{ran:?}");
}

/// The shared libraries an ELF file asks the loader for (readelf comes with the binutils every Rust
/// build on Linux needs).
fn needed_libraries(path: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("readelf").arg("-d").arg(path).output().expect("run readelf");
    assert!(out.status.success(), "readelf -d {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1).map(|s| s.trim_end_matches(']').to_owned()))
        .collect()
}

// libtorch registers CUDA from libtorch_cuda.so's static initialisers, which the linker used to drop
// as unneeded (`--as-needed`): `--device cuda` then failed even on a GPU machine. Checked here on the
// CPU-only machine: every binary needs the library, and the running ones have it loaded.
#[test]
fn every_binary_links_libtorch_cuda_and_reports_it() {
    let libtorch = std::path::PathBuf::from(env!("LIBTORCH"));
    if !libtorch.join("lib/libtorch_cuda.so").exists() {
        eprintln!("skipped: this libtorch ({}) has no CUDA backend", libtorch.display());
        return;
    }
    let main = std::path::PathBuf::from(env!("CARGO_BIN_EXE_diffloom"));
    let binaries = [main.clone(), main.with_file_name("make-test-models"), std::env::current_exe().unwrap()];
    for bin in &binaries {
        let needed = needed_libraries(bin);
        assert!(needed.iter().any(|l| l == "libtorch_cuda.so"), "{} needs only {needed:?}", bin.display());
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(maps.contains("libtorch_cuda.so"), "libtorch_cuda.so is not loaded in the test process");

    let d = Dir::new();
    let out = d.diffloom(&["--version", "-v"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with(&format!("diffloom {}\n", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("libtorch 2.13.0"), "{text}");
    assert!(text.contains("CUDA: compiled in;"), "{text}");
    assert!(text.contains("bf16 on this CPU: "), "{text}");
    let short = d.diffloom(&["--version"]);
    assert_eq!(stdout(&short), format!("diffloom {}\n", env!("CARGO_PKG_VERSION")));
}
