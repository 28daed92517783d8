//! `diffloom nodes [NAME] [--json]`: the registry's schemas; `diffloom nodes --coverage`: which of
//! ComfyUI's nodes the built-in ones cover.

use std::process::ExitCode;

use anyhow::{bail, Result};
use diffloom_core::node::{InputKind, Schema};
use diffloom_core::registry::Entry;

use crate::session;

pub fn nodes(name: Option<&str>, json: bool, coverage: bool) -> Result<ExitCode> {
    if coverage {
        // Built-in nodes only: the output is README.md's section, the same on every machine.
        print!("{}", diffloom_comfy::coverage::markdown(&diffloom_nodes::registry()));
        return Ok(ExitCode::SUCCESS);
    }
    let registry = session::registry();
    let entries: Vec<&Entry> = match name {
        Some(n) => match registry.get(n) {
            Some(e) => vec![e],
            None => {
                let hint = registry.suggest(n).map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default();
                bail!("unknown node type {n:?}{hint}")
            }
        },
        None => registry.entries().collect(),
    };
    if json {
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(&*e.schema).unwrap_or_default();
                v["origin"] = serde_json::Value::String(e.origin.to_string());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let mut entries = entries;
        entries.sort_by(|a, b| (&a.schema.category, &a.schema.name).cmp(&(&b.schema.category, &b.schema.name)));
        for e in entries {
            print!("{}", describe(&e.schema));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(s: &Schema) -> String {
    let mut out = format!("{}  [{}]{}\n", s.name, s.category, if s.output_node { "  (output node)" } else { "" });
    if !s.description.is_empty() {
        out.push_str(&format!("    {}\n", s.description));
    }
    for i in &s.inputs {
        let detail = match &i.kind {
            InputKind::Int { default, min, max, .. } => {
                format!("INT {}{min}..{max}", default.map(|d| format!("= {d}, ")).unwrap_or_default())
            }
            InputKind::Float { default, min, max, .. } => {
                let range = if *min == f64::MIN { String::new() } else { format!("{min}..{max}") };
                format!("FLOAT {}{range}", default.map(|d| format!("= {d}, ")).unwrap_or_default())
            }
            InputKind::String { default, .. } => match default {
                Some(d) => format!("STRING = {d:?}"),
                None => "STRING (required)".to_owned(),
            },
            InputKind::Boolean { default } => format!("BOOLEAN = {}", default.unwrap_or(false)),
            InputKind::Combo { choices, .. } => format!("one of {}", choices.join(" | ")),
            InputKind::Link { ty } => ty.to_string(),
        };
        let opt = if i.optional { " (optional)" } else { "" };
        out.push_str(&format!("    in   {:<18} {detail}{opt}\n", i.name));
    }
    for o in &s.outputs {
        out.push_str(&format!("    out  {:<18} {}\n", o.name, o.ty));
    }
    out
}
