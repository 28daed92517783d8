//! `serve --queue`: prompts run on queue workers instead of here.
//!
//! The server side: a dispatcher thread puts each posted prompt on the Redis stream as a one-job
//! sweep that asks to be followed, and a thread per prompt reads that job's events
//! ([`diffloom_sweep::events`]) and relays them to the client that queued it as ComfyUI's messages:
//! progress, previews, and the images, whose bytes come with the events and are written under the
//! server's own output (or temp) folder at `<sweep id>/00000/…`, the layout the worker uses; so
//! `/view` serves them with no shared mount. The worker side is [`Sink`], the executor observer
//! `diffloom worker` sets for a followed job.
//!
//! Nothing is lost when Redis goes away for a while: a prompt that could not be submitted stays
//! pending and is submitted when the server is back, and a follower reads its job's events from where
//! it stopped. A job that ends without telling (dead-lettered before it ran, or dropped by a cancel)
//! is ended from its recorded outcome.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diffloom_core::graph::file::to_ron;
use diffloom_core::validate::validate;
use diffloom_core::Observer;
use diffloom_sweep::events::{self, Event};
use diffloom_sweep::queue::{self, Connection, QueueError, QueueUrl};
use diffloom_sweep::{Follow, Job as SweepJob};
use serde_json::{Map, Value as Json};

use crate::messages::{Ending, Messages};
use crate::queue::{Job, Shared};
use crate::worker::{latent_preview, preview_method, prompt_path};

/// How long a read waits for a job's next event before checking whether the job ended unreported.
const BLOCK: Duration = Duration::from_secs(1);

/// The queue prompts go to.
#[derive(Clone)]
pub struct QueueConfig {
    pub url: QueueUrl,
    /// The workers' consumer group.
    pub group: String,
}

/// The server's handle on the queue.
pub struct Remote {
    pub config: QueueConfig,
    /// Prompt id → the sweep id its job has on the queue.
    sweeps: Mutex<HashMap<String, String>>,
}

impl Remote {
    /// Checks that the queue can be reached (and creates its consumer group).
    pub fn connect(config: QueueConfig) -> Result<Remote, QueueError> {
        let mut con = config.url.connect(BLOCK * 5)?;
        queue::ensure_group(&mut con, &config.url, &config.group)?;
        if let Some(warning) = queue::persistence_warning(&mut con) {
            tracing::warn!("{}: {warning}", config.url.shown);
        }
        Ok(Remote { config, sweeps: Mutex::new(HashMap::new()) })
    }

    /// Cancels prompts on the queue: a job no worker has taken is dropped, a running one stops at its
    /// next step. Prompts not submitted yet are unknown here (taking them off the pending list is
    /// enough).
    pub fn cancel(&self, prompt_ids: &[String]) {
        let sweeps: Vec<String> = {
            let Ok(map) = self.sweeps.lock() else { return };
            prompt_ids.iter().filter_map(|id| map.get(id).cloned()).collect()
        };
        if sweeps.is_empty() {
            return;
        }
        let q = &self.config.url;
        match q.connect(BLOCK * 5) {
            Ok(mut con) => {
                for sweep in &sweeps {
                    if let Err(e) = queue::cancel(&mut con, q, &self.config.group, sweep) {
                        tracing::warn!("cannot cancel {sweep} on the queue: {e}");
                    }
                }
            }
            Err(e) => tracing::warn!("cannot cancel on the queue: {e}"),
        }
    }
}

