//! The HTTP routes ComfyUI's frontend and API clients call, each registered with and without the `/api`
//! prefix as ComfyUI registers them, and the frontend's static files.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::queue::{Job, Shared};
use crate::security::{confine, guard};
use crate::worker::ValidateRequest;

type S = State<Arc<Shared>>;

fn api() -> Router<Arc<Shared>> {
    Router::new()
        .route("/object_info", get(object_info))
        .route("/object_info/{node}", get(object_info_node))
        .route("/prompt", get(prompt_info).post(post_prompt))
        .route("/queue", get(queue).post(post_queue))
        .route("/history", get(history).post(post_history))
        .route("/history/{id}", get(history_one))
        .route("/interrupt", post(interrupt))
        .route("/free", post(free))
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/upload/mask", post(upload_mask))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/extensions", get(|| async { Json(json!([])) }))
        .route("/embeddings", get(embeddings))
        .route("/models", get(model_folders))
        .route("/models/{folder}", get(model_files))
        .route("/users", get(|| async { Json(json!({"storage": "server", "migrated": true})) }))
        .route("/workflow_templates", get(|| async { Json(json!({})) }))
        .route("/i18n", get(|| async { Json(json!({})) }))
        .route("/experiment/models", get(experiment_models))
        .route("/experiment/models/{folder}", get(experiment_model_files))
        .route("/jobs", get(jobs))
        .route("/jobs/{id}", get(job))
        .route("/settings", get(settings).post(post_settings))
        .route("/settings/{id}", get(setting).post(post_setting))
        .route("/ws", get(crate::ws::handler))
        .route("/userdata", get(crate::userdata::list))
        .route("/userdata/{file}", get(crate::userdata::read).post(crate::userdata::write).delete(crate::userdata::delete))
        .route("/userdata/{file}/move/{dest}", post(crate::userdata::rename))
        .route("/templates/index.json", get(crate::userdata::templates))
        .route("/templates/{file}", get(crate::userdata::template))
}

/// Every route, with and without `/api`, the static frontend as the fallback, behind the guard.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_body;
    Router::new()
        .nest("/api", api())
        .merge(api())
        .fallback(get(frontend))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn object_info(State(s): S) -> Response {
    let info = s.object_info.read().map(|i| i.clone()).unwrap_or_default();
    Json((*info).clone()).into_response()
}

async fn object_info_node(State(s): S, UrlPath(node): UrlPath<String>) -> Response {
    let info = s.object_info.read().map(|i| i.clone()).unwrap_or_default();
    let mut out = Map::new();
    if let Some(n) = info.get(&node) {
        out.insert(node, n.clone());
    }
    Json(Value::Object(out)).into_response()
}

async fn prompt_info(State(s): S) -> Json<Value> {
    Json(s.queue_info())
}

/// `POST /prompt`: validates on the validator thread, then queues; a bad prompt gets ComfyUI's 400 body
/// (`error` and per-node `node_errors`) so the canvas highlights the node and input.
async fn post_prompt(State(s): S, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let Some(prompt) = body.get("prompt").and_then(Value::as_object).cloned() else {
        let e = json!({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}});
        return (StatusCode::BAD_REQUEST, Json(json!({"error": e, "node_errors": {}}))).into_response();
    };
    let (reply, answer) = oneshot::channel();
    let sent = s.validator.lock().map(|v| v.send(ValidateRequest::Prompt { prompt: prompt.clone(), reply }).is_ok()).unwrap_or(false);
    let checked = match (sent, answer.await) {
        (true, Ok(r)) => r,
        _ => return error(StatusCode::SERVICE_UNAVAILABLE, "the validator is not running"),
    };
    let (graph, outputs) = match checked {
        Ok(v) => v,
        Err(body) => return (StatusCode::BAD_REQUEST, Json(body)).into_response(),
    };
    let mut extra = body.get("extra_data").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
    let client_id = body.get("client_id").and_then(Value::as_str).map(str::to_owned);
    if let Some(c) = &client_id {
        extra["client_id"] = json!(c);
    }
    extra["create_time"] = json!(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0));
    let id = body.get("prompt_id").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let number = {
        let Ok(mut state) = s.state.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, "queue unavailable") };
        // Cancelling, history and (with --queue) the relayed messages all go by the id.
        if state.pending.iter().chain(state.running.iter()).any(|j| j.id == id) {
            return error(StatusCode::BAD_REQUEST, format!("prompt_id {id:?} is already queued"));
        }
        let number = match body.get("number").and_then(Value::as_f64) {
            Some(n) => n,
            None => {
                let n = state.counter;
                state.counter += 1.0;
                if body.get("front").and_then(Value::as_bool) == Some(true) {
                    -n
                } else {
                    n
                }
            }
        };
        state.pending.push(Job { number, id: id.clone(), prompt, extra, outputs, graph, client_id });
        number
    };
    s.wake.notify_all();
    s.queue_updated();
    Json(json!({"prompt_id": id, "number": crate::queue::number(number), "node_errors": {}})).into_response()
}

