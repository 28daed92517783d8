//! Sweeps on a Redis Streams queue: what the submitter, the workers and `sweep status` read and
//! write, with commands named as Redis names them.
//!
//! Layout, for a queue URL `redis://HOST:PORT/STREAM`:
//! - `STREAM`: one entry per job, fields `v` ([`VERSION`]), `sweep`, `index` and `job` (the [`Job`]
//!   as JSON). Workers read it through a consumer group (`XREADGROUP`), created at the stream's start
//!   (`XGROUP CREATE … 0 MKSTREAM`) so entries added before any worker joined are read too. An entry
//!   is acknowledged and deleted (`XACK`, `XDEL`) when its job has finished, so the stream holds only
//!   what is left to do.
//! - `STREAM:dead`: the dead-letter stream. A job that failed, that could not be read (bad JSON,
//!   another version, a graph that does not validate, a plugin that differs) or that was delivered
//!   too often without finishing is moved there with its original fields plus `error`, `worker`,
//!   `deliveries` and `entry` (its id in `STREAM`).
//! - `STREAM:sweep:ID`: a hash describing the sweep (`total`, `graph`, `submitted`, `cancelled`).
//! - `STREAM:sweep:ID:results`: job index → [`Outcome`] as JSON (done, failed or cancelled; a job
//!   delivered twice overwrites its own record, so counts stay exact).
//! - `STREAM:sweep:ID:running`: job index → the worker running it and since when.
//! - `STREAM:sweep:ID:events`: what happens while a followed job runs ([`crate::events`]).
//! - `STREAM:sweep:ID:files`: a `--collect` sweep's job files (`index`, `path`, `bytes`), one entry per
//!   file, until `sweep fetch` takes them.
//!
//! Delivery is at least once: a worker that dies holding a job leaves the entry pending in the group,
//! and another worker reclaims it (`XAUTOCLAIM`) once it has been idle for the claim timeout. A worker
//! that is slow but alive resets that idle time by re-claiming its own entry ([`heartbeat`]). A job
//! run twice writes its files once ([`crate::Publish`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadOptions, StreamReadReply};
use redis::Commands;
/// A connection to the queue's server (redis-rs's, synchronous).
pub use redis::Connection;
use serde::{Deserialize, Serialize};

use crate::Job;

/// The entry format's version (field `v`); a worker dead-letters entries of another version. (2: a
/// job may ask for its [`crate::events`].)
pub const VERSION: &str = "2";

/// The environment variable naming a PEM file of CA certificates that `rediss://` servers' certificates
/// are checked against (instead of the public roots).
pub const CA_VAR: &str = "DIFFLOOM_REDIS_CA";

/// The consumer group workers join unless `--group` names another.
pub const DEFAULT_GROUP: &str = "diffloom";

/// What can go wrong talking to the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The `--queue` argument is not `redis[s]://[user:password@]HOST[:PORT]/STREAM`.
    #[error("--queue {url:?}: {reason} (expected redis://HOST:PORT/STREAM or rediss://…)")]
    Url { url: String, reason: &'static str },
    /// The server refused or failed a command, or could not be reached. (`cause` is part of the
    /// message, not a `source`, so that it is printed once.)
    #[error("{url}: {cause}")]
    Redis { url: String, cause: redis::RedisError },
    /// `sweep status` or `cancel` of an id the queue does not know.
    #[error("{url}: no sweep {id} on this queue")]
    NoSweep { url: String, id: String },
}

impl QueueError {
    /// Whether the connection was lost (the server restarted or the network failed): reconnecting may
    /// help, unlike a refused command.
    pub fn is_connection(&self) -> bool {
        match self {
            QueueError::Redis { cause, .. } => cause.is_io_error() || cause.is_connection_dropped() || cause.is_connection_refusal() || cause.is_timeout(),
            _ => false,
        }
    }
}

/// A parsed `--queue` URL: the server's URL (the path taken off) and the stream's name.
#[derive(Clone, Debug)]
pub struct QueueUrl {
    /// What the redis client opens: scheme, credentials, host and port, and any `?query`.
    client: String,
    /// The stream holding the jobs.
    pub stream: String,
    /// The URL with its password replaced by `***`, for messages.
    pub shown: String,
}

