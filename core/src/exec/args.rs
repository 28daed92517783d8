//! A node's arguments for one call: literals and its sources' outputs, bound to the schema.

use crate::error::NodeError;
use crate::graph::{ResolvedInput, ResolvedNode};
use crate::node::Args;
use crate::value::Value;

/// Builds a node's arguments from literals and its sources' outputs through [`Schema::bind`], which
/// also checks linked values against the input's range and choices (validation could only check
/// literals). With `item`, a linked [`Value::List`] gives its item `item`, or its last one when it is
/// shorter (ComfyUI's `slice_dict`); without, lists are passed whole (list nodes, or no list at all).
///
/// [`Schema::bind`]: crate::node::Schema::bind
pub(super) fn gather_args(node: &ResolvedNode, values: &[Option<Vec<Value>>], item: Option<usize>) -> Result<Args, NodeError> {
    let schema = &node.entry.schema;
    let mut inputs = node.inputs.iter();
    schema.bind(|spec| match inputs.next() {
        Some(ResolvedInput::Value(v)) => Ok(Some(v.clone())),
        Some(ResolvedInput::Absent) | None => Ok(None),
        Some(ResolvedInput::Link { node: src, output }) => {
            let value = values[*src]
                .as_ref()
                .and_then(|outs| outs.get(*output))
                .ok_or_else(|| NodeError::Failed(format!("input {:?}: its source produced no value", spec.name)))?;
            Ok(Some(match (value, item) {
                (Value::List(items), Some(i)) => items
                    .get(i.min(items.len().saturating_sub(1)))
                    .cloned()
                    .ok_or_else(|| NodeError::input(&spec.name, "the list it is given is empty: there is nothing to run the node on"))?,
                (value, _) => value.clone(),
            }))
        }
    })
}