/// Submits posted prompts to the queue until the server goes away.
pub fn dispatcher(shared: Arc<Shared>, remote: Arc<Remote>) {
    let registry = (shared.config.registry)();
    let q = remote.config.url.clone();
    let mut con: Option<Connection> = None;
    let mut submitted: HashSet<String> = HashSet::new();
    // Each prompt's job, made once: a submission retried after a lost reply is the same sweep, which
    // `queue::submit` does not queue twice.
    let mut prepared: HashMap<String, SweepJob> = HashMap::new();
    loop {
        let job = {
            let Ok(mut state) = shared.state.lock() else { return };
            loop {
                submitted.retain(|id| state.pending.iter().any(|j| &j.id == id));
                prepared.retain(|id, _| state.pending.iter().any(|j| &j.id == id));
                // Lowest number first (a prompt queued "front" has a negative one).
                let next = state.pending.iter().filter(|j| !submitted.contains(&j.id)).min_by(|a, b| a.number.total_cmp(&b.number));
                if let Some(job) = next {
                    break job.clone();
                }
                state = match shared.wake.wait_timeout(state, BLOCK) {
                    Ok((s, _)) => s,
                    Err(_) => return,
                };
            }
        };
        let sweep_job = match prepared.get(&job.id) {
            Some(j) => j.clone(),
            None => match prepare(&shared, &registry, &job) {
                Ok(j) => prepared.entry(job.id.clone()).or_insert(j).clone(),
                Err(message) => {
                    // As a local run reports a prompt that no longer validates.
                    let m = Messages::new(shared.clone(), &job);
                    remove(&shared, &job);
                    m.start();
                    m.end(&job, Ending::Error { node: None, node_type: None, message, exception_type: "ValidationError".into(), traceback: vec![] });
                    continue;
                }
            },
        };
        if con.is_none() {
            con = q.connect(BLOCK * 5).map_err(|e| tracing::warn!("{e}; prompts wait until the queue is back")).ok();
        }
        let Some(c) = con.as_mut() else {
            std::thread::sleep(BLOCK);
            continue;
        };
        if let Err(e) = queue::submit(c, &q, &remote.config.group, std::slice::from_ref(&sweep_job)) {
            tracing::warn!("{e}; prompts wait until the queue is back");
            con = None;
            std::thread::sleep(BLOCK);
            continue;
        }
        submitted.insert(job.id.clone());
        // Known to `Remote::cancel` only while still pending (checked under the queue's lock, which a
        // delete takes too): a prompt deleted meanwhile is dropped from the queue here.
        let still_queued = shared.state.lock().map(|state| {
            let queued = state.pending.iter().any(|j| j.id == job.id);
            if queued {
                if let Ok(mut map) = remote.sweeps.lock() {
                    map.insert(job.id.clone(), sweep_job.sweep.clone());
                }
            }
            queued
        });
        if !still_queued.unwrap_or(false) {
            if let Err(e) = queue::cancel(c, &q, &remote.config.group, &sweep_job.sweep) {
                tracing::warn!("cannot drop deleted prompt {} from the queue: {e}", job.id);
            }
            continue;
        }
        let (s, r) = (shared.clone(), remote.clone());
        let (id, sweep) = (job.id.clone(), sweep_job.sweep.clone());
        let spawned = std::thread::Builder::new().name(format!("follow {id}")).spawn(move || follow(s, r, job, sweep_job));
        if let Err(e) = spawned {
            tracing::error!("cannot start a thread to follow prompt {id}: {e}; dropping it");
            let _ = queue::cancel(c, &q, &remote.config.group, &sweep);
        }
    }
}

/// Validates a prompt as the workers will run it and makes its job.
fn prepare(shared: &Shared, registry: &diffloom_core::Registry, job: &Job) -> Result<SweepJob, String> {
    let path = prompt_path(&shared.config.graphs_dir, &job.id);
    let resolved = validate(&path, &job.graph, registry).map_err(|e| e.to_string())?;
    let plugins = resolved.plugin_hashes().map_err(|e| e.to_string())?;
    Ok(sweep_job(shared, job, plugins))
}

/// The prompt as a one-job sweep that asks to be followed. Its id is new for every submission (a
/// prompt id reused by a client does not find an earlier prompt's outputs).
fn sweep_job(shared: &Shared, job: &Job, plugins: std::collections::BTreeMap<String, String>) -> SweepJob {
    let mut h = blake3::Hasher::new();
    h.update(job.id.as_bytes());
    h.update(&std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0).to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let name: String = job.id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    SweepJob {
        sweep: format!("p{}", &h.finalize().to_hex()[..12]),
        index: 0,
        total: 1,
        graph: to_ron(&job.graph),
        graph_name: format!("prompt {name}.ron"),
        graph_dir: shared.config.graphs_dir.display().to_string(),
        sets: Vec::new(),
        plugins,
        follow: Some(Follow { previews: preview_method(shared, job) != "none" }),
        collect: false,
    }
}

/// Takes a prompt off the pending and running lists.
fn remove(shared: &Shared, job: &Job) {
    if let Ok(mut state) = shared.state.lock() {
        state.pending.retain(|j| j.id != job.id);
        state.running.retain(|j| j.id != job.id);
    }
    shared.queue_updated();
}

/// How many quiet reads pass between checks that the queue still knows the job.
const LOST_CHECK: u32 = 10;

/// How long a served prompt's records stay on the queue after its end was relayed.
const KEEP_SECS: i64 = 24 * 3600;