async fn queue(State(s): S) -> Response {
    let Ok(state) = s.state.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, "queue unavailable") };
    let running: Vec<Value> = state.running.iter().map(Job::item).collect();
    let pending: Vec<Value> = state.pending.iter().map(Job::item).collect();
    Json(json!({"queue_running": running, "queue_pending": pending})).into_response()
}

#[derive(Deserialize)]
struct QueueEdit {
    #[serde(default)]
    clear: bool,
    #[serde(default)]
    delete: Vec<String>,
}

/// `POST /queue`: `{"clear": true}` or `{"delete": [ids]}` (how a queued prompt is cancelled; with
/// `--queue`, its job is dropped from the queue too).
async fn post_queue(State(s): S, body: Bytes) -> Response {
    let Ok(edit) = serde_json::from_slice::<QueueEdit>(&body) else { return error(StatusCode::BAD_REQUEST, "expected {\"clear\": bool, \"delete\": [ids]}") };
    let mut dropped = Vec::new();
    if let Ok(mut state) = s.state.lock() {
        state.pending.retain(|j| {
            let keep = !edit.clear && !edit.delete.contains(&j.id);
            if !keep {
                dropped.push(j.id.clone());
            }
            keep
        });
    }
    if let Some(remote) = s.remote.clone() {
        let _ = tokio::task::spawn_blocking(move || remote.cancel(&dropped)).await;
    }
    s.queue_updated();
    StatusCode::OK.into_response()
}

#[derive(Deserialize)]
struct HistoryQuery {
    max_items: Option<usize>,
    offset: Option<usize>,
}

async fn history(State(s): S, Query(q): Query<HistoryQuery>) -> Response {
    let Ok(state) = s.state.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, "history unavailable") };
    let n = state.history.len();
    let offset = q.offset.unwrap_or(0).min(n);
    let take = q.max_items.unwrap_or(n);
    let out: Map<String, Value> = state.history.iter().skip(offset).take(take).map(|(k, v)| (k.clone(), v.clone())).collect();
    Json(Value::Object(out)).into_response()
}

async fn history_one(State(s): S, UrlPath(id): UrlPath<String>) -> Response {
    let Ok(state) = s.state.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, "history unavailable") };
    let out: Map<String, Value> = state.history.iter().filter(|(k, _)| *k == id).map(|(k, v)| (k.clone(), v.clone())).collect();
    Json(Value::Object(out)).into_response()
}

async fn post_history(State(s): S, body: Bytes) -> Response {
    let Ok(edit) = serde_json::from_slice::<QueueEdit>(&body) else { return error(StatusCode::BAD_REQUEST, "expected {\"clear\": bool, \"delete\": [ids]}") };
    if let Ok(mut state) = s.state.lock() {
        if edit.clear {
            state.history.clear();
        }
        state.history.retain(|(id, _)| !edit.delete.contains(id));
    }
    StatusCode::OK.into_response()
}

/// `POST /interrupt`: stops the running prompt (or only the one named by `prompt_id`); with `--queue`,
/// every running prompt (or the one named) on its worker.
async fn interrupt(State(s): S, body: Bytes) -> Response {
    let wanted = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v.get("prompt_id").and_then(Value::as_str).map(str::to_owned));
    let running: Vec<String> = s.state.lock().map(|st| st.running.iter().map(|j| j.id.clone()).collect()).unwrap_or_default();
    let stop: Vec<String> = running.into_iter().filter(|id| wanted.as_ref().is_none_or(|w| w == id)).collect();
    match s.remote.clone() {
        Some(remote) => {
            let _ = tokio::task::spawn_blocking(move || remote.cancel(&stop)).await;
        }
        None if !stop.is_empty() || wanted.is_none() => s.cancel.store(true, Ordering::SeqCst),
        None => {}
    }
    StatusCode::OK.into_response()
}

