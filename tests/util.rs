//! Helpers shared by the integration tests: a temporary directory per test, the `diffloom` binary, and
//! running graphs in-process with an executor whose cache survives between runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffloom_core::graph::file;
use diffloom_core::validate::{apply_params, validate};
use diffloom_core::{Executor, Registry, RunOptions, RunReport};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary directory that a test works in; removed when dropped.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { tmp: tempfile::tempdir().expect("temp dir") }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(&p, contents).expect("write");
        p
    }

    /// Writes a `w`×`h` RGB PNG whose pixels depend on `seed`.
    pub fn png(&self, name: &str, w: u32, h: u32, seed: u8) -> PathBuf {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x as u8).wrapping_mul(7) ^ seed, (y as u8).wrapping_mul(13), seed.wrapping_add(x as u8)]));
        let p = self.join(name);
        img.save(&p).expect("save png");
        p
    }

    /// `diffloom ARGS` run in this directory.
    pub fn diffloom(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_diffloom"))
            .args(args)
            .current_dir(self.path())
            .env_remove("DIFFLOOM_LOG")
            // Each test directory has its own persistent cache, empty at first.
            .env("DIFFLOOM_CACHE_DIR", self.join(".cache"))
            .output()
            .expect("run diffloom")
    }

    /// Sorted names of the files in `sub`.
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.join(sub))
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// An executor on the CPU writing into `dir/output`, and the built-in registry.
pub fn executor(dir: &Dir, cache_limit: usize) -> (Executor, Registry) {
    let options = RunOptions::new(tch::Device::Cpu, dir.join("output"));
    (Executor::new(options, cache_limit), diffloom_nodes::registry())
}

/// Writes `text` as `dir/graph.ron`, validates it (with `--set`-style overrides) and runs it.
pub fn run_graph(exec: &mut Executor, registry: &Registry, dir: &Dir, text: &str, sets: &[(&str, &str)]) -> RunReport {
    let path = dir.write("graph.ron", text);
    let (_, mut graph) = file::read(&path).expect("parse");
    let sets: Vec<(String, String)> = sets.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    apply_params(&path, &mut graph, &sets).expect("params");
    let resolved = validate(&path, &graph, registry).unwrap_or_else(|e| panic!("invalid graph: {e}"));
    exec.run(&resolved)
}

/// load → scale → invert → save, plus a second branch load → crop → save2 (reads `in.png`): the graph
/// the cache and watch tests edit.
pub const TWO_BRANCHES: &str = r#"(version: 1, params: {"factor": 2.0}, nodes: {
    "load": (type: "LoadImage", inputs: {"image": "in.png"}),
    "scale": (type: "ImageScaleBy", inputs: {"image": Link("load", "IMAGE"), "scale_by": Param("factor")}),
    "invert": (type: "ImageInvert", inputs: {"image": Link("scale", "IMAGE")}),
    "save": (type: "SaveImage", inputs: {"images": Link("invert", "IMAGE"), "filename_prefix": "a"}),
    "crop": (type: "ImageCrop", inputs: {"image": Link("load", "IMAGE"), "width": 8, "height": 8}),
    "save2": (type: "SaveImage", inputs: {"images": Link("crop", "IMAGE"), "filename_prefix": "b"}),
})"#;

/// Writes the tiny SD1 test checkpoint (fp32, config in the metadata) as `dir/name` and returns its path.
pub fn tiny_sd1(dir: &Dir, name: &str) -> PathBuf {
    use diffloom_nodes::checkpoint::detect::Family;
    use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
    let path = dir.join(name);
    write_checkpoint(&path, &tiny_config(Family::Sd1, false), tch::Kind::Float, 1, true).expect("tiny checkpoint");
    path
}

/// Runs the RON node entries `nodes` plus a PreviewAny of each wanted output `(node id, output name,
/// output index)`, and returns those outputs, or the run's error.
pub fn outputs(d: &Dir, nodes: &str, wanted: &[(&str, &str, usize)]) -> Result<Vec<diffloom_core::Value>, String> {
    let (mut ex, reg) = executor(d, 1 << 32);
    let previews: String = wanted
        .iter()
        .enumerate()
        .map(|(i, (id, name, _))| format!(r#""zz{i}": (type: "PreviewAny", inputs: {{"source": Link({id:?}, {name:?})}}),"#))
        .collect();
    let r = run_graph(&mut ex, &reg, d, &format!("(version: 1, nodes: {{ {nodes} {previews} }})"), &[]);
    if let Some(e) = r.error {
        return Err(e.to_string());
    }
    let path = d.join("graph.ron");
    let (_, parsed) = file::read(&path).expect("parse");
    let resolved = validate(&path, &parsed, &reg).expect("valid");
    Ok(wanted.iter().map(|(id, _, i)| ex.cached_output(&resolved, id, *i).expect("cached output")).collect())
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
}

/// Runs `node` directly on `args`, past validation (as a value that slipped through would reach it).
pub fn call(node: &dyn diffloom_core::Node, args: Vec<(&str, Option<diffloom_core::Value>)>) -> Result<Vec<diffloom_core::Value>, diffloom_core::NodeError> {
    let args = diffloom_core::Args::new(args.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let mut cx = diffloom_core::Ctx {
        device: tch::Device::Cpu,
        node_id: "n",
        files: diffloom_core::Locator {
            graph_dir: std::path::Path::new("."),
            folders: &diffloom_core::Folders::default(),
            output_dir: std::path::Path::new("."),
        },
        output_dir: std::path::Path::new("."),
        image_texts: &|_, _| Vec::new(),
        cancel: &cancel,
        dtype: tch::Kind::Float,
        messages: Vec::new(),
        ui: serde_json::Map::new(),
        progress: &|_, _, _| {},
        registry: &Registry::new(),
    };
    node.execute(&mut cx, &args)
}