/// Relays one prompt's job events to its client until the job ends.
fn follow(shared: Arc<Shared>, remote: Arc<Remote>, job: Job, sweep_job: SweepJob) {
    let q = remote.config.url.clone();
    let group = remote.config.group.clone();
    let sweep = sweep_job.sweep.clone();
    let mut f = Follower { m: Messages::new(shared.clone(), &job), shared: shared.clone(), job, sweep_job, started: false, deleted: false };
    let mut con: Option<Connection> = None;
    let mut after = "0".to_owned();
    let mut quiet = 0u32;
    loop {
        if con.is_none() {
            con = q.connect(BLOCK * 5).map_err(|e| tracing::info!("following {sweep}: {e}")).ok();
        }
        let Some(c) = con.as_mut() else {
            std::thread::sleep(BLOCK);
            continue;
        };
        let ended = events::read(c, &q, &sweep, &after, BLOCK).and_then(|batch| {
            if !batch.is_empty() {
                quiet = 0;
                return Ok(f.handle_all(batch, &mut after));
            }
            // Quiet: did the job end without telling? (An end is published before the outcome is
            // recorded, so an outcome with no end after one more read means none is coming.)
            if let Some(outcome) = queue::outcome(c, &q, &sweep, 0)? {
                let late = events::read(c, &q, &sweep, &after, Duration::from_millis(1))?;
                if late.is_empty() {
                    return Ok(f.end_from_outcome(&outcome));
                }
                return Ok(f.handle_all(late, &mut after));
            }
            quiet += 1;
            if quiet.is_multiple_of(LOST_CHECK) && !queue::sweep_exists(c, &q, &sweep)? {
                let message = format!("job {sweep} is no longer on {} (was the Redis server restarted without persistence, or flushed?)", q.shown);
                f.finish(Ending::Error {
                    node: None,
                    node_type: None,
                    message: message.clone(),
                    exception_type: "diffloom.QueueError".into(),
                    traceback: vec![message],
                });
                return Ok(true);
            }
            Ok(false)
        });
        match ended {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                tracing::info!("following {sweep}: {e}");
                con = None;
                std::thread::sleep(BLOCK);
            }
        }
    }
    if let Ok(mut map) = remote.sweeps.lock() {
        map.remove(&f.job.id);
    }
    let Some(c) = con.as_mut() else { return };
    if f.deleted {
        // Deleted while being submitted: the job must not run.
        let _ = queue::cancel(c, &q, &group, &sweep);
    }
    let _ = events::remove(c, &q, &sweep);
    let _ = queue::expire_sweep(c, &q, &sweep, KEEP_SECS);
}

struct Follower {
    m: Messages,
    shared: Arc<Shared>,
    job: Job,
    sweep_job: SweepJob,
    started: bool,
    /// Taken off the queue here before a worker started it.
    deleted: bool,
}

impl Follower {
    /// The ComfyUI id of graph node `id`.
    fn comfy(&self, id: &str) -> String {
        self.job.graph.nodes.get(id).and_then(|n| n.canvas.comfy_id.clone()).unwrap_or_else(|| id.to_owned())
    }

    /// Handles a batch of events, moving `after` past each (and past entries that are no events);
    /// true when the job ended.
    fn handle_all(&mut self, batch: Vec<(String, Option<Event>)>, after: &mut String) -> bool {
        for (id, event) in batch {
            *after = id;
            if event.is_some_and(|e| self.handle(e)) {
                return true;
            }
        }
        false
    }

    /// Moves the prompt from pending to running on its first event (any: a lost start event does not
    /// leave it pending); false when it was deleted from the pending list meanwhile.
    fn start(&mut self) -> bool {
        if self.started {
            return true;
        }
        let moved = self.shared.state.lock().map(|mut state| {
            let before = state.pending.len();
            state.pending.retain(|j| j.id != self.job.id);
            let was_pending = state.pending.len() < before;
            if was_pending {
                state.running.push(self.job.clone());
            }
            was_pending
        });
        if !moved.unwrap_or(false) {
            self.deleted = true;
            return false;
        }
        self.started = true;
        self.shared.queue_updated();
        self.m.start();
        true
    }