async fn free(State(s): S, body: Bytes) -> Response {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if v.get("unload_models").and_then(Value::as_bool) == Some(true) || v.get("free_memory").and_then(Value::as_bool) == Some(true) {
        if let Ok(mut state) = s.state.lock() {
            state.free = true;
        }
    }
    StatusCode::OK.into_response()
}

#[derive(Deserialize)]
struct ViewQuery {
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

fn dir_of(s: &Shared, kind: Option<&str>) -> Option<PathBuf> {
    match kind.unwrap_or("output") {
        "output" => Some(s.config.output_dir.clone()),
        "input" => Some(s.config.folders.input_dir.clone()),
        "temp" => Some(s.config.folders.temp_dir.clone()),
        _ => None,
    }
}

/// The content type for a served user file: images and a few safe kinds inline; anything that a
/// browser would run (HTML, JavaScript, SVG) only as a download.
fn user_file_type(path: &Path) -> (&'static str, bool) {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => ("image/png", true),
        Some("jpg" | "jpeg") => ("image/jpeg", true),
        Some("webp") => ("image/webp", true),
        Some("gif") => ("image/gif", true),
        Some("json") => ("application/json", true),
        _ => ("application/octet-stream", false),
    }
}

/// `GET /view`: a file of the output, input or temp directory, never one outside them.
async fn view(State(s): S, Query(q): Query<ViewQuery>) -> Response {
    let Some(dir) = dir_of(&s, q.kind.as_deref()) else { return error(StatusCode::BAD_REQUEST, "type must be output, input or temp") };
    // ComfyUI accepts "name [output]" style names here too.
    let (name, dir) = match q.filename.rsplit_once(" [") {
        Some((n, k)) if k.ends_with(']') => (n.to_owned(), dir_of(&s, Some(&k[..k.len() - 1])).unwrap_or(dir)),
        _ => (q.filename.clone(), dir),
    };
    let Some(path) = confine(&dir, &q.subfolder, &name) else { return error(StatusCode::FORBIDDEN, "the file is outside the served directories") };
    let Ok(bytes) = tokio::fs::read(&path).await else { return error(StatusCode::NOT_FOUND, "no such file") };
    let (ty, inline) = user_file_type(&path);
    let disposition = format!("{}; filename=\"{}\"", if inline { "inline" } else { "attachment" }, name.replace('"', ""));
    ([(header::CONTENT_TYPE, ty.to_owned()), (header::CONTENT_DISPOSITION, disposition), (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned())], bytes)
        .into_response()
}

/// `POST /upload/image`: multipart `image`, optional `subfolder`, `type`, `overwrite`; answers
/// `{name, subfolder, type}`. Only images are accepted; names stay in their folder.
async fn upload_image(state: S, form: Multipart) -> Response {
    upload(state, form, false).await
}

/// `POST /upload/mask`: as ComfyUI's, the uploaded image's alpha put into the image `original_ref`
/// names (`{filename, subfolder, type}`), saved as PNG under the upload's name.
async fn upload_mask(state: S, form: Multipart) -> Response {
    upload(state, form, true).await
}

