//! What a run reports: per node, whether it ran, came from the cache or failed, how long it took and
//! what it said.

use std::fmt;
use std::time::Duration;

use crate::error::RunError;

/// Whether a node ran, came from the cache, or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeStatus {
    Ran,
    Cached,
    Failed,
}

/// One line of a run report.
#[derive(Clone, Debug)]
pub struct NodeReport {
    pub id: String,
    pub node_type: String,
    pub status: NodeStatus,
    /// Time spent in the node's `execute` (zero when cached).
    pub time: Duration,
    /// What the node reported (files written, previews).
    pub messages: Vec<String>,
}

impl NodeReport {
    /// A node whose result came from the cache.
    pub(super) fn cached(id: &str, node_type: &str) -> NodeReport {
        NodeReport { id: id.to_owned(), node_type: node_type.to_owned(), status: NodeStatus::Cached, time: Duration::ZERO, messages: Vec::new() }
    }
}

/// What a run did. `error` is set when a node failed; results computed before it stay cached.
#[derive(Debug, Default)]
pub struct RunReport {
    /// Needed nodes in the order they were considered.
    pub nodes: Vec<NodeReport>,
    /// Time spent computing keys, checking the cache and ordering the work.
    pub overhead: Duration,
    pub total: Duration,
    pub error: Option<RunError>,
    /// Problems that did not stop the run (a corrupt disk-cache entry, recomputed; a full disk).
    pub warnings: Vec<String>,
}

impl RunReport {
    /// Ids of the nodes whose `execute` ran (successfully or not), in run order.
    pub fn ran(&self) -> Vec<&str> {
        self.ids_with(|s| s != NodeStatus::Cached)
    }

    /// Ids of the nodes whose results came from the cache.
    pub fn cached(&self) -> Vec<&str> {
        self.ids_with(|s| s == NodeStatus::Cached)
    }

    fn ids_with(&self, want: impl Fn(NodeStatus) -> bool) -> Vec<&str> {
        self.nodes.iter().filter(|n| want(n.status)).map(|n| n.id.as_str()).collect()
    }

    /// The failure, if any, as a `Result`.
    // The report is the point of the error side (what ran before the failure), so it is not boxed.
    #[allow(clippy::result_large_err)]
    pub fn into_result(mut self) -> Result<RunReport, (RunReport, RunError)> {
        match self.error.take() {
            None => Ok(self),
            Some(error) => Err((self, error)),
        }
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id_w = self.nodes.iter().map(|n| n.id.len()).max().unwrap_or(0);
        let ty_w = self.nodes.iter().map(|n| n.node_type.len()).max().unwrap_or(0);
        for n in &self.nodes {
            let status = match n.status {
                NodeStatus::Ran => "ran",
                NodeStatus::Cached => "cached",
                NodeStatus::Failed => "FAILED",
            };
            write!(f, "  {status:<6}  {:<id_w$}  {:<ty_w$}", n.id, n.node_type)?;
            if n.status != NodeStatus::Cached {
                write!(f, "  {:>10}", format_duration(n.time))?;
            }
            writeln!(f)?;
            for m in &n.messages {
                writeln!(f, "          {m}")?;
            }
        }
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        let ran = self.nodes.iter().filter(|n| n.status == NodeStatus::Ran).count();
        write!(f, "{} nodes: {ran} ran, {} cached, {} in all", self.nodes.len(), self.cached().len(), format_duration(self.total))
    }
}

fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1.0 {
        format!("{:.0} µs", ms * 1e3)
    } else if ms < 10_000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.1} s", ms / 1e3)
    }
}
