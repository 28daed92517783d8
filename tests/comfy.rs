//! ComfyUI interop (issue 13): workflows in every form ComfyUI saves them (UI 0.4 and 1 with reroutes,
//! primitives, bypassed and muted nodes, notes, groups and subgraphs; API JSON; PNGs that carry them)
//! imported and run on the tiny model, checked node by node and against the image the hand-written RON
//! graph renders; exports and round trips; model and image names resolved as ComfyUI resolves them; the
//! metadata saved PNGs carry.

use std::path::{Path, PathBuf};

use diffloom_comfy::{import_file, Source};
use diffloom_core::graph::file::{self, GraphFile};
use diffloom_core::graph::{InputValue, Literal, Reference};
use serde_json::{json, Value as Json};

use crate::util::{stderr, stdout, tiny_sd1, Dir};

const FIXTURES: &str = "tests/data/comfy";

/// The RON graph every fixture describes: seed 42, 4 steps of euler_ancestral/karras, CFG 7.5, 64×48.
const REFERENCE: &str = r#"(version: 2, nodes: {
    "ck": (type: "CheckpointLoaderSimple", inputs: {"ckpt_name": "models/checkpoints/SD1.5/tiny-sd1.safetensors"}),
    "pos": (type: "CLIPTextEncode", inputs: {"text": "a lighthouse at dusk, {oil|acrylic} painting", "clip": Link("ck", "CLIP")}),
    "neg": (type: "CLIPTextEncode", inputs: {"text": "text, watermark", "clip": Link("ck", "CLIP")}),
    "latent": (type: "EmptyLatentImage", inputs: {"width": 64, "height": 48}),
    "sampler": (type: "KSampler", inputs: {"model": Link("ck", "MODEL"), "seed": 42, "steps": 4, "cfg": 7.5,
        "sampler_name": "euler_ancestral", "scheduler": "karras", "positive": Link("pos", "CONDITIONING"),
        "negative": Link("neg", "CONDITIONING"), "latent_image": Link("latent", "LATENT")}),
    "decode": (type: "VAEDecode", inputs: {"samples": Link("sampler", "LATENT"), "vae": Link("ck", "VAE")}),
    "save": (type: "SaveImage", inputs: {"images": Link("decode", "IMAGE"), "filename_prefix": "ref"}),
})"#;

/// A directory with the tiny checkpoint in a ComfyUI models layout and the fixtures copied in.
fn setup() -> Dir {
    let d = Dir::new();
    std::fs::create_dir_all(d.join("models/checkpoints/SD1.5")).unwrap();
    tiny_sd1(&d, "models/checkpoints/SD1.5/tiny-sd1.safetensors");
    for f in std::fs::read_dir(crate::util::repo().join(FIXTURES)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, d.join(f.file_name().unwrap().to_str().unwrap())).unwrap();
    }
    d
}

fn ok(d: &Dir, args: &[&str]) -> String {
    let o = d.diffloom(args);
    assert!(o.status.success(), "diffloom {args:?} failed:\n{}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// The one file a run wrote (from its report).
fn written(report: &str) -> PathBuf {
    let files: Vec<&str> = report.lines().filter_map(|l| l.trim().strip_prefix("wrote ")).collect();
    assert_eq!(files.len(), 1, "{report}");
    PathBuf::from(files[0])
}

fn pixels(d: &Dir, path: &Path) -> Vec<u8> {
    image::open(d.path().join(path)).unwrap().to_rgb8().into_raw()
}

fn texts(path: &Path) -> Vec<(String, String)> {
    diffloom_comfy::embedded::texts(&std::fs::read(path).unwrap()).unwrap()
}

fn text<'a>(texts: &'a [(String, String)], key: &str) -> Option<&'a str> {
    texts.iter().find(|(k, _)| k == key).map(|(_, t)| t.as_str())
}

