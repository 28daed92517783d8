//! Which nodes a run needs, in dependency order.

use petgraph::algo::toposort;
use petgraph::Direction;

use crate::graph::ResolvedGraph;

/// The nodes the output nodes depend on (output nodes included), in topological order (every node after
/// the nodes it reads from). Nodes no output needs are left out: they never run.
pub fn needed_in_order(graph: &ResolvedGraph) -> Vec<usize> {
    // invariant: validation rejected every cycle, so a topological order exists.
    let order = toposort(&graph.dag, None).unwrap_or_default();
    let mut needed = vec![false; graph.nodes.len()];
    for v in order.iter().rev() {
        let i = graph.dag[*v];
        if graph.nodes[i].entry.schema.output_node {
            needed[i] = true;
        }
        if needed[i] {
            for src in graph.dag.neighbors_directed(*v, Direction::Incoming) {
                needed[graph.dag[src]] = true;
            }
        }
    }
    order.into_iter().map(|v| graph.dag[v]).filter(|i| needed[*i]).collect()
}
