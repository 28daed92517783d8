//! ComfyUI's UI format (what the canvas saves, and PNGs carry as `workflow`), version 0.4 and the
//! version-1 schema: nodes with `widgets_values`, links as arrays or objects, groups, notes,
//! frontend-only nodes (reroutes, primitives) and subgraphs (`definitions.subgraphs`).

use std::collections::HashMap;
use std::path::Path;

use diffloom_core::graph::Canvas;
use diffloom_core::Registry;
use serde_json::Value as Json;

use crate::error::ImportError;
use crate::flat::{Flat, FlatInput, FlatNode, FlatParam};
use crate::widgets;

/// Node modes as the canvas stores them.
const MODE_MUTED: i64 = 2;
const MODE_BYPASS: i64 = 4;
/// The ids of a subgraph's input and output pseudo-nodes.
const SUBGRAPH_INPUT: i64 = -10;
const SUBGRAPH_OUTPUT: i64 = -20;
/// Deeper than any sensible chain of reroutes, bypasses and subgraphs; a cycle in a broken file stops here.
const MAX_DEPTH: usize = 256;

/// Whether `doc` looks like a UI workflow.
pub fn is_ui(doc: &Json) -> bool {
    doc.get("nodes").is_some_and(Json::is_array) && doc.get("links").is_none_or(Json::is_array)
}

#[derive(Clone, Debug)]
struct Link {
    origin: i64,
    origin_slot: usize,
    target: i64,
    target_slot: usize,
}

/// One graph level: the workflow itself, or a subgraph instance's definition.
struct Scope<'a> {
    /// Prefix of the ComfyUI ids of nodes in this scope (`""`, `"12:"`).
    prefix: String,
    nodes: HashMap<i64, &'a Json>,
    /// Node ids in file order.
    order: Vec<i64>,
    links: HashMap<i64, Link>,
    groups: Vec<(String, [f64; 4])>,
    /// (parent scope, instance node id there).
    parent: Option<(usize, i64)>,
    /// Child scopes by instance node id.
    children: HashMap<i64, usize>,
}

struct Reader<'a> {
    file: &'a Path,
    registry: &'a Registry,
    subgraphs: HashMap<&'a str, &'a Json>,
    scopes: Vec<Scope<'a>>,
    /// Parameters made from primitive nodes, by (scope, node id).
    params: HashMap<(usize, i64), usize>,
    flat: Flat,
}

/// Reads a UI workflow.
pub fn from_ui(doc: &Json, registry: &Registry, file: &Path) -> Result<Flat, ImportError> {
    let mut subgraphs = HashMap::new();
    for def in doc.pointer("/definitions/subgraphs").and_then(Json::as_array).into_iter().flatten() {
        if let Some(id) = def.get("id").and_then(Json::as_str) {
            subgraphs.insert(id, def);
        }
    }
    let mut r = Reader { file, registry, subgraphs, scopes: Vec::new(), params: HashMap::new(), flat: Flat::default() };
    r.add_scope(doc, String::new(), None, 0)?;
    for s in 0..r.scopes.len() {
        r.read_scope(s)?;
    }
    Ok(r.flat)
}

fn int(v: Option<&Json>) -> Option<i64> {
    v.and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)).or_else(|| v.as_str().and_then(|s| s.parse().ok())))
}

fn pair(v: Option<&Json>) -> Option<(f64, f64)> {
    match v? {
        Json::Array(a) if a.len() >= 2 => Some((a[0].as_f64()?, a[1].as_f64()?)),
        // Some frontends wrote positions as {"0": x, "1": y}.
        Json::Object(o) => Some((o.get("0")?.as_f64()?, o.get("1")?.as_f64()?)),
        _ => None,
    }
}

