//! ComfyUI's API format (what `POST /prompt` takes and what its PNGs carry as `prompt`):
//! `{"3": {"class_type": "KSampler", "inputs": {"seed": 5, "model": ["4", 0]}, "_meta": {"title": "…"}}}`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use diffloom_core::graph::{Canvas, GraphFile, InputValue, Literal, Reference};
use diffloom_core::{Origin, Registry};
use serde_json::{json, Map, Value as Json};

use crate::error::ImportError;
use crate::flat::{Flat, FlatInput, FlatNode};

/// Whether `doc` looks like an API prompt (or a `POST /prompt` body holding one).
pub fn prompt_of(doc: &Json) -> Option<&Map<String, Json>> {
    let map = doc.as_object()?;
    let map = match map.get("prompt") {
        Some(Json::Object(inner)) => inner,
        _ => map,
    };
    let is_node = |v: &Json| v.get("class_type").is_some_and(Json::is_string);
    (!map.is_empty() && map.values().all(is_node)).then_some(map)
}

/// Reads an API prompt. `[id, slot]` pairs are links; everything else is a value.
pub fn from_api(prompt: &Map<String, Json>, file: &Path) -> Result<Flat, ImportError> {
    let mut flat = Flat::default();
    for (id, node) in prompt {
        let class_type = node.get("class_type").and_then(Json::as_str).unwrap_or_default().to_owned();
        // ComfyUI (and diffloom) write the display name as the title of an untitled node.
        let title = node.pointer("/_meta/title").and_then(Json::as_str).filter(|t| !crate::display::is_default_title(&class_type, t)).map(str::to_owned);
        let mut inputs = Vec::new();
        if let Some(map) = node.get("inputs").and_then(Json::as_object) {
            for (name, value) in map {
                inputs.push((name.clone(), api_input(value)));
            }
        } else if node.get("inputs").is_some() {
            return Err(ImportError::at(file, format!("node #{id} ({class_type}): \"inputs\" must be an object")));
        }
        flat.nodes.push(FlatNode { comfy_id: id.clone(), class_type, title, inputs, canvas: Canvas::default(), notes: Vec::new(), diffloom_id: None });
    }
    Ok(flat)
}

fn api_input(value: &Json) -> FlatInput {
    if let Some([src, slot]) = value.as_array().map(Vec::as_slice) {
        let src = match src {
            Json::String(s) => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        };
        if let (Some(src), Some(slot)) = (src, slot.as_u64()) {
            return FlatInput::Link(src, slot as usize);
        }
    }
    FlatInput::Value(value.clone())
}

/// The ComfyUI ids of a graph's nodes: their recorded ComfyUI id where it is unique, else the next
/// free number.
pub fn comfy_ids(graph: &GraphFile) -> Vec<String> {
    let mut seen: HashSet<String> = HashSet::new();
    let recorded: Vec<Option<String>> = graph.nodes.iter().map(|(_, n)| n.canvas.comfy_id.clone().filter(|id| seen.insert(id.clone()))).collect();
    let mut next = graph.nodes.iter().filter_map(|(_, n)| n.canvas.comfy_id.as_deref()?.split(':').next()?.parse::<u64>().ok()).max().unwrap_or(0) + 1;
    recorded
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                while seen.contains(&next.to_string()) {
                    next += 1;
                }
                seen.insert(next.to_string());
                next.to_string()
            })
        })
        .collect()
}

/// A literal as JSON.
pub fn literal_json(lit: &Literal) -> Json {
    match lit {
        Literal::Bool(b) => json!(b),
        Literal::Int(i) => json!(i),
        Literal::UInt(u) => json!(u),
        Literal::Float(f) => json!(f),
        Literal::String(s) => json!(s),
    }
}

/// The graph (parameters applied and inlined, as the run used them) as an API prompt. `model_name`
/// turns a model input's value into the name ComfyUI would use (relative to its models folder). A
/// graph with plugin nodes is refused with their list: ComfyUI cannot run them.
pub fn to_api(graph: &GraphFile, registry: &Registry, file: &Path, model_name: &dyn Fn(&str, &str, &str) -> String) -> Result<Map<String, Json>, ImportError> {
    let plugins: Vec<String> = graph
        .nodes
        .iter()
        .filter_map(|(id, n)| match registry.get(&n.node_type).map(|e| &e.origin) {
            Some(Origin::Plugin(p)) => Some(format!("{id:?} ({} from {})", n.node_type, p.display())),
            _ => None,
        })
        .collect();
    if !plugins.is_empty() {
        return Err(ImportError::at(file, format!("ComfyUI cannot run Lua plugin nodes; the graph uses {}", plugins.join(", "))));
    }
    let ids = comfy_ids(graph);
    let index: HashMap<&str, usize> = graph.nodes.iter().enumerate().map(|(i, (id, _))| (id, i)).collect();
    let mut out = Map::new();
    for ((id, node), cid) in graph.nodes.iter().zip(&ids) {
        let schema = registry.get(&node.node_type).map(|e| e.schema.clone());
        let mut inputs = Map::new();
        for (name, value) in node.inputs.iter() {
            let v = match value {
                InputValue::Literal(lit) => literal_json(lit),
                InputValue::Ref(Reference::Param(p)) => match graph.params.get(p) {
                    Some(lit) => literal_json(lit),
                    None => return Err(ImportError::at(file, format!("node {id:?}, input {name:?}: parameter {p:?} is not declared"))),
                },
                InputValue::Ref(Reference::Link(target, output)) => {
                    let t = *index
                        .get(target.as_str())
                        .ok_or_else(|| ImportError::at(file, format!("node {id:?}, input {name:?}: links to node {target:?}, which does not exist")))?;
                    let slot = registry
                        .get(&graph.nodes.0[t].1.node_type)
                        .and_then(|e| e.schema.output_index(output))
                        .ok_or_else(|| ImportError::at(file, format!("node {id:?}, input {name:?}: node {target:?} has no output {output:?}")))?;
                    json!([ids[t], slot])
                }
            };
            let v = match &v {
                Json::String(s) => json!(model_name(&node.node_type, name, s)),
                _ => v,
            };
            inputs.insert(name.to_owned(), v);
        }
        // Defaults made explicit: ComfyUI requires every required input.
        if let Some(schema) = schema {
            for spec in &schema.inputs {
                if !inputs.contains_key(&spec.name) {
                    if let Some(d) = spec.kind.default_value().as_ref().and_then(value_json) {
                        inputs.insert(spec.name.clone(), d);
                    }
                }
            }
        }
        let title = node.title.clone().unwrap_or_else(|| crate::display::display_name(&node.node_type).to_owned());
        out.insert(cid.clone(), json!({"inputs": inputs, "class_type": node.node_type, "_meta": {"title": title}}));
    }
    Ok(out)
}

pub fn value_json(v: &diffloom_core::Value) -> Option<Json> {
    use diffloom_core::Value;
    match v {
        Value::Int(i) => i64::try_from(*i).ok().map(|i| json!(i)).or_else(|| u64::try_from(*i).ok().map(|u| json!(u))),
        Value::Float(f) => Some(json!(f)),
        Value::String(s) => Some(json!(s)),
        Value::Boolean(b) => Some(json!(b)),
        _ => None,
    }
}