/// Re-encodes a PNG with only the given text chunks (a ComfyUI-made PNG has no `diffloom` chunk).
fn png_with(d: &Dir, from: &Path, name: &str, chunks: &[(&str, &str)]) -> PathBuf {
    let img = image::open(d.path().join(from)).unwrap().to_rgb8();
    let out = d.join(name);
    let mut enc = png::Encoder::new(std::fs::File::create(&out).unwrap(), img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    for (k, t) in chunks {
        enc.add_text_chunk(k.to_string(), t.to_string()).unwrap();
    }
    enc.write_header().unwrap().write_image_data(img.as_raw()).unwrap();
    out
}

fn import(d: &Dir, name: &str) -> (GraphFile, Source) {
    import_file(&d.join(name), &diffloom_nodes::registry()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn input<'a>(g: &'a GraphFile, node: &str, name: &str) -> &'a InputValue {
    g.nodes
        .get(node)
        .unwrap_or_else(|| panic!("no node {node}: {:?}", g.nodes.0.iter().map(|(k, _)| k).collect::<Vec<_>>()))
        .inputs
        .get(name)
        .unwrap_or_else(|| panic!("{node} has no {name}"))
}

fn link(node: &str, output: &str) -> InputValue {
    InputValue::Ref(Reference::Link(node.into(), output.into()))
}

fn lit(v: impl Into<Json>) -> InputValue {
    InputValue::Literal(diffloom_comfy::flat::literal(&v.into()).unwrap())
}

#[test]
fn every_workflow_form_renders_the_image_the_ron_graph_renders() {
    let d = setup();
    d.write("reference.ron", REFERENCE);
    let reference = written(&ok(&d, &["run", "reference.ron"]));
    let want = pixels(&d, &reference);
    let api = std::fs::read_to_string(d.join("api.json")).unwrap();
    d.write("post_body.json", json!({"prompt": serde_json::from_str::<Json>(&api).unwrap(), "client_id": "tests"}).to_string());
    let ui = std::fs::read_to_string(d.join("ui_v04.json")).unwrap();
    // As ComfyUI saves: the prompt as run, the canvas as drawn (here the v0.4 workflow, seed 42 from its
    // primitive), and no diffloom chunk.
    let comfy_png = png_with(&d, &reference, "comfyui.png", &[("prompt", &api), ("workflow", &ui)]);
    let workflow_only = png_with(&d, &reference, "workflow_only.png", &[("workflow", &ui)]);
    for file in ["ui_v04.json", "ui_v1_subgraph.json", "api.json", "post_body.json", reference.to_str().unwrap(), "comfyui.png", "workflow_only.png"] {
        let report = ok(&d, &["run", file, "--models", "models"]);
        assert_eq!(pixels(&d, &written(&report)), want, "{file} renders another image");
    }
    // A WebP as ComfyUI's SaveAnimatedWEBP writes it (PIL, EXIF Make/Model).
    d.write("prompt.json", &api);
    crate::parity::run_reference("comfy_webp.py", &[&d.path().join(&reference), &d.join("prompt.json"), &d.join("ui_v04.json"), &d.join("comfy.webp")]);
    let report = ok(&d, &["run", "comfy.webp", "--models", "models"]);
    assert_eq!(pixels(&d, &written(&report)), want, "the WebP's workflow renders another image");
    assert_eq!(import(&d, "comfy.webp").0.nodes.get("positive").unwrap().title.as_deref(), Some("Positive"));
    assert_eq!(import(&d, reference.to_str().unwrap()).1, Source::ImageRon);
    assert_eq!(import(&d, comfy_png.file_name().unwrap().to_str().unwrap()).1, Source::ImagePrompt);
    assert_eq!(import(&d, workflow_only.file_name().unwrap().to_str().unwrap()).1, Source::ImageWorkflow);
    // `validate` and `show` read workflows too.
    assert!(ok(&d, &["validate", "ui_v1_subgraph.json"]).contains("ok (7 nodes)"));
}

/// diffloom's own SaveAnimatedWEBP file carries the run as ComfyUI's does (EXIF Model `prompt:`, Make
/// `workflow:`), and importing it gives back the workflow that renders the same frames.
#[test]
fn saved_webp_imports_back_as_its_workflow() {
    let d = setup();
    let ron = REFERENCE.replace(
        r#"(type: "SaveImage", inputs: {"images": Link("decode", "IMAGE"), "filename_prefix": "ref"})"#,
        r#"(type: "SaveAnimatedWEBP", inputs: {"images": Link("decode", "IMAGE"), "filename_prefix": "anim", "fps": 6.0, "lossless": true, "quality": 80, "method": "default"})"#,
    );
    assert_ne!(ron, REFERENCE);
    d.write("webp.ron", &ron);
    let first = written(&ok(&d, &["run", "webp.ron", "--models", "models"]));
    assert_eq!(first.extension().unwrap(), "webp");
    let t = texts(&d.path().join(&first));
    assert!(text(&t, "prompt").unwrap().contains("SaveAnimatedWEBP"), "{t:?}");
    assert!(serde_json::from_str::<Json>(text(&t, "workflow").unwrap()).unwrap()["nodes"].is_array());
    let (graph, source) = import(&d, first.to_str().unwrap());
    assert_eq!(source, Source::ImagePrompt);
    assert!(graph.nodes.iter().any(|(_, n)| n.node_type == "SaveAnimatedWEBP"));
    let again = written(&ok(&d, &["run", first.to_str().unwrap(), "--models", "models"]));
    assert_ne!(again, first, "the second run must not overwrite the first file");
    assert_eq!(pixels(&d, &again), pixels(&d, &first), "the WebP's workflow renders other frames");
}

#[test]
fn ui_workflows_map_widgets_reroutes_primitives_bypass_mute_notes_and_groups() {
    let d = setup();
    let (g, source) = import(&d, "ui_v04.json");
    assert_eq!(source, Source::UiJson);
    let ids: Vec<&str> = g.nodes.iter().map(|(k, _)| k).collect();
    // Readable ids: unique titles slugged, else the type; the muted SaveImage, the bypassed ImageInvert,
    // the reroute, the primitive and the notes are gone.
    assert_eq!(ids, ["ksampler", "checkpointloadersimple", "emptylatentimage", "positive", "negative", "vaedecode", "saveimage"]);
    // widgets_values in widget order, the control_after_generate value skipped; the linked seed widget
    // takes the primitive, which became a parameter named by its title.
    assert_eq!(g.params.0, [("seed".to_owned(), Literal::Int(42))]);
    assert_eq!(*input(&g, "ksampler", "seed"), InputValue::Ref(Reference::Param("seed".into())));
    for (name, v) in [("steps", lit(4)), ("cfg", lit(7.5)), ("sampler_name", lit("euler_ancestral")), ("scheduler", lit("karras")), ("denoise", lit(1))] {
        assert_eq!(*input(&g, "ksampler", name), v, "{name}");
    }
    assert_eq!(*input(&g, "emptylatentimage", "height"), lit(48));
    // Windows separators are kept as written (the lookup understands them).
    assert_eq!(*input(&g, "checkpointloadersimple", "ckpt_name"), lit("SD1.5\\tiny-sd1.safetensors"));
    // The reroute collapsed into the link it forwards; the bypassed node's input passed through.
    assert_eq!(*input(&g, "negative", "clip"), link("checkpointloadersimple", "CLIP"));
    assert_eq!(*input(&g, "saveimage", "images"), link("vaedecode", "IMAGE"));
    // Titles, ComfyUI ids, positions, colours, groups; the grouped note on the group's nodes, the other
    // note on the graph.
    let positive = g.nodes.get("positive").unwrap();
    assert_eq!(positive.title.as_deref(), Some("Positive"));
    assert_eq!(positive.canvas.comfy_id.as_deref(), Some("6"));
    assert_eq!(positive.canvas.pos, Some((415.0, 186.0)));
    assert_eq!(positive.canvas.color.as_deref(), Some("#232"));
    assert_eq!(positive.canvas.group.as_deref(), Some("Prompts"));
    assert_eq!(positive.notes.as_deref(), Some("Prompts for the test render."));
    assert_eq!(g.nodes.get("ksampler").unwrap().notes, None);
    assert_eq!(g.notes.as_deref(), Some("# A workflow the tests wrote"));

    // Version 1: link objects, native reroutes, a subgraph flattened with stable "instance:inner" ids,
    // its promoted seed widget's value, and a legacy `true` in the control slot.
    let (g, _) = import(&d, "ui_v1_subgraph.json");
    let comfy: Vec<&str> = g.nodes.iter().map(|(_, n)| n.canvas.comfy_id.as_deref().unwrap()).collect();
    assert_eq!(comfy, ["4", "5", "9", "20:3", "20:6", "20:7", "20:8"]);
    assert_eq!(*input(&g, "ksampler", "seed"), lit(42));
    assert_eq!(*input(&g, "ksampler", "steps"), lit(4));
    assert_eq!(*input(&g, "ksampler", "model"), link("checkpointloadersimple", "MODEL"));
    assert_eq!(*input(&g, "saveimage", "images"), link("vaedecode", "IMAGE"));

    // API: titles from _meta (ComfyUI's default ones, display names, are no titles), links as [id, slot].
    let (g, _) = import(&d, "api.json");
    assert_eq!(g.nodes.get("checkpointloadersimple").unwrap().canvas.comfy_id.as_deref(), Some("4"));
    assert_eq!(g.nodes.get("checkpointloadersimple").unwrap().title, None);
    assert_eq!(g.nodes.get("positive").unwrap().title.as_deref(), Some("Positive"));
    assert_eq!(*input(&g, "ksampler", "positive"), link("positive", "CONDITIONING"));
    assert_eq!(g.nodes.get("ksampler").unwrap().title, None, "a title equal to the type is no title");

    // The newer primitive nodes (backend PrimitiveInt, …) become parameters too.
    let mut api: Json = serde_json::from_str(&std::fs::read_to_string(d.join("api.json")).unwrap()).unwrap();
    api["12"] = json!({"class_type": "PrimitiveInt", "inputs": {"value": 6}, "_meta": {"title": "Steps"}});
    api["3"]["inputs"]["steps"] = json!(["12", 0]);
    d.write("primitive.json", api.to_string());
    let (g, _) = import(&d, "primitive.json");
    assert_eq!(g.params.0, [("steps".to_owned(), Literal::Int(6))]);
    assert_eq!(*input(&g, "ksampler", "steps"), InputValue::Ref(Reference::Param("steps".into())));
    assert!(g.nodes.iter().all(|(_, n)| n.node_type != "PrimitiveInt"));

    // A PNG as ComfyUI writes it: values from `prompt` (what ran), titles, notes and the primitive's
    // parameter from `workflow` — with the value the prompt holds.
    let ui = std::fs::read_to_string(d.join("ui_v04.json")).unwrap();
    let api = std::fs::read_to_string(d.join("api.json")).unwrap().replace("\"seed\": 42", "\"seed\": 7");
    d.png("plain.png", 8, 8, 1);
    png_with(&d, Path::new("plain.png"), "comfy.png", &[("prompt", &api), ("workflow", &ui)]);
    let (g, _) = import(&d, "comfy.png");
    assert_eq!(g.params.0, [("seed".to_owned(), Literal::Int(7))]);
    assert_eq!(g.nodes.get("positive").unwrap().notes.as_deref(), Some("Prompts for the test render."));
    assert_eq!(*input(&g, "checkpointloadersimple", "ckpt_name"), lit("SD1.5/tiny-sd1.safetensors"));
}

#[test]
fn import_writes_ron_that_runs_and_never_overwrites() {
    let d = setup();
    let out = ok(&d, &["import", "ui_v04.json", "-o", "wf.ron"]);
    assert!(out.is_empty());
    let (_, g) = file::read(&d.join("wf.ron")).unwrap();
    assert_eq!(g.version, file::FORMAT_VERSION);
    ok(&d, &["run", "wf.ron", "--models", "models", "--set", "seed=43"]);
    let before = std::fs::read(d.join("wf.ron")).unwrap();
    let o = d.diffloom(&["import", "api.json", "-o", "wf.ron"]);
    assert!(!o.status.success() && stderr(&o).contains("wf.ron") && stderr(&o).contains("never overwritten"), "{}", stderr(&o));
    assert_eq!(std::fs::read(d.join("wf.ron")).unwrap(), before);
}

#[test]
fn round_trips_keep_nodes_links_values_and_titles() {
    let d = setup();
    // RON → API → RON: the same API prompt again (nodes, links, values, titles; parameters inlined).
    let txt2img = crate::util::repo().join("graphs/txt2img.ron");
    let api1 = ok(&d, &["export", txt2img.to_str().unwrap(), "--format", "api"]);
    d.write("a1.json", &api1);
    ok(&d, &["import", "a1.json", "-o", "a1.ron"]);
    let api2 = ok(&d, &["export", "a1.ron", "--format", "api"]);
    let (a1, a2): (Json, Json) = (serde_json::from_str(&api1).unwrap(), serde_json::from_str(&api2).unwrap());
    assert_eq!(a1, a2);
    let latent = a1.as_object().unwrap().values().find(|n| n["class_type"] == "EmptyLatentImage").unwrap();
    assert_eq!(latent["inputs"]["width"], 512, "parameters are inlined");

    // UI → RON → UI → RON: the same graph both times; the exported canvas keeps ids, types, titles,
    // positions and the widget values.
    let (g1, _) = import(&d, "ui_v04.json");
    d.write("g1.ron", file::to_ron(&g1));
    let ui = ok(&d, &["export", "g1.ron", "--format", "ui"]);
    d.write("ui2.json", &ui);
    let (g2, _) = import(&d, "ui2.json");
    assert_eq!(file::to_ron(&g1), file::to_ron(&g2));
    let ui: Json = serde_json::from_str(&ui).unwrap();
    let node = |id: u64| ui["nodes"].as_array().unwrap().iter().find(|n| n["id"] == json!(id)).cloned().unwrap();
    assert_eq!(node(3)["widgets_values"], json!([42, "fixed", 4, 7.5, "euler_ancestral", "karras", 1]));
    assert_eq!(node(6)["title"], "Positive");
    assert_eq!(node(6)["pos"], json!([415.0, 186.0]));
    assert_eq!(node(5)["widgets_values"], json!([64, 48, 1]));
    let primitive = ui["nodes"].as_array().unwrap().iter().find(|n| n["type"] == "PrimitiveNode").unwrap();
    assert_eq!(primitive["title"], "seed");
    assert_eq!(primitive["outputs"][0]["widget"]["name"], "seed");
    assert!(ui["groups"].as_array().unwrap().iter().any(|g| g["title"] == "Prompts"));

    // RON → UI → RON keeps the RON's ids (carried as a node property), its parameters (as primitive
    // nodes) and its values.
    let ui_text = ok(&d, &["export", txt2img.to_str().unwrap(), "--format", "ui"]);
    d.write("t2i.json", &ui_text);
    let (back, _) = import(&d, "t2i.json");
    let (_, original) = file::read(&txt2img).unwrap();
    let ids = |g: &GraphFile| g.nodes.iter().map(|(k, n)| (k.to_owned(), n.node_type.clone(), n.inputs.clone())).collect::<Vec<_>>();
    let mut a = ids(&original);
    let mut b = ids(&back);
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    // Inputs left at their defaults come back explicit; compare those the original sets.
    for ((ia, ta, ina), (ib, tb, inb)) in a.iter().zip(&b) {
        assert_eq!((ia, ta), (ib, tb));
        for (name, v) in ina.iter() {
            assert_eq!(inb.get(name), Some(v), "{ia}.{name}");
        }
    }
    assert_eq!(a.len(), b.len());
    let mut pa = original.params.0.clone();
    let mut pb = back.params.0.clone();
    pa.sort_by(|x, y| x.0.cmp(&y.0));
    pb.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(pa, pb);

    // A graph without canvas fields gets a layered layout: each node right of what it reads.
    let ui: Json = serde_json::from_str(&ui_text).unwrap();
    let x = |ty: &str| ui["nodes"].as_array().unwrap().iter().find(|n| n["type"] == ty).unwrap()["pos"][0].as_f64().unwrap();
    assert!(
        x("CheckpointLoaderSimple") < x("CLIPTextEncode")
            && x("CLIPTextEncode") < x("KSampler")
            && x("KSampler") < x("VAEDecode")
            && x("VAEDecode") < x("SaveImage")
    );
}

#[test]
fn unknown_nodes_are_listed_together_and_nothing_runs() {
    let d = setup();
    let mut api: Json = serde_json::from_str(&std::fs::read_to_string(d.join("api.json")).unwrap()).unwrap();
    api["3"]["class_type"] = json!("KSamplr");
    api["10"] = json!({"class_type": "ImpactWildcardProcessor", "inputs": {}, "_meta": {"title": "Wildcards"}});
    api["11"] = json!({"class_type": "ImpactWildcardProcessor", "inputs": {}, "_meta": {"title": "More wildcards"}});
    api["12"] = json!({"class_type": "UltimateSDUpscale", "inputs": {"image": ["8", 0]}, "_meta": {"title": "Ultimate SD Upscale"}});
    d.write("custom.json", api.to_string());
    let o = d.diffloom(&["run", "custom.json", "--models", "models"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("3 node types diffloom does not have"), "{err}");
    assert!(err.contains(r#""KSamplr" used by node #3 "KSampler" (did you mean "KSampler"?)"#), "{err}");
    assert!(err.contains(r#""ImpactWildcardProcessor" used by nodes #10 "Wildcards", #11 "More wildcards""#), "{err}");
    assert!(err.contains(r#""UltimateSDUpscale" used by node #12 "Ultimate SD Upscale""#), "{err}");
    assert!(!d.join("output").exists(), "nothing ran");
}

#[test]
fn model_and_image_names_resolve_as_comfyui_resolves_them() {
    let d = setup();
    // A missing checkpoint: node (both ids), input, file name, and every folder searched.
    let api = std::fs::read_to_string(d.join("api.json")).unwrap().replace("SD1.5/tiny-sd1.safetensors", "SD1.5/dreamshaper_8.safetensors");
    d.write("missing.json", api);
    std::fs::create_dir_all(d.join("more/checkpoints")).unwrap();
    let o = d.diffloom(&["run", "missing.json", "--models", "models", "--models", "more"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    for part in [
        r#"node "checkpointloadersimple" (ComfyUI #4)"#,
        r#"input "ckpt_name""#,
        "SD1.5/dreamshaper_8.safetensors",
        "models/checkpoints",
        "more/checkpoints",
        "working directory",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    // An existing install's extra_model_paths.yaml (several bases, multi-line values) instead of --models.
    std::fs::create_dir_all(d.join("comfy/models/checkpoints")).unwrap();
    std::fs::rename(d.join("models/checkpoints/SD1.5"), d.join("comfy/models/checkpoints/SD1.5")).unwrap();
    d.write(
        "extra_model_paths.yaml",
        "a111:\n    base_path: webui\n    checkpoints: models/Stable-diffusion\ncomfyui:\n    base_path: comfy/\n    checkpoints: |\n        models/checkpoints\n        other/checkpoints\n",
    );
    ok(&d, &["run", "ui_v04.json", "--extra-model-paths", "extra_model_paths.yaml"]);

    // LoadImage names in the input directory, with subfolders and the [input] annotation.
    std::fs::create_dir_all(d.join("in/clipspace")).unwrap();
    d.png("in/clipspace/photo.png", 16, 16, 3);
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "clipspace/photo.png [input]"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
    });
    d.write("load.json", graph.to_string());
    ok(&d, &["run", "load.json", "--input-dir", "in"]);
    let o = d.diffloom(&["run", "load.json"]);
    assert!(!o.status.success() && stderr(&o).contains(r#"file "clipspace/photo.png" not found; searched input,"#), "{}", stderr(&o));

    // An embedding the user lacks is an error naming it and the folders searched.
    std::fs::create_dir_all(d.join("comfy/models/embeddings")).unwrap();
    let api = std::fs::read_to_string(d.join("api.json")).unwrap().replace("text, watermark", "embedding:EasyNegative, text");
    d.write("embedding.json", api);
    let o = d.diffloom(&["run", "embedding.json", "--models", "comfy/models"]);
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("EasyNegative") && err.contains("comfy/models/embeddings"), "{err}");
}

#[test]
fn saved_images_carry_comfyui_and_a1111_metadata() {
    let d = setup();
    d.write("g.ron", REFERENCE.replace(r#""sampler_name": "euler_ancestral""#, r#""sampler_name": "dpmpp_2m""#));
    let png = written(&ok(&d, &["run", "g.ron", "--models", "models"]));
    let t = texts(&d.path().join(&png));
    let keys: Vec<&str> = t.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["diffloom", "prompt", "workflow", "parameters"]);
    // parameters, as A1111 writes them; the hash is the checkpoint's SHA-256, first 10 hex digits.
    let ckpt = std::fs::read(d.join("models/checkpoints/SD1.5/tiny-sd1.safetensors")).unwrap();
    let hash: String = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&ckpt)).iter().map(|b| format!("{b:02x}")).collect();
    let params = text(&t, "parameters").unwrap();
    let want = format!(
        "a lighthouse at dusk, {{oil|acrylic}} painting\nNegative prompt: text, watermark\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x48, Model hash: {}, Model: tiny-sd1, Version: diffloom",
        &hash[..10]
    );
    assert!(params.starts_with(&want), "{params}\n---\n{want}");
    // prompt: API JSON with the model named relative to its folder, as ComfyUI would.
    let prompt: Json = serde_json::from_str(text(&t, "prompt").unwrap()).unwrap();
    let ck = prompt.as_object().unwrap().values().find(|n| n["class_type"] == "CheckpointLoaderSimple").unwrap();
    assert_eq!(ck["inputs"]["ckpt_name"], "SD1.5/tiny-sd1.safetensors");
    // The image without its RON opens in ComfyUI's forms and renders the same picture.
    let comfy = png_with(&d, &png, "as_comfy.png", &[("prompt", text(&t, "prompt").unwrap()), ("workflow", text(&t, "workflow").unwrap())]);
    let again = written(&ok(&d, &["run", comfy.to_str().unwrap(), "--models", "models"]));
    assert_eq!(pixels(&d, &again), pixels(&d, &png));
    let ui_only = png_with(&d, &png, "ui_only.png", &[("workflow", text(&t, "workflow").unwrap())]);
    let again = written(&ok(&d, &["run", ui_only.to_str().unwrap(), "--models", "models"]));
    assert_eq!(pixels(&d, &again), pixels(&d, &png));

    // A graph with Lua plugin nodes cannot go to ComfyUI.
    let lua = crate::util::repo().join("graphs/lua_plugins.ron");
    let o = d.diffloom(&["export", lua.to_str().unwrap(), "--format", "api"]);
    assert!(!o.status.success() && stderr(&o).contains("ComfyUI cannot run Lua plugin nodes"), "{}", stderr(&o));
}

/// The folder of ComfyUI's own example workflows (PyPI `comfyui-workflow-templates`, pinned by the set-up).
fn templates() -> PathBuf {
    let out = std::process::Command::new(crate::parity::python())
        .args(["-c", "import comfyui_workflow_templates as t, os; print(os.path.join(os.path.dirname(t.__file__), 'templates'))"])
        .output()
        .unwrap();
    assert!(out.status.success(), "comfyui-workflow-templates is missing: run scripts/setup.sh\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Literal widget values of `node` in the saved file, for checking the mapping value by value.
fn saved_widgets(workflow: &Json, comfy_id: &str) -> Vec<Json> {
    let node = workflow["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"].as_u64().map(|i| i.to_string()).as_deref() == Some(comfy_id))
        .unwrap_or_else(|| panic!("no node {comfy_id}"));
    node["widgets_values"].as_array().cloned().unwrap_or_default()
}

/// Scales pixel sizes (at least 64, ComfyUI's area minimum) and positions down 8× (to multiples of 8)
/// and caps steps at 2, so that a real workflow runs on the tiny models in moments; everything else
/// stays as saved.
fn shrink(g: &mut GraphFile) {
    for (_, node) in g.nodes.0.iter_mut() {
        for (name, value) in node.inputs.0.iter_mut() {
            if let InputValue::Literal(Literal::Int(v)) = value {
                match name.as_str() {
                    "width" | "height" if *v >= 64 => *v = (*v / 8 / 8 * 8).max(64),
                    "x" | "y" => *v = *v / 8 / 8 * 8,
                    "steps" | "end_at_step" => *v = (*v).min(2),
                    "start_at_step" => *v = (*v).min(1),
                    _ => {}
                }
            }
        }
    }
}

/// ComfyUI's example workflows, as its own package ships them, imported, checked against the saved
/// widget values and run on tiny models saved under the file names they expect (pickles included).
#[test]
fn comfyui_example_workflows_import_and_run() {
    use diffloom_nodes::checkpoint::detect::Family;
    use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
    let d = Dir::new();
    let dir = templates();
    let ck = |name: &str, family: Family, inpaint: bool| {
        let p = d.join(&format!("models/checkpoints/{name}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_checkpoint(&p, &tiny_config(family, inpaint), tch::Kind::Float, 3, true).unwrap();
    };
    ck("v1-5-pruned-emaonly-fp16.safetensors", Family::Sd1, false);
    ck("v2-1_768-ema-pruned.safetensors", Family::Sd2, false);
    ck("512-inpainting-ema.safetensors", Family::Sd2, true);
    for name in ["dreamshaper_8.safetensors", "AbyssOrangeMix2_hard.safetensors", "cardosAnime_v10.safetensors", "wd-illusion-fp16.safetensors"] {
        ck(name, Family::Sd1, false);
    }
    {
        let loaded =
            diffloom_nodes::checkpoint::load::load_checkpoint(&d.join("models/checkpoints/dreamshaper_8.safetensors"), tch::Device::Cpu, tch::Kind::Float)
                .unwrap();
        std::fs::create_dir_all(d.join("models/loras")).unwrap();
        diffloom_nodes::checkpoint::synthetic::write_lora(
            &d.join("models/loras/blindbox_v1_mix.safetensors"),
            loaded.unet.as_ref().unwrap(),
            loaded.clip.as_ref().unwrap(),
            4,
            9,
        )
        .unwrap();
    }
    // A standalone VAE: the VAE loader reads a checkpoint's first_stage_model.* as well.
    std::fs::create_dir_all(d.join("models/vae")).unwrap();
    std::fs::copy(d.join("models/checkpoints/dreamshaper_8.safetensors"), d.join("models/vae/vae-ft-mse-840000-ema-pruned.safetensors")).unwrap();
    // The pickles ComfyUI's examples name, written by torch.save from tiny models: a lightning .ckpt (of
    // a model whose configuration the shapes reveal, as a .ckpt has no metadata), Real-ESRGAN's .pth and
    // an A1111 textual inversion .pt.
    let plain = d.join("anything.safetensors");
    write_checkpoint(&plain, &diffloom_nodes::checkpoint::synthetic::detectable_tiny_config(Family::Sd1), tch::Kind::Float, 4, false).unwrap();
    crate::parity::run_reference("comfy_pickles.py", &[Path::new("checkpoint"), &plain, &d.join("models/checkpoints/Anything-V3.0.ckpt")]);
    let esrgan = d.join("esrgan.safetensors");
    let rrdb = diffloom_nodes::models::rrdbnet::RrdbConfig { in_nc: 3, out_nc: 3, nf: 16, gc: 32, nb: 1, upsamples: 2, shuffle: 1 };
    diffloom_nodes::checkpoint::synthetic::write_rrdbnet(&esrgan, &rrdb, false, 5).unwrap();
    std::fs::create_dir_all(d.join("models/upscale_models")).unwrap();
    crate::parity::run_reference("comfy_pickles.py", &[Path::new("upscaler"), &esrgan, &d.join("models/upscale_models/RealESRGAN_x4plus.pth")]);
    std::fs::create_dir_all(d.join("models/embeddings")).unwrap();
    crate::parity::run_reference(
        "comfy_pickles.py",
        &[Path::new("embedding"), Path::new("32"), Path::new("2"), Path::new("3"), &d.join("models/embeddings/SDA768.pt")],
    );
    // The .ckpt loads with the configuration the shapes give and renders what its safetensors twin does.
    let twin = |ck: &str| {
        format!(
            r#"(version: 2, nodes: {{
            "ck": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a cat", "clip": Link("ck", "CLIP")}}),
            "l": (type: "EmptyLatentImage", inputs: {{"width": 32, "height": 32}}),
            "k": (type: "KSampler", inputs: {{"model": Link("ck", "MODEL"), "positive": Link("p", "CONDITIONING"), "negative": Link("p", "CONDITIONING"), "latent_image": Link("l", "LATENT"), "steps": 2}}),
            "v": (type: "VAEDecode", inputs: {{"samples": Link("k", "LATENT"), "vae": Link("ck", "VAE")}}),
            "s": (type: "SaveImage", inputs: {{"images": Link("v", "IMAGE"), "filename_prefix": "twin"}}),
        }})"#
        )
    };
    d.write("ckpt.ron", twin("Anything-V3.0.ckpt"));
    d.write("st.ron", twin(plain.to_str().unwrap()));
    let a = written(&ok(&d, &["run", "ckpt.ron", "--models", "models"]));
    let b = written(&ok(&d, &["run", "st.ron", "--models", "models"]));
    assert_eq!(pixels(&d, &a), pixels(&d, &b), "the .ckpt renders another image than its safetensors twin");

    // ControlNet examples: fp16 ControlNets for the SD 1.5 checkpoints, and a depth T2I-Adapter with a
    // checkpoint of SD 1.5's block layout (the adapter's features go to its 12 input blocks).
    for name in [
        "dreamCreationVirtual3DECommerce_v10.safetensors",
        "architecturerealmix_v11.safetensors",
        "awpainting_v14.safetensors",
        "majicmixRealistic_v7.safetensors",
        "japaneseStyleRealistic_v20.safetensors",
    ] {
        ck(name, Family::Sd1, false);
    }
    write_checkpoint(
        &d.join("models/checkpoints/interiordesignsuperm_v2.safetensors"),
        &diffloom_nodes::checkpoint::synthetic::tiny_four_level_config(),
        tch::Kind::Float,
        3,
        true,
    )
    .unwrap();
    std::fs::create_dir_all(d.join("models/controlnet")).unwrap();
    let controlnet = diffloom_nodes::checkpoint::synthetic::tiny_controlnet_config(tiny_config(Family::Sd1, false).unet.as_ref().unwrap());
    for (i, name) in ["control_v11p_sd15_scribble_fp16", "control_v11f1p_sd15_depth_fp16", "control_v11p_sd15_openpose_fp16"].iter().enumerate() {
        let path = d.join(&format!("models/controlnet/{name}.safetensors"));
        diffloom_nodes::checkpoint::synthetic::write_controlnet(&path, &controlnet, tch::Kind::Half, 30 + i as i64).unwrap();
    }
    let adapter = diffloom_nodes::checkpoint::synthetic::tiny_adapter_config(false);
    diffloom_nodes::checkpoint::synthetic::write_t2i_adapter(&d.join("models/controlnet/controlnetT2IAdapter_t2iAdapterDepth.safetensors"), &adapter, 33)
        .unwrap();

    std::fs::create_dir_all(d.join("input")).unwrap();
    for name in ["scribble_input.png", "depth_input (1).png", "depth-t2i-adapter_input.png", "image (72).png", "image (70).png", "input (3).png"] {
        d.png(&format!("input/{name}"), 128, 128, 7);
    }
    for name in ["example.png", "input.png", "input (1).png"] {
        d.png(&format!("input/{name}"), 96, 64, 5);
    }

    for (name, ran) in [
        ("default", 7),
        ("image2image", 8),
        ("hiresfix_latent_workflow", 11),
        ("inpaint_example", 8),
        ("inpain_model_outpainting", 9),
        ("lora", 8),
        ("latent_upscale_different_prompt_model", 15),
        ("esrgan_example", 9),
        ("hiresfix_esrgan_workflow", 15),
        ("embedding_example", 7),
        ("area_composition_square_area_for_subject", 18),
        ("area_composition", 29),
        ("controlnet_example", 11),
        ("depth_controlnet", 10),
        ("depth_t2i_adapter", 10),
        ("mixing_controlnets", 14),
        ("2_pass_pose_worship", 20),
    ] {
        let file = dir.join(format!("{name}.json"));
        let (mut g, source) = import_file(&file, &diffloom_nodes::registry()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(source, Source::UiJson);
        // Value by value: each node's literal widget inputs are the saved widget values, in order.
        let saved: Json = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        for (id, node) in g.nodes.iter() {
            let widgets = saved_widgets(&saved, node.canvas.comfy_id.as_deref().unwrap());
            let mut rest = widgets.iter();
            for (input, value) in node.inputs.iter() {
                if let InputValue::Literal(l) = value {
                    let want = diffloom_comfy::api::literal_json(l);
                    assert!(rest.any(|w| *w == want), "{name}: node {id:?} input {input:?} = {want} is not among the saved widgets {widgets:?} in order");
                }
            }
        }
        shrink(&mut g);
        d.write(&format!("{name}.ron"), file::to_ron(&g));
        let report = ok(&d, &["run", &format!("{name}.ron"), "--models", "models"]);
        // Every node ran, or came from the cache (a duplicate node within the run).
        assert!(report.contains(&format!("{ran} nodes: ")) && !report.contains("failed"), "{name}:\n{report}");
    }
    // Node by node for the default workflow, as ComfyUI's own API export of it reads.
    let (g, _) = import_file(&dir.join("default.json"), &diffloom_nodes::registry()).unwrap();
    let k = g.nodes.iter().find(|(_, n)| n.node_type == "KSampler").unwrap().1;
    for (input, v) in [
        ("seed", lit(156680208700286u64)),
        ("steps", lit(20)),
        ("cfg", lit(8)),
        ("sampler_name", lit("euler")),
        ("scheduler", lit("normal")),
        ("denoise", lit(1)),
    ] {
        assert_eq!(k.inputs.get(input), Some(&v), "{input}");
    }
}
