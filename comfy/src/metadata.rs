//! What diffloom's saved images carry besides the RON graph: ComfyUI's `prompt` (API JSON) and
//! `workflow` (UI JSON), so that dropping the image on ComfyUI opens its workflow, and A1111's
//! `parameters` for image viewers and model sites.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use diffloom_core::graph::{file, ResolvedGraph};
use diffloom_core::node::ImageTexts;
use diffloom_core::{Folders, Locator};
use sha2::{Digest, Sha256};

use crate::export::comfy_model_name;
use crate::{a1111, api, export};

/// SHA-256 of model files by (path, size, modification time): hashed once per process.
type Hashes = Mutex<HashMap<(PathBuf, u64, std::time::SystemTime), String>>;

/// The hook the executor calls for each saved image.
pub fn image_texts(folders: Folders) -> ImageTexts {
    let hashes: Hashes = Mutex::default();
    Arc::new(move |graph: &ResolvedGraph, node: usize, size: (u32, u32)| texts(graph, node, size, &folders, &hashes))
}

fn texts(graph: &ResolvedGraph, node: usize, size: (u32, u32), folders: &Folders, hashes: &Hashes) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let files = Locator { graph_dir: &graph.graph_dir, folders, output_dir: Path::new("") };
    let model_name = |n: &str, i: &str, v: &str| comfy_model_name(&files, n, i, v);
    // The RON as run always parses; a graph that cannot be exported (Lua plugin nodes) goes without.
    if let Ok(g) = file::parse(&graph.file, &graph.source) {
        if let Ok(prompt) = api::to_api(&g, &graph.registry, &graph.file, &model_name) {
            out.push(("prompt".to_owned(), serde_json::Value::Object(prompt).to_string()));
        }
        if let Ok(workflow) = export::to_ui(&g, &graph.registry, &graph.file, &model_name) {
            out.push(("workflow".to_owned(), workflow.to_string()));
        }
    }
    if let Some(mut p) = a1111::parameters(graph, node, size) {
        if let Some(name) = p.model.take() {
            p.model_hash = files.model("checkpoints", "ckpt_name", &name).ok().and_then(|path| model_hash(&path, hashes));
            p.model = Some(comfy_model_name(&files, "CheckpointLoaderSimple", "ckpt_name", &name));
        }
        out.push(("parameters".to_owned(), p.text()));
    }
    out
}

/// A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (its "AutoV2" hash).
fn model_hash(path: &Path, hashes: &Hashes) -> Option<String> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok()?);
    if let Some(h) = hashes.lock().ok()?.get(&key) {
        return Some(h.clone());
    }
    let mut f = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let short = hex[..10].to_owned();
    hashes.lock().ok()?.insert(key, short.clone());
    Some(short)
}