fn links_of(graph: &Json, file: &Path) -> Result<HashMap<i64, Link>, ImportError> {
    let mut out = HashMap::new();
    for l in graph.get("links").and_then(Json::as_array).into_iter().flatten() {
        let (id, link) = match l {
            // Version 0.4: [id, origin_id, origin_slot, target_id, target_slot, type].
            Json::Array(a) if a.len() >= 5 => {
                let g = |i: usize| int(a.get(i));
                (
                    g(0),
                    g(1).zip(g(2)).zip(g(3)).zip(g(4)).map(|(((o, os), t), ts)| Link {
                        origin: o,
                        origin_slot: os as usize,
                        target: t,
                        target_slot: ts as usize,
                    }),
                )
            }
            // Version 1: {id, origin_id, origin_slot, target_id, target_slot, type, parentId}.
            Json::Object(o) => {
                let g = |k: &str| int(o.get(k));
                (
                    g("id"),
                    g("origin_id").zip(g("origin_slot")).zip(g("target_id")).zip(g("target_slot")).map(|(((o, os), t), ts)| Link {
                        origin: o,
                        origin_slot: os as usize,
                        target: t,
                        target_slot: ts as usize,
                    }),
                )
            }
            Json::Null => continue,
            _ => (None, None),
        };
        match (id, link) {
            (Some(id), Some(link)) => {
                out.insert(id, link);
            }
            _ => return Err(ImportError::at(file, format!("a link is neither [id, origin, slot, target, slot, type] nor an object with those fields: {l}"))),
        }
    }
    Ok(out)
}

impl<'a> Reader<'a> {
    fn add_scope(&mut self, graph: &'a Json, prefix: String, parent: Option<(usize, i64)>, depth: usize) -> Result<usize, ImportError> {
        if depth > 16 {
            return Err(ImportError::at(self.file, "subgraphs nest more than 16 deep (a subgraph containing itself?)"));
        }
        let mut nodes = HashMap::new();
        let mut order = Vec::new();
        for n in graph.get("nodes").and_then(Json::as_array).into_iter().flatten() {
            let id = int(n.get("id")).ok_or_else(|| ImportError::at(self.file, format!("a node has no numeric id: {}", short(n))))?;
            if nodes.insert(id, n).is_some() {
                return Err(ImportError::at(self.file, format!("two nodes have id {prefix}{id}")));
            }
            order.push(id);
        }
        let groups = graph
            .get("groups")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .filter_map(|g| {
                let b = g.get("bounding")?.as_array()?;
                let b: Vec<f64> = b.iter().filter_map(Json::as_f64).collect();
                (b.len() == 4).then(|| (g.get("title").and_then(Json::as_str).unwrap_or("Group").to_owned(), [b[0], b[1], b[2], b[3]]))
            })
            .collect();
        let index = self.scopes.len();
        let links = links_of(graph, self.file)?;
        self.scopes.push(Scope { prefix: prefix.clone(), nodes, order: order.clone(), links, groups, parent, children: HashMap::new() });
        for id in order {
            let node = self.scopes[index].nodes[&id];
            let ty = node.get("type").and_then(Json::as_str).unwrap_or_default();
            let mode = int(node.get("mode")).unwrap_or(0);
            if let Some(def) = self.subgraphs.get(ty).copied() {
                if mode != MODE_MUTED && mode != MODE_BYPASS {
                    let child = self.add_scope(def, format!("{prefix}{id}:"), Some((index, id)), depth + 1)?;
                    self.scopes[index].children.insert(id, child);
                }
            }
        }
        Ok(index)
    }

