//! A node's arguments for one call: literals and its sources' outputs, checked against the schema.

use std::path::PathBuf;

use crate::error::NodeError;
use crate::graph::{ResolvedInput, ResolvedNode};
use crate::node::{Args, InputKind};
use crate::validate::check_value;
use crate::value::Value;

/// Builds a node's arguments from literals and its sources' outputs, checking linked values against the
/// input's range and choices (validation could only check literals).
pub(super) fn gather_args(node: &ResolvedNode, values: &[Option<Vec<Value>>]) -> Result<Args, NodeError> {
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
                        NodeError::input(
                            &spec.name,
                            crate::error::ValidationError { file: PathBuf::new(), node: None, input: None, kind: k }
                                .to_string()
                                .trim_start_matches(": ")
                                .to_owned(),
                        )
                    })?,
                };
                Some(v)
            }
        };
        args.push((spec.name.clone(), v));
    }
    Ok(Args::new(args))
}