impl QueueUrl {
    /// Parses `redis://[user:password@]HOST[:PORT]/STREAM[?query]` (or `rediss://` for TLS). The path
    /// names the stream; the database is 0.
    pub fn parse(url: &str) -> Result<QueueUrl, QueueError> {
        let bad = |reason| QueueError::Url { url: mask(url), reason };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        if scheme != "redis" && scheme != "rediss" {
            return Err(bad("the scheme must be redis or rediss"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        // The authority ends at the last '/' (a password should percent-encode '/', but be lenient).
        let (authority, stream) = rest.rsplit_once('/').ok_or_else(|| bad("no stream name after the host"))?;
        if authority.rsplit('@').next().unwrap_or("").is_empty() {
            return Err(bad("no host"));
        }
        if stream.contains('#') {
            return Err(bad("URL fragments such as #insecure are not supported; name a private CA with DIFFLOOM_REDIS_CA"));
        }
        if stream.is_empty() || stream.contains(char::is_whitespace) {
            return Err(bad("no stream name after the host"));
        }
        let client = match query {
            Some(q) => format!("{scheme}://{authority}/0?{q}"),
            None => format!("{scheme}://{authority}/0"),
        };
        redis::Client::open(client.as_str()).map_err(|_| bad("not a Redis URL (percent-encode @ : / # ? in the password)"))?;
        Ok(QueueUrl { client, stream: stream.to_owned(), shown: mask(url) })
    }

    /// Opens a connection (5 s to connect; reads wait at most `read_timeout`). A `rediss://` server's
    /// certificate is checked against the web's public roots (webpki-roots), or against the PEM
    /// certificates in the file `$DIFFLOOM_REDIS_CA` names (a private CA) when it is set.
    pub fn connect(&self, read_timeout: Duration) -> Result<Connection, QueueError> {
        let ca = std::env::var_os(CA_VAR).filter(|_| self.client.starts_with("rediss://"));
        if self.client.starts_with("rediss://") {
            // rustls needs its cryptography chosen once per process (ring, built without C++ or cmake);
            // an error means one was installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match ca {
            Some(file) => {
                let pem = std::fs::read(&file)
                    .map_err(|e| self.err(redis::RedisError::from(std::io::Error::new(e.kind(), format!("{CA_VAR}={}: {e}", Path::new(&file).display())))))?;
                redis::Client::build_with_tls(self.client.as_str(), redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
            }
            None => redis::Client::open(self.client.as_str()),
        }
        .map_err(|e| self.err(e))?;
        let con = client.get_connection_with_timeout(Duration::from_secs(5)).map_err(|e| self.err(e))?;
        con.set_read_timeout(Some(read_timeout)).map_err(|e| self.err(e))?;
        con.set_write_timeout(Some(Duration::from_secs(10))).map_err(|e| self.err(e))?;
        Ok(con)
    }

    /// A Redis error, naming this queue.
    pub fn err(&self, cause: redis::RedisError) -> QueueError {
        QueueError::Redis { url: self.shown.clone(), cause }
    }

    /// The dead-letter stream.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.stream)
    }

    fn meta(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}", self.stream)
    }

    fn results(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:results", self.stream)
    }

    fn running(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:running", self.stream)
    }

    /// The files of a `--collect` sweep's finished jobs, until `sweep fetch` takes them.
    fn files(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:files", self.stream)
    }

    /// A followed job's events stream ([`crate::events`]).
    pub fn events(&self, sweep: &str) -> String {
        format!("{}:sweep:{sweep}:events", self.stream)
    }
}

/// `url` with the password (between `:` and `@`) replaced by `***`.
fn mask(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How a job ended, as recorded in the sweep's results hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// `done`, `failed` or `cancelled`.
    pub state: String,
    /// The worker that ended it (empty for `sweep cancel`).
    pub worker: String,
    /// The job's own time in seconds (0 when it did not run).
    pub secs: f64,
    /// When it ended, in milliseconds since the Unix epoch.
    pub at: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Outcome {
    pub fn new(state: &str, worker: &str, secs: f64, error: Option<String>) -> Outcome {
        Outcome { state: state.to_owned(), worker: worker.to_owned(), secs, at: now_ms(), error }
    }
}

/// Creates the consumer group at the stream's start (and the stream), unless it exists.
pub fn ensure_group(con: &mut Connection, q: &QueueUrl, group: &str) -> Result<(), QueueError> {
    match con.xgroup_create_mkstream::<_, _, _, ()>(&q.stream, group, "0") {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(q.err(e)),
    }
}

/// What [`submit`] did.
#[derive(Debug, Default)]
pub struct Submitted {
    /// Entries added to the stream.
    pub added: usize,
    /// Jobs left out because an earlier submission of the same sweep finished them.
    pub done_before: usize,
    /// Jobs left out because an earlier submission of the same sweep has them in the stream still.
    pub queued_before: usize,
}

/// Puts the jobs of one sweep on the queue (one `XADD` per job), skipping jobs already done by an
/// earlier submission of the same sweep; a cancelled sweep submitted again is revived.
pub fn submit(con: &mut Connection, q: &QueueUrl, group: &str, jobs: &[Job]) -> Result<Submitted, QueueError> {
    let Some(first) = jobs.first() else { return Ok(Submitted::default()) };
    ensure_group(con, q, group)?;
    let results: HashMap<String, String> = con.hgetall(q.results(&first.sweep)).map_err(|e| q.err(e))?;
    let mut queued = std::collections::HashSet::new();
    entries_of(con, q, &first.sweep, |e| {
        queued.insert(e.get::<String>("index").unwrap_or_default());
    })?;
    let mut pipe = redis::pipe();
    pipe.atomic();
    pipe.hset_multiple(
        q.meta(&first.sweep),
        &[("total", first.total.to_string()), ("graph", first.graph_name.clone()), ("submitted", now_ms().to_string()), ("cancelled", "0".into())],
    )
    .ignore();
    if first.collect {
        pipe.hset(q.meta(&first.sweep), "collect", "1").ignore();
    }
    let mut out = Submitted::default();
    for job in jobs {
        let key = job.index.to_string();
        if let Some(o) = results.get(&key).and_then(|r| serde_json::from_str::<Outcome>(r).ok()) {
            if o.state == "done" {
                out.done_before += 1;
                continue;
            }
            pipe.hdel(q.results(&job.sweep), &key).ignore();
        }
        if queued.contains(&key) {
            out.queued_before += 1;
            continue;
        }
        let json = serde_json::to_string(job).expect("a job serialises");
        pipe.xadd(&q.stream, "*", &[("v", VERSION), ("sweep", job.sweep.as_str()), ("index", key.as_str()), ("job", json.as_str())]).ignore();
        out.added += 1;
    }
    pipe.query::<()>(con).map_err(|e| q.err(e))?;
    Ok(out)
}

/// One worker's share of a sweep.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WorkerShare {
    pub done: usize,
    pub failed: usize,
    /// Seconds spent on its done jobs.
    pub secs: f64,
}

/// Where a sweep stands.
#[derive(Debug, Default)]
pub struct Status {
    pub total: usize,
    pub done: usize,
    pub failed: usize,
    pub cancelled: usize,
    /// Being run now (taken by a worker, not finished).
    pub running: usize,
    /// Not taken yet: `total - done - failed - cancelled - running`.
    pub pending: usize,
    /// Whether `sweep cancel` was called.
    pub cancel_requested: bool,
    /// Worker name → its jobs.
    pub workers: BTreeMap<String, WorkerShare>,
    /// (job index, worker, error) of each failed job, by index.
    pub failures: Vec<(usize, String, String)>,
    /// First and last finishing times (ms since the epoch), for the overall rate.
    pub span_ms: Option<(u64, u64)>,
}

impl Status {
    /// Whether every job has ended (done, failed or cancelled).
    pub fn finished(&self) -> bool {
        self.done + self.failed + self.cancelled >= self.total
    }
}

/// Reads a sweep's counts and failures.
pub fn status(con: &mut Connection, q: &QueueUrl, sweep: &str) -> Result<Status, QueueError> {
    let meta: HashMap<String, String> = con.hgetall(q.meta(sweep)).map_err(|e| q.err(e))?;
    let Some(total) = meta.get("total").and_then(|t| t.parse::<usize>().ok()) else {
        return Err(QueueError::NoSweep { url: q.shown.clone(), id: sweep.to_owned() });
    };
    let results: HashMap<String, String> = con.hgetall(q.results(sweep)).map_err(|e| q.err(e))?;
    let running: HashMap<String, String> = con.hgetall(q.running(sweep)).map_err(|e| q.err(e))?;
    let mut s = Status { total, cancel_requested: meta.get("cancelled").map(String::as_str) == Some("1"), ..Status::default() };
    for (index, text) in &results {
        let Ok(o) = serde_json::from_str::<Outcome>(text) else { continue };
        let share = s.workers.entry(o.worker.clone()).or_default();
        match o.state.as_str() {
            "done" => {
                s.done += 1;
                share.done += 1;
                share.secs += o.secs;
            }
            "failed" => {
                s.failed += 1;
                share.failed += 1;
                s.failures.push((index.parse().unwrap_or(usize::MAX), o.worker.clone(), o.error.clone().unwrap_or_default()));
            }
            _ => s.cancelled += 1,
        }
        if o.state != "cancelled" {
            s.span_ms = Some(match s.span_ms {
                Some((a, b)) => (a.min(o.at), b.max(o.at)),
                None => (o.at, o.at),
            });
        }
    }
    s.workers.remove("");
    s.failures.sort();
    s.running = running.keys().filter(|k| !results.contains_key(*k)).count();
    s.pending = total.saturating_sub(s.done + s.failed + s.cancelled + s.running);
    Ok(s)
}

/// How job `index` of `sweep` ended, if it has (a record that does not parse counts as a failure).
pub fn outcome(con: &mut Connection, q: &QueueUrl, sweep: &str, index: usize) -> Result<Option<Outcome>, QueueError> {
    let text: Option<String> = con.hget(q.results(sweep), index.to_string()).map_err(|e| q.err(e))?;
    Ok(text.map(|t| serde_json::from_str(&t).unwrap_or_else(|e| Outcome::new("failed", "", 0.0, Some(format!("an unreadable outcome record ({e}): {t}"))))))
}

/// Whether the queue still knows the sweep (a server restarted without persistence, or flushed, does
/// not).
pub fn sweep_exists(con: &mut Connection, q: &QueueUrl, sweep: &str) -> Result<bool, QueueError> {
    con.exists(q.meta(sweep)).map_err(|e| q.err(e))
}

/// Lets a finished sweep's records go after `secs` (a served prompt's, once its end was relayed).
pub fn expire_sweep(con: &mut Connection, q: &QueueUrl, sweep: &str, secs: i64) -> Result<(), QueueError> {
    let mut pipe = redis::pipe();
    for key in [q.meta(sweep), q.results(sweep), q.running(sweep), q.files(sweep)] {
        pipe.expire(key, secs).ignore();
    }
    pipe.query::<()>(con).map_err(|e| q.err(e))
}

/// Cancels a sweep: its entries still in the stream are acknowledged and deleted (recorded as
/// cancelled), and workers skip any of its entries they hold or reclaim; a job being run stops at its
/// next step. Returns how many entries were dropped.
pub fn cancel(con: &mut Connection, q: &QueueUrl, group: &str, sweep: &str) -> Result<usize, QueueError> {
    if !con.exists::<_, bool>(q.meta(sweep)).map_err(|e| q.err(e))? {
        return Err(QueueError::NoSweep { url: q.shown.clone(), id: sweep.to_owned() });
    }
    con.hset::<_, _, _, ()>(q.meta(sweep), "cancelled", "1").map_err(|e| q.err(e))?;
    let running: HashMap<String, String> = con.hgetall(q.running(sweep)).map_err(|e| q.err(e))?;
    let mut drop = Vec::new();
    entries_of(con, q, sweep, |entry| {
        let index = entry.get::<String>("index").unwrap_or_default();
        // A running job's worker stops it and records the end.
        if !running.contains_key(&index) {
            drop.push((entry.id.clone(), index));
        }
    })?;
    let outcome = serde_json::to_string(&Outcome::new("cancelled", "", 0.0, None)).expect("serialises");
    for chunk in drop.chunks(500) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (id, index) in chunk {
            pipe.xack(&q.stream, group, &[id]).ignore().xdel(&q.stream, &[id]).ignore().hset(q.results(sweep), index, &outcome).ignore();
        }
        pipe.query::<()>(con).map_err(|e| q.err(e))?;
    }
    Ok(drop.len())
}

/// Calls `f` on each entry of `sweep` in the stream, in pages of 500 (`XRANGE … COUNT`).
fn entries_of(con: &mut Connection, q: &QueueUrl, sweep: &str, mut f: impl FnMut(&StreamId)) -> Result<(), QueueError> {
    let mut start = "-".to_owned();
    loop {
        let page: redis::streams::StreamRangeReply = con.xrange_count(&q.stream, &start, "+", 500).map_err(|e| q.err(e))?;
        let Some(last) = page.ids.last() else { return Ok(()) };
        start = format!("({}", last.id);
        page.ids.iter().filter(|e| e.get::<String>("sweep").as_deref() == Some(sweep)).for_each(&mut f);
    }
}

/// Whether `sweep cancel` was called for this sweep.
pub fn is_cancelled(con: &mut Connection, q: &QueueUrl, sweep: &str) -> Result<bool, QueueError> {
    let flag: Option<String> = con.hget(q.meta(sweep), "cancelled").map_err(|e| q.err(e))?;
    Ok(flag.as_deref() == Some("1"))
}

/// A warning when the server would lose the queue on a restart (neither AOF nor RDB snapshots);
/// None when it persists, or when `CONFIG` is not allowed.
pub fn persistence_warning(con: &mut Connection) -> Option<String> {
    let get = |con: &mut Connection, name: &str| -> Option<String> {
        let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(con).ok()?;
        pair.get(1).cloned()
    };
    let aof = get(con, "appendonly")?;
    let save = get(con, "save")?;
    (aof != "yes" && save.trim().is_empty())
        .then(|| "the Redis server has no persistence (appendonly no, no save points): a restart loses the queue; start it with --appendonly yes".to_owned())
}

/// One entry taken from the stream: its id, raw fields and how often it was delivered.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
    /// Deliveries so far, this one included.
    pub deliveries: usize,
}

