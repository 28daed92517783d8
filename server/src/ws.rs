//! `GET /ws?clientId=…`: the `status` greeting with the session id, the `feature_flags` exchange, and
//! every message the executor thread sends to this client or to all.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::queue::{Body, Shared};

#[derive(Deserialize)]
pub struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}

/// ComfyUI's binary preview frames: `[4][len][metadata JSON][image]` (PREVIEW_IMAGE_WITH_METADATA) for
/// clients that asked for it, else `[1][1 = JPEG][image]` (PREVIEW_IMAGE); integers big-endian u32.
pub fn preview_frame(metadata: &Value, jpeg: &[u8], with_metadata: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(jpeg.len() + 256);
    if with_metadata {
        let meta = metadata.to_string();
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        out.extend_from_slice(meta.as_bytes());
    } else {
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(&1u32.to_be_bytes());
    }
    out.extend_from_slice(jpeg);
    out
}

pub async fn handler(State(s): State<Arc<Shared>>, Query(q): Query<WsQuery>, upgrade: WebSocketUpgrade) -> Response {
    let sid = q.client_id.filter(|c| !c.is_empty()).unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| session(s, sid, socket))
}

async fn session(s: Arc<Shared>, sid: String, mut socket: WebSocket) {
    let mut events = s.events.subscribe();
    let greeting = json!({"type": "status", "data": {"status": s.queue_info(), "sid": sid}});
    if socket.send(Message::Text(greeting.to_string().into())).await.is_err() {
        return;
    }
    let mut first = true;
    let mut with_metadata = false;
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    // The first message may be the client's feature flags; the server answers with its own.
                    if first {
                        if let Ok(v) = serde_json::from_str::<Value>(&text) {
                            if v.get("type").and_then(Value::as_str) == Some("feature_flags") {
                                with_metadata = v.pointer("/data/supports_preview_metadata").and_then(Value::as_bool) == Some(true);
                                let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": s.config.max_body}});
                                if socket.send(Message::Text(flags.to_string().into())).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    first = false;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            event = events.recv() => match event {
                Ok(e) => {
                    if e.to.as_deref().is_some_and(|to| to != sid) {
                        continue;
                    }
                    let message = match &e.body {
                        Body::Text(t) => Message::Text(t.clone().into()),
                        Body::Preview { metadata, jpeg } => Message::Binary(preview_frame(metadata, jpeg, with_metadata).into()),
                    };
                    if socket.send(message).await.is_err() {
                        return;
                    }
                }
                // A slow client missed messages; it keeps the later ones.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
        }
    }
}
