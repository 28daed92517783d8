//! The executor's cache: after each kind of edit, exactly which nodes re-ran.

use crate::util::{executor, run_graph, Dir};

use crate::util::TWO_BRANCHES as BASE;

const GIB: usize = 1 << 30;

/// `base` with `extra` node entries appended.
fn with_nodes(base: &str, extra: &str) -> String {
    let end = base.rfind("})").unwrap();
    format!("{}{extra}\n}})", &base[..end])
}

fn sorted(mut v: Vec<&str>) -> Vec<&str> {
    v.sort_unstable();
    v
}

#[test]
fn unchanged_graph_runs_nothing_the_second_time() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    let (mut ex, reg) = executor(&d, GIB);
    let first = run_graph(&mut ex, &reg, &d, BASE, &[]);
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.ran(), ["load", "scale", "invert", "save", "crop", "save2"]);
    let second = run_graph(&mut ex, &reg, &d, BASE, &[]);
    assert!(second.ran().is_empty(), "{:?}", second.ran());
    assert_eq!(sorted(second.cached()), ["save", "save2"]);
    assert_eq!(d.files("output"), ["a_00001_.png", "b_00001_.png"]);
}

#[test]
fn literal_change_reruns_the_node_and_its_dependents() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    let (mut ex, reg) = executor(&d, GIB);
    run_graph(&mut ex, &reg, &d, BASE, &[]);
    let edited = BASE.replace(r#""width": 8"#, r#""width": 4"#);
    let r = run_graph(&mut ex, &reg, &d, &edited, &[]);
    assert_eq!(r.ran(), ["crop", "save2"]);
}

#[test]
fn param_change_reruns_exactly_its_users() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    let (mut ex, reg) = executor(&d, GIB);
    run_graph(&mut ex, &reg, &d, BASE, &[]);
    let r = run_graph(&mut ex, &reg, &d, BASE, &[("factor", "3")]);
    assert_eq!(r.ran(), ["scale", "invert", "save"]);
    // Back to the first value: everything is still cached.
    let r = run_graph(&mut ex, &reg, &d, BASE, &[("factor", "2.0")]);
    assert!(r.ran().is_empty(), "{:?}", r.ran());
}

#[test]
fn link_change_reruns_the_consumer_and_its_dependents() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    let (mut ex, reg) = executor(&d, GIB);
    run_graph(&mut ex, &reg, &d, BASE, &[]);
    // save2 now reads the inverted image instead of the crop.
    let edited = BASE.replace(r#""images": Link("crop", "IMAGE")"#, r#""images": Link("invert", "IMAGE")"#);
    let r = run_graph(&mut ex, &reg, &d, &edited, &[]);
    assert_eq!(r.ran(), ["save2"]);
}

#[test]
fn added_node_runs_alone_and_removed_node_runs_nothing() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    let (mut ex, reg) = executor(&d, GIB);
    run_graph(&mut ex, &reg, &d, BASE, &[]);
    let added = with_nodes(
        BASE,
        r#""blur": (type: "ImageScaleBy", inputs: {"image": Link("invert", "IMAGE"), "scale_by": 0.5}),
           "save3": (type: "SaveImage", inputs: {"images": Link("blur", "IMAGE"), "filename_prefix": "c"}),"#,
    );
    let r = run_graph(&mut ex, &reg, &d, &added, &[]);
    assert_eq!(r.ran(), ["blur", "save3"]);
    let removed = BASE.replace(r#""save2": (type: "SaveImage", inputs: {"images": Link("crop", "IMAGE"), "filename_prefix": "b"}),"#, "");
    assert_ne!(removed, BASE);
    let r = run_graph(&mut ex, &reg, &d, &removed, &[]);
    assert!(r.ran().is_empty(), "{:?}", r.ran());
    assert_eq!(r.cached(), ["save"]);
}

#[test]
fn touched_input_file_runs_nothing_and_changed_input_file_reruns_its_readers() {
    let d = Dir::new();
    let img = d.png("in.png", 16, 12, 1);
    let (mut ex, reg) = executor(&d, GIB);
    run_graph(&mut ex, &reg, &d, BASE, &[]);
    // Same bytes, new modification time.
    let bytes = std::fs::read(&img).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&img, &bytes).unwrap();
    let r = run_graph(&mut ex, &reg, &d, BASE, &[]);
    assert!(r.ran().is_empty(), "{:?}", r.ran());
    d.png("in.png", 16, 12, 2);
    let r = run_graph(&mut ex, &reg, &d, BASE, &[]);
    assert_eq!(r.ran(), ["load", "scale", "invert", "save", "crop", "save2"]);
}