impl Entry {
    fn from_stream(e: StreamId, deliveries: usize) -> Entry {
        let mut fields: Vec<(String, Vec<u8>)> = e.map.iter().map(|(k, v)| (k.clone(), redis::from_redis_value::<Vec<u8>>(v).unwrap_or_default())).collect();
        fields.sort();
        Entry { id: e.id, fields, deliveries }
    }

    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// The job this entry carries, or why it carries none.
    pub fn job(&self) -> Result<Job, String> {
        let text = |name: &str| self.field(name).map(|v| String::from_utf8_lossy(v).into_owned());
        match text("v") {
            // Version 1 entries are version 2 entries without `follow`.
            Some(v) if v == VERSION || v == "1" => {}
            Some(v) => return Err(format!("entry {}: format version {v:?}, this worker reads {VERSION:?}", self.id)),
            None => return Err(format!("entry {}: no field \"v\" (not a diffloom job)", self.id)),
        }
        let json = self.field("job").ok_or_else(|| format!("entry {}: no field \"job\"", self.id))?;
        let job: Job = serde_json::from_slice(json).map_err(|e| format!("entry {}: the job is not valid JSON: {e}", self.id))?;
        if text("sweep").as_deref() != Some(job.sweep.as_str()) || text("index") != Some(job.index.to_string()) {
            return Err(format!("entry {}: its sweep and index fields differ from the job's", self.id));
        }
        Ok(job)
    }

