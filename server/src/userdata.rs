//! ComfyUI's user-data routes. `workflows/` is the graphs directory: its RON graphs are listed as
//! `name.json`, opened as UI workflows and saved back as RON (ids, parameters, titles, notes and canvas
//! positions kept; a hand-written `//` comment of the file being replaced is kept as a graph note).
//! Everything else lives in the user directory, confined to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::queue::Shared;
use crate::security::confine;
use crate::worker::ValidateRequest;

type S = State<Arc<Shared>>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

#[derive(Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    dir: String,
    #[serde(default)]
    recurse: Option<String>,
    #[serde(default)]
    full_info: Option<String>,
    #[serde(default)]
    split: Option<String>,
}

fn yes(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// ComfyUI's `get_file_info`.
fn info(path: &Path, shown: &str) -> Value {
    let meta = std::fs::metadata(path).ok();
    let time = |t: Option<std::time::SystemTime>| t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64());
    json!({
        "path": shown,
        "size": meta.as_ref().map_or(0, |m| m.len()),
        "modified": time(meta.as_ref().and_then(|m| m.modified().ok())),
        "created": time(meta.as_ref().and_then(|m| m.created().ok())),
    })
}

fn walk(root: &Path, dir: &Path, recurse: bool, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if recurse && depth < 8 && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                walk(root, &p, recurse, out, depth + 1);
            }
        } else if p.is_file() {
            out.push(p.strip_prefix(root).map(Path::to_path_buf).unwrap_or(p));
        }
    }
}

fn slashes(p: &Path) -> String {
    p.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// `GET /userdata?dir=…`: `workflows` lists the graphs directory's RON graphs as `.json` workflows.
pub async fn list(State(s): S, Query(q): Query<ListQuery>) -> Response {
    if q.dir.is_empty() {
        return error(StatusCode::BAD_REQUEST, "Directory not provided");
    }
    let recurse = yes(&q.recurse);
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    if q.dir == "workflows" || q.dir == "workflows/" {
        let mut found = Vec::new();
        walk(&s.config.graphs_dir, &s.config.graphs_dir, recurse, &mut found, 0);
        for rel in found.into_iter().filter(|r| r.extension().is_some_and(|e| e == "ron")) {
            files.push((s.config.graphs_dir.join(&rel), slashes(&rel.with_extension("json"))));
        }
    } else {
        let Some(dir) = confine(&s.config.user_dir, "", &q.dir) else { return error(StatusCode::FORBIDDEN, "Invalid directory") };
        if !dir.is_dir() {
            return error(StatusCode::NOT_FOUND, "Directory not found");
        }
        let mut found = Vec::new();
        walk(&dir, &dir, recurse, &mut found, 0);
        files.extend(found.into_iter().map(|rel| (dir.join(&rel), slashes(&rel))));
    }
    files.sort_by(|a, b| a.1.cmp(&b.1));
    let out: Vec<Value> = files
        .iter()
        .map(|(full, shown)| {
            if yes(&q.full_info) {
                info(full, shown)
            } else if yes(&q.split) {
                let mut parts = vec![json!(shown)];
                parts.extend(shown.split('/').map(|p| json!(p)));
                Value::Array(parts)
            } else {
                json!(shown)
            }
        })
        .collect();
    Json(Value::Array(out)).into_response()
}

/// The RON graph a `workflows/NAME.json` user-data path stands for.
fn graph_for(s: &Shared, file: &str) -> Option<Result<PathBuf, Response>> {
    let rest = file.strip_prefix("workflows/")?;
    let stem = rest.strip_suffix(".json")?;
    Some(confine(&s.config.graphs_dir, "", &format!("{stem}.ron")).ok_or_else(|| error(StatusCode::FORBIDDEN, "Invalid file path")))
}

async fn ask<T>(s: &Shared, make: impl FnOnce(oneshot::Sender<T>) -> ValidateRequest) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    let sent = s.validator.lock().map(|v| v.send(make(tx)).is_ok()).unwrap_or(false);
    if sent {
        rx.await.ok()
    } else {
        None
    }
}