/// The original image with the mask's alpha channel, as PNG bytes.
fn masked(original: &Path, mask: &[u8]) -> Result<Vec<u8>, String> {
    let mut img = image::open(original).map_err(|e| format!("cannot read the original image: {e}"))?.to_rgba8();
    let mask = image::load_from_memory(mask).map_err(|e| format!("cannot read the mask: {e}"))?.to_rgba8();
    if mask.dimensions() != img.dimensions() {
        return Err(format!("the mask is {:?}, the image {:?}", mask.dimensions(), img.dimensions()));
    }
    for (p, m) in img.pixels_mut().zip(mask.pixels()) {
        p.0[3] = m.0[3];
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

async fn upload(State(s): S, mut form: Multipart, mask: bool) -> Response {
    let (mut data, mut filename, mut subfolder, mut kind, mut overwrite) = (None, String::new(), String::new(), None, false);
    let mut original: Option<Value> = None;
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("malformed upload: {e}")),
        };
        let name = field.name().unwrap_or("").to_owned();
        if name == "image" {
            filename = field.file_name().unwrap_or("").to_owned();
            match field.bytes().await {
                Ok(b) => data = Some(b),
                Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("upload refused: {e}")),
            }
        } else {
            let text = field.text().await.unwrap_or_default();
            match name.as_str() {
                "subfolder" => subfolder = text,
                "type" => kind = Some(text),
                "overwrite" => overwrite = text == "true" || text == "1",
                "original_ref" => original = serde_json::from_str(&text).ok(),
                _ => {}
            }
        }
    }
    let Some(mut data) = data else { return error(StatusCode::BAD_REQUEST, "no image field") };
    if mask {
        let Some(r) = original else { return error(StatusCode::BAD_REQUEST, "a mask upload needs original_ref {filename, subfolder, type}") };
        let name = r["filename"].as_str().unwrap_or("");
        let (name, dir) = match name.rsplit_once(" [") {
            Some((n, k)) if k.ends_with(']') => (n, dir_of(&s, Some(&k[..k.len() - 1]))),
            _ => (name, dir_of(&s, Some(r["type"].as_str().unwrap_or("output")))),
        };
        let Some(dir) = dir else { return error(StatusCode::BAD_REQUEST, "original_ref: type must be input, output or temp") };
        let Some(path) = confine(&dir, r["subfolder"].as_str().unwrap_or(""), name).filter(|p| p.is_file()) else {
            return error(StatusCode::FORBIDDEN, "original_ref: no such image in the served directories");
        };
        data = match masked(&path, &data) {
            Ok(png) => Bytes::from(png),
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
    }
    if !matches!(user_file_type(Path::new(&filename)), (_, true)) || filename.ends_with(".json") {
        return error(StatusCode::BAD_REQUEST, "only PNG, JPEG, WebP and GIF images are accepted");
    }
    let kind = kind.unwrap_or_else(|| "input".to_owned());
    let Some(dir) = dir_of(&s, Some(&kind)) else { return error(StatusCode::BAD_REQUEST, "type must be input, output or temp") };
    if tokio::fs::create_dir_all(dir.join(&subfolder)).await.is_err() && confine(&dir, &subfolder, "x").is_none() {
        return error(StatusCode::FORBIDDEN, "the folder is outside the served directories");
    }
    let Some(mut path) = confine(&dir, &subfolder, &filename) else { return error(StatusCode::FORBIDDEN, "the name leaves the served directories") };
    // An existing file with other content is kept: the upload gets a new name, as ComfyUI does.
    if !overwrite {
        let (stem, ext) = filename.rsplit_once('.').map(|(a, b)| (a.to_owned(), b.to_owned())).unwrap_or((filename.clone(), String::new()));
        let mut k = 1;
        while let Ok(existing) = tokio::fs::read(&path).await {
            if existing == data {
                break;
            }
            filename = format!("{stem} ({k}).{ext}");
            path = match confine(&dir, &subfolder, &filename) {
                Some(p) => p,
                None => return error(StatusCode::FORBIDDEN, "the name leaves the served directories"),
            };
            k += 1;
        }
    }
    if let Err(e) = tokio::fs::write(&path, &data).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot save the upload: {e}"));
    }
    Json(json!({"name": filename, "subfolder": subfolder, "type": kind})).into_response()
}