    fn read_scope(&mut self, s: usize) -> Result<(), ImportError> {
        let order = self.scopes[s].order.clone();
        let mut notes: Vec<(Option<String>, String)> = Vec::new();
        let first_node = self.flat.nodes.len();
        for id in order {
            let node = self.scopes[s].nodes[&id];
            let ty = node.get("type").and_then(Json::as_str).unwrap_or_default().to_owned();
            let mode = int(node.get("mode")).unwrap_or(0);
            let group = pair(node.get("pos")).and_then(|p| self.group_at(s, p));
            match ty.as_str() {
                "Note" | "MarkdownNote" => {
                    let text = node.pointer("/widgets_values/0").and_then(Json::as_str).unwrap_or_default().trim().to_owned();
                    if !text.is_empty() {
                        notes.push((group, text));
                    }
                    continue;
                }
                "Reroute" | "PrimitiveNode" => continue,
                _ => {}
            }
            if mode == MODE_MUTED || mode == MODE_BYPASS || self.scopes[s].children.contains_key(&id) {
                continue;
            }
            let comfy_id = format!("{}{id}", self.scopes[s].prefix);
            let inputs = self.node_inputs(s, id, &ty, &comfy_id)?;
            let canvas = Canvas {
                comfy_id: None,
                pos: pair(node.get("pos")),
                size: pair(node.get("size")),
                group,
                color: node.get("color").and_then(Json::as_str).map(str::to_owned),
                bgcolor: node.get("bgcolor").and_then(Json::as_str).map(str::to_owned),
            };
            let title = node.get("title").and_then(Json::as_str).map(str::to_owned);
            let notes = node.pointer(&format!("/properties/{}", crate::export::NOTES_PROPERTY)).and_then(Json::as_str).map(str::to_owned).into_iter().collect();
            let diffloom_id = node.pointer(&format!("/properties/{}", crate::export::ID_PROPERTY)).and_then(Json::as_str).map(str::to_owned);
            self.flat.nodes.push(FlatNode { comfy_id, class_type: ty, title, inputs, canvas, notes, diffloom_id });
        }
        // A note inside a group belongs to the group's nodes; any other note to the whole workflow.
        for (group, text) in notes {
            let members: Vec<&mut FlatNode> = self.flat.nodes[first_node..].iter_mut().filter(|n| group.is_some() && n.canvas.group == group).collect();
            if members.is_empty() {
                self.flat.notes.push(text);
            } else {
                for n in members {
                    n.notes.push(text.clone());
                }
            }
        }
        Ok(())
    }

    /// The smallest group whose box holds `pos`.
    fn group_at(&self, s: usize, (x, y): (f64, f64)) -> Option<String> {
        self.scopes[s]
            .groups
            .iter()
            .filter(|(_, [gx, gy, w, h])| x >= *gx && y >= *gy && x <= gx + w && y <= gy + h)
            .min_by(|a, b| (a.1[2] * a.1[3]).total_cmp(&(b.1[2] * b.1[3])))
            .map(|(t, _)| t.clone())
    }

    /// A regular node's inputs by name: links from its `inputs` entries, widget values from
    /// `widgets_values` in ComfyUI's widget order (a widget converted to a linked input takes the link).
    fn node_inputs(&mut self, s: usize, id: i64, ty: &str, comfy_id: &str) -> Result<Vec<(String, FlatInput)>, ImportError> {
        let node = self.scopes[s].nodes[&id];
        let mut out: Vec<(String, FlatInput)> = Vec::new();
        let Some(entry) = self.registry.get(ty) else { return Ok(out) };
        let schema = entry.schema.clone();
        let widget_values = widgets::assign(&schema, node.get("widgets_values")).map_err(|message| ImportError::Node {
            file: self.file.to_path_buf(),
            comfy_id: comfy_id.to_owned(),
            node_type: ty.to_owned(),
            input: "widgets_values".to_owned(),
            message,
        })?;
        for (name, value) in widget_values {
            out.push((name, FlatInput::Value(value)));
        }
        for input in node.get("inputs").and_then(Json::as_array).into_iter().flatten() {
            let Some(name) = input.pointer("/widget/name").or_else(|| input.get("name")).and_then(Json::as_str) else { continue };
            let Some(link) = int(input.get("link")) else { continue };
            let ty = input.get("type").and_then(Json::as_str).unwrap_or("*").to_owned();
            let source = self.resolve_link(s, link, &ty, 0)?;
            out.retain(|(n, _)| n != name);
            if let Some(source) = source {
                out.push((name.to_owned(), source));
            }
        }
        // Schema order, so that the graph reads as ComfyUI lists the inputs.
        out.sort_by_key(|(n, _)| schema.inputs.iter().position(|i| i.name == *n).unwrap_or(usize::MAX));
        Ok(out)
    }

