//! `GET /object_info`: every registered node (built-ins and Lua plugins) in ComfyUI's shape, with file
//! inputs offered as lists of the files in their folders, as ComfyUI's combos list them.

use std::path::Path;

use diffloom_comfy::export::model_folder;
use diffloom_core::{Folders, InputKind, Origin, Registry, Schema};
use serde_json::{json, Map, Value as Json};

/// Extensions ComfyUI lists as model files (`folder_paths.supported_pt_extensions`).
const MODEL_EXTENSIONS: &[&str] = &["ckpt", "pt", "pt2", "bin", "pth", "safetensors", "pkl", "sft"];
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// The whole `object_info` answer.
pub fn object_info(registry: &Registry, folders: &Folders) -> Json {
    let mut out = Map::new();
    for entry in registry.entries() {
        let module = match &entry.origin {
            Origin::Builtin => "nodes".to_owned(),
            Origin::Plugin(p) => format!("custom_nodes.{}", p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
        };
        out.insert(entry.schema.name.clone(), node_info(&entry.schema, &module, folders));
    }
    Json::Object(out)
}

fn number(v: i128) -> Json {
    i64::try_from(v).map(Json::from).or_else(|_| u64::try_from(v).map(Json::from)).unwrap_or(Json::Null)
}

/// One node's entry, as ComfyUI's `node_info`.
pub fn node_info(schema: &Schema, module: &str, folders: &Folders) -> Json {
    let (mut required, mut optional) = (Map::new(), Map::new());
    let (mut required_order, mut optional_order) = (Vec::new(), Vec::new());
    for spec in &schema.inputs {
        let mut opts = Map::new();
        if !spec.description.is_empty() {
            opts.insert("tooltip".into(), json!(spec.description));
        }
        let ty = match &spec.kind {
            InputKind::Int { default, min, max, step } => {
                if let Some(d) = default {
                    opts.insert("default".into(), number(*d));
                }
                opts.insert("min".into(), number(*min));
                opts.insert("max".into(), number(*max));
                opts.insert("step".into(), number(*step));
                if diffloom_comfy::widgets::has_control(&schema.name, &spec.name, &spec.kind) {
                    opts.insert("control_after_generate".into(), json!(true));
                }
                json!("INT")
            }
            InputKind::Float { default, min, max, step } => {
                if let Some(d) = default {
                    opts.insert("default".into(), json!(d));
                }
                // ComfyUI's widgets take finite bounds.
                opts.insert("min".into(), json!(min.max(-f64::MAX / 2.0)));
                opts.insert("max".into(), json!(max.min(f64::MAX / 2.0)));
                opts.insert("step".into(), json!(step));
                json!("FLOAT")
            }
            InputKind::String { default, multiline } => match files_for(schema, &spec.name, folders) {
                Some(files) => {
                    if spec.name == "image" {
                        opts.insert("image_upload".into(), json!(true));
                    }
                    json!(files)
                }
                None => {
                    if let Some(d) = default {
                        opts.insert("default".into(), json!(d));
                    }
                    if *multiline {
                        opts.insert("multiline".into(), json!(true));
                        opts.insert("dynamicPrompts".into(), json!(true));
                    }
                    json!("STRING")
                }
            },
            InputKind::Boolean { default } => {
                if let Some(d) = default {
                    opts.insert("default".into(), json!(d));
                }
                json!("BOOLEAN")
            }
            InputKind::Combo { choices, default } => {
                if let Some(d) = default {
                    opts.insert("default".into(), json!(d));
                }
                json!(choices)
            }
            InputKind::Link { ty } => json!(ty.name()),
        };
        let entry = if opts.is_empty() { json!([ty]) } else { json!([ty, opts]) };
        if spec.optional {
            optional.insert(spec.name.clone(), entry);
            optional_order.push(spec.name.clone());
        } else {
            required.insert(spec.name.clone(), entry);
            required_order.push(spec.name.clone());
        }
    }
    let mut input = Map::new();
    input.insert("required".into(), Json::Object(required));
    let mut input_order = Map::new();
    input_order.insert("required".into(), json!(required_order));
    if !optional.is_empty() {
        input.insert("optional".into(), Json::Object(optional));
        input_order.insert("optional".into(), json!(optional_order));
    }
    let outputs: Vec<&str> = schema.outputs.iter().map(|o| o.ty.name()).collect();
    let names: Vec<&str> = schema.outputs.iter().map(|o| o.name.as_str()).collect();
    json!({
        "input": input,
        "input_order": input_order,
        "output": outputs,
        "output_is_list": schema.outputs.iter().map(|o| o.is_list).collect::<Vec<bool>>(),
        "output_name": names,
        "name": schema.name,
        "display_name": diffloom_comfy::display::display_name(&schema.name),
        "description": schema.description,
        "python_module": module,
        "category": schema.category,
        "output_node": schema.output_node,
    })
}

/// The files a file input may name: model files in its folders, images in the input directory.
fn files_for(schema: &Schema, input: &str, folders: &Folders) -> Option<Vec<String>> {
    if let Some(folder) = model_folder(&schema.name, input) {
        let mut files = Vec::new();
        for dir in folders.dirs(folder) {
            list(dir, dir, MODEL_EXTENSIONS, &mut files, 0);
        }
        files.sort();
        files.dedup();
        return Some(files);
    }
    if input == "image" && (schema.name == "LoadImage" || schema.name == "LoadImageMask") {
        let mut files = Vec::new();
        list(&folders.input_dir, &folders.input_dir, IMAGE_EXTENSIONS, &mut files, 0);
        files.sort();
        return Some(files);
    }
    None
}

/// Files under `dir` with one of `extensions`, as names relative to `root` with forward slashes.
fn list(root: &Path, dir: &Path, extensions: &[&str], out: &mut Vec<String>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() && depth < 8 {
            list(root, &path, extensions, out, depth + 1);
        } else if path.extension().and_then(|x| x.to_str()).is_some_and(|x| extensions.contains(&x.to_ascii_lowercase().as_str())) {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
    }
}