#[test]
fn a_failed_node_stops_the_run_keeps_finished_results_and_resumes_there() {
    let d = Dir::new();
    d.png("in.png", 16, 12, 1);
    d.write("broken.png", b"\x89PNG\r\n\x1a\n truncated");
    let (mut ex, reg) = executor(&d, GIB);
    let g = with_nodes(
        BASE,
        r#""bad": (type: "LoadImage", inputs: {"image": "broken.png"}),
           "save3": (type: "SaveImage", inputs: {"images": Link("bad", "IMAGE"), "filename_prefix": "c"}),"#,
    );
    let r = run_graph(&mut ex, &reg, &d, &g, &[]);
    let err = r.error.as_ref().expect("the run fails");
    assert_eq!(err.node, "bad");
    let msg = err.to_string();
    assert!(msg.contains("graph.ron: node \"bad\" (LoadImage): ") && msg.contains("broken.png: cannot decode the image"), "{msg}");
    let ran_before = r.ran();
    assert_eq!(*ran_before.last().unwrap(), "bad");
    // Fix the file: only the failed branch and what had not run yet run now.
    d.png("broken.png", 4, 4, 9);
    let r = run_graph(&mut ex, &reg, &d, &g, &[]);
    assert!(r.error.is_none(), "{:?}", r.error);
    for done in ran_before.iter().filter(|n| **n != "bad") {
        assert!(!r.ran().contains(done), "{done} re-ran: {:?}", r.ran());
    }
    assert!(r.ran().contains(&"bad") && r.ran().contains(&"save3"));
}

#[test]
fn results_over_the_memory_bound_are_recomputed_when_needed() {
    let d = Dir::new();
    d.png("in.png", 64, 64, 1);
    // Room for about two 64×64×3 float images (48 KiB each) and the output nodes' empty results.
    let (mut ex, reg) = executor(&d, 110 << 10);
    run_graph(&mut ex, &reg, &d, BASE, &[]);
    assert!(ex.cache.used_bytes() <= 110 << 10);
    // Evicted intermediates are not recomputed while the output nodes stay cached...
    let r = run_graph(&mut ex, &reg, &d, BASE, &[]);
    assert!(r.ran().is_empty(), "{:?}", r.ran());
    // ...but an edit below them has to recompute what was evicted.
    let edited = BASE.replace(r#""filename_prefix": "a""#, r#""filename_prefix": "z""#);
    let r = run_graph(&mut ex, &reg, &d, &edited, &[]);
    assert!(r.ran().contains(&"save"));
    assert!(r.ran().len() > 1, "the evicted inputs of save were recomputed: {:?}", r.ran());
}

/// Records what an observer is told, as `kind id [detail]` lines.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl diffloom_core::Observer for Recorder {
    fn cached(&self, ids: &[&str]) {
        self.0.lock().unwrap().push(format!("cached {}", ids.join(",")));
    }
    fn executing(&self, id: &str) {
        self.0.lock().unwrap().push(format!("executing {id}"));
    }
    fn progress(&self, id: &str, value: u64, max: u64) {
        self.0.lock().unwrap().push(format!("progress {id} {value}/{max}"));
    }
    fn executed(&self, id: &str, ui: &serde_json::Map<String, serde_json::Value>) {
        self.0.lock().unwrap().push(format!("executed {id} {}", serde_json::Value::Object(ui.clone())));
    }
}

#[test]
fn an_observer_is_told_what_is_cached_what_runs_its_progress_and_its_images() {
    let d = Dir::new();
    let ckpt = crate::util::tiny_sd1(&d, "m.safetensors");
    let graph = format!(
        r#"(version: 2, nodes: {{
        "ck": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a", "clip": Link("ck", "CLIP")}}),
        "latent": (type: "EmptyLatentImage", inputs: {{"width": 32, "height": 32}}),
        "k": (type: "KSampler", inputs: {{"model": Link("ck", "MODEL"), "positive": Link("p", "CONDITIONING"), "negative": Link("p", "CONDITIONING"),
              "latent_image": Link("latent", "LATENT"), "steps": 3, "cfg": 1.0}}),
        "dec": (type: "VAEDecode", inputs: {{"samples": Link("k", "LATENT"), "vae": Link("ck", "VAE")}}),
        "save": (type: "SaveImage", inputs: {{"images": Link("dec", "IMAGE"), "filename_prefix": "sub/obs"}}),
    }})"#,
        ck = ckpt.display().to_string()
    );
    let (mut ex, reg) = executor(&d, GIB);
    let seen = std::sync::Arc::new(Recorder::default());
    ex.options.observer = Some(seen.clone());
    assert!(run_graph(&mut ex, &reg, &d, &graph, &[]).error.is_none());
    let events = std::mem::take(&mut *seen.0.lock().unwrap());
    let want = [
        "cached ",
        "executing ck",
        "executed ck {}",
        "executing p",
        "executed p {}",
        "executing latent",
        "executed latent {}",
        "executing k",
        "progress k 1/3",
        "progress k 2/3",
        "progress k 3/3",
        "executed k {}",
        "executing dec",
        "executed dec {}",
        "executing save",
        r#"executed save {"images":[{"filename":"obs_00001_.png","subfolder":"sub","type":"output"}]}"#,
    ];
    assert_eq!(events, want);
    // Again with a new prefix: everything but the save node comes from the cache.
    assert!(run_graph(&mut ex, &reg, &d, &graph.replace("sub/obs", "again"), &[]).error.is_none());
    let events = std::mem::take(&mut *seen.0.lock().unwrap());
    assert_eq!(events[0], "cached dec");
    assert_eq!(events[1], "executing save");
}

