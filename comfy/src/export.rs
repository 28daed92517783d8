//! A diffloom graph as ComfyUI's UI format (version 0.4, which every frontend opens): nodes with
//! `widgets_values` in widget order, parameters as `PrimitiveNode`s, notes as `Note` nodes, groups
//! around their nodes, and positions from the graph or from a layered layout by dependency depth.

use std::collections::HashMap;
use std::path::Path;

use diffloom_core::graph::{GraphFile, InputValue, Reference};
use diffloom_core::{InputKind, Registry};
use serde_json::{json, Map, Value as Json};

use crate::api::literal_json;
use crate::error::ImportError;
use crate::widgets;

/// Where a model input's file name is looked up: (node type, input, ComfyUI folder).
pub const MODEL_INPUTS: &[(&str, &str, &str)] = &[
    ("CheckpointLoaderSimple", "ckpt_name", "checkpoints"),
    ("VAELoader", "vae_name", "vae"),
    ("LoraLoader", "lora_name", "loras"),
    ("LoraLoaderModelOnly", "lora_name", "loras"),
    ("UpscaleModelLoader", "model_name", "upscale_models"),
    ("ControlNetLoader", "control_net_name", "controlnet"),
    ("DiffControlNetLoader", "control_net_name", "controlnet"),
    ("GLIGENLoader", "gligen_name", "gligen"),
    ("CheckpointLoader", "config_name", "configs"),
    ("CheckpointLoader", "ckpt_name", "checkpoints"),
    ("DiffusersLoader", "model_path", "diffusers"),
    ("UNETLoader", "unet_name", "diffusion_models"),
    ("CLIPLoader", "clip_name", "text_encoders"),
    ("HypernetworkLoader", "hypernetwork_name", "hypernetworks"),
    ("CLIPVisionLoader", "clip_name", "clip_vision"),
    ("StyleModelLoader", "style_model_name", "style_models"),
    ("unCLIPCheckpointLoader", "ckpt_name", "checkpoints"),
];

/// The ComfyUI folder a node's input names a file in, if it is a model input.
pub fn model_folder(node_type: &str, input: &str) -> Option<&'static str> {
    MODEL_INPUTS.iter().find(|(n, i, _)| *n == node_type && *i == input).map(|(_, _, f)| *f)
}

/// The node property that carries a node's notes (ComfyUI keeps properties it does not know).
pub const NOTES_PROPERTY: &str = "diffloom notes";
/// The node property that carries a node's diffloom id, so a canvas round trip keeps the RON's ids.
pub const ID_PROPERTY: &str = "diffloom id";

/// A model input's value as ComfyUI names the file: relative to the models folder it is found in,
/// with forward slashes; other values (and files outside the folders) as they are.
pub fn comfy_model_name(files: &diffloom_core::Locator, node: &str, input: &str, value: &str) -> String {
    let Some(folder) = model_folder(node, input) else { return value.to_owned() };
    let Ok(found) = files.model(folder, input, value) else { return value.to_owned() };
    for dir in files.folders.dirs(folder) {
        if let Ok(rel) = found.strip_prefix(dir) {
            return rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        }
    }
    value.to_owned()
}

const NODE_WIDTH: f64 = 315.0;
const COLUMN: f64 = 400.0;
const ROW_GAP: f64 = 40.0;

struct Builder {
    nodes: Vec<Json>,
    links: Vec<Json>,
    next_id: u64,
}

impl Builder {
    fn link(&mut self, from: u64, slot: usize, to: u64, to_slot: usize, ty: &str) -> u64 {
        let id = self.links.len() as u64 + 1;
        self.links.push(json!([id, from, slot, to, to_slot, ty]));
        id
    }
}

