//! Hypernetworks (A1111's format, ComfyUI's HypernetworkLoader): for each text-state width, two small
//! MLPs that add to the text states the cross-attention's keys and values are projected from. Keys
//! `<width>.<0 for k, 1 for v>.linear.<index>.{weight,bias}`, with the options (`activation_func`,
//! `is_layer_norm`, `activate_output`) beside them in the file.

use std::collections::BTreeMap;

use tch::Tensor;

use crate::checkpoint::safetensors::SafetensorsFile;
use crate::checkpoint::LoadError;

/// One layer of the MLP, in order.
enum Step {
    Linear { weight: Tensor, bias: Tensor },
    Norm { weight: Tensor, bias: Tensor },
    Act(String),
}

/// The MLP for keys or values.
pub struct Mlp {
    layers: Vec<Step>,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for layer in &self.layers {
            h = match layer {
                Step::Linear { weight, bias } => h.linear(&weight.to_kind(h.kind()), Some(&bias.to_kind(h.kind()))),
                Step::Norm { weight, bias } => h.layer_norm([weight.size()[0]], Some(weight), Some(bias), 1e-5, true),
                Step::Act(name) => match name.as_str() {
                    "relu" => h.relu(),
                    "leakyrelu" => h.leaky_relu(),
                    "elu" => h.elu(),
                    // ComfyUI maps "swish" to Hardswish.
                    "swish" => h.hardswish(),
                    "tanh" => h.tanh(),
                    "sigmoid" => h.sigmoid(),
                    "softsign" => &h / (h.abs() + 1.0),
                    "mish" => h.mish(),
                    _ => h,
                },
            };
        }
        h
    }
}

/// A hypernetwork: (k, v) MLPs by text-state width.
pub struct Hypernetwork {
    pub by_width: BTreeMap<i64, (Mlp, Mlp)>,
}

const ACTIVATIONS: [&str; 9] = ["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish"];

impl Hypernetwork {
    /// Reads `file` as ComfyUI's `load_hypernetwork_patch` does (dropout layers are inactive in
    /// inference and left out).
    pub fn load(file: &SafetensorsFile) -> Result<Hypernetwork, LoadError> {
        let bad = |message: String| LoadError::Unsupported { file: file.path.clone(), message };
        let option = |k: &str, default: &str| file.metadata.get(k).cloned().unwrap_or_else(|| default.to_owned());
        let activation = option("activation_func", "linear");
        if !ACTIVATIONS.contains(&activation.as_str()) {
            return Err(bad(format!("unsupported hypernetwork activation {activation:?} (one of {})", ACTIVATIONS.join(", "))));
        }
        let layer_norm = option("is_layer_norm", "False") == "True";
        let activate_output = option("activate_output", "False") == "True";
        // "<width>.<0|1>.<module>.<index>.weight" → per (width, which): (index, module name).
        let mut modules: BTreeMap<(i64, usize), Vec<(i64, String)>> = BTreeMap::new();
        for name in file.tensors().keys() {
            let mut parts = name.splitn(3, '.');
            let (Some(width), Some(which), Some(rest)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let (Ok(width), Ok(which)) = (width.parse::<i64>(), which.parse::<usize>()) else { continue };
            let Some(module) = rest.strip_suffix(".weight") else { continue };
            let index = module.rsplit('.').next().and_then(|i| i.parse::<i64>().ok()).unwrap_or(0);
            modules.entry((width, which)).or_default().push((index, format!("{width}.{which}.{module}")));
        }
        let load = |k: &str| file.load(k, tch::Device::Cpu, Some(tch::Kind::Float));
        let mut mlps: BTreeMap<(i64, usize), Mlp> = BTreeMap::new();
        for ((width, which), mut names) in modules {
            if which > 1 {
                continue;
            }
            names.sort();
            let mut layers = Vec::new();
            let mut i = 0;
            while i < names.len() {
                // As ComfyUI counts it: with layer norms in the list, the last linear layer is never the
                // last entry, so it gets the activation too.
                let last = i + 1 == names.len();
                let name = &names[i].1;
                layers.push(Step::Linear { weight: load(&format!("{name}.weight"))?, bias: load(&format!("{name}.bias"))? });
                if activation != "linear" && (!last || activate_output) {
                    layers.push(Step::Act(activation.clone()));
                }
                if layer_norm {
                    i += 1;
                    let Some((_, ln)) = names.get(i) else { return Err(bad(format!("width {width}: a layer norm is missing after {name}"))) };
                    layers.push(Step::Norm { weight: load(&format!("{ln}.weight"))?, bias: load(&format!("{ln}.bias"))? });
                }
                i += 1;
            }
            mlps.insert((width, which), Mlp { layers });
        }
        let mut by_width = BTreeMap::new();
        let widths: Vec<i64> = mlps.keys().map(|(w, _)| *w).collect();
        for w in widths {
            if let (Some(k), Some(v)) = (mlps.remove(&(w, 0)), mlps.remove(&(w, 1))) {
                by_width.insert(w, (k, v));
            }
        }
        if by_width.is_empty() {
            return Err(bad("no hypernetwork modules (<width>.0.linear.N / <width>.1.linear.N)".into()));
        }
        Ok(Hypernetwork { by_width })
    }
}