    fn handle(&mut self, event: Event) -> bool {
        if !matches!(event, Event::End { .. }) && !self.start() {
            return true;
        }
        match event {
            Event::Start { worker } => tracing::info!("prompt {} runs on worker {worker}", self.job.id),
            Event::Cached { nodes } => {
                let nodes = nodes.iter().map(|n| self.comfy(n)).collect();
                self.m.cached(nodes);
            }
            Event::Executing { node } => self.m.executing(&self.comfy(&node)),
            Event::Progress { node, value, max } => self.m.progress(&self.comfy(&node), value, max),
            Event::Preview { node, jpeg } => self.m.preview(&self.comfy(&node), jpeg),
            Event::File { kind, path, bytes } => {
                if let Err(e) = self.save(&kind, &path, &bytes) {
                    tracing::warn!("prompt {}: {e}", self.job.id);
                }
            }
            Event::Executed { node, ui } => {
                let ui = self.relocate(ui);
                self.m.executed(&self.comfy(&node), &ui);
            }
            Event::End { status, node, node_type, message } => {
                let node = node.map(|n| self.comfy(&n));
                let ending = match status.as_str() {
                    "success" => Ending::Success,
                    "interrupted" => Ending::Interrupted { node, node_type },
                    "cancelled" => return self.cancelled(),
                    _ => Ending::Error {
                        node,
                        node_type,
                        message: message.clone().unwrap_or_default(),
                        exception_type: "diffloom.NodeError".into(),
                        traceback: message.into_iter().collect(),
                    },
                };
                self.finish(ending);
                return true;
            }
        }
        false
    }

    fn finish(&mut self, ending: Ending) {
        if !self.start() {
            return;
        }
        remove(&self.shared, &self.job);
        self.m.end(&self.job, ending);
    }

    /// Dropped before any worker took it (`POST /queue` delete, or interrupted while queued): gone
    /// from the queue without a history entry, as in ComfyUI; once started it counts as interrupted.
    fn cancelled(&mut self) -> bool {
        if self.started {
            self.finish(Ending::Interrupted { node: None, node_type: None });
        } else {
            remove(&self.shared, &self.job);
        }
        true
    }

    /// Ends the prompt from its recorded outcome (no end event came).
    fn end_from_outcome(&mut self, outcome: &queue::Outcome) -> bool {
        match outcome.state.as_str() {
            "done" => self.finish(Ending::Success),
            "cancelled" => return self.cancelled(),
            _ => {
                let message = outcome.error.clone().unwrap_or_else(|| "the job failed".into());
                let traceback = vec![message.clone()];
                self.finish(Ending::Error { node: None, node_type: None, message, exception_type: "diffloom.QueueError".into(), traceback });
            }
        }
        true
    }

    /// Where a relayed file goes: `<output or temp>/<sweep>/<job>/<path>`.
    fn target(&self, kind: &str, path: &str) -> Result<PathBuf, String> {
        let root = match kind {
            "output" => &self.shared.config.output_dir,
            "temp" => &self.shared.config.folders.temp_dir,
            _ => return Err(format!("a relayed file of type {kind:?} (expected output or temp)")),
        };
        let rel = Path::new(path);
        if path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(format!("a relayed file named {path:?} (expected a relative path inside the {kind} folder)"));
        }
        Ok(self.sweep_job.output_dir(root).join(rel))
    }

    /// Writes a relayed file, never over an existing one (which is the same file: a shared mount, or
    /// the job run again after its worker died). Clients learn its name only from the `executed`
    /// message that follows, so nobody reads it half-written.
    fn save(&self, kind: &str, path: &str, bytes: &[u8]) -> Result<(), String> {
        let target = self.target(kind, path)?;
        let parent = target.parent().ok_or("no parent folder")?;
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let mut file = match std::fs::OpenOptions::new().write(true).create_new(true).open(&target) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", target.display())),
        };
        file.write_all(bytes).map_err(|e| {
            let _ = std::fs::remove_file(&target);
            format!("{}: {e}", target.display())
        })
    }

    /// A worker's UI output, its files' subfolders moved under the job's folder here.
    fn relocate(&self, ui: Json) -> Map<String, Json> {
        let Json::Object(mut ui) = ui else { return Map::new() };
        let base = self.sweep_job.output_dir(Path::new(""));
        let base = base.to_string_lossy().replace('\\', "/");
        for list in ui.values_mut() {
            let Some(items) = list.as_array_mut() else { continue };
            for item in items {
                let is_file = matches!(item.get("type").and_then(Json::as_str), Some("output" | "temp"));
                if is_file && item.is_object() {
                    let sub = item.get("subfolder").and_then(Json::as_str).unwrap_or("");
                    let sub = if sub.is_empty() { base.clone() } else { format!("{base}/{sub}") };
                    item["subfolder"] = Json::String(sub);
                }
            }
        }
        ui
    }
}

