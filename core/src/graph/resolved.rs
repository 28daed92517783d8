//! A validated graph: node types looked up, inputs in schema order with literals converted, defaults and
//! parameters filled in, links pointing at node indices and output slots, and the petgraph DAG.

use std::collections::BTreeMap;
use std::path::PathBuf;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::registry::{Entry, Origin, Registry};
use crate::value::Value;

/// A graph ready to schedule and run.
pub struct ResolvedGraph {
    /// The graph file, for messages.
    pub file: PathBuf,
    /// The directory relative input paths are also looked up in.
    pub graph_dir: PathBuf,
    /// The graph as run (parameters applied), as RON; saved images embed it.
    pub source: String,
    /// Nodes in file order; indices are also the DAG's node weights.
    pub nodes: Vec<ResolvedNode>,
    /// Edges run from the producing node to the consuming node.
    pub dag: DiGraph<usize, ()>,
    /// The node types the graph was validated against: nodes that run others (a Lua plugin's
    /// `diffloom.call`) look them up here, so a reloaded plugin is reached in its new version.
    pub registry: Registry,
}

/// One node of a resolved graph.
pub struct ResolvedNode {
    pub id: String,
    /// The node's id in ComfyUI, for imported workflows (named in errors beside `id`).
    pub comfy_id: Option<String>,
    pub entry: Entry,
    /// One per schema input, in schema order.
    pub inputs: Vec<ResolvedInput>,
    /// This node's vertex in [`ResolvedGraph::dag`].
    pub vertex: NodeIndex,
}

/// An input after resolution.
#[derive(Clone, Debug)]
pub enum ResolvedInput {
    /// A literal, a parameter's value or the schema default.
    Value(Value),
    /// Output `output` of node `node` (an index into [`ResolvedGraph::nodes`]).
    Link { node: usize, output: usize },
    /// An optional input left out.
    Absent,
}

impl ResolvedGraph {
    /// The index of the node with id `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// File name → BLAKE3 (hex) of the source of each plugin file whose nodes the graph uses: what a
    /// queued job carries so that a worker with another version of a plugin refuses it.
    pub fn plugin_hashes(&self) -> std::io::Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for node in &self.nodes {
            if let Origin::Plugin(file) = &node.entry.origin {
                let source = std::fs::read(file).map_err(|e| std::io::Error::new(e.kind(), format!("{}: cannot read the plugin: {e}", file.display())))?;
                let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                out.insert(name, blake3::hash(&source).to_hex().to_string());
            }
        }
        Ok(out)
    }
}
