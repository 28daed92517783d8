//! ComfyUI's list semantics (`_map_node_over_list` and `merge_result_data` in its `execution.py`).
//!
//! A node with a list output (RebatchLatents) hands its consumers a [`Value::List`]. A consumer that
//! does not take lists runs once per item, a shorter list repeating its last item, and each of its
//! outputs becomes the list of its calls' results; a list output's items are concatenated instead.
//! A node that takes lists ([`Schema::input_is_list`]) runs once with them whole. Without any list
//! among the inputs a node runs once, as before.
//!
//! [`Schema::input_is_list`]: crate::node::Schema::input_is_list

use serde_json::{Map, Value as Json};

use crate::error::NodeError;
use crate::exec::args::gather_args;
use crate::exec::run::execute_guarded;
use crate::graph::{ResolvedInput, ResolvedNode};
use crate::node::Ctx;
use crate::value::Value;

/// Runs `node` over its inputs' lists and returns its outputs, in schema order.
pub(super) fn execute_mapped(node: &ResolvedNode, cx: &mut Ctx, values: &[Option<Vec<Value>>]) -> Result<Vec<Value>, NodeError> {
    let schema = &node.entry.schema;
    let longest = node
        .inputs
        .iter()
        .filter_map(|input| match input {
            ResolvedInput::Link { node: src, output } => values[*src].as_ref().and_then(|outs| outs.get(*output)),
            _ => None,
        })
        .filter_map(|v| if let Value::List(items) = v { Some(items.len()) } else { None })
        .max();
    let calls = match longest {
        Some(n) if !schema.input_is_list => n,
        _ => {
            cx.check_cancel()?;
            let args = gather_args(node, values, None)?;
            return execute_guarded(node, cx, &args);
        }
    };
    let mut merged: Vec<Vec<Value>> = vec![Vec::new(); schema.outputs.len()];
    let mut ui = Map::new();
    // Item 0 of an empty list is an error naming the input (ComfyUI fails there too).
    for item in 0..calls.max(1) {
        cx.check_cancel()?;
        let args = gather_args(node, values, Some(item))?;
        let outputs = execute_guarded(node, cx, &args)?;
        for ((slot, value), spec) in merged.iter_mut().zip(outputs).zip(&schema.outputs) {
            match value {
                Value::List(items) if spec.is_list => slot.extend(items),
                value => slot.push(value),
            }
        }
        merge_ui(&mut ui, std::mem::take(&mut cx.ui));
    }
    cx.ui = ui;
    Ok(merged.into_iter().map(Value::List).collect())
}

/// Adds one call's UI to the node's (ComfyUI concatenates each key's lists: every saved image shows).
fn merge_ui(into: &mut Map<String, Json>, call: Map<String, Json>) {
    for (key, value) in call {
        match (into.get_mut(&key), value) {
            (Some(Json::Array(have)), Json::Array(more)) => have.extend(more),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
#[path = "tests/lists.rs"]
mod tests;