/// The worker's side of a followed job: its executor events, published on the job's events stream,
/// with the files output nodes write. Publishing is best effort: a lost event never stops the job.
pub struct Sink {
    q: QueueUrl,
    sweep: String,
    previews: bool,
    con: Mutex<Option<Connection>>,
    /// After a failure, events are dropped until then rather than stall the job on reconnecting.
    down_until: Mutex<Option<std::time::Instant>>,
    /// Where the job's output nodes write (its publish folder), once known.
    output_dir: Mutex<Option<PathBuf>>,
    temp_dir: PathBuf,
}

impl Sink {
    /// None when the job is not followed.
    pub fn new(q: &QueueUrl, job: &SweepJob, temp_dir: PathBuf) -> Option<Sink> {
        let follow = job.follow.as_ref()?;
        Some(Sink {
            q: q.clone(),
            sweep: job.sweep.clone(),
            previews: follow.previews,
            con: Mutex::new(None),
            down_until: Mutex::new(None),
            output_dir: Mutex::new(None),
            temp_dir,
        })
    }

    pub fn set_output_dir(&self, dir: PathBuf) {
        if let Ok(mut d) = self.output_dir.lock() {
            *d = Some(dir);
        }
    }

    /// Publishes `event`, reconnecting once when the connection was lost. When the queue cannot be
    /// reached, events are dropped for a while (the job goes on; its outcome still ends the prompt).
    pub fn send(&self, event: &Event) {
        let Ok(mut con) = self.con.lock() else { return };
        let Ok(mut down) = self.down_until.lock() else { return };
        if down.is_some_and(|t| std::time::Instant::now() < t) {
            return;
        }
        for _ in 0..2 {
            if con.is_none() {
                *con = self.q.connect(Duration::from_secs(2)).map_err(|e| tracing::warn!("events of {}: {e}", self.sweep)).ok();
            }
            let Some(c) = con.as_mut() else { break };
            match events::publish(c, &self.q, &self.sweep, event) {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!("events of {}: {e}", self.sweep);
                    *con = None;
                }
            }
        }
        *down = Some(std::time::Instant::now() + Duration::from_secs(10));
    }

    /// The files a node's UI output lists, as (type, relative path, bytes).
    fn files(&self, ui: &Map<String, Json>) -> Vec<(String, String, Vec<u8>)> {
        let output = self.output_dir.lock().ok().and_then(|d| d.clone());
        let mut out = Vec::new();
        for item in ui.values().filter_map(Json::as_array).flatten() {
            let (Some(kind), Some(name)) = (item.get("type").and_then(Json::as_str), item.get("filename").and_then(Json::as_str)) else { continue };
            let sub = item.get("subfolder").and_then(Json::as_str).unwrap_or("");
            let root = match kind {
                "output" => output.clone(),
                "temp" => Some(self.temp_dir.clone()),
                _ => None,
            };
            let Some(root) = root else { continue };
            let rel = if sub.is_empty() { name.to_owned() } else { format!("{sub}/{name}") };
            if !Path::new(&rel).components().all(|c| matches!(c, Component::Normal(_))) {
                tracing::warn!("events of {}: not relaying {rel:?} (not a path inside the {kind} folder)", self.sweep);
                continue;
            }
            match std::fs::read(root.join(&rel)) {
                Ok(bytes) => out.push((kind.to_owned(), rel, bytes)),
                Err(e) => tracing::warn!("events of {}: cannot read {}: {e}", self.sweep, root.join(&rel).display()),
            }
        }
        out
    }
}

impl Observer for Sink {
    fn cached(&self, ids: &[&str]) {
        self.send(&Event::Cached { nodes: ids.iter().map(|s| s.to_string()).collect() });
    }
    fn executing(&self, id: &str) {
        self.send(&Event::Executing { node: id.to_owned() });
    }
    fn progress(&self, id: &str, value: u64, max: u64) {
        self.send(&Event::Progress { node: id.to_owned(), value, max });
    }
    fn wants_previews(&self) -> bool {
        self.previews
    }
    fn preview(&self, id: &str, latent: &tch::Tensor) {
        if let Some(jpeg) = latent_preview(latent) {
            self.send(&Event::Preview { node: id.to_owned(), jpeg });
        }
    }
    fn executed(&self, id: &str, ui: &Map<String, Json>) {
        for (kind, path, bytes) in self.files(ui) {
            self.send(&Event::File { kind, path, bytes });
        }
        self.send(&Event::Executed { node: id.to_owned(), ui: Json::Object(ui.clone()) });
    }
}