    /// The sweep the entry names, even when its job does not parse.
    fn sweep_and_index(&self) -> Option<(String, String)> {
        let sweep = String::from_utf8(self.field("sweep")?.to_vec()).ok()?;
        let index = String::from_utf8(self.field("index")?.to_vec()).ok()?;
        Some((sweep, index))
    }
}

/// Reads the next new entry for `consumer`, waiting at most `block`; None when none came.
pub fn read(con: &mut Connection, q: &QueueUrl, group: &str, consumer: &str, block: Duration) -> Result<Option<Entry>, QueueError> {
    let options = StreamReadOptions::default().group(group, consumer).count(1).block(block.as_millis() as usize);
    let reply: Option<StreamReadReply> = con.xread_options(&[&q.stream], &[">"], &options).map_err(|e| q.err(e))?;
    Ok(reply.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next()).map(|e| Entry::from_stream(e, 1)))
}

/// Takes over one entry that another consumer has left pending for at least `min_idle` (its worker
/// died or stalled), with its delivery count; None when there is none.
pub fn reclaim(con: &mut Connection, q: &QueueUrl, group: &str, consumer: &str, min_idle: Duration) -> Result<Option<Entry>, QueueError> {
    let options = StreamAutoClaimOptions::default().count(1);
    let reply: StreamAutoClaimReply = con.xautoclaim_options(&q.stream, group, consumer, min_idle.as_millis() as u64, "0-0", options).map_err(|e| q.err(e))?;
    let Some(entry) = reply.claimed.into_iter().next() else { return Ok(None) };
    let pending: StreamPendingCountReply = con.xpending_count(&q.stream, group, &entry.id, &entry.id, 1).map_err(|e| q.err(e))?;
    let deliveries = pending.ids.first().map(|p| p.times_delivered).unwrap_or(1);
    Ok(Some(Entry::from_stream(entry, deliveries)))
}