/// The graph as a UI workflow. `model_name` turns a model input's value into ComfyUI's name for it.
pub fn to_ui(graph: &GraphFile, registry: &Registry, file: &Path, model_name: &dyn Fn(&str, &str, &str) -> String) -> Result<Json, ImportError> {
    let n = graph.nodes.0.len();
    // Numeric ids: a recorded ComfyUI id where it is a plain number, else the next free one.
    let mut used: Vec<u64> = graph.nodes.iter().filter_map(|(_, e)| e.canvas.comfy_id.as_deref()?.parse().ok()).collect();
    used.sort_unstable();
    used.dedup();
    let mut next = used.last().copied().unwrap_or(0) + 1;
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<u64> = graph
        .nodes
        .iter()
        .map(|(_, e)| match e.canvas.comfy_id.as_deref().and_then(|c| c.parse::<u64>().ok()).filter(|c| seen.insert(*c)) {
            Some(id) => id,
            None => {
                next += 1;
                next - 1
            }
        })
        .collect();
    let index: HashMap<&str, usize> = graph.nodes.iter().enumerate().map(|(i, (id, _))| (id, i)).collect();
    let schema_of = |i: usize| {
        let ty = &graph.nodes.0[i].1.node_type;
        registry.get(ty).map(|e| e.schema.clone()).ok_or_else(|| ImportError::at(file, format!("node {:?}: unknown node type {ty:?}", graph.nodes.0[i].0)))
    };

    // Layered layout: column = longest chain of links above the node.
    let mut depth = vec![0usize; n];
    for _ in 0..n {
        let mut changed = false;
        for (i, (_, e)) in graph.nodes.iter().enumerate() {
            for (_, v) in e.inputs.iter() {
                if let InputValue::Ref(Reference::Link(t, _)) = v {
                    if let Some(&s) = index.get(t.as_str()) {
                        if depth[i] < depth[s] + 1 {
                            depth[i] = depth[s] + 1;
                            changed = true;
                        }
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut column_y: HashMap<usize, f64> = HashMap::new();

    let mut b = Builder { nodes: Vec::new(), links: Vec::new(), next_id: next };
    // (target node, input slot, link id) per output, filled as inputs are written.
    let mut out_links: Vec<Vec<Vec<u64>>> = Vec::with_capacity(n);
    for i in 0..n {
        out_links.push(vec![Vec::new(); schema_of(i)?.outputs.len()]);
    }
    let mut param_targets: HashMap<&str, Vec<(u64, usize, String, String, u64)>> = HashMap::new();
    let mut bodies: Vec<Map<String, Json>> = Vec::with_capacity(n);

    for (i, (id, entry)) in graph.nodes.iter().enumerate() {
        let schema = schema_of(i)?;
        let mut inputs = Vec::new();
        let mut literal_of: HashMap<String, Json> = HashMap::new();
        for spec in &schema.inputs {
            let value = entry.inputs.get(&spec.name);
            let ty = match &spec.kind {
                InputKind::Link { ty } => ty.name().to_owned(),
                InputKind::Combo { .. } => "COMBO".to_owned(),
                k => k.value_type().name().to_owned(),
            };
            let widget = widgets::is_widget(&spec.kind);
            let slot = inputs.len();
            let mut socket = json!({"name": spec.name, "type": ty, "link": null});
            if widget {
                socket["widget"] = json!({"name": spec.name});
            }
            match value {
                Some(InputValue::Ref(Reference::Link(t, out))) => {
                    let s = *index
                        .get(t.as_str())
                        .ok_or_else(|| ImportError::at(file, format!("node {id:?}, input {:?}: links to unknown node {t:?}", spec.name)))?;
                    let os = schema_of(s)?
                        .output_index(out)
                        .ok_or_else(|| ImportError::at(file, format!("node {id:?}, input {:?}: node {t:?} has no output {out:?}", spec.name)))?;
                    let link = b.link(ids[s], os, ids[i], slot, &ty);
                    out_links[s][os].push(link);
                    socket["link"] = json!(link);
                }
                Some(InputValue::Ref(Reference::Param(p))) => {
                    let lit = graph
                        .params
                        .get(p)
                        .ok_or_else(|| ImportError::at(file, format!("node {id:?}, input {:?}: parameter {p:?} is not declared", spec.name)))?;
                    literal_of.insert(spec.name.clone(), literal_json(lit));
                    // Linked once the primitive node has its id.
                    param_targets.entry(p).or_default().push((ids[i], slot, spec.name.clone(), ty.clone(), 0));
                }
                Some(InputValue::Literal(lit)) => {
                    let v = literal_json(lit);
                    let v = match &v {
                        Json::String(s) => json!(model_name(&entry.node_type, &spec.name, s)),
                        _ => v,
                    };
                    literal_of.insert(spec.name.clone(), v);
                }
                None => {}
            }
            // Sockets for links; widgets appear as inputs only when linked (the 0.4 frontend's form).
            if !widget || value.is_some_and(|v| matches!(v, InputValue::Ref(_))) {
                inputs.push(socket);
            }
        }
        let defaults = |name: &str| {
            let spec = schema.input_spec(name)?;
            let d = spec.kind.default_value()?;
            crate::api::value_json(&d)
        };
        let values = widgets::values_for(&schema, &|name| literal_of.get(name).cloned().or_else(|| defaults(name)));
        let (w, h) = entry.canvas.size.unwrap_or((NODE_WIDTH, 46.0 + 24.0 * (inputs.len().max(schema.outputs.len()) + values.len()) as f64));
        let pos = entry.canvas.pos.unwrap_or_else(|| {
            let y = column_y.entry(depth[i]).or_insert(0.0);
            let p = (depth[i] as f64 * COLUMN, *y);
            *y += h + ROW_GAP;
            p
        });
        let mut body = Map::new();
        body.insert("id".into(), json!(ids[i]));
        body.insert("type".into(), json!(entry.node_type));
        body.insert("pos".into(), json!([pos.0, pos.1]));
        body.insert("size".into(), json!([w, h]));
        body.insert("flags".into(), json!({}));
        body.insert("order".into(), json!(i));
        body.insert("mode".into(), json!(0));
        body.insert("inputs".into(), Json::Array(inputs));
        if let Some(t) = &entry.title {
            body.insert("title".into(), json!(t));
        }
        for (k, v) in [("color", &entry.canvas.color), ("bgcolor", &entry.canvas.bgcolor)] {
            if let Some(v) = v {
                body.insert(k.into(), json!(v));
            }
        }
        let mut properties = json!({"Node name for S&R": entry.node_type, ID_PROPERTY: id});
        // A node's own notes have no place on ComfyUI's canvas; they travel as a property it keeps.
        if let Some(notes) = &entry.notes {
            properties[NOTES_PROPERTY] = json!(notes);
        }
        body.insert("properties".into(), properties);
        body.insert("widgets_values".into(), Json::Array(values));
        bodies.push(body);
    }
    for (i, body) in bodies.iter_mut().enumerate() {
        let schema = schema_of(i)?;
        let outputs: Vec<Json> =
            schema.outputs.iter().enumerate().map(|(k, o)| json!({"name": o.name, "type": o.ty.name(), "links": out_links[i][k], "slot_index": k})).collect();
        body.insert("outputs".into(), Json::Array(outputs));
    }
    b.nodes = bodies.into_iter().map(Json::Object).collect();

    // Parameters as primitive nodes left of the nodes they feed.
    for (name, lit) in graph.params.iter() {
        let Some(targets) = param_targets.get(name) else { continue };
        let id = b.next_id;
        b.next_id += 1;
        let (_, _, widget, ty, _) = &targets[0];
        let mut links = Vec::new();
        for (node, slot, _, _, _) in targets {
            let link = b.link(id, 0, *node, *slot, ty);
            links.push(link);
            if let Some(target) = b.nodes.iter_mut().find(|n| n["id"] == json!(node)) {
                target["inputs"][*slot]["link"] = json!(link);
            }
        }
        let first = b.nodes.iter().find(|n| n["id"] == json!(targets[0].0)).cloned().unwrap_or(Json::Null);
        let (x, y) = (first["pos"][0].as_f64().unwrap_or(0.0) - 260.0, first["pos"][1].as_f64().unwrap_or(0.0) - 120.0);
        // The canvas gives a primitive of a number or a choice its control widget ("fixed": as run).
        let mut values = vec![literal_json(lit)];
        if matches!(ty.as_str(), "INT" | "FLOAT" | "COMBO") {
            values.push(json!("fixed"));
        }
        b.nodes.push(json!({
            "id": id, "type": "PrimitiveNode", "pos": [x, y], "size": [210, 82], "flags": {}, "order": n, "mode": 0, "inputs": [],
            "outputs": [{"name": ty, "type": ty, "links": links, "slot_index": 0, "widget": {"name": widget}}],
            "title": name, "properties": {"Run widget replace on values": false}, "widgets_values": values
        }));
    }

    // The graph's notes as a Note node at the top left.
    if let Some(text) = &graph.notes {
        let id = b.next_id;
        b.next_id += 1;
        b.nodes.push(json!({"id": id, "type": "Note", "pos": [-400.0, 0.0], "size": [300, 80], "flags": {}, "order": n, "mode": 0, "properties": {"text": ""}, "widgets_values": [text]}));
    }

    // Groups around the nodes that name them.
    let mut groups: Vec<(String, [f64; 4])> = Vec::new();
    for (i, (_, e)) in graph.nodes.iter().enumerate() {
        let Some(g) = &e.canvas.group else { continue };
        let node = &b.nodes[i];
        let (x, y) = (node["pos"][0].as_f64().unwrap_or(0.0), node["pos"][1].as_f64().unwrap_or(0.0));
        let (w, h) = (node["size"][0].as_f64().unwrap_or(NODE_WIDTH), node["size"][1].as_f64().unwrap_or(100.0));
        let (x0, y0, x1, y1) = (x - 10.0, y - 40.0, x + w + 10.0, y + h + 10.0);
        match groups.iter_mut().find(|(t, _)| t == g) {
            Some((_, b)) => *b = [b[0].min(x0), b[1].min(y0), (b[0] + b[2]).max(x1) - b[0].min(x0), (b[1] + b[3]).max(y1) - b[1].min(y0)],
            None => groups.push((g.clone(), [x0, y0, x1 - x0, y1 - y0])),
        }
    }
    let groups: Vec<Json> = groups.into_iter().map(|(t, bb)| json!({"title": t, "bounding": bb, "color": "#3f789e", "font_size": 24, "flags": {}})).collect();

    Ok(json!({
        "last_node_id": b.next_id - 1,
        "last_link_id": b.links.len(),
        "nodes": b.nodes,
        "links": b.links,
        "groups": groups,
        "config": {},
        "extra": {"diffloom": {"format_version": graph.version}},
        "version": 0.4
    }))
}
