//! `diffloom worker --queue redis://HOST:PORT/STREAM`: runs sweep jobs from a Redis stream, as the
//! Redis Streams tutorial reads: reclaim what dead workers left pending, else read a new entry; run
//! it; write its outputs; acknowledge. One executor serves every job, so models stay loaded.
//!
//! Delivery is at least once and outputs are idempotent ([`Publish`]): a job run twice (its worker
//! was thought dead, or died after publishing but before acknowledging) writes its files once. A
//! heartbeat thread re-claims the running job's entry so that a slow job is not taken over; only an
//! entry idle for `--claim-timeout` (its worker died or hung) moves. Nothing an entry carries crashes
//! the worker: an entry that cannot be read or run goes to the dead-letter stream with its error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use diffloom_core::{Executor, NodeError, Registry};
use diffloom_server::remote::Sink;
use diffloom_sweep::events::Event;
use diffloom_sweep::queue::{self, Connection, Entry, Outcome, QueueError, QueueUrl};
use diffloom_sweep::{Job, Publish};

use super::run::{run_options, Settings};
use super::sweep::{check_plugins, load_job};
use crate::cli::WorkerArgs;
use crate::session;

/// How long one read waits for a new entry: Ctrl-C is noticed within this.
const BLOCK: Duration = Duration::from_secs(1);

/// Why the running job was stopped (the executor's cancel flag says only that it was).
const STOP_NONE: u8 = 0;
/// Ctrl-C twice: give the job back to the queue.
const STOP_RELEASE: u8 = 1;
/// `sweep cancel`.
const STOP_CANCELLED: u8 = 2;

pub fn worker(args: WorkerArgs, device: Option<String>) -> Result<ExitCode> {
    let q = QueueUrl::parse(&args.queue)?;
    let name = args.name.clone().unwrap_or_else(default_name);
    let claim_timeout = Duration::from_secs_f64(args.claim_timeout.max(0.1));
    if let Some(n) = args.threads {
        tch::set_num_threads(n.max(1) as i32);
    }
    let folders = session::folders(&args.models, &args.extra_model_paths, args.embeddings.as_deref(), &args.input_dir)?;
    let root = args.output_dir.clone();
    let disk_cache = if args.no_disk_cache { None } else { args.cache_dir.clone().or_else(session::default_cache_dir).map(|d| (d, args.disk_cache_mb << 20)) };
    let settings =
        Settings { output_dir: root.clone(), device, dtype: args.dtype.map(|d| d.kind()), folders, disk_cache, max_memory: args.max_memory.map(|m| m << 20) };
    // As `run` sets them up (the memory budget is this thread's, which runs every job).
    let mut options = run_options(settings)?;
    options.folders.confined = args.confine;
    let cancel = options.cancel.clone();
    let mut executor = Executor::new(options, args.cache_mb << 20);
    let registry = session::registry();

    let mut con = q.connect(BLOCK * 5)?;
    queue::ensure_group(&mut con, &q, &args.group)?;
    if let Some(warning) = queue::persistence_warning(&mut con) {
        tracing::warn!("{}: {warning}", q.shown);
    }

    let quit = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicU8::new(STOP_NONE));
    install_ctrlc(quit.clone(), stop.clone(), cancel.clone());
    let beat = Heartbeat::start(q.clone(), args.group.clone(), name.clone(), claim_timeout, stop.clone(), cancel.clone());
    println!("worker {name}: reading {} (group {}), outputs in {}", q.shown, args.group, root.display());

    let mut w = Worker { q, group: args.group, name, root, claim_timeout, max_retries: args.max_retries, confine: args.confine, registry, beat, stop, cancel };
    let mut jobs = 0;
    while !quit.load(Ordering::SeqCst) && args.max_jobs.is_none_or(|m| jobs < m) {
        match w.step(&mut con, &mut executor) {
            Ok(true) => jobs += 1,
            Ok(false) => {}
            // Ctrl-C interrupts a blocking read (EINTR): that is the stop, not a lost connection.
            Err(_) if quit.load(Ordering::SeqCst) => break,
            Err(e) if e.is_connection() => {
                eprintln!("worker {}: lost the queue ({e}); reconnecting", w.name);
                con = loop {
                    std::thread::sleep(Duration::from_secs(1));
                    if quit.load(Ordering::SeqCst) {
                        println!("worker {}: stopped after {jobs} jobs", w.name);
                        return Ok(ExitCode::SUCCESS);
                    }
                    match w.q.connect(BLOCK * 5) {
                        Ok(c) => break c,
                        Err(e) => tracing::info!("reconnecting: {e}"),
                    }
                };
                // A restarted server without persistence lost the group (and the jobs).
                queue::ensure_group(&mut con, &w.q, &w.group)?;
                eprintln!("worker {}: reconnected", w.name);
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!("worker {}: stopped after {jobs} jobs", w.name);
    Ok(ExitCode::SUCCESS)
}

/// `HOSTNAME-PID`: unique among the workers of one group.
fn default_name() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty());
    let host = host.or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned())).filter(|h| !h.is_empty());
    format!("{}-{}", host.unwrap_or_else(|| "worker".into()), std::process::id())
}

