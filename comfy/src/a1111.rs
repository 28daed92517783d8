//! The `parameters` text A1111-style tools, image viewers and model sites read from a PNG, as current
//! stable-diffusion-webui writes it (`create_infotext`):
//!
//! ```text
//! a lighthouse at dusk
//! Negative prompt: text, watermark
//! Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly
//! ```
//!
//! describing the last sampler upstream of the saved image.

use std::collections::VecDeque;

use diffloom_core::graph::{ResolvedGraph, ResolvedInput};
use diffloom_core::Value;

/// ComfyUI sampler names as A1111 shows them (`modules/sd_samplers_kdiffusion.py`); names A1111 lacks
/// are written as ComfyUI names them.
const SAMPLERS: &[(&str, &str)] = &[
    ("euler", "Euler"),
    ("euler_ancestral", "Euler a"),
    ("heun", "Heun"),
    ("dpm_2", "DPM2"),
    ("dpm_2_ancestral", "DPM2 a"),
    ("lms", "LMS"),
    ("dpm_fast", "DPM fast"),
    ("dpm_adaptive", "DPM adaptive"),
    ("dpmpp_2s_ancestral", "DPM++ 2S a"),
    ("dpmpp_sde", "DPM++ SDE"),
    ("dpmpp_sde_gpu", "DPM++ SDE"),
    ("dpmpp_2m", "DPM++ 2M"),
    ("dpmpp_2m_sde", "DPM++ 2M SDE"),
    ("dpmpp_2m_sde_gpu", "DPM++ 2M SDE"),
    ("dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"),
    ("dpmpp_2m_sde_heun_gpu", "DPM++ 2M SDE Heun"),
    ("dpmpp_3m_sde", "DPM++ 3M SDE"),
    ("dpmpp_3m_sde_gpu", "DPM++ 3M SDE"),
    ("restart", "Restart"),
    ("ddim", "DDIM"),
    ("uni_pc", "UniPC"),
    ("lcm", "LCM"),
];

/// ComfyUI scheduler names as A1111's "Schedule type" shows them (`modules/sd_schedulers.py`).
const SCHEDULERS: &[(&str, &str)] = &[
    ("normal", "Normal"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
    ("sgm_uniform", "SGM Uniform"),
    ("simple", "Simple"),
    ("ddim_uniform", "DDIM"),
    ("beta", "Beta"),
    ("kl_optimal", "KL Optimal"),
    ("align_your_steps", "Align Your Steps"),
];

const SAMPLER_NODES: &[&str] = &["KSampler", "KSamplerAdvanced", "SamplerCustom", "SamplerCustomAdvanced"];

pub fn sampler_label(name: &str) -> String {
    SAMPLERS.iter().find(|(c, _)| *c == name).map_or(name, |(_, a)| a).to_owned()
}

pub fn scheduler_label(name: &str) -> String {
    SCHEDULERS.iter().find(|(c, _)| *c == name).map_or(name, |(_, a)| a).to_owned()
}

/// What the text describes; every field is optional, as the graph may not say.
#[derive(Debug, Default, PartialEq)]
pub struct Parameters {
    pub positive: String,
    pub negative: Option<String>,
    pub steps: Option<i128>,
    pub sampler: Option<String>,
    pub scheduler: Option<String>,
    pub cfg: Option<f64>,
    pub seed: Option<i128>,
    pub size: (u32, u32),
    /// The checkpoint input's value (a path or ComfyUI name).
    pub model: Option<String>,
    pub model_hash: Option<String>,
    pub denoise: Option<f64>,
}

impl Parameters {
    /// The text, in A1111's field order.
    pub fn text(&self) -> String {
        let mut out = self.positive.clone();
        if let Some(n) = self.negative.as_ref().filter(|n| !n.is_empty()) {
            out.push_str(&format!("\nNegative prompt: {n}"));
        }
        let mut fields: Vec<String> = Vec::new();
        let number = |x: f64| if x.fract() == 0.0 { format!("{x:.0}") } else { format!("{x}") };
        if let Some(s) = self.steps {
            fields.push(format!("Steps: {s}"));
        }
        if let Some(s) = &self.sampler {
            fields.push(format!("Sampler: {}", sampler_label(s)));
        }
        if let Some(s) = &self.scheduler {
            fields.push(format!("Schedule type: {}", scheduler_label(s)));
        }
        if let Some(c) = self.cfg {
            fields.push(format!("CFG scale: {}", number(c)));
        }
        if let Some(s) = self.seed {
            fields.push(format!("Seed: {s}"));
        }
        fields.push(format!("Size: {}x{}", self.size.0, self.size.1));
        if let Some(h) = &self.model_hash {
            fields.push(format!("Model hash: {h}"));
        }
        if let Some(m) = &self.model {
            let name = m.rsplit(['/', '\\']).next().unwrap_or(m);
            let stem = name.rsplit_once('.').map_or(name, |(s, _)| s);
            fields.push(format!("Model: {stem}"));
        }
        if let Some(d) = self.denoise.filter(|d| *d < 1.0) {
            fields.push(format!("Denoising strength: {}", number(d)));
        }
        fields.push(format!("Version: diffloom {}", env!("CARGO_PKG_VERSION")));
        out.push('\n');
        out.push_str(&fields.join(", "));
        out
    }
}

struct Walk<'a> {
    graph: &'a ResolvedGraph,
}

