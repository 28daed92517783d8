//! A node's `widgets_values` as the canvas saves them, mapped to named inputs: one value per widget
//! input in ComfyUI's order, plus the `control_after_generate` value ("fixed", "randomize", …, or a
//! legacy `true`/`false`) that follows seed inputs, and the upload button's value that image loaders
//! add.

use diffloom_core::{InputKind, Schema};
use serde_json::Value as Json;

/// The values the "control after generate" widget takes.
const CONTROL_VALUES: &[&str] = &["fixed", "increment", "decrement", "randomize"];

/// Whether ComfyUI's canvas adds a control-after-generate widget after this input: INT inputs named
/// `seed` or `noise_seed` (the frontend's rule, `control_after_generate ?? ["seed", "noise_seed"]`),
/// and the one input of ComfyUI 0.8's SD node set that asks for it by name otherwise (PrimitiveInt's
/// `value`).
pub fn has_control(node: &str, name: &str, kind: &InputKind) -> bool {
    matches!(kind, InputKind::Int { .. }) && (name == "seed" || name == "noise_seed" || (node == "PrimitiveInt" && name == "value"))
}

/// Whether the input shows as a widget on the canvas (everything but sockets for models, latents, …).
pub fn is_widget(kind: &InputKind) -> bool {
    !matches!(kind, InputKind::Link { .. })
}

/// The values of `widgets_values` by input name. A list is read in widget order; an object (some
/// frontends' form) by name. More values than widgets are ignored (buttons, newer widgets); fewer
/// leave the rest at their defaults.
pub fn assign(schema: &Schema, values: Option<&Json>) -> Result<Vec<(String, Json)>, String> {
    let mut out = Vec::new();
    let widgets = schema.inputs.iter().filter(|i| is_widget(&i.kind));
    match values {
        None | Some(Json::Null) => {}
        Some(Json::Object(map)) => {
            for spec in widgets {
                if let Some(v) = map.get(&spec.name) {
                    out.push((spec.name.clone(), v.clone()));
                }
            }
        }
        Some(Json::Array(list)) => {
            let mut k = 0;
            for spec in widgets {
                let Some(v) = list.get(k) else { break };
                out.push((spec.name.clone(), v.clone()));
                k += 1;
                if has_control(&schema.name, &spec.name, &spec.kind) && list.get(k).is_some_and(is_control_value) {
                    k += 1;
                }
                // LoadImage's upload button sits right after the image name and saves "image".
                if spec.name == "image" && matches!(spec.kind, InputKind::String { .. }) && list.get(k).and_then(Json::as_str) == Some("image") {
                    k += 1;
                }
            }
        }
        Some(other) => return Err(format!("expected a list of widget values, got {other}")),
    }
    Ok(out)
}

fn is_control_value(v: &Json) -> bool {
    v.is_boolean() || v.as_str().is_some_and(|s| CONTROL_VALUES.contains(&s))
}

/// A node's `widgets_values` for export: one value per widget input in order, with "fixed" after seed
/// inputs (the run used the value as it is).
pub fn values_for(schema: &Schema, value_of: &dyn Fn(&str) -> Option<Json>) -> Vec<Json> {
    let mut out = Vec::new();
    for spec in schema.inputs.iter().filter(|i| is_widget(&i.kind)) {
        let v = value_of(&spec.name).unwrap_or(Json::Null);
        out.push(v);
        if has_control(&schema.name, &spec.name, &spec.kind) {
            out.push(Json::String("fixed".into()));
        }
        if spec.name == "image" && matches!(spec.kind, InputKind::String { .. }) && schema.name.starts_with("LoadImage") {
            out.push(Json::String("image".into()));
        }
    }
    out
}
