//! Validation: checks a parsed graph against the registry's schemas, reports *every* problem at once, and
//! on success produces the [`ResolvedGraph`] the executor runs.

use std::path::Path;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::DiGraph;

use crate::error::{GraphError, ValidationError, ValidationErrors, ValidationKind};
use crate::graph::file::{self, GraphFile, InputValue, Literal, Reference, FORMAT_VERSION, READ_VERSIONS};
use crate::graph::resolved::{ResolvedGraph, ResolvedInput, ResolvedNode};
use crate::node::InputKind;
use crate::registry::{closest, Registry};
use crate::value::Value;

/// Applies `--set name=value` overrides: each must name a declared parameter and parse as the type of
/// its default (a string parameter takes the text as is).
pub fn apply_params(file: &Path, graph: &mut GraphFile, sets: &[(String, String)]) -> Result<(), GraphError> {
    for (name, text) in sets {
        let err = |message: String| GraphError::Param { file: file.to_path_buf(), name: name.clone(), message };
        let Some(current) = graph.params.get_mut(name) else {
            let declared: Vec<&str> = graph.params.iter().map(|(k, _)| k).collect();
            let hint = closest(name, declared.iter().copied()).map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default();
            return Err(err(format!(
                "the graph declares no parameter {name:?}{hint}; its parameters: {}",
                if declared.is_empty() { "none".to_owned() } else { declared.join(", ") }
            )));
        };
        *current = match current {
            Literal::String(_) => Literal::String(text.clone()),
            Literal::Bool(_) => match text.as_str() {
                "true" => Literal::Bool(true),
                "false" => Literal::Bool(false),
                _ => return Err(err(format!("expected true or false, got {text:?}"))),
            },
            Literal::Int(_) | Literal::UInt(_) => {
                if let Ok(i) = text.parse::<i64>() {
                    Literal::Int(i)
                } else if let Ok(u) = text.parse::<u64>() {
                    Literal::UInt(u)
                } else {
                    return Err(err(format!("expected an integer, got {text:?}")));
                }
            }
            Literal::Float(_) => match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Literal::Float(f),
                _ => return Err(err(format!("expected a number, got {text:?}"))),
            },
        };
    }
    Ok(())
}

fn literal_value(lit: &Literal) -> Value {
    match lit {
        Literal::Bool(b) => Value::Boolean(*b),
        Literal::Int(i) => Value::Int(*i as i128),
        Literal::UInt(u) => Value::Int(*u as i128),
        Literal::Float(f) => Value::Float(*f),
        Literal::String(s) => Value::String(s.clone()),
    }
}