/// `GET /userdata/{file}`: a workflow (converted from its RON graph) or a user file.
pub async fn read(State(s): S, UrlPath(file): UrlPath<String>) -> Response {
    if let Some(ron) = graph_for(&s, &file) {
        let ron = match ron {
            Ok(r) if r.is_file() => r,
            Ok(_) => return error(StatusCode::NOT_FOUND, "File not found"),
            Err(e) => return e,
        };
        return match ask(&s, |reply| ValidateRequest::ToUi { ron, reply }).await {
            Some(Ok(ui)) => Json(ui).into_response(),
            Some(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
            None => error(StatusCode::SERVICE_UNAVAILABLE, "the validator is not running"),
        };
    }
    let Some(path) = confine(&s.config.user_dir, "", &file) else { return error(StatusCode::FORBIDDEN, "Invalid file path") };
    let Ok(bytes) = tokio::fs::read(&path).await else { return error(StatusCode::NOT_FOUND, "File not found") };
    // User files are data: JSON as JSON, anything else as a download, never as a page.
    let json = path.extension().is_some_and(|e| e == "json");
    let (ty, disposition) = if json { ("application/json", "inline") } else { ("application/octet-stream", "attachment") };
    ([(header::CONTENT_TYPE, ty), (header::CONTENT_DISPOSITION, disposition), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], bytes).into_response()
}

#[derive(Deserialize)]
pub struct WriteQuery {
    overwrite: Option<String>,
    full_info: Option<String>,
}

/// The `//` comments of a RON file, so that a canvas save does not drop them.
fn comments(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.trim_start().strip_prefix("//")).map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect()
}

/// `POST /userdata/{file}`: a workflow saved from the canvas becomes its RON graph; other files are
/// written in the user directory.
pub async fn write(State(s): S, UrlPath(file): UrlPath<String>, Query(q): Query<WriteQuery>, body: Bytes) -> Response {
    let overwrite = q.overwrite.as_deref() != Some("false");
    if let Some(ron) = graph_for(&s, &file) {
        let ron = match ron {
            Ok(r) => r,
            Err(e) => return e,
        };
        if ron.exists() && !overwrite {
            return error(StatusCode::CONFLICT, "File already exists");
        }
        let name = ron.clone();
        let mut graph = match ask(&s, |reply| ValidateRequest::FromUi { workflow: body.to_vec(), name, reply }).await {
            Some(Ok(g)) => g,
            Some(Err(e)) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
            None => return error(StatusCode::SERVICE_UNAVAILABLE, "the validator is not running"),
        };
        // Hand-written comments of the file being replaced stay, as a graph note.
        if let Ok(old) = std::fs::read_to_string(&ron) {
            let lost: Vec<String> = comments(&old).into_iter().filter(|c| !graph.notes.as_deref().unwrap_or("").contains(c.as_str())).collect();
            if !lost.is_empty() {
                let kept = lost.join("\n");
                graph.notes = Some(match graph.notes.take() {
                    Some(n) => format!("{n}\n\n{kept}"),
                    None => kept,
                });
            }
        }
        let text = diffloom_core::graph::file::to_ron(&graph);
        if let Some(dir) = ron.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // Written beside and renamed over, so a failed save never leaves half a graph.
        let tmp = ron.with_extension("ron.saving");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &ron)) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot save the graph: {e}"));
        }
        return if yes(&q.full_info) { Json(info(&ron, &file)).into_response() } else { Json(json!(file)).into_response() };
    }
    let Some(path) = confine(&s.config.user_dir, "", &file).or_else(|| {
        // The folder may not exist yet.
        let p = Path::new(&file);
        let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir_all(s.config.user_dir.join(&parent)).ok()?;
        confine(&s.config.user_dir, "", &file)
    }) else {
        return error(StatusCode::FORBIDDEN, "Invalid file path");
    };
    if path.exists() && !overwrite {
        return error(StatusCode::CONFLICT, "File already exists");
    }
    if let Err(e) = tokio::fs::write(&path, &body).await {
        return error(StatusCode::BAD_REQUEST, format!("cannot save: {e}"));
    }
    if yes(&q.full_info) {
        Json(info(&path, &file)).into_response()
    } else {
        Json(json!(file)).into_response()
    }
}

