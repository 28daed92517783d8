//! The two threads that own node registries (which are not `Send`): the validator, which checks posted
//! prompts and answers `object_info`, and the executor thread, which runs the queue with one executor
//! whose cache (models included) lives across prompts.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use diffloom_comfy::ImportError;
use diffloom_core::graph::GraphFile;
use diffloom_core::validate::validate;
use diffloom_core::{Executor, Observer, Registry, RunOptions, ValidationErrors, ValidationKind};
use serde_json::{json, Map, Value as Json};
use tokio::sync::oneshot;

use diffloom_nodes::models::taesd::TaesdDecoder;

use crate::messages::{Ending, Messages};
use crate::queue::{Job, Shared};

/// What the HTTP side asks of the thread that owns a registry.
pub enum ValidateRequest {
    /// A posted prompt: its graph and output node ids, or ComfyUI's 400 body.
    Prompt { prompt: Map<String, Json>, reply: oneshot::Sender<Result<(GraphFile, Vec<String>), Json>> },
    /// A RON graph file as a UI workflow for the canvas.
    ToUi { ron: PathBuf, reply: oneshot::Sender<Result<Json, String>> },
    /// A UI workflow from the canvas as a RON graph.
    FromUi { workflow: Vec<u8>, name: PathBuf, reply: oneshot::Sender<Result<GraphFile, String>> },
}

/// Where a prompt's relative paths resolve; it names the prompt in messages.
pub fn prompt_path(graphs: &Path, id: &str) -> PathBuf {
    graphs.join(format!("prompt {id}"))
}

/// Checks prompts until the server goes away.
pub fn validator(shared: Arc<Shared>, requests: Receiver<ValidateRequest>, ready: std::sync::mpsc::Sender<()>) {
    let registry = (shared.config.registry)();
    if let Ok(mut info) = shared.object_info.write() {
        *info = Arc::new(crate::object_info::object_info(&registry, &shared.config.folders));
    }
    let _ = ready.send(());
    let base = shared.config.graphs_dir.clone();
    while let Ok(req) = requests.recv() {
        match req {
            ValidateRequest::Prompt { prompt, reply } => {
                let _ = reply.send(check(&prompt, &registry, &prompt_path(&base, "")));
            }
            ValidateRequest::ToUi { ron, reply } => {
                let _ = reply.send(to_ui(&ron, &registry, &shared.config.folders));
            }
            ValidateRequest::FromUi { workflow, name, reply } => {
                let _ = reply.send(diffloom_comfy::import_bytes(&name, &workflow, &registry).map(|(g, _)| g).map_err(|e| e.to_string()));
            }
        }
    }
}

fn to_ui(ron: &Path, registry: &Registry, folders: &diffloom_core::Folders) -> Result<Json, String> {
    let (_, graph) = diffloom_core::graph::file::read(ron).map_err(|e| e.to_string())?;
    let graph_dir = ron.parent().unwrap_or(Path::new(""));
    let files = diffloom_core::Locator { graph_dir, folders, output_dir: Path::new("") };
    let model_name = |n: &str, i: &str, v: &str| diffloom_comfy::export::comfy_model_name(&files, n, i, v);
    diffloom_comfy::export::to_ui(&graph, registry, ron, &model_name).map_err(|e| e.to_string())
}

fn check(prompt: &Map<String, Json>, registry: &Registry, path: &Path) -> Result<(GraphFile, Vec<String>), Json> {
    let graph = diffloom_comfy::graph_from_prompt(prompt, registry, path).map_err(|e| import_error(prompt, e))?;
    let resolved = validate(path, &graph, registry).map_err(|e| validation_error(prompt, &graph, e))?;
    let outputs = resolved.nodes.iter().filter(|n| n.entry.schema.output_node).filter_map(|n| n.comfy_id.clone()).collect();
    Ok((graph, outputs))
}

fn error_body(kind: &str, message: &str, details: String, node_errors: Map<String, Json>) -> Json {
    json!({"error": {"type": kind, "message": message, "details": details, "extra_info": {}}, "node_errors": node_errors})
}