/// Resets the idle time of `consumer`'s own pending entry so that nobody reclaims it, but only while
/// it is still this consumer's (`XCLAIM … JUSTID` does not count a delivery). False when another
/// worker has taken it (this one was thought dead) or it is gone (cancelled).
pub fn heartbeat(con: &mut Connection, q: &QueueUrl, group: &str, consumer: &str, id: &str) -> Result<bool, QueueError> {
    let script = redis::Script::new(
        r"
        local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
        if #p == 0 or p[1][2] ~= ARGV[2] then return 0 end
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
        return 1",
    );
    let mine: i64 = script.key(&q.stream).arg(group).arg(consumer).arg(id).invoke(con).map_err(|e| q.err(e))?;
    Ok(mine == 1)
}

/// Records that `worker` runs `job`.
pub fn mark_running(con: &mut Connection, q: &QueueUrl, job: &Job, worker: &str) -> Result<(), QueueError> {
    con.hset::<_, _, _, ()>(q.running(&job.sweep), job.index.to_string(), format!("{worker} {}", now_ms())).map_err(|e| q.err(e))
}

/// Ends an entry: acknowledged, deleted from the stream and its outcome recorded, in one transaction.
/// Without `overwrite` an outcome already recorded stays (a redelivered job found done keeps the
/// record of the run that did it).
pub fn finish(con: &mut Connection, q: &QueueUrl, group: &str, entry: &Entry, job: &Job, outcome: &Outcome, overwrite: bool) -> Result<(), QueueError> {
    let json = serde_json::to_string(outcome).expect("an outcome serialises");
    let mut pipe = redis::pipe();
    pipe.atomic().xack(&q.stream, group, &[&entry.id]).ignore().xdel(&q.stream, &[&entry.id]).ignore();
    if overwrite {
        pipe.hset(q.results(&job.sweep), job.index.to_string(), json).ignore();
    } else {
        pipe.hset_nx(q.results(&job.sweep), job.index.to_string(), json).ignore();
    }
    pipe.hdel(q.running(&job.sweep), job.index.to_string()).ignore();
    pipe.query::<()>(con).map_err(|e| q.err(e))
}