    /// What link `link` in scope `s` carries to a consumer input of type `ty`.
    fn resolve_link(&mut self, s: usize, link: i64, ty: &str, depth: usize) -> Result<Option<FlatInput>, ImportError> {
        let Some(l) = self.scopes[s].links.get(&link).cloned() else {
            // A dangling link id: ComfyUI ignores it as well.
            return Ok(None);
        };
        let _ = (l.target, l.target_slot);
        self.resolve_output(s, l.origin, l.origin_slot, ty, depth + 1)
    }

    /// What output `slot` of node `id` in scope `s` stands for once frontend-only nodes are gone.
    fn resolve_output(&mut self, s: usize, id: i64, slot: usize, ty: &str, depth: usize) -> Result<Option<FlatInput>, ImportError> {
        if depth > MAX_DEPTH {
            return Err(ImportError::at(
                self.file,
                format!("links around node {}{id} form a loop through reroutes, bypassed nodes or subgraphs", self.scopes[s].prefix),
            ));
        }
        if id == SUBGRAPH_INPUT {
            let Some((p, instance)) = self.scopes[s].parent else { return Ok(None) };
            return self.instance_input(p, instance, slot, ty, depth);
        }
        let Some(node) = self.scopes[s].nodes.get(&id).copied() else { return Ok(None) };
        let node_type = node.get("type").and_then(Json::as_str).unwrap_or_default();
        let mode = int(node.get("mode")).unwrap_or(0);
        let input_link = |i: usize| node.get("inputs").and_then(|a| a.get(i)).and_then(|x| int(x.get("link")));
        if mode == MODE_MUTED {
            return Ok(None);
        }
        if mode == MODE_BYPASS {
            return match bypass_input(node, slot, ty).and_then(input_link) {
                Some(link) => self.resolve_link(s, link, ty, depth),
                None => Ok(None),
            };
        }
        match node_type {
            "Reroute" => match input_link(0) {
                Some(link) => self.resolve_link(s, link, ty, depth),
                None => Ok(None),
            },
            "PrimitiveNode" => Ok(self.primitive(s, id, node)),
            _ => match self.scopes[s].children.get(&id).copied() {
                Some(child) => {
                    // The inner link that feeds the subgraph's output `slot`.
                    let inner = self.scopes[child].links.values().find(|l| l.target == SUBGRAPH_OUTPUT && l.target_slot == slot).cloned();
                    match inner {
                        Some(l) => self.resolve_output(child, l.origin, l.origin_slot, ty, depth + 1),
                        None => Ok(None),
                    }
                }
                None => Ok(Some(FlatInput::Link(format!("{}{id}", self.scopes[s].prefix), slot))),
            },
        }
    }

    /// What feeds input `slot` of subgraph instance `instance` (in scope `p`): its link, or the value of
    /// the widget the instance shows for it.
    fn instance_input(&mut self, p: usize, instance: i64, slot: usize, ty: &str, depth: usize) -> Result<Option<FlatInput>, ImportError> {
        let node = self.scopes[p].nodes[&instance];
        let inputs = node.get("inputs").and_then(Json::as_array).cloned().unwrap_or_default();
        let Some(input) = inputs.get(slot) else { return Ok(None) };
        if let Some(link) = int(input.get("link")) {
            return self.resolve_link(p, link, ty, depth);
        }
        // Promoted widgets keep their values in widgets_values, in the order of the widget inputs.
        if input.get("widget").is_some() {
            let k = inputs[..slot].iter().filter(|i| i.get("widget").is_some()).count();
            if let Some(v) = node.get("widgets_values").and_then(|w| w.get(k)) {
                return Ok(Some(FlatInput::Value(v.clone())));
            }
        }
        Ok(None)
    }