fn class_of(prompt: &Map<String, Json>, id: &str) -> Json {
    prompt.get(id).and_then(|n| n.get("class_type")).cloned().unwrap_or(Json::Null)
}

fn import_error(prompt: &Map<String, Json>, e: ImportError) -> Json {
    let mut node_errors = Map::new();
    match &e {
        ImportError::UnknownNodes { unknown, .. } => {
            for u in unknown {
                for (id, _) in &u.nodes {
                    let message = format!("Node type {:?} is not available in diffloom", u.class_type);
                    node_errors.insert(
                        id.clone(),
                        json!({"errors": [{"type": "invalid_prompt", "message": message, "details": e.to_string(), "extra_info": {}}], "dependent_outputs": [], "class_type": u.class_type}),
                    );
                }
            }
            let first = unknown.first().map(|u| u.class_type.clone()).unwrap_or_default();
            error_body("invalid_prompt", &format!("Cannot execute because node {first} does not exist."), e.to_string(), node_errors)
        }
        ImportError::Node { comfy_id, input, message, .. } => {
            node_errors.insert(
                comfy_id.clone(),
                json!({"errors": [{"type": "invalid_input_type", "message": message, "details": format!("{input}: {message}"), "extra_info": {"input_name": input}}],
                       "dependent_outputs": [], "class_type": class_of(prompt, comfy_id)}),
            );
            error_body("prompt_outputs_failed_validation", "Prompt outputs failed validation", e.to_string(), node_errors)
        }
        _ => error_body("invalid_prompt", "Invalid prompt", e.to_string(), node_errors),
    }
}

/// ComfyUI's error types for diffloom's validation problems, so the canvas highlights node and input.
fn validation_error(prompt: &Map<String, Json>, graph: &GraphFile, errors: ValidationErrors) -> Json {
    let mut node_errors = Map::new();
    let mut general = Vec::new();
    for e in &errors.0 {
        let comfy = e.node.as_ref().and_then(|n| graph.nodes.get(n)).and_then(|n| n.canvas.comfy_id.clone());
        let Some(id) = comfy else {
            general.push(e.to_string());
            continue;
        };
        let kind = match &e.kind {
            ValidationKind::MissingInput => "required_input_missing",
            ValidationKind::BelowMin { .. } => "value_smaller_than_min",
            ValidationKind::AboveMax { .. } => "value_bigger_than_max",
            ValidationKind::NotAChoice { .. } => "value_not_in_list",
            ValidationKind::TypeMismatch { .. } => "return_type_mismatch",
            ValidationKind::UnknownInput { .. } => "invalid_input_type",
            ValidationKind::UnknownLinkNode { .. } | ValidationKind::UnknownOutput { .. } => "bad_linked_input",
            _ => "invalid_prompt",
        };
        let input = e.input.clone().unwrap_or_default();
        let entry = node_errors.entry(id.clone()).or_insert_with(|| json!({"errors": [], "dependent_outputs": [], "class_type": class_of(prompt, &id)}));
        if let Some(list) = entry["errors"].as_array_mut() {
            list.push(json!({"type": kind, "message": e.kind.to_string(), "details": format!("{input}: {}", e.kind), "extra_info": {"input_name": input}}));
        }
    }
    if node_errors.is_empty() {
        let details = general.join("\n");
        let message = if errors.0.iter().any(|e| e.kind == ValidationKind::NoOutputNode) { "Prompt has no outputs" } else { "Invalid prompt" };
        return error_body(if message == "Prompt has no outputs" { "prompt_no_outputs" } else { "invalid_prompt" }, message, details, node_errors);
    }
    error_body("prompt_outputs_failed_validation", "Prompt outputs failed validation", general.join("\n"), node_errors)
}

/// Turns the executor's events into ComfyUI's messages for the prompt's client.
struct Relay {
    m: Messages,
    /// diffloom node id → ComfyUI node id.
    ids: Vec<(String, String)>,
    previews: bool,
    /// TAESD's decoder when the preview method asks for it and its weights are present.
    taesd: Option<Arc<Mutex<TaesdDecoder>>>,
}