/// First Ctrl-C: finish the running job, then exit. Second: stop it now and give it back to the
/// queue. Third: exit at once (the job stays pending and is reclaimed after the claim timeout).
fn install_ctrlc(quit: Arc<AtomicBool>, stop: Arc<AtomicU8>, cancel: Arc<AtomicBool>) {
    let presses = AtomicU8::new(0);
    let result = ctrlc::set_handler(move || match presses.fetch_add(1, Ordering::SeqCst) {
        0 => {
            quit.store(true, Ordering::SeqCst);
            eprintln!("finishing the current job, then stopping (Ctrl-C again to give it back now)");
        }
        1 => {
            stop.store(STOP_RELEASE, Ordering::SeqCst);
            cancel.store(true, Ordering::SeqCst);
            eprintln!("giving the current job back to the queue (Ctrl-C again to quit now)");
        }
        _ => std::process::exit(130),
    });
    if let Err(e) = result {
        tracing::warn!("Ctrl-C handling unavailable: {e}");
    }
}

struct Worker {
    q: QueueUrl,
    group: String,
    name: String,
    root: PathBuf,
    claim_timeout: Duration,
    max_retries: usize,
    /// `--confine`; a followed job (a served prompt, from people on the web) always runs confined.
    confine: bool,
    registry: Registry,
    beat: Heartbeat,
    stop: Arc<AtomicU8>,
    cancel: Arc<AtomicBool>,
}

impl Worker {
    /// Takes one entry (a dead worker's first, else a new one) and ends it; false when none came.
    fn step(&mut self, con: &mut Connection, executor: &mut Executor) -> Result<bool, QueueError> {
        let asked = Instant::now();
        let entry = match queue::reclaim(con, &self.q, &self.group, &self.name, self.claim_timeout)? {
            Some(e) => {
                println!("worker {}: took over entry {} (delivery {})", self.name, e.id, e.deliveries);
                e
            }
            None => match queue::read(con, &self.q, &self.group, &self.name, BLOCK)? {
                Some(e) => e,
                None => return Ok(false),
            },
        };
        let handled = self.handle(con, executor, entry, asked.elapsed());
        self.beat.watch(None);
        handled?;
        Ok(true)
    }

    /// Puts a `--collect` job's files on the queue for `sweep fetch` (before the job is recorded done,
    /// so that a fetch that finds every job ended finds every file). `Ok(Some(error))`: they cannot be
    /// collected (unreadable, too large, refused by the server), and the job fails with that error;
    /// `Err`: the connection was lost (the job stays pending and is done again).
    fn collect(&self, con: &mut Connection, job: &Job) -> Result<Option<String>, QueueError> {
        if !job.collect {
            return Ok(None);
        }
        let dir = job.output_dir(&self.root);
        let files = match diffloom_sweep::job_files(&dir) {
            Ok(f) => f,
            Err(e) => return Ok(Some(format!("{}: cannot read the job's files to collect them: {e}", dir.display()))),
        };
        let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
        if bytes > queue::MAX_COLLECT_BYTES {
            return Ok(Some(format!("{}: {bytes} bytes of files, more than --collect puts on the queue ({} bytes)", dir.display(), queue::MAX_COLLECT_BYTES)));
        }
        match queue::upload_files(con, &self.q, job, &files) {
            Ok(()) => Ok(None),
            Err(e) if e.is_connection() => Err(e),
            Err(e) => Ok(Some(format!("cannot collect the job's files: {e}"))),
        }
    }

