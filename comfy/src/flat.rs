//! The workflow every ComfyUI format is read into before it becomes a diffloom graph: nodes with
//! ComfyUI ids and named inputs, links by ComfyUI id and output slot, frontend-only nodes already gone
//! (reroutes collapsed, bypassed and muted nodes removed, subgraphs flattened, primitives turned into
//! parameters).

use std::collections::{BTreeMap, HashMap, HashSet};

use diffloom_core::graph::file::{Entries, FORMAT_VERSION};
use diffloom_core::graph::{Canvas, GraphFile, InputValue, Literal, NodeEntry, Reference};
use diffloom_core::Registry;
use serde_json::Value as Json;

use crate::error::{ImportError, UnknownNode};

/// A workflow in ComfyUI's terms.
#[derive(Clone, Debug, Default)]
pub struct Flat {
    pub nodes: Vec<FlatNode>,
    /// Values the canvas's primitive nodes feed into widgets; inputs refer to them by index.
    pub params: Vec<FlatParam>,
    /// Notes on the whole workflow (`Note`/`MarkdownNote` nodes outside any group).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct FlatNode {
    /// ComfyUI's id (`"3"`, `"12:5"` inside subgraph instance 12).
    pub comfy_id: String,
    pub class_type: String,
    pub title: Option<String>,
    pub inputs: Vec<(String, FlatInput)>,
    pub canvas: Canvas,
    pub notes: Vec<String>,
    /// The diffloom id the node had when diffloom exported it (kept so a canvas round trip keeps ids).
    pub diffloom_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FlatInput {
    Value(Json),
    /// (ComfyUI id of the source node, output slot).
    Link(String, usize),
    /// An index into [`Flat::params`].
    Param(usize),
}

#[derive(Clone, Debug)]
pub struct FlatParam {
    /// What the parameter is called: the primitive's own title, else the input it feeds.
    pub name: String,
    pub value: Json,
}

impl FlatNode {
    pub fn input(&self, name: &str) -> Option<&FlatInput> {
        self.inputs.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

/// `"Positive Prompt"` → `"positive_prompt"`: lowercase ASCII letters and digits, runs of anything
/// else one `_`.
pub fn slug(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_owned()
}

/// Readable, unique ids: the id diffloom exported the node with, where it has one; else a node's
/// slugged title where no other node's title slugs the same; else its type in lowercase (`ksampler`,
/// `ksampler_2`).
pub fn readable_ids(nodes: &[FlatNode]) -> Vec<String> {
    let mut taken: HashSet<String> = HashSet::new();
    let mut ids = vec![String::new(); nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        if let Some(id) = n.diffloom_id.as_ref().filter(|id| !id.is_empty() && !taken.contains(*id)) {
            taken.insert(id.clone());
            ids[i] = id.clone();
        }
    }
    let mut title_count: HashMap<String, usize> = HashMap::new();
    for n in nodes.iter().filter(|n| n.diffloom_id.is_none()) {
        if let Some(t) = n.title.as_deref().map(slug).filter(|s| !s.is_empty()) {
            *title_count.entry(t).or_default() += 1;
        }
    }
    // Unique titles first, so that a type-derived id never takes a title's name.
    for (i, n) in nodes.iter().enumerate() {
        if !ids[i].is_empty() {
            continue;
        }
        if let Some(t) = n.title.as_deref().map(slug).filter(|s| title_count.get(s) == Some(&1) && !taken.contains(s)) {
            taken.insert(t.clone());
            ids[i] = t;
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        if ids[i].is_empty() {
            ids[i] = unique(&n.class_type.to_lowercase(), &mut taken);
        }
    }
    ids
}

/// `base`, else `base_2`, `base_3`, … whichever is free; records it as taken.
pub fn unique(base: &str, taken: &mut HashSet<String>) -> String {
    let base = if base.is_empty() { "node" } else { base };
    let mut name = base.to_owned();
    let mut k = 2;
    while taken.contains(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    taken.insert(name.clone());
    name
}

/// A JSON value as a graph literal.
pub fn literal(value: &Json) -> Option<Literal> {
    match value {
        Json::Bool(b) => Some(Literal::Bool(*b)),
        Json::Number(n) => n.as_i64().map(Literal::Int).or_else(|| n.as_u64().map(Literal::UInt)).or_else(|| n.as_f64().map(Literal::Float)),
        Json::String(s) => Some(Literal::String(s.clone())),
        _ => None,
    }
}

/// The names of node types that are not registered, with the nodes that use them (custom-node packs).
pub fn unknown_nodes(flat: &Flat, registry: &Registry) -> Vec<UnknownNode> {
    let mut by_type: BTreeMap<&str, Vec<&FlatNode>> = BTreeMap::new();
    for n in &flat.nodes {
        if registry.get(&n.class_type).is_none() {
            by_type.entry(&n.class_type).or_default().push(n);
        }
    }
    by_type
        .into_iter()
        .map(|(ty, nodes)| UnknownNode {
            class_type: ty.to_owned(),
            nodes: nodes.iter().map(|n| (n.comfy_id.clone(), n.title.clone())).collect(),
            suggestion: registry.suggest(ty),
        })
        .collect()
}

/// The diffloom graph for a flat workflow. Every unknown node type is reported at once; values that no
/// literal can hold (lists, objects) and links to missing outputs are errors naming node and input.
pub fn to_graph(flat: &Flat, registry: &Registry, file: &std::path::Path) -> Result<GraphFile, ImportError> {
    let unknown = unknown_nodes(flat, registry);
    if !unknown.is_empty() {
        return Err(ImportError::UnknownNodes { file: file.to_path_buf(), unknown });
    }
    let ids = readable_ids(&flat.nodes);
    let id_of: HashMap<&str, usize> = flat.nodes.iter().enumerate().map(|(i, n)| (n.comfy_id.as_str(), i)).collect();

    let mut taken = HashSet::new();
    let param_names: Vec<String> = flat.params.iter().map(|p| unique(&slug(&p.name), &mut taken)).collect();
    let mut params = Entries::default();
    for (p, name) in flat.params.iter().zip(&param_names) {
        let lit = literal(&p.value).ok_or_else(|| ImportError::at(file, format!("parameter {name:?}: {} is not a number, string or boolean", p.value)))?;
        params.0.push((name.clone(), lit));
    }

    let mut nodes = Entries::default();
    for (n, id) in flat.nodes.iter().zip(&ids) {
        let bad = |input: &str, message: String| ImportError::Node {
            file: file.to_path_buf(),
            comfy_id: n.comfy_id.clone(),
            node_type: n.class_type.clone(),
            input: input.to_owned(),
            message,
        };
        let mut inputs = Entries::default();
        for (name, input) in &n.inputs {
            let value = match input {
                FlatInput::Value(v) => {
                    InputValue::Literal(literal(v).ok_or_else(|| bad(name, format!("{v} is not a number, string or boolean, or a link [node_id, output]")))?)
                }
                FlatInput::Param(p) => InputValue::Ref(Reference::Param(param_names[*p].clone())),
                FlatInput::Link(src, slot) => {
                    let &s = id_of.get(src.as_str()).ok_or_else(|| bad(name, format!("links to node #{src}, which is not in the workflow")))?;
                    let schema = &registry.get(&flat.nodes[s].class_type).expect("known: checked above").schema; // invariant: unknown node types were reported (and returned) above.
                    let output = schema.outputs.get(*slot).ok_or_else(|| {
                        bad(name, format!("links to output {slot} of node #{src} ({}), which has {} outputs", flat.nodes[s].class_type, schema.outputs.len()))
                    })?;
                    InputValue::Ref(Reference::Link(ids[s].clone(), output.name.clone()))
                }
            };
            inputs.0.push((name.clone(), value));
        }
        let notes = if n.notes.is_empty() { None } else { Some(n.notes.join("\n\n")) };
        let canvas = Canvas { comfy_id: Some(n.comfy_id.clone()), ..n.canvas.clone() };
        nodes.0.push((id.clone(), NodeEntry { node_type: n.class_type.clone(), inputs, title: n.title.clone(), notes, canvas }));
    }
    let notes = if flat.notes.is_empty() { None } else { Some(flat.notes.join("\n\n")) };
    Ok(GraphFile { version: FORMAT_VERSION, params, notes, nodes })
}

/// Backend primitive nodes (`PrimitiveInt`, …) whose value is a literal become parameters, as the
/// canvas's `PrimitiveNode`s do, so that `--set` reaches them.
pub fn primitives_to_params(flat: &mut Flat) {
    const PRIMITIVES: &[&str] = &["PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveStringMultiline", "PrimitiveBoolean"];
    let mut replaced: HashMap<String, usize> = HashMap::new();
    for n in &flat.nodes {
        if let (true, Some(FlatInput::Value(v))) = (PRIMITIVES.contains(&n.class_type.as_str()), n.input("value")) {
            let used_by =
                flat.nodes.iter().flat_map(|c| c.inputs.iter()).find(|(_, i)| *i == FlatInput::Link(n.comfy_id.clone(), 0)).map(|(name, _)| name.clone());
            let name = n.title.clone().or(used_by).unwrap_or_else(|| "value".to_owned());
            replaced.insert(n.comfy_id.clone(), flat.params.len());
            flat.params.push(FlatParam { name, value: v.clone() });
        }
    }
    flat.nodes.retain(|n| !replaced.contains_key(&n.comfy_id));
    for n in &mut flat.nodes {
        for (_, input) in &mut n.inputs {
            if let FlatInput::Link(src, 0) = input {
                if let Some(&p) = replaced.get(src.as_str()) {
                    *input = FlatInput::Param(p);
                }
            }
        }
    }
}

/// Orders nodes by ComfyUI id, numerically part by part (`2` < `10` < `10:3`).
pub fn sort_by_id(flat: &mut Flat) {
    let key = |id: &str| id.split(':').map(|p| p.parse::<i64>().map_or((1, 0, p.to_owned()), |n| (0, n, String::new()))).collect::<Vec<_>>();
    flat.nodes.sort_by_key(|n| key(&n.comfy_id));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, ty: &str, title: Option<&str>) -> FlatNode {
        FlatNode {
            comfy_id: id.into(),
            class_type: ty.into(),
            title: title.map(Into::into),
            inputs: vec![],
            canvas: Canvas::default(),
            notes: vec![],
            diffloom_id: None,
        }
    }

    #[test]
    fn ids_from_unique_titles_else_types() {
        let nodes = vec![
            node("1", "KSampler", None),
            node("2", "KSampler", Some("Base pass")),
            node("3", "CLIPTextEncode", Some("Prompt")),
            node("4", "CLIPTextEncode", Some("Prompt")),
            node("5", "KSampler", None),
            node("6", "SaveImage", Some("ksampler")),
        ];
        assert_eq!(readable_ids(&nodes), ["ksampler_2", "base_pass", "cliptextencode", "cliptextencode_2", "ksampler_3", "ksampler"]);
        assert_eq!(slug("  CLIP Text Encode (Prompt) "), "clip_text_encode_prompt");
    }
}