impl Relay {
    fn comfy(&self, id: &str) -> String {
        comfy_id(&self.ids, id)
    }
}

/// The ComfyUI id of diffloom node `id` (itself when the graph did not come from ComfyUI).
pub(crate) fn comfy_id(ids: &[(String, String)], id: &str) -> String {
    ids.iter().find(|(d, _)| d == id).map_or_else(|| id.to_owned(), |(_, c)| c.clone())
}

impl Observer for Relay {
    fn cached(&self, ids: &[&str]) {
        self.m.cached(ids.iter().map(|i| self.comfy(i)).collect());
    }
    fn executing(&self, id: &str) {
        self.m.executing(&self.comfy(id));
    }
    fn progress(&self, id: &str, value: u64, max: u64) {
        self.m.progress(&self.comfy(id), value, max);
    }
    fn wants_previews(&self) -> bool {
        self.previews
    }
    fn preview(&self, id: &str, latent: &tch::Tensor) {
        let jpeg = match &self.taesd {
            Some(t) => t.lock().ok().and_then(|t| taesd_preview(&t, latent)),
            None => latent_preview(latent),
        };
        if let Some(jpeg) = jpeg {
            self.m.preview(&self.comfy(id), jpeg);
        }
    }
    fn executed(&self, id: &str, ui: &Map<String, Json>) {
        self.m.executed(&self.comfy(id), ui);
    }
}

/// ComfyUI's latent-to-RGB factors for SD 1.x/2.x latents (`latent_formats.SD15`), one row per channel.
const LATENT_RGB: [[f32; 3]; 4] = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]];

/// A cheap preview of a denoised latent, as ComfyUI's Latent2RGBPreviewer: the first image's channels
/// mixed to RGB by [`LATENT_RGB`], mapped from -1..1 to 0..255, as a JPEG at latent resolution.
pub fn latent_preview(latent: &tch::Tensor) -> Option<Vec<u8>> {
    let x = latent.f_get(0).ok()?.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    if x.size().first() != Some(&4) {
        return None;
    }
    let flat: Vec<f32> = LATENT_RGB.iter().flatten().copied().collect();
    let factors = tch::Tensor::from_slice(&flat).view([4, 3]);
    jpeg(&x.permute([1, 2, 0]).matmul(&factors))
}

/// A TAESD preview: the decoder's image of the first latent, as ComfyUI's TAESD previewer, as a JPEG.
fn taesd_preview(decoder: &TaesdDecoder, latent: &tch::Tensor) -> Option<Vec<u8>> {
    let _no_grad = tch::no_grad_guard();
    let x = latent.f_narrow(0, 0, 1).ok()?.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    let image = decoder.forward(&x).get(0).permute([1, 2, 0]);
    jpeg(&image)
}

/// HWC values in -1..1 as a JPEG, as ComfyUI's `preview_to_image`.
fn jpeg(hwc: &tch::Tensor) -> Option<Vec<u8>> {
    let bytes = ((hwc + 1.0) / 2.0).clamp(0.0, 1.0).multiply_scalar(255.0).to_kind(tch::Kind::Uint8).contiguous();
    let (h, w) = (bytes.size()[0] as u32, bytes.size()[1] as u32);
    let data = Vec::<u8>::try_from(bytes.view([-1])).ok()?;
    let img = image::RgbImage::from_raw(w, h, data)?;
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95).encode_image(&img).ok()?;
    Some(out.into_inner())
}

/// The TAESD decoder file in the `vae_approx` folders (`taesd_decoder.*`), as ComfyUI looks for it.
fn taesd_file(folders: &diffloom_core::Folders) -> Option<PathBuf> {
    folders.dirs("vae_approx").find_map(|d| {
        let mut names: Vec<PathBuf> = std::fs::read_dir(d).ok()?.flatten().map(|e| e.path()).collect();
        names.sort();
        names.into_iter().find(|p| p.is_file() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("taesd_decoder")))
    })
}

