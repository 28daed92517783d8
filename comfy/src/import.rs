//! One entry point for every form a ComfyUI workflow comes in: UI JSON, API JSON, or an image that
//! carries them (or diffloom's own RON).

use std::collections::HashMap;
use std::path::Path;

use diffloom_core::graph::{file, GraphFile};
use diffloom_core::Registry;
use serde_json::Value as Json;

use crate::error::ImportError;
use crate::flat::{self, Flat, FlatInput};
use crate::{api, embedded, ui};

/// Where an imported graph came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    UiJson,
    ApiJson,
    /// An image's `prompt` chunk (values), with its `workflow` chunk (titles, groups, notes, positions,
    /// primitives) where it has one.
    ImagePrompt,
    /// An image's `workflow` chunk alone.
    ImageWorkflow,
    /// The RON graph a diffloom image embeds.
    ImageRon,
}

/// Whether a path names a file `run`/`watch` should import rather than read as RON.
pub fn is_importable(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| ["json", "png", "webp"].contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads a workflow file (`.json`, `.png`, `.webp`) and converts it.
pub fn import_file(path: &Path, registry: &Registry) -> Result<(GraphFile, Source), ImportError> {
    let bytes = std::fs::read(path).map_err(|e| ImportError::Read {
        file: path.to_path_buf(),
        message: if path.is_dir() { "it is a directory, not a file".into() } else { e.to_string() },
    })?;
    import_bytes(path, &bytes, registry)
}

/// Converts a workflow's bytes; `path` names it in errors.
pub fn import_bytes(path: &Path, bytes: &[u8], registry: &Registry) -> Result<(GraphFile, Source), ImportError> {
    if embedded::is_image(bytes) {
        return import_image(path, bytes, registry);
    }
    let text =
        std::str::from_utf8(bytes).map_err(|e| ImportError::at(path, format!("not a PNG, WebP or JSON file (invalid UTF-8 at byte {})", e.valid_up_to())))?;
    let doc: Json = serde_json::from_str(text).map_err(|e| ImportError::at(path, format!("{}:{}: not valid JSON: {e}", e.line(), e.column())))?;
    if let Some(prompt) = api::prompt_of(&doc) {
        let flat = api::from_api(prompt, path)?;
        return Ok((finish(flat, registry, path)?, Source::ApiJson));
    }
    if ui::is_ui(&doc) {
        let flat = ui::from_ui(&doc, registry, path)?;
        return Ok((finish(flat, registry, path)?, Source::UiJson));
    }
    Err(ImportError::at(path, "not a ComfyUI workflow: expected the UI format ({\"nodes\": [...], \"links\": [...]}) or the API format ({\"3\": {\"class_type\": ..., \"inputs\": {...}}})"))
}

/// A graph for an API prompt (what `POST /prompt` carries); `name` stands for it in errors.
pub fn graph_from_prompt(prompt: &serde_json::Map<String, Json>, registry: &Registry, name: &Path) -> Result<GraphFile, ImportError> {
    finish(api::from_api(prompt, name)?, registry, name)
}

fn finish(mut flat: Flat, registry: &Registry, path: &Path) -> Result<GraphFile, ImportError> {
    flat::primitives_to_params(&mut flat);
    flat::sort_by_id(&mut flat);
    flat::to_graph(&flat, registry, path)
}

fn import_image(path: &Path, bytes: &[u8], registry: &Registry) -> Result<(GraphFile, Source), ImportError> {
    let texts = embedded::texts(bytes).map_err(|m| ImportError::at(path, m))?;
    let text = |k: &str| texts.iter().find(|(key, _)| key == k).map(|(_, t)| t.as_str());
    if let Some(ron) = text("diffloom") {
        let graph = file::parse(path, ron).map_err(|e| ImportError::at(path, format!("the embedded diffloom graph does not parse: {e}")))?;
        return Ok((graph, Source::ImageRon));
    }
    let parse = |k: &str| -> Result<Option<Json>, ImportError> {
        text(k).map(|t| serde_json::from_str(t).map_err(|e| ImportError::at(path, format!("the image's {k:?} text is not valid JSON: {e}")))).transpose()
    };
    let (prompt, workflow) = (parse("prompt")?, parse("workflow")?);
    let workflow_flat = match &workflow {
        Some(w) if ui::is_ui(w) => Some(ui::from_ui(w, registry, path)),
        _ => None,
    };
    match prompt.as_ref().and_then(api::prompt_of) {
        Some(p) => {
            let mut flat = api::from_api(p, path)?;
            // The canvas adds what the prompt lacks; a workflow that does not read only loses that.
            if let Some(Ok(w)) = workflow_flat {
                decorate(&mut flat, w);
            }
            Ok((finish(flat, registry, path)?, Source::ImagePrompt))
        }
        None => match workflow_flat {
            Some(w) => Ok((finish(w?, registry, path)?, Source::ImageWorkflow)),
            None => {
                let hint = if text("parameters").is_some() { " (it has A1111 `parameters`, which describe a run but not a workflow)" } else { "" };
                Err(ImportError::at(path, format!("the image carries no workflow: no \"diffloom\", \"prompt\" or \"workflow\" text{hint}")))
            }
        },
    }
}

/// Gives the prompt's nodes what the canvas knew: titles, positions, groups, colours and notes, and
/// turns values a primitive fed into parameters (with the value as it ran).
fn decorate(prompt: &mut Flat, canvas: Flat) {
    let by_id: HashMap<&str, &flat::FlatNode> = canvas.nodes.iter().map(|n| (n.comfy_id.as_str(), n)).collect();
    let mut params: HashMap<usize, usize> = HashMap::new();
    for node in &mut prompt.nodes {
        let Some(c) = by_id.get(node.comfy_id.as_str()) else { continue };
        node.title = c.title.clone();
        node.canvas = c.canvas.clone();
        node.notes = c.notes.clone();
        node.diffloom_id = c.diffloom_id.clone();
        for (name, input) in &mut node.inputs {
            if let (Some(FlatInput::Param(p)), FlatInput::Value(v)) = (c.input(name), &*input) {
                let index = *params.entry(*p).or_insert_with(|| {
                    prompt.params.push(flat::FlatParam { name: canvas.params[*p].name.clone(), value: v.clone() });
                    prompt.params.len() - 1
                });
                *input = FlatInput::Param(index);
            }
        }
    }
    prompt.notes = canvas.notes;
}