async fn system_stats() -> Json<Value> {
    let (total, free) = memory();
    let devices = if tch::Cuda::is_available() {
        (0..tch::Cuda::device_count()).map(|i| json!({"name": format!("cuda:{i}"), "type": "cuda", "index": i, "vram_total": 0, "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0})).collect()
    } else {
        vec![json!({"name": "cpu", "type": "cpu", "index": null, "vram_total": total, "vram_free": free, "torch_vram_total": total, "torch_vram_free": free})]
    };
    Json(json!({
        "system": {
            "os": std::env::consts::OS,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": "0.8.0",
            "python_version": format!("diffloom {}", env!("CARGO_PKG_VERSION")),
            "pytorch_version": diffloom_aten_version(),
            "embedded_python": false,
            "argv": std::env::args().collect::<Vec<_>>(),
        },
        "devices": devices,
    }))
}

fn diffloom_aten_version() -> String {
    "libtorch".to_owned()
}

/// (total, available) memory from /proc/meminfo, in bytes.
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field =
        |k: &str| text.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
    (field("MemTotal:"), field("MemAvailable:"))
}

async fn features(State(s): S) -> Json<Value> {
    Json(json!({"supports_preview_metadata": true, "max_upload_size": s.config.max_body}))
}

async fn embeddings(State(s): S) -> Json<Value> {
    let mut names = Vec::new();
    for dir in s.config.folders.dirs("embeddings") {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_file() {
                    if let Some(stem) = p.file_stem() {
                        names.push(stem.to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    names.sort();
    names.dedup();
    Json(json!(names))
}

async fn model_folders(State(s): S) -> Json<Value> {
    let mut names: Vec<String> = s.config.folders.models.iter().map(|(f, _)| f.clone()).collect();
    names.sort();
    names.dedup();
    Json(json!(names))
}

async fn model_files(State(s): S, UrlPath(folder): UrlPath<String>) -> Response {
    let dirs: Vec<PathBuf> = s.config.folders.dirs(&folder).map(Path::to_path_buf).collect();
    if dirs.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("no model folder {folder:?}"));
    }
    let mut files = Vec::new();
    for d in &dirs {
        list_files(d, d, &mut files, 0);
    }
    files.sort();
    Json(json!(files)).into_response()
}

/// `GET /experiment/models`: the model folders and their directories (the model library's sidebar).
async fn experiment_models(State(s): S) -> Json<Value> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (folder, dir) in &s.config.folders.models {
        match out.iter_mut().find(|(f, _)| f == folder) {
            Some((_, dirs)) => dirs.push(dir.display().to_string()),
            None => out.push((folder.clone(), vec![dir.display().to_string()])),
        }
    }
    Json(json!(out.into_iter().map(|(name, folders)| json!({"name": name, "folders": folders})).collect::<Vec<_>>()))
}

/// `GET /experiment/models/{folder}`: `[{name, pathIndex}]`, as ComfyUI's model manager lists them.
async fn experiment_model_files(State(s): S, UrlPath(folder): UrlPath<String>) -> Response {
    let dirs: Vec<PathBuf> = s.config.folders.dirs(&folder).map(Path::to_path_buf).collect();
    if dirs.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("no model folder {folder:?}"));
    }
    let mut out = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let mut files = Vec::new();
        list_files(d, d, &mut files, 0);
        files.sort();
        out.extend(files.into_iter().map(|f| json!({"name": f, "pathIndex": i})));
    }
    Json(json!(out)).into_response()
}

