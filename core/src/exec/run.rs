//! The executor: computes every needed node's key, reuses cached results, runs the rest in dependency
//! order, and reports per node what ran and how long it took.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind};

use crate::error::{NodeError, RunError};
use crate::exec::cache::{Cache, Key};
use crate::exec::schedule::needed_in_order;
use crate::graph::{ResolvedGraph, ResolvedInput, ResolvedNode};
use crate::node::{Args, Ctx, InputKind};
use crate::validate::check_value;
use crate::value::Value;

/// Settings shared by every run of an executor.
pub struct RunOptions {
    pub device: Device,
    /// Where output nodes write files.
    pub output_dir: PathBuf,
    /// Set (from any thread) to stop the run at the next node or sampling step.
    pub cancel: Arc<AtomicBool>,
    /// Floating-point kind for model weights; `None` picks per device (fp32 on CPU, fp16 on CUDA).
    pub dtype: Option<Kind>,
    /// Where `embedding:name` in prompts looks for textual inversions.
    pub embeddings_dir: Option<PathBuf>,
}

impl RunOptions {
    /// Options for `device` writing to `output_dir`, with defaults for the rest.
    pub fn new(device: Device, output_dir: impl Into<PathBuf>) -> RunOptions {
        RunOptions {
            device,
            output_dir: output_dir.into(),
            cancel: Arc::new(AtomicBool::new(false)),
            dtype: None,
            embeddings_dir: None,
        }
    }

