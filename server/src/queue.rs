//! What the HTTP side and the executor thread share: the queue of prompts, those running, the history,
//! the interrupt flag, and the channel of messages for WebSocket clients.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use diffloom_core::graph::GraphFile;
use serde_json::{json, Map, Value as Json};
use tokio::sync::broadcast;

use crate::Config;

/// ComfyUI keeps this many finished prompts.
pub const MAX_HISTORY: usize = 10_000;

/// A queue number as ComfyUI shows it: an integer unless a client posted a fraction.
pub fn number(n: f64) -> Json {
    if n.fract() == 0.0 && n.abs() < 9e15 {
        json!(n as i64)
    } else {
        json!(n)
    }
}

/// A queued prompt.
#[derive(Clone)]
pub struct Job {
    pub number: f64,
    pub id: String,
    /// The API prompt as posted.
    pub prompt: Map<String, Json>,
    pub extra: Json,
    /// Ids of the output nodes it runs.
    pub outputs: Vec<String>,
    pub graph: GraphFile,
    pub client_id: Option<String>,
}

impl Job {
    /// The queue entry ComfyUI lists: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
    pub fn item(&self) -> Json {
        json!([number(self.number), self.id, self.prompt, self.extra, self.outputs])
    }
}

#[derive(Default)]
pub struct QueueState {
    pub pending: Vec<Job>,
    /// The prompt being run (several at once with `--queue`, one per busy worker).
    pub running: Vec<Job>,
    /// Finished prompts, oldest first: (prompt id, history entry).
    pub history: VecDeque<(String, Json)>,
    pub counter: f64,
    /// Set by `POST /free`: drop cached results (models included) before the next prompt.
    pub free: bool,
}

/// A WebSocket message: JSON text or a binary frame, for one client or all.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub to: Option<String>,
    pub body: Body,
}

#[derive(Clone, Debug)]
pub enum Body {
    Text(String),
    /// A live preview: ComfyUI's metadata (node and prompt ids) and the JPEG; each session frames it as
    /// its client understands (binary type 4 with the metadata, or the older type 1).
    Preview {
        metadata: Json,
        jpeg: Vec<u8>,
    },
}

pub struct Shared {
    pub config: Config,
    pub state: Mutex<QueueState>,
    /// Wakes the executor thread when a prompt is queued.
    pub wake: Condvar,
    pub events: broadcast::Sender<Arc<Outgoing>>,
    /// Interrupts the running prompt at the next node or sampling step.
    pub cancel: Arc<AtomicBool>,
    pub object_info: RwLock<Arc<Json>>,
    /// Asks the validator thread (which owns a registry) to check a prompt.
    pub validator: Mutex<std::sync::mpsc::Sender<crate::worker::ValidateRequest>>,
    /// With `--queue`: the queue the prompts go to (they run on its workers, not here).
    pub remote: Option<Arc<crate::remote::Remote>>,
}

impl Shared {
    /// Sends `{type, data}` to client `to` (or every client).
    pub fn send(&self, kind: &str, data: Json, to: Option<&str>) {
        let text = json!({"type": kind, "data": data}).to_string();
        let _ = self.events.send(Arc::new(Outgoing { to: to.map(str::to_owned), body: Body::Text(text) }));
    }

    /// ComfyUI's `status` payload.
    pub fn queue_info(&self) -> Json {
        let remaining = self.state.lock().map(|s| s.pending.len() + s.running.len()).unwrap_or(0);
        json!({"exec_info": {"queue_remaining": remaining}})
    }

    /// Tells every client how long the queue is.
    pub fn queue_updated(&self) {
        self.send("status", json!({"status": self.queue_info()}), None);
    }
}