/// Where a deleted graph goes: nothing a canvas click deletes is lost.
fn trash(s: &Shared, ron: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = ron.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    s.config.graphs_dir.join(".trash").join(format!("{stamp}-{name}"))
}

/// `DELETE /userdata/{file}`: a graph moves to the graphs directory's `.trash/`; a user file is removed.
pub async fn delete(State(s): S, UrlPath(file): UrlPath<String>) -> Response {
    if let Some(ron) = graph_for(&s, &file) {
        let ron = match ron {
            Ok(r) if r.is_file() => r,
            Ok(_) => return error(StatusCode::NOT_FOUND, "File not found"),
            Err(e) => return e,
        };
        let to = trash(&s, &ron);
        let _ = std::fs::create_dir_all(to.parent().unwrap_or(Path::new(".")));
        return match std::fs::rename(&ron, &to) {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    }
    let Some(path) = confine(&s.config.user_dir, "", &file).filter(|p| p.is_file()) else { return error(StatusCode::NOT_FOUND, "File not found") };
    match std::fs::remove_file(path) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /userdata/{file}/move/{dest}`: renames a graph or a user file (never over an existing one
/// unless `overwrite`).
pub async fn rename(State(s): S, UrlPath((file, dest)): UrlPath<(String, String)>, Query(q): Query<WriteQuery>) -> Response {
    let overwrite = q.overwrite.as_deref() != Some("false");
    let (from, to) = match (graph_for(&s, &file), graph_for(&s, &dest)) {
        (Some(Ok(a)), Some(Ok(b))) => (a, b),
        (None, None) => match (confine(&s.config.user_dir, "", &file), confine(&s.config.user_dir, "", &dest)) {
            (Some(a), Some(b)) => (a, b),
            _ => return error(StatusCode::FORBIDDEN, "Invalid file path"),
        },
        _ => return error(StatusCode::FORBIDDEN, "a workflow moves only within workflows/"),
    };
    if !from.is_file() {
        return error(StatusCode::NOT_FOUND, "File not found");
    }
    if to.exists() && !overwrite {
        return error(StatusCode::CONFLICT, "File already exists");
    }
    if to.exists() && graph_for(&s, &dest).is_some() {
        let t = trash(&s, &to);
        let _ = std::fs::create_dir_all(t.parent().unwrap_or(Path::new(".")));
        let _ = std::fs::rename(&to, t);
    }
    match std::fs::rename(&from, &to) {
        Ok(()) if yes(&q.full_info) => Json(info(&to, &dest)).into_response(),
        Ok(()) => Json(json!(dest)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /templates/index.json`: the graphs directory's graphs as one template category.
pub async fn templates(State(s): S) -> Json<Value> {
    let mut found = Vec::new();
    walk(&s.config.graphs_dir, &s.config.graphs_dir, false, &mut found, 0);
    let mut names: Vec<String> = found.iter().filter(|r| r.extension().is_some_and(|e| e == "ron")).map(|r| slashes(&r.with_extension(""))).collect();
    names.sort();
    let templates: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "title": n, "mediaType": "image", "mediaSubtype": "png", "description": format!("diffloom graph {n}.ron")}))
        .collect();
    Json(json!([{"moduleName": "default", "title": "diffloom graphs", "type": "image", "category": "diffloom", "templates": templates}]))
}

/// `GET /templates/{name}.json`: a graph of the graphs directory as a UI workflow.
pub async fn template(state: S, UrlPath(file): UrlPath<String>) -> Response {
    read(state, UrlPath(format!("workflows/{file}"))).await
}
