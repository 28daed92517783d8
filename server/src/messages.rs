//! ComfyUI's WebSocket messages about one prompt, and its history entry when it ends: the same for a
//! prompt run here and one run by a queue worker (`serve --queue`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value as Json};

use crate::queue::{Body, Job, Outgoing, Shared, MAX_HISTORY};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How a prompt ended.
pub enum Ending {
    Success,
    /// `POST /interrupt` stopped it at node `node`.
    Interrupted {
        node: Option<String>,
        node_type: Option<String>,
    },
    /// Node `node` failed (or, without a node, the prompt did not get that far).
    Error {
        node: Option<String>,
        node_type: Option<String>,
        message: String,
        exception_type: String,
        traceback: Vec<String>,
    },
}

/// The messages of one prompt, for the client that queued it; node ids are ComfyUI's.
pub struct Messages {
    pub shared: Arc<Shared>,
    pub prompt_id: String,
    pub client: Option<String>,
    /// What goes into the history entry's `status.messages`.
    pub history: std::sync::Mutex<Vec<Json>>,
    /// Nodes that ran and their UI outputs, for the history entry and errors.
    pub done: std::sync::Mutex<(Vec<String>, Map<String, Json>)>,
}

impl Messages {
    pub fn new(shared: Arc<Shared>, job: &Job) -> Messages {
        Messages { shared, prompt_id: job.id.clone(), client: job.client_id.clone(), history: Default::default(), done: Default::default() }
    }

    fn send(&self, kind: &str, data: Json) {
        self.shared.send(kind, data, self.client.as_deref());
    }

    pub fn start(&self) {
        let data = json!({"prompt_id": self.prompt_id, "timestamp": now_ms()});
        if let Ok(mut h) = self.history.lock() {
            h.push(json!(["execution_start", data.clone()]));
        }
        self.send("execution_start", data);
    }

    pub fn cached(&self, nodes: Vec<String>) {
        self.send("execution_cached", json!({"nodes": nodes, "prompt_id": self.prompt_id, "timestamp": now_ms()}));
    }

    fn state(&self, node: &str, value: u64, max: u64) {
        let state = json!({node: {"value": value, "max": max, "state": "running", "node_id": node, "prompt_id": self.prompt_id, "display_node_id": node, "parent_node_id": null, "real_node_id": node}});
        self.send("progress_state", json!({"prompt_id": self.prompt_id, "nodes": state}));
    }

    pub fn executing(&self, node: &str) {
        self.send("executing", json!({"node": node, "display_node": node, "prompt_id": self.prompt_id}));
        self.state(node, 0, 1);
    }

    pub fn progress(&self, node: &str, value: u64, max: u64) {
        self.send("progress", json!({"value": value, "max": max, "prompt_id": self.prompt_id, "node": node}));
        self.state(node, value, max);
    }

    pub fn preview(&self, node: &str, jpeg: Vec<u8>) {
        let metadata = json!({"node_id": node, "display_node_id": node, "parent_node_id": null, "real_node_id": node, "prompt_id": self.prompt_id, "image_type": "image/jpeg"});
        let _ = self.shared.events.send(Arc::new(Outgoing { to: self.client.clone(), body: Body::Preview { metadata, jpeg } }));
    }

    pub fn executed(&self, node: &str, ui: &Map<String, Json>) {
        if let Ok(mut done) = self.done.lock() {
            done.0.push(node.to_owned());
            if !ui.is_empty() {
                done.1.insert(node.to_owned(), Json::Object(ui.clone()));
            }
        }
        if !ui.is_empty() {
            self.send("executed", json!({"node": node, "display_node": node, "output": ui, "prompt_id": self.prompt_id}));
        }
    }

    /// Records the prompt in the history, then tells the client how it ended (a client that asks for
    /// the history on the final message finds the entry), then sends the legacy end marker.
    pub fn end(&self, job: &Job, ending: Ending) {
        let (executed, outputs) = self.done.lock().map(|d| d.clone()).unwrap_or_default();
        let (status, kind, data) = match ending {
            Ending::Success => ("success", "execution_success", json!({"prompt_id": self.prompt_id, "timestamp": now_ms()})),
            Ending::Interrupted { node, node_type } => (
                "error",
                "execution_interrupted",
                json!({"prompt_id": self.prompt_id, "node_id": node, "node_type": node_type, "executed": executed, "timestamp": now_ms()}),
            ),
            Ending::Error { node, node_type, message, exception_type, traceback } => (
                "error",
                "execution_error",
                json!({"prompt_id": self.prompt_id, "node_id": node, "node_type": node_type, "executed": executed,
                       "exception_message": message, "exception_type": exception_type, "traceback": traceback,
                       "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}),
            ),
        };
        let mut messages = self.history.lock().map(|h| h.clone()).unwrap_or_default();
        messages.push(json!([kind, data.clone()]));
        let meta: Map<String, Json> =
            outputs.keys().map(|k| (k.clone(), json!({"node_id": k, "display_node": k, "parent_node": null, "real_node_id": k}))).collect();
        let entry = json!({
            "prompt": job.item(),
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
            "meta": meta,
        });
        if let Ok(mut state) = self.shared.state.lock() {
            if state.history.len() >= MAX_HISTORY {
                state.history.pop_front();
            }
            state.history.push_back((job.id.clone(), entry));
        }
        self.send(kind, data);
        self.send("executing", json!({"node": null, "prompt_id": self.prompt_id}));
    }
}