    /// The parameter a canvas `PrimitiveNode` becomes: named by its title if it has its own, else by
    /// the widget it feeds.
    fn primitive(&mut self, s: usize, id: i64, node: &Json) -> Option<FlatInput> {
        if let Some(&p) = self.params.get(&(s, id)) {
            return Some(FlatInput::Param(p));
        }
        let value = node.pointer("/widgets_values/0")?.clone();
        let title = node.get("title").and_then(Json::as_str).filter(|t| *t != "Primitive");
        let widget = node.pointer("/outputs/0/widget/name").and_then(Json::as_str);
        let name = title.or(widget).unwrap_or("value").to_owned();
        let p = self.flat.params.len();
        self.flat.params.push(FlatParam { name, value });
        self.params.insert((s, id), p);
        Some(FlatInput::Param(p))
    }
}

/// The input a bypassed node passes to output `slot` for a consumer input of type `ty`, by the frontend's
/// rule (`ExecutableNodeDTO.#getBypassSlotIndex`): any-type consumers take the same slot (else the
/// first); else the same slot if its type fits both the output and the consumer; else the first input
/// of exactly the consumer's type; else the first that fits both.
fn bypass_input(node: &Json, slot: usize, ty: &str) -> Option<usize> {
    let inputs = node.get("inputs").and_then(Json::as_array)?;
    let type_of = |i: usize| inputs.get(i).and_then(|x| x.get("type")).and_then(Json::as_str).unwrap_or("");
    if ty == "*" || ty.is_empty() {
        return Some(if inputs.len() > slot { slot } else { 0 }).filter(|_| !inputs.is_empty());
    }
    let out = node.pointer(&format!("/outputs/{slot}/type")).and_then(Json::as_str).unwrap_or("");
    let fits = |i: usize| valid_connection(type_of(i), out) && valid_connection(type_of(i), ty);
    if slot < inputs.len() && fits(slot) {
        return Some(slot);
    }
    (0..inputs.len()).find(|&i| type_of(i) == ty).or_else(|| (0..inputs.len()).find(|&i| fits(i)))
}

/// LiteGraph's `isValidConnection`: `*` or empty match anything; otherwise equal ignoring case, or any
/// pair of a comma-separated list.
fn valid_connection(a: &str, b: &str) -> bool {
    if a.is_empty() || a == "*" || b.is_empty() || b == "*" || a.eq_ignore_ascii_case(b) {
        return true;
    }
    a.split(',').any(|x| b.split(',').any(|y| x.trim().eq_ignore_ascii_case(y.trim())))
}

fn short(v: &Json) -> String {
    let s = v.to_string();
    if s.len() > 120 {
        format!("{}…", &s[..s.char_indices().nth(117).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bypass_picks_the_input_the_frontend_picks() {
        // VAEEncode-like: (pixels IMAGE, vae VAE) → LATENT; nothing fits a LATENT consumer.
        let encode = json!({"inputs": [{"type": "IMAGE"}, {"type": "VAE"}], "outputs": [{"type": "LATENT"}]});
        assert_eq!(bypass_input(&encode, 0, "LATENT"), None);
        // A LATENT passes through slot 1 although the output is slot 0.
        let node = json!({"inputs": [{"type": "MODEL"}, {"type": "LATENT"}], "outputs": [{"type": "LATENT"}]});
        assert_eq!(bypass_input(&node, 0, "LATENT"), Some(1));
        // Same slot first when it fits; an any-type consumer takes the same slot.
        let invert = json!({"inputs": [{"type": "IMAGE"}], "outputs": [{"type": "IMAGE"}]});
        assert_eq!(bypass_input(&invert, 0, "IMAGE"), Some(0));
        assert_eq!(bypass_input(&node, 0, "*"), Some(0));
        // Types compare without case, and lists match any member.
        let list = json!({"inputs": [{"type": "IMAGE,MASK"}], "outputs": [{"type": "MASK"}]});
        assert_eq!(bypass_input(&list, 0, "mask"), Some(0));
    }
}
