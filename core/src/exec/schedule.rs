//! Which nodes a run needs, in dependency order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::Direction;

use crate::graph::ResolvedGraph;

/// The nodes the output nodes depend on (output nodes included), in topological order (every node after
/// the nodes it reads from). Nodes no output needs are left out: they never run.
pub fn needed_in_order(graph: &ResolvedGraph) -> Vec<usize> {
    let order = file_ordered_toposort(graph);
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

/// Every node in topological order.
pub fn all_in_order(graph: &ResolvedGraph) -> Vec<usize> {
    file_ordered_toposort(graph).into_iter().map(|v| graph.dag[v]).collect()
}

/// A topological order that, among the nodes ready to run, always takes the one written first, so runs,
/// reports and `show` follow the file where the dependencies allow.
fn file_ordered_toposort(graph: &ResolvedGraph) -> Vec<petgraph::graph::NodeIndex> {
    let dag = &graph.dag;
    let mut pending: Vec<usize> = dag.node_indices().map(|v| dag.neighbors_directed(v, Direction::Incoming).count()).collect();
    // Vertex indices equal file positions: validation adds one vertex per node in file order.
    let mut ready: BinaryHeap<Reverse<usize>> = dag.node_indices().filter(|v| pending[v.index()] == 0).map(|v| Reverse(v.index())).collect();
    let mut order = Vec::with_capacity(pending.len());
    while let Some(Reverse(i)) = ready.pop() {
        let v = petgraph::graph::NodeIndex::new(i);
        order.push(v);
        for next in dag.neighbors_directed(v, Direction::Outgoing) {
            pending[next.index()] -= 1;
            if pending[next.index()] == 0 {
                ready.push(Reverse(next.index()));
            }
        }
    }
    order
}