impl<'a> Walk<'a> {
    fn input(&self, node: usize, name: &str) -> Option<&'a ResolvedInput> {
        let n = &self.graph.nodes[node];
        n.entry.schema.inputs.iter().position(|s| s.name == name).map(|i| &n.inputs[i])
    }

    fn value(&self, node: usize, name: &str) -> Option<&'a Value> {
        match self.input(node, name)? {
            ResolvedInput::Value(v) => Some(v),
            _ => None,
        }
    }

    fn int(&self, node: usize, name: &str) -> Option<i128> {
        match self.value(node, name)? {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn float(&self, node: usize, name: &str) -> Option<f64> {
        match self.value(node, name)? {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    fn string(&self, node: usize, name: &str) -> Option<String> {
        match self.value(node, name)? {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn type_of(&self, node: usize) -> &'a str {
        &self.graph.nodes[node].entry.schema.name
    }

    /// The nearest node upstream of `from` (through any links, breadth first) whose type is one of
    /// `types`; with `input`, the search starts at that input only.
    fn upstream(&self, from: usize, input: Option<&str>, types: &[&str]) -> Option<usize> {
        let mut queue: VecDeque<usize> = VecDeque::new();
        let mut seen = vec![false; self.graph.nodes.len()];
        let push_inputs = |n: usize, only: Option<&str>, q: &mut VecDeque<usize>| {
            let node = &self.graph.nodes[n];
            for (spec, i) in node.entry.schema.inputs.iter().zip(&node.inputs) {
                if let (ResolvedInput::Link { node: src, .. }, true) = (i, only.is_none_or(|o| o == spec.name)) {
                    q.push_back(*src);
                }
            }
        };
        push_inputs(from, input, &mut queue);
        while let Some(n) = queue.pop_front() {
            if std::mem::replace(&mut seen[n], true) {
                continue;
            }
            if types.contains(&self.type_of(n)) {
                return Some(n);
            }
            push_inputs(n, None, &mut queue);
        }
        None
    }

    fn prompt(&self, node: usize, input: &str) -> Option<String> {
        self.upstream(node, Some(input), &["CLIPTextEncode"]).and_then(|t| self.string(t, "text"))
    }
}

/// The parameters of the image saved by node `save` (`size` in pixels), or `None` when no sampler is
/// upstream of it (an upscaled photo, say).
pub fn parameters(graph: &ResolvedGraph, save: usize, size: (u32, u32)) -> Option<Parameters> {
    let w = Walk { graph };
    let s = w.upstream(save, None, SAMPLER_NODES)?;
    let mut p = Parameters { size, ..Parameters::default() };
    // The guider holds the prompts and CFG in the custom-sampling form.
    let guider = match w.type_of(s) {
        "SamplerCustomAdvanced" => w.upstream(s, Some("guider"), &["CFGGuider", "BasicGuider", "DualCFGGuider", "PerpNegGuider"]),
        _ => None,
    };
    let conds = guider.unwrap_or(s);
    let (pos, neg) = match guider.map(|g| w.type_of(g)) {
        Some("DualCFGGuider") => ("cond1", "negative"),
        Some("BasicGuider") => ("conditioning", ""),
        _ => ("positive", "negative"),
    };
    p.positive = w.prompt(conds, pos).unwrap_or_default();
    p.negative = if neg.is_empty() { None } else { w.prompt(conds, neg) };
    p.cfg = w.float(conds, "cfg").or_else(|| w.float(conds, "cfg_conds"));
    let model_from = guider.unwrap_or(s);
    if let Some(ck) = w.upstream(model_from, Some("model"), &["CheckpointLoaderSimple"]) {
        p.model = w.string(ck, "ckpt_name");
    }
    match w.type_of(s) {
        "KSampler" => {
            p.seed = w.int(s, "seed");
            p.steps = w.int(s, "steps");
            p.sampler = w.string(s, "sampler_name");
            p.scheduler = w.string(s, "scheduler");
            p.denoise = w.float(s, "denoise");
        }
        "KSamplerAdvanced" => {
            p.seed = w.int(s, "noise_seed");
            p.steps = w.int(s, "steps");
            p.sampler = w.string(s, "sampler_name");
            p.scheduler = w.string(s, "scheduler");
        }
        _ => {
            p.seed = w.int(s, "noise_seed").or_else(|| w.upstream(s, Some("noise"), &["RandomNoise"]).and_then(|n| w.int(n, "noise_seed")));
            p.sampler = w.upstream(s, Some("sampler"), &["KSamplerSelect"]).and_then(|n| w.string(n, "sampler_name"));
            if let Some(sch) = w.upstream(s, Some("sigmas"), &["BasicScheduler", "KarrasScheduler", "ExponentialScheduler", "PolyexponentialScheduler"]) {
                p.steps = w.int(sch, "steps");
                p.scheduler = match w.type_of(sch) {
                    "BasicScheduler" => w.string(sch, "scheduler"),
                    "KarrasScheduler" => Some("karras".into()),
                    "ExponentialScheduler" => Some("exponential".into()),
                    _ => Some("polyexponential".into()),
                };
                p.denoise = w.float(sch, "denoise");
            }
        }
    }
    Some(p)
}