    fn dead(&self, con: &mut Connection, entry: &Entry, error: &str) -> Result<(), QueueError> {
        println!("worker {}: entry {} moved to {}: {error}", self.name, entry.id, self.q.dead());
        queue::dead_letter(con, &self.q, &self.group, entry, &self.name, error)
    }

    /// Ends one entry. `fetched`: the time taken to get it (the queue's share of the job, with
    /// the commands around the run, reported on the job's line).
    fn handle(&mut self, con: &mut Connection, executor: &mut Executor, entry: Entry, fetched: Duration) -> Result<(), QueueError> {
        let asked = Instant::now();
        let job = match entry.job() {
            Ok(job) => job,
            Err(e) => return self.dead(con, &entry, &e),
        };
        let label = format!("job {} of {} ({})", job.index, job.sweep, job.describe());
        // A followed job (a served prompt) reports what happens to it; each end is told before it is
        // recorded, so whoever follows it never finds an outcome without its end.
        let sink = Sink::new(&self.q, &job, executor.options.folders.temp_dir.clone()).map(Arc::new);
        let end = |status: &str, message: Option<String>| {
            if let Some(s) = &sink {
                s.send(&Event::end(status, message));
            }
        };
        if queue::is_cancelled(con, &self.q, &job.sweep)? {
            println!("worker {}: {label}: skipped, the sweep was cancelled", self.name);
            end("cancelled", None);
            return queue::finish(con, &self.q, &self.group, &entry, &job, &Outcome::new("cancelled", &self.name, 0.0, None), true);
        }
        if entry.deliveries > self.max_retries + 1 {
            let error = format!("{label}: delivered {} times without finishing (the workers that took it died or hung)", entry.deliveries);
            end("error", Some(error.clone()));
            return self.dead(con, &entry, &error);
        }
        let validating = Instant::now();
        let graph = match load_job(&job, &self.registry).and_then(|g| check_plugins(&job, &g).map(|_| g)) {
            Ok(g) => g,
            Err(e) => {
                end("error", Some(format!("{e:#}")));
                return self.dead(con, &entry, &format!("{e:#}"));
            }
        };
        let validation = validating.elapsed();
        let publish = match Publish::begin(&self.root, &job) {
            Ok(Some(p)) => p,
            Ok(None) => {
                // Published by an earlier delivery that was not acknowledged: its files stand.
                println!("worker {}: {label}: already done", self.name);
                if let Some(error) = self.collect(con, &job)? {
                    end("error", Some(error.clone()));
                    return self.dead(con, &entry, &format!("{label}: {error}"));
                }
                end("success", None);
                return queue::finish(con, &self.q, &self.group, &entry, &job, &Outcome::new("done", &self.name, 0.0, None), false);
            }
            Err(e) => {
                let error = format!("{}: cannot write the outputs of {label}: {e}", self.root.display());
                end("error", Some(error.clone()));
                return self.dead(con, &entry, &error);
            }
        };
        queue::mark_running(con, &self.q, &job, &self.name)?;
        // Without the graph's validation, which a local sweep does too.
        let queue_time = fetched + asked.elapsed().saturating_sub(validation);
        executor.options.output_dir = publish.dir().to_path_buf();
        executor.options.folders.confined = self.confine || job.follow.is_some();
        self.stop.store(STOP_NONE, Ordering::SeqCst);
        self.cancel.store(false, Ordering::SeqCst);
        self.beat.watch(Some((entry.id.clone(), job.sweep.clone())));
        if let Some(s) = &sink {
            s.set_output_dir(publish.dir().to_path_buf());
            s.send(&Event::Start { worker: self.name.clone() });
            executor.options.observer = Some(s.clone());
        }
        let started = Instant::now();
        let report = executor.run(&graph);
        executor.options.observer = None;
        // The heartbeat goes on until the entry is ended (collecting a large job's files takes time).
        let secs = started.elapsed().as_secs_f64();
        match report.error {
            None => match publish.commit() {
                Ok(_) => {
                    let finishing = Instant::now();
                    if let Some(error) = self.collect(con, &job)? {
                        end("error", Some(error.clone()));
                        return self.dead(con, &entry, &format!("{label}: {error}"));
                    }
                    end("success", None);
                    queue::finish(con, &self.q, &self.group, &entry, &job, &Outcome::new("done", &self.name, secs, None), true)?;
                    let queue_ms = (queue_time + finishing.elapsed()).as_secs_f64() * 1000.0;
                    println!("worker {}: {label}: done in {secs:.2} s (queue {queue_ms:.1} ms)", self.name);
                    Ok(())
                }
                Err(e) => {
                    let error = format!("{}: cannot publish {label}: {e}", self.root.display());
                    end("error", Some(error.clone()));
                    self.dead(con, &entry, &error)
                }
            },
            Some(e) if matches!(e.cause, NodeError::Cancelled) => {
                publish.abandon();
                self.cancel.store(false, Ordering::SeqCst);
                if self.stop.load(Ordering::SeqCst) == STOP_CANCELLED {
                    println!("worker {}: {label}: stopped, the sweep was cancelled", self.name);
                    if let Some(s) = &sink {
                        s.send(&Event::End { status: "interrupted".into(), node: Some(e.node.clone()), node_type: Some(e.node_type.clone()), message: None });
                    }
                    queue::finish(con, &self.q, &self.group, &entry, &job, &Outcome::new("cancelled", &self.name, secs, None), true)
                } else {
                    println!("worker {}: {label}: given back to the queue", self.name);
                    queue::release(con, &self.q, &self.group, &entry, &job)
                }
            }
            Some(e) => {
                publish.abandon();
                if let Some(s) = &sink {
                    let message = Some(e.cause.to_string());
                    s.send(&Event::End { status: "error".into(), node: Some(e.node.clone()), node_type: Some(e.node_type.clone()), message });
                }
                self.dead(con, &entry, &format!("{label}: {e}"))
            }
        }
    }
}

