//! What a worker tells whoever queued a job while the job runs: the stream `STREAM:sweep:ID:events`,
//! read from its start, so a reader that connects late or reconnects misses nothing. `diffloom serve
//! --queue` reads it to relay a prompt's progress and images to the canvas that queued it.
//!
//! Each entry has `data`, the [`Event`] as JSON, and for files and previews `bytes`, their raw
//! contents. The stream expires a day after its last entry (a reader that went away leaves nothing
//! behind for long); the reader deletes it once it has read the end.

use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::Commands;
use serde::{Deserialize, Serialize};

use crate::queue::{Connection, QueueError, QueueUrl};

/// How long an events stream outlives its last entry.
const EXPIRE_SECS: i64 = 24 * 3600;

/// One thing that happened to a running job; node ids are the graph's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A worker took the job (again, when a dead worker's job is taken over).
    Start {
        worker: String,
    },
    /// Nodes whose results came from the cache.
    Cached {
        nodes: Vec<String>,
    },
    Executing {
        node: String,
    },
    Progress {
        node: String,
        value: u64,
        max: u64,
    },
    /// A live preview of a sampler's latent, as a JPEG.
    Preview {
        node: String,
        #[serde(skip)]
        jpeg: Vec<u8>,
    },
    /// A file an output node wrote, sent before that node's [`Event::Executed`]: `kind` is "output" or
    /// "temp", `path` is relative to that folder (`subfolder/filename`, '/'-separated).
    File {
        kind: String,
        path: String,
        #[serde(skip)]
        bytes: Vec<u8>,
    },
    /// A node finished; `ui` is what it shows (ComfyUI's `{"images": [{filename, subfolder, type}]}`).
    Executed {
        node: String,
        ui: serde_json::Value,
    },
    /// The job ended: `status` is "success", "error", "interrupted" or "cancelled" (never started);
    /// errors name the node and say why.
    End {
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_type: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

impl Event {
    /// An end without a node.
    pub fn end(status: &str, message: Option<String>) -> Event {
        Event::End { status: status.to_owned(), node: None, node_type: None, message }
    }

    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Event::Preview { jpeg, .. } => Some(jpeg),
            Event::File { bytes, .. } => Some(bytes),
            _ => None,
        }
    }

    fn set_bytes(&mut self, data: Vec<u8>) {
        match self {
            Event::Preview { jpeg, .. } => *jpeg = data,
            Event::File { bytes, .. } => *bytes = data,
            _ => {}
        }
    }
}

/// Adds `event` to the job's events stream (and pushes its expiry back).
pub fn publish(con: &mut Connection, q: &QueueUrl, sweep: &str, event: &Event) -> Result<(), QueueError> {
    let key = q.events(sweep);
    let data = serde_json::to_string(event).expect("an event serialises");
    let mut fields: Vec<(&str, &[u8])> = vec![("data", data.as_bytes())];
    if let Some(bytes) = event.bytes() {
        fields.push(("bytes", bytes));
    }
    let mut pipe = redis::pipe();
    pipe.atomic().xadd(&key, "*", &fields).ignore().expire(&key, EXPIRE_SECS).ignore();
    pipe.query::<()>(con).map_err(|e| q.err(e))
}

/// The job's entries after entry id `after` ("0" for all), waiting at most `block` for the first;
/// each with its entry id, and None for an entry that is not an event this version reads (a newer
/// worker's), which the reader steps over.
pub fn read(con: &mut Connection, q: &QueueUrl, sweep: &str, after: &str, block: Duration) -> Result<Vec<(String, Option<Event>)>, QueueError> {
    let options = StreamReadOptions::default().count(64).block(block.as_millis().max(1) as usize);
    let reply: Option<StreamReadReply> = con.xread_options(&[q.events(sweep)], &[after], &options).map_err(|e| q.err(e))?;
    let entries = reply.and_then(|r| r.keys.into_iter().next()).map(|k| k.ids).unwrap_or_default();
    Ok(entries
        .into_iter()
        .map(|e| {
            let event = e.get::<Vec<u8>>("data").and_then(|data| serde_json::from_slice::<Event>(&data).ok()).map(|mut event| {
                if let Some(bytes) = e.get::<Vec<u8>>("bytes") {
                    event.set_bytes(bytes);
                }
                event
            });
            (e.id, event)
        })
        .collect())
}

/// Deletes the job's events stream (its reader has read the end).
pub fn remove(con: &mut Connection, q: &QueueUrl, sweep: &str) -> Result<(), QueueError> {
    con.del::<_, ()>(q.events(sweep)).map_err(|e| q.err(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_bytes_out_of_the_json() {
        let file = Event::File { kind: "output".into(), path: "a/b.png".into(), bytes: vec![1, 2, 3] };
        let json = serde_json::to_string(&file).unwrap();
        assert_eq!(json, r#"{"type":"file","kind":"output","path":"a/b.png"}"#);
        let mut back: Event = serde_json::from_str(&json).unwrap();
        back.set_bytes(vec![1, 2, 3]);
        assert_eq!(back, file);
        let end = Event::end("error", Some("boom".into()));
        assert_eq!(serde_json::to_string(&end).unwrap(), r#"{"type":"end","status":"error","message":"boom"}"#);
    }
}
