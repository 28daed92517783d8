//! What keeps a served diffloom safe from the browser it serves (ComfyUI has had CSRF, stored-XSS and
//! path-traversal CVEs in these routes): the token, same-origin checks, and file names confined to
//! their directories.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::queue::Shared;

const COOKIE: &str = "diffloom_token";

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    let cookies = headers.get(header::COOKIE)?.to_str().ok()?;
    cookies.split(';').filter_map(|c| c.trim().split_once('=')).find(|(k, _)| *k == COOKIE).map(|(_, v)| v.to_owned())
}

fn query_token(query: Option<&str>) -> Option<String> {
    query?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == "token").map(|(_, v)| v.to_owned())
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses cross-site requests (an `Origin` whose host is not the `Host` the request was sent to) and,
/// with `--token`, requests without it; a browser that opens `/?token=…` once gets it as an HttpOnly,
/// SameSite=Strict cookie.
pub async fn guard(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        let origin_host = origin.to_str().unwrap_or("").split("://").nth(1).unwrap_or("");
        if origin_host != host.to_str().unwrap_or("-") {
            return (StatusCode::FORBIDDEN, "cross-origin request refused").into_response();
        }
    }
    let Some(token) = &shared.config.token else { return next.run(request).await };
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::to_owned);
    let from_query = query_token(request.uri().query());
    let ok = |t: &Option<String>| t.as_deref().is_some_and(|t| same(t, token));
    if ok(&bearer) || ok(&cookie_token(headers)) {
        return next.run(request).await;
    }
    if ok(&from_query) {
        let mut response = next.run(request).await;
        let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
        return response;
    }
    (StatusCode::UNAUTHORIZED, "a token is required: open /?token=… or send Authorization: Bearer …").into_response()
}

/// `dir/subfolder/name` if it stays inside `dir` once `..`, absolute paths and symbolic links are
/// resolved; `None` otherwise. The file need not exist (uploads), but its directory must resolve.
pub fn confine(dir: &Path, subfolder: &str, name: &str) -> Option<PathBuf> {
    let relative = Path::new(subfolder).join(name);
    if name.is_empty() || relative.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return None;
    }
    let root = dir.canonicalize().ok()?;
    let full = root.join(&relative);
    let parent = full.parent()?.canonicalize().ok()?;
    if !parent.starts_with(&root) {
        return None;
    }
    let file = parent.join(full.file_name()?);
    match file.canonicalize() {
        Ok(real) if !real.starts_with(&root) => None,
        _ => Some(file),
    }
}

#[cfg(test)]
#[path = "tests/security.rs"]
mod tests;
