//! The cache key of a node's result, in one place: a BLAKE3 hash of everything that determines the
//! result, so that an unchanged node is found in the cache and a changed one never is.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::NodeError;
use crate::exec::run::panic_message;
use crate::graph::{ResolvedGraph, ResolvedInput};
use crate::node::Args;
use crate::paths::Locator;
use crate::value::Value;

/// A result's key: a BLAKE3 hash of the node type, its literal inputs in schema order, the keys of the
/// results it reads and its change token (see [`node_key`]).
pub type Key = [u8; 32];

/// The node's cache key; see [`Key`]. Output nodes also mix in their id, so that two identical output
/// nodes each write their file; nodes that opt out of caching mix in the run number.
pub(super) fn node_key(graph: &ResolvedGraph, i: usize, keys: &[Key], run: u64, files: &Locator) -> Result<Key, NodeError> {
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
    let token =
        catch_unwind(AssertUnwindSafe(|| node.entry.node.change_token(files, &literals))).unwrap_or_else(|p| Err(NodeError::Panic(panic_message(&p))))?;
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