/// A thread that keeps the running job's entry claimed (every quarter of the claim timeout, at most a second) and
/// stops the job when its sweep is cancelled. It has its own connection, so a long job does not
/// hold the worker's.
struct Heartbeat {
    current: Arc<Mutex<Option<(String, String)>>>,
}

impl Heartbeat {
    fn start(q: QueueUrl, group: String, name: String, claim_timeout: Duration, stop: Arc<AtomicU8>, cancel: Arc<AtomicBool>) -> Heartbeat {
        let current: Arc<Mutex<Option<(String, String)>>> = Arc::new(Mutex::new(None));
        let watched = current.clone();
        // At most a second: a cancelled sweep's (or interrupted prompt's) running job stops within it.
        let period = (claim_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        std::thread::spawn(move || {
            let mut con: Option<Connection> = None;
            loop {
                std::thread::sleep(period);
                let Some((id, sweep)) = watched.lock().map(|c| c.clone()).unwrap_or(None) else { continue };
                if con.is_none() {
                    con = q.connect(period.max(Duration::from_secs(1))).map_err(|e| tracing::info!("heartbeat: {e}")).ok();
                }
                let Some(c) = con.as_mut() else { continue };
                let beat = queue::is_cancelled(c, &q, &sweep).and_then(|cancelled| {
                    if cancelled {
                        stop.store(STOP_CANCELLED, Ordering::SeqCst);
                        cancel.store(true, Ordering::SeqCst);
                    }
                    queue::heartbeat(c, &q, &group, &name, &id)
                });
                match beat {
                    Ok(true) => {}
                    Ok(false) => tracing::info!("entry {id} is no longer this worker's (taken over or cancelled)"),
                    Err(e) => {
                        tracing::info!("heartbeat: {e}");
                        con = None;
                    }
                }
            }
        });
        Heartbeat { current }
    }

    /// Sets the entry (id, sweep) being run, or none.
    fn watch(&self, entry: Option<(String, String)>) {
        if let Ok(mut c) = self.current.lock() {
            *c = entry;
        }
    }
}