/// Moves an entry to the dead-letter stream with `error` (and records the job as failed when the
/// entry names its sweep), in one transaction.
pub fn dead_letter(con: &mut Connection, q: &QueueUrl, group: &str, entry: &Entry, worker: &str, error: &str) -> Result<(), QueueError> {
    let mut fields: Vec<(String, Vec<u8>)> =
        entry.fields.iter().filter(|(k, _)| !matches!(k.as_str(), "error" | "worker" | "deliveries" | "entry")).cloned().collect();
    fields.push(("error".into(), error.as_bytes().to_vec()));
    fields.push(("worker".into(), worker.as_bytes().to_vec()));
    fields.push(("deliveries".into(), entry.deliveries.to_string().into_bytes()));
    fields.push(("entry".into(), entry.id.clone().into_bytes()));
    let mut pipe = redis::pipe();
    pipe.atomic().xadd(q.dead(), "*", &fields).ignore().xack(&q.stream, group, &[&entry.id]).ignore().xdel(&q.stream, &[&entry.id]).ignore();
    if let Some((sweep, index)) = entry.sweep_and_index() {
        // Only for a job of a sweep that exists (a malformed entry's fields may name anything), and
        // never over a done job (its files exist; this was a bad duplicate).
        let total: Option<usize> = con.hget(q.meta(&sweep), "total").map_err(|e| q.err(e))?;
        let previous: Option<String> = con.hget(q.results(&sweep), &index).map_err(|e| q.err(e))?;
        let done = previous.and_then(|p| serde_json::from_str::<Outcome>(&p).ok()).is_some_and(|o| o.state == "done");
        if index.parse::<usize>().ok().zip(total).is_some_and(|(i, t)| i < t) && !done {
            let outcome = serde_json::to_string(&Outcome::new("failed", worker, 0.0, Some(error.to_owned()))).expect("serialises");
            pipe.hset(q.results(&sweep), &index, outcome).ignore().hdel(q.running(&sweep), &index).ignore();
        }
    }
    pipe.query::<()>(con).map_err(|e| q.err(e))
}