/// The ids `diffloom run` reported as `status` ("ran", "cached") in its per-node report.
fn reported(stdout: &str, status: &str) -> Vec<String> {
    let mut ids: Vec<String> = stdout
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(status)).then(|| words.next().map(str::to_owned)).flatten()
        })
        .collect();
    ids.sort();
    ids
}

/// The persistent cache across processes: a second `diffloom run` re-executes only its output node
/// (and still writes a new image), an edit re-runs what it changes (models are never stored, so the
/// loader runs again when the sampler needs it), `--no-disk-cache` runs everything, damaged entries
/// are reported and recomputed, and processes running at once share the directory.
#[test]
fn a_second_process_re_executes_only_what_changed() {
    let d = Dir::new();
    let graph = crate::util::repo().join("graphs/txt2img.ron");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", graph.to_str().unwrap(), "-o", "out", "--set", "width=64", "--set", "height=64", "--set", "steps=2"];
        args.extend_from_slice(extra);
        let out = d.diffloom(&args);
        assert!(out.status.success(), "{}", crate::util::stderr(&out));
        crate::util::stdout(&out)
    };
    let first = run(&[]);
    assert_eq!(reported(&first, "ran"), ["checkpoint", "decode", "latent", "negative", "positive", "sampler", "save"]);
    let second = run(&[]);
    assert_eq!(reported(&second, "ran"), ["save"], "{second}");
    assert_eq!(reported(&second, "cached"), ["decode"], "only what the output node needs is read");
    assert!(second.contains("from the disk cache"));
    assert_eq!(d.files("out").len(), 2, "a fully cached run still saves its image");
    assert_eq!(std::fs::read(d.join("out/txt2img_00001_.png")).unwrap().len(), std::fs::read(d.join("out/txt2img_00002_.png")).unwrap().len());

    let edited = run(&["--set", "seed=7"]);
    assert_eq!(reported(&edited, "ran"), ["checkpoint", "decode", "sampler", "save"], "{edited}");
    assert_eq!(reported(&edited, "cached"), ["latent", "negative", "positive"]);
    let memory_only = run(&["--no-disk-cache"]);
    assert_eq!(reported(&memory_only, "ran").len(), 7);

    // Damage every entry: reported, recomputed, the run succeeds.
    let mut damaged = 0;
    for sub in std::fs::read_dir(d.join(".cache/v1")).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let mut bytes = std::fs::read(f.path()).unwrap();
            bytes.truncate(bytes.len() / 2);
            std::fs::write(f.path(), bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged >= 5, "{damaged} entries");
    let recovered = run(&[]);
    assert!(recovered.contains("warning:") && recovered.contains("corrupt cache entry"), "{recovered}");
    assert_eq!(reported(&run(&[]), "ran"), ["save"]);

    // Three processes at once on one directory (another seed: nothing stored yet), and one after them.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (dir, graph) = (d.path().to_path_buf(), graph.clone());
            std::thread::spawn(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_diffloom"))
                    .args(["run", graph.to_str().unwrap(), "-o", "out", "--set", "width=64", "--set", "height=64", "--set", "steps=2", "--set", "seed=123"])
                    .current_dir(&dir)
                    .env("DIFFLOOM_CACHE_DIR", dir.join(".cache"))
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(out.status.success(), "{}", crate::util::stderr(&out));
        assert!(!crate::util::stdout(&out).contains("warning:"));
    }
    assert_eq!(reported(&run(&["--set", "seed=123"]), "ran"), ["save"]);
    let names = d.files("out");
    let unique: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len());
}

#[test]
fn model_files_enter_keys_by_content_not_by_path_or_time() {
    let d = Dir::new();
    let graph = crate::util::repo().join("graphs/txt2img.ron");
    let model = crate::util::repo().join("models/test/tiny-sd1.safetensors");
    for m in ["m1", "m2"] {
        std::fs::create_dir_all(d.join(&format!("{m}/checkpoints"))).unwrap();
        std::fs::copy(&model, d.join(&format!("{m}/checkpoints/tiny.safetensors"))).unwrap();
    }
    let run = |models: &str| {
        let args = [
            "run",
            graph.to_str().unwrap(),
            "-o",
            "out",
            "--models",
            models,
            "--set",
            "ckpt=tiny.safetensors",
            "--set",
            "width=64",
            "--set",
            "height=64",
            "--set",
            "steps=2",
        ];
        let out = d.diffloom(&args);
        assert!(out.status.success(), "{}", crate::util::stderr(&out));
        crate::util::stdout(&out)
    };
    assert_eq!(reported(&run("m1"), "ran").len(), 7);
    // The same file in another models folder (another machine's mount): the results are found.
    assert_eq!(reported(&run("m2"), "ran"), ["save"]);
    // A file changed in place, with its size and modification time kept: never taken for the old one.
    let file = d.join("m2/checkpoints/tiny.safetensors");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&file).unwrap().modified().unwrap(), mtime);
    assert_eq!(reported(&run("m2"), "ran"), ["checkpoint", "decode", "negative", "positive", "sampler", "save"]);
}