    /// The weight kind actually used.
    pub fn resolved_dtype(&self) -> Kind {
        self.dtype.unwrap_or(if self.device.is_cuda() { Kind::Half } else { Kind::Float })
    }
}

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
    fn cached(id: &str, node_type: &str) -> NodeReport {
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
        let ran = self.nodes.iter().filter(|n| n.status == NodeStatus::Ran).count();
        write!(
            f,
            "{} nodes: {ran} ran, {} cached, {} in all",
            self.nodes.len(),
            self.cached().len(),
            format_duration(self.total)
        )
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

/// Runs graphs, keeping results in its cache between runs.
pub struct Executor {
    pub cache: Cache,
    pub options: RunOptions,
    /// Counts runs; mixed into the keys of never-cached nodes so they always run.
    runs: u64,
}

impl Executor {
    pub fn new(options: RunOptions, cache_limit_bytes: usize) -> Executor {
        Executor { cache: Cache::new(cache_limit_bytes), options, runs: 0 }
    }

    /// Runs what the graph's output nodes need. Never panics: a failing or panicking node ends the run
    /// with `error` set, naming the node.
    pub fn run(&mut self, graph: &ResolvedGraph) -> RunReport {
        // Inference only: no node needs gradients, so autograd is off for the whole run (once, here,
        // rather than in every node).
        let _no_grad = tch::no_grad_guard();
        let started = Instant::now();
        self.runs += 1;
        let mut report = RunReport::default();
        let order = needed_in_order(graph);

        // Keys first, top-down: a key depends only on literals, change tokens and the inputs' keys.
        // Nodes outside `order` keep a zero key; nothing reads it.
        let mut keys: Vec<Key> = vec![[0; 32]; graph.nodes.len()];
        for &i in &order {
            match node_key(graph, i, &keys, self.runs) {
                Ok(k) => keys[i] = k,
                Err(e) => {
                    report.error = Some(self.node_error(graph, i, e));
                    report.total = started.elapsed();
                    return report;
                }
            }
        }

        // Then bottom-up: a node must run if an output needs it and its result is not cached. A cached
        // node's inputs are not needed at all, so its ancestors need not run either.
        let mut values: Vec<Option<Vec<Value>>> = vec![None; graph.nodes.len()];
        let mut must_run = vec![false; graph.nodes.len()];
        let mut wanted = vec![false; graph.nodes.len()];
        for &i in order.iter().rev() {
            let node = &graph.nodes[i];
            wanted[i] |= node.entry.schema.output_node;
            if !wanted[i] {
                continue;
            }
            match self.cache.get(&keys[i]) {
                Some(v) => values[i] = Some(v),
                None => {
                    must_run[i] = true;
                    for input in &node.inputs {
                        if let ResolvedInput::Link { node: src, .. } = input {
                            wanted[*src] = true;
                        }
                    }
                }
            }
        }
        // How many pending consumers each result still has, so intermediate results can be dropped.
        let mut consumers = vec![0usize; graph.nodes.len()];
        for &i in &order {
            if must_run[i] {
                for input in &graph.nodes[i].inputs {
                    if let ResolvedInput::Link { node: src, .. } = input {
                        consumers[*src] += 1;
                    }
                }
            }
        }
        report.overhead = started.elapsed();

        for &i in &order {
            if !wanted[i] {
                continue;
            }
            let node = &graph.nodes[i];
            let schema = &node.entry.schema;
            if !must_run[i] {
                report.nodes.push(NodeReport::cached(&node.id, &schema.name));
                continue;
            }
            // An identical node earlier in this run (same key) has just produced this result.
            if let Some(v) = self.cache.get(&keys[i]) {
                values[i] = Some(v);
                report.nodes.push(NodeReport::cached(&node.id, &schema.name));
                release_inputs(node, &mut consumers, &mut values);
                continue;
            }
            let t0 = Instant::now();
            let mut cx = Ctx {
                device: self.options.device,
                node_id: &node.id,
                graph_dir: &graph.graph_dir,
                output_dir: &self.options.output_dir,
                graph_source: &graph.source,
                cancel: &self.options.cancel,
                dtype: self.options.resolved_dtype(),
                embeddings_dir: self.options.embeddings_dir.as_deref(),
                messages: Vec::new(),
                registry: &graph.registry,
            };
            let result = cx.check_cancel().and_then(|_| {
                let args = gather_args(node, &values)?;
                execute_guarded(node, &mut cx, &args)
            });
            let messages = std::mem::take(&mut cx.messages);
            let time = t0.elapsed();
            match result {
                Ok(outputs) => {
                    self.cache.insert(keys[i], outputs.clone());
                    values[i] = Some(outputs);
                    report.nodes.push(NodeReport {
                        id: node.id.clone(),
                        node_type: schema.name.clone(),
                        status: NodeStatus::Ran,
                        time,
                        messages,
                    });
                }
                Err(e) => {
                    report.nodes.push(NodeReport {
                        id: node.id.clone(),
                        node_type: schema.name.clone(),
                        status: NodeStatus::Failed,
                        time,
                        messages,
                    });
                    report.error = Some(self.node_error(graph, i, e));
                    break;
                }
            }
            release_inputs(node, &mut consumers, &mut values);
        }
        report.total = started.elapsed();
        report
    }

    /// Output `output` of node `id` as the last run left it in the cache (for tools, tests and
    /// previews); `None` when it is not cached (evicted, never cached, or not run).
    pub fn cached_output(&mut self, graph: &ResolvedGraph, id: &str, output: usize) -> Option<Value> {
        let target = graph.index_of(id)?;
        let mut keys: Vec<Key> = vec![[0; 32]; graph.nodes.len()];
        for i in crate::exec::schedule::all_in_order(graph) {
            keys[i] = node_key(graph, i, &keys, self.runs).ok()?;
        }
        self.cache.get(&keys[target])?.get(output).cloned()
    }

    fn node_error(&self, graph: &ResolvedGraph, i: usize, cause: NodeError) -> RunError {
        let node = &graph.nodes[i];
        RunError {
            file: graph.file.clone(),
            node: node.id.clone(),
            node_type: node.entry.schema.name.clone(),
            cause,
        }
    }
}

/// Counts `node`'s use of its inputs and drops results no pending node still needs.
fn release_inputs(node: &ResolvedNode, consumers: &mut [usize], values: &mut [Option<Vec<Value>>]) {
    for input in &node.inputs {
        if let ResolvedInput::Link { node: src, .. } = input {
            consumers[*src] -= 1;
            if consumers[*src] == 0 {
                values[*src] = None;
            }
        }
    }
}

/// The node's cache key; see [`Key`]. Output nodes also mix in their id, so that two identical output
/// nodes each write their file; nodes that opt out of caching mix in the run number.
fn node_key(graph: &ResolvedGraph, i: usize, keys: &[Key], run: u64) -> Result<Key, NodeError> {
    let node = &graph.nodes[i];
    let schema = &node.entry.schema;
    let mut h = blake3::Hasher::new();
    hash_str(&mut h, &schema.name);
    for input in &node.inputs {
        match input {
            ResolvedInput::Value(v) => {
                h.update(b"v");
                hash_literal(&mut h, v);
            }
            ResolvedInput::Link { node: src, output } => {
                h.update(b"l");
                // Sources come before their consumers in topological order, so their keys are set.
                h.update(&keys[*src]);
                h.update(&(*output as u64).to_le_bytes());
            }
            ResolvedInput::Absent => {
                h.update(b"a");
            }
        }
    }
    if schema.output_node {
        hash_str(&mut h, &node.id);
    }
    if !schema.cacheable {
        h.update(&run.to_le_bytes());
    }
    let literals = Args::new(
        schema
            .inputs
            .iter()
            .zip(&node.inputs)
            .map(|(spec, input)| {
                let v = match input {
                    ResolvedInput::Value(v) => Some(v.clone()),
                    _ => None,
                };
                (spec.name.clone(), v)
            })
            .collect(),
    );
    let token = catch_unwind(AssertUnwindSafe(|| node.entry.node.change_token(&graph.graph_dir, &literals)))
        .unwrap_or_else(|p| Err(NodeError::Panic(panic_message(&p))))?;
    if let Some(token) = token {
        h.update(b"t");
        hash_str(&mut h, &token);
    }
    Ok(*h.finalize().as_bytes())
}

fn hash_str(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn hash_literal(h: &mut blake3::Hasher, v: &Value) {
    match v {
        Value::Int(i) => {
            h.update(b"i");
            h.update(&i.to_le_bytes());
        }
        Value::Float(f) => {
            h.update(b"f");
            h.update(&f.to_bits().to_le_bytes());
        }
        Value::Boolean(b) => {
            h.update(if *b { b"T" } else { b"F" });
        }
        Value::String(s) => {
            h.update(b"s");
            hash_str(h, s);
        }
        // Literals are only ever numbers, strings and booleans.
        other => {
            h.update(b"?");
            hash_str(h, &other.describe());
        }
    }
}

/// Builds a node's arguments from literals and its sources' outputs, checking linked values against the
/// input's range and choices (validation could only check literals).
fn gather_args(node: &ResolvedNode, values: &[Option<Vec<Value>>]) -> Result<Args, NodeError> {
    let schema = &node.entry.schema;
    let mut args = Vec::with_capacity(node.inputs.len());
    for (spec, input) in schema.inputs.iter().zip(&node.inputs) {
        let v = match input {
            ResolvedInput::Value(v) => Some(v.clone()),
            ResolvedInput::Absent => None,
            ResolvedInput::Link { node: src, output } => {
                let v = values[*src]
                    .as_ref()
                    .and_then(|outs| outs.get(*output))
                    .cloned()
                    .ok_or_else(|| NodeError::Failed(format!("input {:?}: its source produced no value", spec.name)))?;
                let v = match &spec.kind {
                    InputKind::Link { .. } => v,
                    kind => check_value(kind, v).map_err(|k| {
                        NodeError::input(&spec.name, crate::error::ValidationError {
                            file: PathBuf::new(),
                            node: None,
                            input: None,
                            kind: k,
                        }
                        .to_string()
                        .trim_start_matches(": ")
                        .to_owned())
                    })?,
                };
                Some(v)
            }
        };
        args.push((spec.name.clone(), v));
    }
    Ok(Args::new(args))
}

/// Runs `execute` with panics caught, and checks the outputs against the schema (a plugin could return
/// anything).
fn execute_guarded(node: &ResolvedNode, cx: &mut Ctx, args: &Args) -> Result<Vec<Value>, NodeError> {
    let schema = &node.entry.schema;
    let outputs = catch_unwind(AssertUnwindSafe(|| node.entry.node.execute(cx, args)))
        .unwrap_or_else(|p| Err(NodeError::Panic(panic_message(&p))))?;
    if outputs.len() != schema.outputs.len() {
        return Err(NodeError::Failed(format!(
            "returned {} outputs, but the node declares {}",
            outputs.len(),
            schema.outputs.len()
        )));
    }
    for (value, spec) in outputs.iter().zip(&schema.outputs) {
        if !value.value_type().feeds(spec.ty) {
            return Err(NodeError::Failed(format!(
                "output {:?} should be {}, but the node returned {}",
                spec.name,
                spec.ty,
                value.value_type()
            )));
        }
    }
    Ok(outputs)
}

/// The text of a caught panic.
pub fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

#[cfg(test)]
#[path = "tests/run.rs"]
mod tests;