/// Validates `graph` (parameters already applied) and resolves it. `file` names the graph in errors and
/// gives the directory relative paths are looked up in.
pub fn validate(file: &Path, graph: &GraphFile, registry: &Registry) -> Result<ResolvedGraph, ValidationErrors> {
    let mut errors = Vec::new();
    let mk = |node: Option<&str>, input: Option<&str>, kind: ValidationKind| ValidationError {
        file: file.to_path_buf(),
        node: node.map(str::to_owned),
        comfy_id: node.and_then(|n| graph.nodes.get(n)).and_then(|e| e.canvas.comfy_id.clone()),
        input: input.map(str::to_owned),
        kind,
    };
    if !READ_VERSIONS.contains(&graph.version) {
        errors.push(mk(None, None, ValidationKind::UnsupportedVersion { found: graph.version, supported: FORMAT_VERSION }));
    }

    let ids: Vec<&str> = graph.nodes.iter().map(|(id, _)| id).collect();
    let index_of = |id: &str| ids.iter().position(|i| *i == id);
    let mut dag = DiGraph::<usize, ()>::with_capacity(ids.len(), ids.len() * 2);
    let vertices: Vec<_> = (0..ids.len()).map(|i| dag.add_node(i)).collect();
    let mut nodes = Vec::with_capacity(ids.len());
    let mut any_output = false;

    for (i, (id, entry)) in graph.nodes.iter().enumerate() {
        let Some(reg) = registry.get(&entry.node_type) else {
            errors.push(mk(Some(id), None, ValidationKind::UnknownNodeType { name: entry.node_type.clone(), suggestion: registry.suggest(&entry.node_type) }));
            continue;
        };
        let schema = &reg.schema;
        any_output |= schema.output_node;

        for (name, _) in entry.inputs.iter() {
            if schema.input_spec(name).is_none() {
                let suggestion = closest(name, schema.inputs.iter().map(|s| s.name.as_str()));
                errors.push(mk(Some(id), Some(name), ValidationKind::UnknownInput { suggestion }));
            }
        }

        let mut inputs = Vec::with_capacity(schema.inputs.len());
        for spec in &schema.inputs {
            let name = spec.name.as_str();
            let resolved = match entry.inputs.get(name) {
                None => match spec.kind.default_value() {
                    Some(v) => Some(ResolvedInput::Value(v)),
                    None if spec.optional => Some(ResolvedInput::Absent),
                    None => {
                        errors.push(mk(Some(id), Some(name), ValidationKind::MissingInput));
                        None
                    }
                },
                Some(InputValue::Literal(lit)) => literal_input(&spec.kind, lit, |k| errors.push(mk(Some(id), Some(name), k))),
                Some(InputValue::Ref(Reference::Param(p))) => match graph.params.get(p) {
                    Some(lit) => literal_input(&spec.kind, lit, |k| errors.push(mk(Some(id), Some(name), k))),
                    None => {
                        let suggestion = closest(p, graph.params.iter().map(|(k, _)| k));
                        errors.push(mk(Some(id), Some(name), ValidationKind::UnknownParam { name: p.clone(), suggestion }));
                        None
                    }
                },
                Some(InputValue::Ref(Reference::Link(target, output))) => {
                    match index_of(target) {
                        None => {
                            let suggestion = closest(target, ids.iter().copied());
                            errors.push(mk(Some(id), Some(name), ValidationKind::UnknownLinkNode { target: target.clone(), suggestion }));
                            None
                        }
                        Some(t) => {
                            dag.add_edge(vertices[t], vertices[i], ());
                            // The target's own type errors are reported at the target; here only the link.
                            let target_schema = registry.get(&graph.nodes.0[t].1.node_type).map(|e| e.schema.clone());
                            match target_schema {
                                None => None,
                                Some(ts) => match ts.output_index(output) {
                                    None => {
                                        errors.push(mk(
                                            Some(id),
                                            Some(name),
                                            ValidationKind::UnknownOutput {
                                                target: target.clone(),
                                                output: output.clone(),
                                                available: ts.outputs.iter().map(|o| o.name.clone()).collect(),
                                            },
                                        ));
                                        None
                                    }
                                    Some(o) => {
                                        let out_ty = ts.outputs[o].ty;
                                        if out_ty.feeds(spec.kind.value_type()) {
                                            Some(ResolvedInput::Link { node: t, output: o })
                                        } else {
                                            errors.push(mk(
                                                Some(id),
                                                Some(name),
                                                ValidationKind::TypeMismatch {
                                                    expected: spec.kind.value_type().name().to_owned(),
                                                    found: format!("{out_ty} (output {output:?} of node {target:?})"),
                                                },
                                            ));
                                            None
                                        }
                                    }
                                },
                            }
                        }
                    }
                }
            };
            inputs.extend(resolved);
        }
        if inputs.len() == schema.inputs.len() {
            nodes.push(ResolvedNode { id: id.to_owned(), comfy_id: entry.canvas.comfy_id.clone(), entry: reg.clone(), inputs, vertex: vertices[i] });
        }
    }

    for scc in tarjan_scc(&dag) {
        let self_loop = scc.len() == 1 && dag.contains_edge(scc[0], scc[0]);
        if scc.len() > 1 || self_loop {
            let mut members: Vec<usize> = scc.iter().map(|v| dag[*v]).collect();
            members.sort_unstable();
            let names: Vec<String> = members.iter().map(|m| ids[*m].to_owned()).collect();
            errors.push(mk(Some(&names[0]), None, ValidationKind::Cycle { nodes: names.clone() }));
        }
    }
    // With other errors, a missing output node is usually one of them (a misspelt "SaveImage").
    if !any_output && (graph.nodes.is_empty() || errors.is_empty()) {
        errors.push(mk(None, None, ValidationKind::NoOutputNode));
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    debug_assert!(toposort(&dag, None).is_ok());
    Ok(ResolvedGraph {
        file: file.to_path_buf(),
        graph_dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        source: file::to_ron(graph),
        nodes,
        dag,
        registry: registry.clone(),
    })
}

/// Converts a literal for an input of `kind`, reporting what is wrong through `report`.
fn literal_input(kind: &InputKind, lit: &Literal, report: impl FnOnce(ValidationKind)) -> Option<ResolvedInput> {
    if let InputKind::Link { ty } = kind {
        report(ValidationKind::TypeMismatch { expected: format!("a link to an output of type {ty}"), found: format!("the literal {lit}") });
        return None;
    }
    match kind.check(literal_value(lit)) {
        Ok(v) => Some(ResolvedInput::Value(v)),
        Err(k) => {
            report(k);
            None
        }
    }
}