/// Gives an entry back to the queue at once (a worker stopping mid-job): a copy is added for another
/// worker and the original acknowledged and deleted, in one transaction.
pub fn release(con: &mut Connection, q: &QueueUrl, group: &str, entry: &Entry, job: &Job) -> Result<(), QueueError> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .xadd(&q.stream, "*", &entry.fields)
        .ignore()
        .xack(&q.stream, group, &[&entry.id])
        .ignore()
        .xdel(&q.stream, &[&entry.id])
        .ignore()
        .hdel(q.running(&job.sweep), job.index.to_string())
        .ignore();
    pipe.query::<()>(con).map_err(|e| q.err(e))
}

/// The most bytes of files one `--collect` job puts on the queue (Redis keeps them in memory until
/// `sweep fetch` takes them; one value may not exceed 512 MB).
pub const MAX_COLLECT_BYTES: usize = 256 << 20;

/// Whether the sweep was submitted with `--collect`.
pub fn collects(con: &mut Connection, q: &QueueUrl, sweep: &str) -> Result<bool, QueueError> {
    let flag: Option<String> = con.hget(q.meta(sweep), "collect").map_err(|e| q.err(e))?;
    Ok(flag.as_deref() == Some("1"))
}

/// How many collected files wait for `sweep fetch`.
pub fn collected_count(con: &mut Connection, q: &QueueUrl, sweep: &str) -> Result<usize, QueueError> {
    con.xlen(q.files(sweep)).map_err(|e| q.err(e))
}

/// Deletes the (empty) files stream of a finished sweep.
pub fn drop_collected(con: &mut Connection, q: &QueueUrl, sweep: &str) -> Result<(), QueueError> {
    con.del::<_, ()>(q.files(sweep)).map_err(|e| q.err(e))
}

/// Puts a finished job's files (from [`crate::job::job_files`]) on the sweep's files stream, in one
/// transaction, for `sweep fetch`. A job delivered twice puts them there twice; fetching keeps the
/// first copy.
pub fn upload_files(con: &mut Connection, q: &QueueUrl, job: &Job, files: &[(String, Vec<u8>)]) -> Result<(), QueueError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let index = job.index.to_string();
    for (path, bytes) in files {
        let fields: [(&str, &[u8]); 3] = [("index", index.as_bytes()), ("path", path.as_bytes()), ("bytes", bytes)];
        pipe.xadd(q.files(&job.sweep), "*", &fields).ignore();
    }
    pipe.query::<()>(con).map_err(|e| q.err(e))
}

/// One collected file: its entry id, job index, path in the job's folder and contents; None for the
/// parts an entry lacks (not a file entry: to be skipped and deleted).
pub struct Collected {
    pub id: String,
    pub index: Option<usize>,
    pub path: Option<String>,
    pub bytes: Option<Vec<u8>>,
}