/// One job as ComfyUI's `/api/jobs` lists it.
fn job_json(id: &str, status: &str, item: &Value, entry: Option<&Value>) -> Value {
    let create_time = item.get(3).and_then(|e| e.get("create_time")).cloned().unwrap_or(Value::Null);
    let outputs = entry.and_then(|e| e.get("outputs")).cloned().unwrap_or_else(|| json!({}));
    let preview = outputs
        .as_object()
        .and_then(|o| {
            o.iter().find_map(|(node, out)| {
                out["images"].get(0).map(|img| json!({"node_id": node, "filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]}))
            })
        })
        .unwrap_or(Value::Null);
    json!({"id": id, "status": status, "priority": item.get(0), "create_time": create_time, "outputs_count": outputs.as_object().map_or(0, |o| o.len()), "preview_output": preview, "workflow_id": null})
}

#[derive(Deserialize)]
struct JobsQuery {
    status: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// `GET /api/jobs`: running, pending and finished prompts, newest first (`status` filters, comma-separated).
async fn jobs(State(s): S, Query(q): Query<JobsQuery>) -> Response {
    let Ok(state) = s.state.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, "queue unavailable") };
    let mut all = Vec::new();
    for j in state.running.iter() {
        all.push(job_json(&j.id, "in_progress", &j.item(), None));
    }
    for j in state.pending.iter() {
        all.push(job_json(&j.id, "pending", &j.item(), None));
    }
    for (id, entry) in state.history.iter().rev() {
        let status = if entry["status"]["status_str"] == "success" { "completed" } else { "failed" };
        all.push(job_json(id, status, &entry["prompt"], Some(entry)));
    }
    if let Some(wanted) = &q.status {
        let wanted: Vec<&str> = wanted.split(',').collect();
        all.retain(|j| j["status"].as_str().is_some_and(|s| wanted.contains(&s)));
    }
    let total = all.len();
    let offset = q.offset.unwrap_or(0).min(total);
    let limit = q.limit.unwrap_or(total);
    let jobs: Vec<Value> = all.into_iter().skip(offset).take(limit).collect();
    let has_more = offset + jobs.len() < total;
    Json(json!({"jobs": jobs, "pagination": {"offset": offset, "limit": limit, "total": total, "has_more": has_more}})).into_response()
}

/// `GET /api/jobs/{id}`: one job with its outputs and workflow.
async fn job(State(s): S, UrlPath(id): UrlPath<String>) -> Response {
    let Ok(state) = s.state.lock() else { return error(StatusCode::INTERNAL_SERVER_ERROR, "queue unavailable") };
    if let Some((_, entry)) = state.history.iter().find(|(k, _)| *k == id) {
        let status = if entry["status"]["status_str"] == "success" { "completed" } else { "failed" };
        let mut j = job_json(&id, status, &entry["prompt"], Some(entry));
        j["outputs"] = entry["outputs"].clone();
        j["workflow"] = json!({"prompt": entry["prompt"].get(2), "extra_data": entry["prompt"].get(3)});
        return Json(j).into_response();
    }
    let live = state.running.iter().map(|j| (j, "in_progress")).chain(state.pending.iter().map(|j| (j, "pending"))).find(|(j, _)| j.id == id);
    match live {
        Some((j, status)) => Json(job_json(&j.id, status, &j.item(), None)).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such job"),
    }
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && depth < 8 {
            list_files(root, &p, out, depth + 1);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
        }
    }
}

fn settings_file(s: &Shared) -> PathBuf {
    s.config.user_dir.join("comfy.settings.json")
}

fn read_settings(s: &Shared) -> Map<String, Value> {
    std::fs::read(settings_file(s)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn write_settings(s: &Shared, settings: &Map<String, Value>) -> Response {
    let path = settings_file(s);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, serde_json::to_vec_pretty(settings).unwrap_or_default()) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot save settings: {e}")),
    }
}

async fn settings(State(s): S) -> Json<Value> {
    Json(Value::Object(read_settings(&s)))
}

async fn post_settings(State(s): S, body: Bytes) -> Response {
    let Ok(Value::Object(new)) = serde_json::from_slice::<Value>(&body) else { return error(StatusCode::BAD_REQUEST, "expected a JSON object") };
    let mut all = read_settings(&s);
    all.extend(new);
    write_settings(&s, &all)
}

async fn setting(State(s): S, UrlPath(id): UrlPath<String>) -> Json<Value> {
    Json(read_settings(&s).get(&id).cloned().unwrap_or(Value::Null))
}

async fn post_setting(State(s): S, UrlPath(id): UrlPath<String>, body: Bytes) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else { return error(StatusCode::BAD_REQUEST, "expected JSON") };
    let mut all = read_settings(&s);
    all.insert(id, v);
    write_settings(&s, &all)
}

/// The frontend's static files (`index.html` for `/`), with their MIME types.
async fn frontend(State(s): S, uri: Uri) -> Response {
    let Some(root) = &s.config.frontend_root else {
        return (StatusCode::NOT_FOUND, "diffloom serve: no frontend (install comfyui-frontend-package or pass --front-end-root)").into_response();
    };
    let path = uri.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    let found = match confine(root, "", path) {
        Some(file) => tokio::fs::read(&file).await.ok().map(|b| (file, b)),
        None => None,
    };
    let Some((file, bytes)) = found else {
        tracing::info!("diffloom serve: no route or file for {}", uri.path());
        return error(StatusCode::NOT_FOUND, "not found");
    };
    let mime = mime_guess::from_path(&file).first_or_octet_stream();
    ([(header::CONTENT_TYPE, mime.to_string())], bytes).into_response()
}
