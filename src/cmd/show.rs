//! `diffloom show FILE`: the graph as text in execution order, or as Graphviz DOT.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use diffloom_core::exec::schedule::needed_in_order;
use diffloom_core::graph::{ResolvedGraph, ResolvedInput};
use petgraph::dot::{Config, Dot};
use petgraph::graph::DiGraph;

use crate::cli::ShowFormat;
use crate::session;

pub fn show(file: &Path, format: ShowFormat, sets: &[String]) -> Result<ExitCode> {
    let graph = session::load_graph(file, sets, &session::registry())?;
    match format {
        ShowFormat::Dot => print!("{}", dot(&graph)),
        ShowFormat::Text => print!("{}", text(&graph)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Nodes labelled "id\nType", edges labelled "OUTPUT → input".
fn dot(graph: &ResolvedGraph) -> String {
    let mut g = DiGraph::<String, String>::new();
    let vs: Vec<_> = graph.nodes.iter().map(|n| g.add_node(format!("{}\n{}", n.id, n.entry.schema.name))).collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        let schema = &node.entry.schema;
        for (spec, input) in schema.inputs.iter().zip(&node.inputs) {
            if let ResolvedInput::Link { node: src, output } = input {
                let out = &graph.nodes[*src].entry.schema.outputs[*output].name;
                g.add_edge(vs[*src], vs[i], format!("{out} → {}", spec.name));
            }
        }
    }
    format!("{}", Dot::with_config(&g, &[Config::GraphContentOnly])).lines().fold(
        String::from("digraph {\n    rankdir=LR\n    node [shape=box]\n"),
        |mut s, l| {
            s.push_str(l);
            s.push('\n');
            s
        },
    ) + "}\n"
}

/// One line per node that would run, in order, with its inputs.
fn text(graph: &ResolvedGraph) -> String {
    let mut s = String::new();
    for i in needed_in_order(graph) {
        let node = &graph.nodes[i];
        let schema = &node.entry.schema;
        let inputs: Vec<String> = schema
            .inputs
            .iter()
            .zip(&node.inputs)
            .map(|(spec, input)| match input {
                ResolvedInput::Value(v) => format!("{}={}", spec.name, v.describe()),
                ResolvedInput::Link { node: src, output } => {
                    format!("{}<-{}.{}", spec.name, graph.nodes[*src].id, graph.nodes[*src].entry.schema.outputs[*output].name)
                }
                ResolvedInput::Absent => format!("{}=(none)", spec.name),
            })
            .collect();
        s.push_str(&format!("{} ({}): {}\n", node.id, schema.name, inputs.join(", ")));
    }
    s
}
