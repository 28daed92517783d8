//! `diffloom watch` driven with real file edits: in place, rename-over, delete-then-create, bursts,
//! broken-then-fixed, input image edits, and a save during a run; each asserting exactly what re-ran.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use crate::util::Dir;

/// A running `diffloom watch` whose stdout lines arrive on a channel; killed when dropped.
struct Watch {
    child: Child,
    lines: Receiver<String>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run as printed: its header, the ids that ran, and every line.
#[derive(Debug)]
struct Run {
    header: String,
    ran: Vec<String>,
    text: String,
}

impl Watch {
    fn start(d: &Dir, graph: &str) -> Watch {
        Watch::start_with(d, graph, &[])
    }

    fn start_with(d: &Dir, graph: &str, extra: &[&str]) -> Watch {
        let mut child = Command::new(env!("CARGO_BIN_EXE_diffloom"))
            .args(["watch", graph, "-o", "out", "--debounce-ms", "150"])
            .args(extra)
            .current_dir(d.path())
            .env("DIFFLOOM_CACHE_DIR", d.join(".cache"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watch");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch { child, lines }
    }

    /// The next block up to "watching …": a run, or a report of errors.
    fn next(&self) -> Run {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut text = String::new();
        let mut header = String::new();
        let mut ran = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no complete run within 60 s; got:\n{text}"));
            if line.starts_with("watching ") {
                return Run { header, ran, text };
            }
            if line.starts_with("== run") {
                header = line.clone();
            }
            if let Some(rest) = line.strip_prefix("  ran ") {
                ran.push(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
            text.push_str(&line);
            text.push('\n');
        }
    }

    /// Asserts that nothing more is printed for `wait`.
    fn quiet_for(&self, wait: Duration) {
        if let Ok(line) = self.lines.recv_timeout(wait) {
            panic!("unexpected output: {line}");
        }
    }
}

use crate::util::TWO_BRANCHES as GRAPH;

/// Saves take effect once the watcher has started; file times need a moment to differ.
fn pause() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn in_place_rename_over_and_delete_create_saves_rerun_only_what_changed() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    d.write("g.ron", GRAPH);
    let w = Watch::start(&d, "g.ron");
    let first = w.next();
    assert_eq!(first.ran, ["load", "scale", "invert", "save", "crop", "save2"], "{}", first.text);
    pause();

    // In place.
    d.write("g.ron", GRAPH.replace(r#""width": 8"#, r#""width": 4"#));
    let r = w.next();
    assert_eq!(r.ran, ["crop", "save2"], "{}", r.text);
    assert!(r.header.contains("g.ron changed"), "{}", r.header);
    pause();

    // Write a temporary file, rename it over the graph (vim, most IDEs).
    d.write(".g.ron.swp", GRAPH.replace(r#""factor": 2.0"#, r#""factor": 3.0"#));
    std::fs::rename(d.join(".g.ron.swp"), d.join("g.ron")).unwrap();
    let r = w.next();
    assert_eq!(r.ran, ["scale", "invert", "save"], "{}", r.text);
    pause();

    // Delete, then create (with both branches changed).
    std::fs::remove_file(d.join("g.ron")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    d.write("g.ron", GRAPH.replace(r#""factor": 2.0"#, r#""factor": 5.0"#).replace(r#""width": 8"#, r#""width": 6"#));
    let r = w.next();
    assert_eq!(r.ran, ["scale", "invert", "save", "crop", "save2"], "{}", r.text);
    pause();

    // Back to the first graph: everything is cached, nothing runs.
    d.write("g.ron", GRAPH);
    let r = w.next();
    assert!(r.ran.is_empty(), "{}", r.text);
    // Every file written is still there (2 + 1 + 1 + 2 saves), none overwritten.
    assert_eq!(d.files("out").len(), 6, "{:?}", d.files("out"));
}

#[test]
fn a_burst_of_saves_gives_one_run_and_a_broken_save_keeps_the_last_good_graph() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    d.write("g.ron", GRAPH);
    let w = Watch::start(&d, "g.ron");
    w.next();
    pause();
    for f in ["2.5", "3.5", "4.5"] {
        d.write("g.ron", GRAPH.replace(r#""factor": 2.0"#, &format!(r#""factor": {f}"#)));
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = w.next();
    assert_eq!(r.ran, ["scale", "invert", "save"], "{}", r.text);
    w.quiet_for(Duration::from_millis(600));

    d.write("g.ron", GRAPH.replace(r#""scale_by": Param("factor")"#, r#""scale_by": Param("factr")"#));
    let r = w.next();
    assert!(r.ran.is_empty(), "{}", r.text);
    assert!(r.text.contains("parameter \"factr\" is not declared") && r.text.contains("keeping the last good graph"), "{}", r.text);
    pause();
    d.write("g.ron", "(version: 1, nodes: {");
    let r = w.next();
    assert!(r.text.contains("g.ron:1:"), "{}", r.text);
    pause();
    // Fixed: only what differs from the last good run runs (factor 4.5 is cached).
    d.write("g.ron", GRAPH.replace(r#""factor": 2.0"#, r#""factor": 4.5"#));
    let r = w.next();
    assert!(r.ran.is_empty(), "{}", r.text);
}

#[test]
fn input_images_are_watched_by_content() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    d.write("g.ron", GRAPH);
    let w = Watch::start(&d, "g.ron");
    w.next();
    pause();
    // Same bytes again: an event, a run, and nothing to execute.
    let bytes = std::fs::read(d.join("in.png")).unwrap();
    std::fs::write(d.join("in.png"), &bytes).unwrap();
    let r = w.next();
    assert!(r.ran.is_empty() && r.header.contains("in.png changed"), "{}", r.text);
    pause();
    d.png("in.png", 16, 12, 2);
    let r = w.next();
    assert_eq!(r.ran, ["load", "scale", "invert", "save", "crop", "save2"], "{}", r.text);
}

#[test]
fn a_save_during_a_run_cancels_it_and_starts_the_new_one() {
    let d = Dir::new();
    let ckpt = crate::util::tiny_sd1(&d, "tiny.safetensors");
    let graph = |seed: u32, steps: u32| {
        std::fs::read_to_string(crate::util::repo().join("graphs/txt2img.ron"))
            .unwrap()
            .replace("\"../models/test/tiny-sd1.safetensors\"", &format!("{:?}", ckpt.display().to_string()))
            .replace("\"seed\": 42", &format!("\"seed\": {seed}"))
            .replace("\"steps\": 20", &format!("\"steps\": {steps}"))
            .replace("\"width\": 512", "\"width\": 128")
            .replace("\"height\": 512", "\"height\": 128")
    };
    d.write("t2i.ron", graph(1, 400));
    let w = Watch::start(&d, "t2i.ron");
    // Let the long run get into sampling, then save a new seed.
    std::thread::sleep(Duration::from_secs(3));
    d.write("t2i.ron", graph(2, 3));
    let r = w.next();
    assert!(r.text.contains("cancelled: a newer save arrived"), "{}", r.text);
    let r = w.next();
    // The checkpoint and prompts come from the cache; only the sampler and what follows run.
    assert_eq!(r.ran, ["sampler", "decode", "save"], "{}", r.text);
    assert_eq!(d.files("out").len(), 1);
}

#[test]
fn an_edited_plugin_reruns_its_nodes_and_a_broken_edit_keeps_the_old_version() {
    let d = Dir::new();
    let v1 = "diffloom.node { name = 'Tint', inputs = { {'image', 'IMAGE'} }, outputs = { {'IMAGE', 'IMAGE'} },\n  execute = function(a) return a.image * 0.5 end }\n";
    d.write("myplugins/tint.lua", v1);
    d.png("in.png", 16, 12, 1);
    d.write(
        "g.ron",
        r#"(version: 1, nodes: {
            "load": (type: "LoadImage", inputs: {"image": "in.png"}),
            "tint": (type: "Tint", inputs: {"image": Link("load", "IMAGE")}),
            "save": (type: "SaveImage", inputs: {"images": Link("tint", "IMAGE"), "filename_prefix": "t"}),
            "crop": (type: "ImageCrop", inputs: {"image": Link("load", "IMAGE"), "width": 8, "height": 8}),
            "save2": (type: "SaveImage", inputs: {"images": Link("crop", "IMAGE"), "filename_prefix": "c"}),
        })"#,
    );
    let w = Watch::start_with(&d, "g.ron", &["--plugins", "myplugins"]);
    assert_eq!(w.next().ran, ["load", "tint", "save", "crop", "save2"]);
    pause();
    d.write("myplugins/tint.lua", v1.replace("0.5", "0.25"));
    let r = w.next();
    assert!(r.text.contains("reloaded") && r.text.contains("Tint"), "{}", r.text);
    assert_eq!(r.ran, ["tint", "save"], "{}", r.text);
    pause();
    d.write("myplugins/tint.lua", "diffloom.node { name = 'Tint',\n  execute = function(a) return a.image end\n");
    let r = w.next();
    assert!(r.text.contains("plugin error:") && r.text.contains("tint.lua:3:") && r.text.contains("keeping the previous version"), "{}", r.text);
    assert!(r.ran.is_empty(), "{}", r.text);
}

#[test]
fn ctrl_c_quits_cleanly() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    d.write("g.ron", GRAPH);
    let mut w = Watch::start(&d, "g.ron");
    w.next();
    let pid = w.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = w.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "watch did not quit on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_comfyui_workflow_json_is_watched_like_a_graph() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    let api = |w: u32| {
        serde_json::json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
            "2": {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": w, "height": 8, "x": 0, "y": 0}},
            "3": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "a"}},
            "5": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "b"}},
        })
        .to_string()
    };
    d.write("wf.json", api(8));
    let w = Watch::start(&d, "wf.json");
    let first = w.next();
    assert_eq!(first.ran.len(), 5, "{}", first.text);
    pause();
    d.write("wf.json", api(4));
    let r = w.next();
    assert_eq!(r.ran, ["imagecrop", "saveimage"], "{}", r.text);
}

/// Model patches stack and un-stack while watching without compounding: after adding RescaleCFG on
/// top of FreeU and taking it away again (with a new seed, so the sampler re-runs on the FreeU model
/// the cache kept), the image equals a fresh run of the FreeU-only graph.
#[test]
fn patches_stack_and_unstack_while_watching_without_compounding() {
    let d = Dir::new();
    let ck = crate::util::tiny_sd1(&d, "m.safetensors");
    let graph = |seed: u64, rescale: bool| {
        let model = if rescale { r#"Link("rescale", "MODEL")"# } else { r#"Link("freeu", "MODEL")"# };
        format!(
            r#"(version: 1, nodes: {{
            "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "freeu": (type: "FreeU", inputs: {{"model": Link("c", "MODEL"), "b1": 1.3, "b2": 1.4}}),
            "rescale": (type: "RescaleCFG", inputs: {{"model": Link("freeu", "MODEL"), "multiplier": 0.7}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a lighthouse", "clip": Link("c", "CLIP")}}),
            "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64}}),
            "s": (type: "KSampler", inputs: {{"model": {model}, "seed": {seed}, "steps": 2, "cfg": 5.0, "positive": Link("p", "CONDITIONING"), "negative": Link("p", "CONDITIONING"), "latent_image": Link("e", "LATENT")}}),
            "v": (type: "VAEDecode", inputs: {{"samples": Link("s", "LATENT"), "vae": Link("c", "VAE")}}),
            "save": (type: "SaveImage", inputs: {{"images": Link("v", "IMAGE"), "filename_prefix": "w"}}),
        }})"#
        )
    };
    d.write("g.ron", graph(1, false));
    let w = Watch::start(&d, "g.ron");
    let first = w.next();
    assert!(first.ran.contains(&"freeu".to_owned()), "{}", first.text);
    pause();
    d.write("g.ron", graph(1, true));
    let r = w.next();
    assert_eq!(r.ran, ["rescale", "s", "v", "save"], "{}", r.text);
    pause();
    d.write("g.ron", graph(2, false));
    let r = w.next();
    assert_eq!(r.ran, ["s", "v", "save"], "{}", r.text);
    let pixels = |p: std::path::PathBuf| image::open(p).unwrap().to_rgb8().into_raw();
    let watched = pixels(d.join("out/w_00003_.png"));
    let fresh = Dir::new();
    fresh.write("g.ron", graph(2, false));
    let out = fresh.diffloom(&["run", "g.ron", "-o", "out"]);
    assert!(out.status.success(), "{}", crate::util::stderr(&out));
    assert_eq!(watched, pixels(fresh.join("out/w_00001_.png")), "the FreeU model changed while RescaleCFG was stacked on it");
    assert_ne!(watched, pixels(d.join("out/w_00001_.png")), "the seed changed nothing");
}