/// Up to `count` collected files of `sweep`, oldest first.
pub fn collected(con: &mut Connection, q: &QueueUrl, sweep: &str, count: usize) -> Result<Vec<Collected>, QueueError> {
    let page: redis::streams::StreamRangeReply = con.xrange_count(q.files(sweep), "-", "+", count).map_err(|e| q.err(e))?;
    Ok(page
        .ids
        .into_iter()
        .map(|mut e| {
            let index = e.get::<String>("index").and_then(|i| i.parse().ok());
            let path = e.get::<String>("path");
            let bytes = e.map.remove("bytes").and_then(|v| redis::from_owned_redis_value::<Vec<u8>>(v).ok());
            Collected { id: e.id, index, path, bytes }
        })
        .collect())
}

/// Deletes collected files that were fetched.
pub fn forget_collected(con: &mut Connection, q: &QueueUrl, sweep: &str, ids: &[String]) -> Result<(), QueueError> {
    if ids.is_empty() {
        return Ok(());
    }
    con.xdel::<_, _, ()>(q.files(sweep), ids).map_err(|e| q.err(e))
}

/// The dead-letter stream's entries (id and fields as text), oldest first, at most `count`.
pub fn dead_letters(con: &mut Connection, q: &QueueUrl, count: usize) -> Result<Vec<(String, BTreeMap<String, String>)>, QueueError> {
    let page: redis::streams::StreamRangeReply = con.xrange_count(q.dead(), "-", "+", count).map_err(|e| q.err(e))?;
    Ok(page
        .ids
        .into_iter()
        .map(|e| {
            let fields = e.map.iter().map(|(k, v)| (k.clone(), redis::from_redis_value::<String>(v).unwrap_or_default())).collect();
            (e.id, fields)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_stream_and_hide_the_password() {
        let q = QueueUrl::parse("redis://127.0.0.1:6379/jobs").unwrap();
        assert_eq!((q.client.as_str(), q.stream.as_str()), ("redis://127.0.0.1:6379/0", "jobs"));
        let q = QueueUrl::parse("rediss://:s3cret@example.com:6380/sweeps?protocol=resp2").unwrap();
        assert_eq!(q.client, "rediss://:s3cret@example.com:6380/0?protocol=resp2");
        assert_eq!(q.stream, "sweeps");
        assert!(!q.shown.contains("s3cret"), "{}", q.shown);
        for bad in ["redis://host:6379", "redis://host:6379/", "http://host/jobs", "jobs", "redis:///jobs"] {
            let e = QueueUrl::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected redis://HOST:PORT/STREAM"), "{bad}: {e}");
        }
        let e = QueueUrl::parse("rediss://host/jobs#insecure").unwrap_err().to_string();
        assert!(e.contains("DIFFLOOM_REDIS_CA"), "{e}");
        let e = QueueUrl::parse("redis://user:pw@host/").unwrap_err().to_string();
        assert!(!e.contains(":pw@"), "{e}");
    }

    #[test]
    fn entries_of_another_version_or_bad_json_are_refused() {
        let entry = |fields: &[(&str, &str)]| Entry {
            id: "1-0".into(),
            fields: fields.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
            deliveries: 1,
        };
        assert!(entry(&[("v", "9"), ("job", "{}")]).job().unwrap_err().contains("version \"9\""));
        assert!(entry(&[("job", "{}")]).job().unwrap_err().contains("no field \"v\""));
        assert!(entry(&[("v", "2"), ("job", "{not json")]).job().unwrap_err().contains("not valid JSON"));
        let job = Job {
            sweep: "sabc".into(),
            index: 3,
            total: 4,
            graph: "g".into(),
            graph_name: "g.ron".into(),
            graph_dir: ".".into(),
            sets: vec![],
            plugins: BTreeMap::new(),
            follow: None,
            collect: false,
        };
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(entry(&[("v", "2"), ("sweep", "sabc"), ("index", "3"), ("job", &json)]).job().unwrap(), job);
        assert!(entry(&[("v", "2"), ("sweep", "sabc"), ("index", "2"), ("job", &json)]).job().unwrap_err().contains("differ"));
    }
}