/// Runs queued prompts one at a time until the server goes away.
pub fn executor(shared: Arc<Shared>) {
    let registry = (shared.config.registry)();
    let mut options = RunOptions::new(shared.config.device, shared.config.output_dir.clone());
    options.dtype = shared.config.dtype;
    options.folders = shared.config.folders.clone();
    options.cancel = shared.cancel.clone();
    options.image_texts = Some(diffloom_comfy::metadata::image_texts(shared.config.folders.clone()));
    let mut exec = Executor::new(options, shared.config.cache_bytes);
    // Loaded on first use, kept for the server's life (None inside: no weights, or they did not load).
    let mut taesd: Option<Option<Arc<Mutex<TaesdDecoder>>>> = None;
    loop {
        let job = {
            let Ok(mut state) = shared.state.lock() else { return };
            loop {
                if state.free {
                    state.free = false;
                    exec.cache.clear();
                }
                if !state.pending.is_empty() {
                    // Lowest number first (a prompt queued "front" has a negative one).
                    let i = (0..state.pending.len()).min_by(|&a, &b| state.pending[a].number.total_cmp(&state.pending[b].number)).unwrap_or(0);
                    let job = state.pending.remove(i);
                    state.running.push(job.clone());
                    break job;
                }
                state = match shared.wake.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
        };
        shared.queue_updated();
        let method = preview_method(&shared, &job);
        let decoder = if method == "taesd" || method == "auto" {
            taesd
                .get_or_insert_with(|| {
                    let file = taesd_file(&shared.config.folders)?;
                    match diffloom_nodes::checkpoint::load::load_taesd(&file, tch::Device::Cpu) {
                        Ok(d) => Some(Arc::new(Mutex::new(d))),
                        Err(e) => {
                            tracing::warn!("TAESD previews off: {e}");
                            None
                        }
                    }
                })
                .clone()
        } else {
            None
        };
        run_job(&shared, &registry, &mut exec, &job, decoder);
        if let Ok(mut state) = shared.state.lock() {
            state.running.retain(|j| j.id != job.id);
        }
        shared.queue_updated();
    }
}

/// The prompt's preview method (the frontend's setting) unless "default", else the server's, as ComfyUI.
pub(crate) fn preview_method(shared: &Shared, job: &Job) -> String {
    job.extra.get("preview_method").and_then(Json::as_str).filter(|m| *m != "default").unwrap_or(&shared.config.preview_method).to_owned()
}

fn run_job(shared: &Arc<Shared>, registry: &Registry, exec: &mut Executor, job: &Job, taesd: Option<Arc<Mutex<TaesdDecoder>>>) {
    let path = prompt_path(&shared.config.graphs_dir, &job.id);
    shared.cancel.store(false, Ordering::SeqCst);
    let m = Messages::new(shared.clone(), job);
    m.start();
    let resolved = match validate(&path, &job.graph, registry) {
        Ok(r) => r,
        Err(e) => {
            let ending = Ending::Error { node: None, node_type: None, message: e.to_string(), exception_type: "ValidationError".into(), traceback: vec![] };
            return m.end(job, ending);
        }
    };
    let ids: Vec<(String, String)> = resolved.nodes.iter().map(|n| (n.id.clone(), n.comfy_id.clone().unwrap_or_else(|| n.id.clone()))).collect();
    let previews = preview_method(shared, job) != "none";
    let relay = Arc::new(Relay { m, ids, previews, taesd });
    exec.options.observer = Some(relay.clone());
    let report = exec.run(&resolved);
    exec.options.observer = None;
    let ending = match report.error {
        None => Ending::Success,
        Some(e) if matches!(e.cause, diffloom_core::NodeError::Cancelled) => {
            Ending::Interrupted { node: Some(relay.comfy(&e.node)), node_type: Some(e.node_type.clone()) }
        }
        Some(e) => Ending::Error {
            node: Some(relay.comfy(&e.node)),
            node_type: Some(e.node_type.clone()),
            message: e.cause.to_string(),
            exception_type: "diffloom.NodeError".into(),
            traceback: vec![e.to_string()],
        },
    };
    relay.m.end(job, ending);
}
