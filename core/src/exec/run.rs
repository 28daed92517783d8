//! The executor: computes every needed node's key, reuses cached results, runs the rest in dependency
//! order, and reports per node what ran and how long it took.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use crate::error::{NodeError, RunError};
use crate::exec::cache::Cache;
use crate::exec::key::{node_key, Key};
use crate::exec::lists::execute_mapped;
use crate::exec::options::RunOptions;
use crate::exec::report::{NodeReport, NodeStatus, RunReport};
use crate::exec::schedule::needed_in_order;
use crate::graph::{ResolvedGraph, ResolvedInput, ResolvedNode};
use crate::node::{Args, Ctx};
use crate::value::Value;

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
            match node_key(graph, i, &keys, self.runs, &self.options.locator(&graph.graph_dir)) {
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
        // The disk tier holds plain results of nodes whose keys are the same in every process: not
        // output nodes (they must write their files), not never-cached nodes nor what depends on them
        // (their keys hold this process's run number).
        let disk = self.options.disk_cache.clone();
        let salt = match &disk {
            Some(_) => format!("{} {:?} {:?}", super::disk::build_id(), self.options.device, self.options.resolved_dtype()),
            None => String::new(),
        };
        let mut on_disk = vec![false; graph.nodes.len()];
        for &i in &order {
            let node = &graph.nodes[i];
            let schema = &node.entry.schema;
            on_disk[i] = disk.is_some()
                && schema.cacheable
                && !schema.output_node
                && node.inputs.iter().all(|input| !matches!(input, ResolvedInput::Link { node: src, .. } if !on_disk[*src]));
        }
        let mut from_disk = vec![false; graph.nodes.len()];

        let mut values: Vec<Option<Vec<Value>>> = vec![None; graph.nodes.len()];
        let mut must_run = vec![false; graph.nodes.len()];
        let mut wanted = vec![false; graph.nodes.len()];
        for &i in order.iter().rev() {
            let node = &graph.nodes[i];
            wanted[i] |= node.entry.schema.output_node;
            if !wanted[i] {
                continue;
            }
            let mut cached = self.cache.get(&keys[i]);
            if let (None, Some(d), true) = (&cached, &disk, on_disk[i]) {
                match d.get(&keys[i], &salt) {
                    Ok(Some(v)) => {
                        self.cache.insert(keys[i], v.clone());
                        from_disk[i] = true;
                        cached = Some(v);
                    }
                    Ok(None) => {}
                    Err(why) => {
                        tracing::warn!("{why}");
                        report.warnings.push(why);
                    }
                }
            }
            match cached {
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
        let observer = self.options.observer.clone();
        if let Some(o) = &observer {
            let cached: Vec<&str> = order.iter().filter(|&&i| wanted[i] && !must_run[i]).map(|&i| graph.nodes[i].id.as_str()).collect();
            o.cached(&cached);
        }

        for &i in &order {
            if !wanted[i] {
                continue;
            }
            let node = &graph.nodes[i];
            let schema = &node.entry.schema;
            if !must_run[i] {
                let mut line = NodeReport::cached(&node.id, &schema.name);
                if from_disk[i] {
                    line.messages.push("from the disk cache".into());
                }
                report.nodes.push(line);
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
            if let Some(o) = &observer {
                o.executing(&node.id);
            }
            let progress = |value: u64, max: u64, latent: Option<&tch::Tensor>| {
                if let Some(o) = &observer {
                    o.progress(&node.id, value, max);
                    if let Some(x) = latent.filter(|_| o.wants_previews()) {
                        o.preview(&node.id, x);
                    }
                }
            };
            let image_texts = |w: u32, h: u32| {
                let mut texts = vec![("diffloom".to_owned(), graph.source.clone())];
                if let Some(hook) = &self.options.image_texts {
                    texts.extend(hook(graph, i, (w, h)));
                }
                texts
            };
            let mut cx = Ctx {
                device: self.options.device,
                node_id: &node.id,
                files: self.options.locator(&graph.graph_dir),
                output_dir: &self.options.output_dir,
                image_texts: &image_texts,
                cancel: &self.options.cancel,
                dtype: self.options.resolved_dtype(),
                messages: Vec::new(),
                ui: serde_json::Map::new(),
                progress: &progress,
                registry: &graph.registry,
            };
            crate::exec::notes::take();
            let result = execute_mapped(node, &mut cx, &values);
            let mut messages = std::mem::take(&mut cx.messages);
            messages.extend(crate::exec::notes::take());
            let ui = std::mem::take(&mut cx.ui);
            let time = t0.elapsed();
            match result {
                Ok(outputs) => {
                    if let Some(o) = &observer {
                        o.executed(&node.id, &ui);
                    }
                    if let (Some(d), true) = (&disk, on_disk[i]) {
                        if let Err(why) = d.put(&keys[i], &salt, &outputs) {
                            tracing::warn!("{why}");
                            report.warnings.push(why);
                        }
                    }
                    self.cache.insert(keys[i], outputs.clone());
                    values[i] = Some(outputs);
                    report.nodes.push(NodeReport { id: node.id.clone(), node_type: schema.name.clone(), status: NodeStatus::Ran, time, messages });
                }
                Err(e) => {
                    report.nodes.push(NodeReport { id: node.id.clone(), node_type: schema.name.clone(), status: NodeStatus::Failed, time, messages });
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
            keys[i] = node_key(graph, i, &keys, self.runs, &self.options.locator(&graph.graph_dir)).ok()?;
        }
        self.cache.get(&keys[target])?.get(output).cloned()
    }

    fn node_error(&self, graph: &ResolvedGraph, i: usize, cause: NodeError) -> RunError {
        let node = &graph.nodes[i];
        RunError { file: graph.file.clone(), node: node.id.clone(), comfy_id: node.comfy_id.clone(), node_type: node.entry.schema.name.clone(), cause }
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

/// Runs `execute` with panics caught, and checks the outputs against the schema (a plugin could return
/// anything).
pub(super) fn execute_guarded(node: &ResolvedNode, cx: &mut Ctx, args: &Args) -> Result<Vec<Value>, NodeError> {
    let schema = &node.entry.schema;
    let outputs = catch_unwind(AssertUnwindSafe(|| node.entry.node.execute(cx, args))).unwrap_or_else(|p| Err(NodeError::Panic(panic_message(&p))))?;
    if outputs.len() != schema.outputs.len() {
        return Err(NodeError::Failed(format!("returned {} outputs, but the node declares {}", outputs.len(), schema.outputs.len())));
    }
    for (value, spec) in outputs.iter().zip(&schema.outputs) {
        match value {
            Value::List(items) if spec.is_list => {
                if let Some(bad) = items.iter().find(|v| !v.value_type().feeds(spec.ty) || matches!(v, Value::List(_))) {
                    return Err(NodeError::Failed(format!("output {:?} should be a list of {}, but holds {}", spec.name, spec.ty, bad.value_type())));
                }
                continue;
            }
            _ if spec.is_list => {
                return Err(NodeError::Failed(format!(
                    "output {:?} should be a list of {}, but the node returned one {}",
                    spec.name,
                    spec.ty,
                    value.value_type()
                )))
            }
            Value::List(_) => return Err(NodeError::Failed(format!("output {:?} should be one {}, but the node returned a list", spec.name, spec.ty))),
            _ => {}
        }
        if !value.value_type().feeds(spec.ty) {
            return Err(NodeError::Failed(format!("output {:?} should be {}, but the node returned {}", spec.name, spec.ty, value.value_type())));
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
