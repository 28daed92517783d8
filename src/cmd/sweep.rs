//! `diffloom sweep GRAPH --grid seed=1..100 [--grid …] [--rows FILE]`: the graph rendered once per
//! parameter set, in order, in one process (models loaded once, results shared through the cache).
//! Each job writes into `<output>/<sweep id>/<job index>/`, published when it finishes; a sweep run
//! again skips the jobs already done, and a failed job leaves its error in `<job index>.error` and
//! does not stop the others. With `--queue` the jobs go on a Redis stream for `diffloom worker`s
//! instead (see `worker.rs` and `diffloom_sweep::queue`); `sweep status` and `sweep cancel` follow
//! and stop a queued sweep.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use diffloom_core::graph::file;
use diffloom_core::graph::resolved::{ResolvedInput, ResolvedNode};
use diffloom_core::validate::{apply_params, validate};
use diffloom_core::{Executor, Registry, ResolvedGraph};
use diffloom_sweep::queue::{self, QueueUrl};
use diffloom_sweep::{expand, grid, sweep_id, Grid, Job, Publish};

use super::run::{install_ctrlc, run_options, Settings};
use crate::cli::{SweepAction, SweepCmd};
use crate::session;

/// What `diffloom sweep` takes besides the run settings.
pub struct Sweep {
    pub grids: Vec<String>,
    pub rows: Option<PathBuf>,
}

/// The sweep's jobs for the graph at `path` (converted to RON, so a job carries plain text).
pub fn jobs(path: &Path, sets: &[String], sweep: &Sweep, registry: &Registry) -> Result<Vec<Job>> {
    let grids = sweep.grids.iter().map(|g| Grid::parse(g)).collect::<Result<Vec<_>, _>>()?;
    let rows = sweep.rows.as_deref().map(grid::read_rows).transpose()?;
    if grids.is_empty() && rows.is_none() {
        bail!("a sweep needs at least one --grid NAME=VALUES or --rows FILE");
    }
    // Fixed --set values come first; a grid or row value for the same name wins (applied after).
    let fixed = session::parse_sets(sets)?;
    let points = expand(&grids, rows)?;
    let graph = file::to_ron(&session::read_graph(path, registry)?);
    let all: Vec<Vec<(String, String)>> = points.into_iter().map(|p| [fixed.clone(), p].concat()).collect();
    let id = sweep_id(&graph, &all);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "graph".into());
    let total = all.len();
    let mut jobs: Vec<Job> = all
        .into_iter()
        .enumerate()
        .map(|(index, sets)| Job {
            sweep: id.clone(),
            index,
            total,
            graph: graph.clone(),
            graph_name: format!("{stem}.ron"),
            graph_dir: dir.display().to_string(),
            sets,
            plugins: BTreeMap::new(),
            follow: None,
            collect: false,
        })
        .collect();
    // The plugins the graph uses (every job uses the same node types); an invalid first job is
    // reported by the validation that follows.
    if let Ok(graph) = load_job(&jobs[0], registry) {
        let plugins = graph.plugin_hashes()?;
        for job in &mut jobs {
            job.plugins = plugins.clone();
        }
    }
    Ok(jobs)
}

/// Refuses a job whose plugins differ from this process's (another version would render something
/// else under the same sweep).
pub fn check_plugins(job: &Job, graph: &ResolvedGraph) -> Result<()> {
    let here = graph.plugin_hashes()?;
    for (name, hash) in &job.plugins {
        match here.get(name) {
            Some(h) if h == hash => {}
            Some(_) => bail!("job {} of sweep {}: plugin {name} differs from the submitter's (another source)", job.index, job.sweep),
            None => bail!("job {} of sweep {}: plugin {name} is not loaded here", job.index, job.sweep),
        }
    }
    Ok(())
}

/// A job's graph, parameterised and validated; errors name the job.
pub fn load_job(job: &Job, registry: &Registry) -> Result<ResolvedGraph> {
    let path = Path::new(&job.graph_dir).join(&job.graph_name);
    let context = || format!("job {} of sweep {} ({})", job.index, job.sweep, job.describe());
    let mut graph = file::parse(&path, &job.graph).with_context(context)?;
    apply_params(&path, &mut graph, &job.sets).with_context(context)?;
    validate(&path, &graph, registry).with_context(context)
}

/// `diffloom sweep …`: run locally, submit to a queue, or one of the queue subcommands.
pub fn command(cmd: SweepCmd, device: Option<String>) -> Result<ExitCode> {
    match cmd.action {
        Some(SweepAction::Status { id, queue, wait }) => status(&id, &queue, wait),
        Some(SweepAction::Cancel { id, queue, group }) => cancel(&id, &queue, &group),
        Some(SweepAction::Fetch { id, queue, output_dir, wait }) => fetch(&id, &queue, &output_dir, wait),
        None => {
            let Some(args) = cmd.args else { bail!("sweep needs a graph file (or a subcommand: status, fetch, cancel)") };
            let (file, set, settings) = Settings::from_args(args, device)?;
            let sweep = Sweep { grids: cmd.grids, rows: cmd.rows };
            match cmd.queue {
                Some(url) => submit(&file, &set, sweep, &url, &cmd.group, cmd.collect),
                None => self::sweep(&file, &set, sweep, settings),
            }
        }
    }
}

/// The sweep's jobs, each checked before any runs (a typo in one row fails now, not an hour in),
/// with their graphs.
fn checked_jobs(path: &Path, sets: &[String], sweep: &Sweep, registry: &Registry) -> Result<(Vec<Job>, Vec<ResolvedGraph>)> {
    let jobs = jobs(path, sets, sweep, registry)?;
    let mut graphs = Vec::with_capacity(jobs.len());
    let mut problems = Vec::new();
    for job in &jobs {
        match load_job(job, registry).and_then(|g| check_plugins(job, &g).map(|_| g)) {
            Ok(g) => graphs.push(g),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!("{} of {} jobs are invalid:\n{}", problems.len(), jobs.len(), problems.join("\n"));
    }
    Ok((jobs, graphs))
}

/// The model files a job loads: the literal inputs of the loaders at the roots of its graph (nodes
/// that make a model, CLIP, VAE, ControlNet, … from no linked input).
fn loaded_models(graph: &ResolvedGraph) -> String {
    use diffloom_core::ValueType as T;
    let loads = |n: &&ResolvedNode| {
        let makes_model = n
            .entry
            .schema
            .outputs
            .iter()
            .any(|o| matches!(o.ty, T::Model | T::Clip | T::Vae | T::UpscaleModel | T::ControlNet | T::ClipVision | T::StyleModel | T::Gligen));
        makes_model && n.inputs.iter().all(|i| !matches!(i, ResolvedInput::Link { .. }))
    };
    graph.nodes.iter().filter(loads).map(|n| format!("{}={:?}", n.id, n.inputs)).collect::<Vec<_>>().join("\n")
}

/// The jobs in the order they go on the queue: those that load the same model files together (each
/// set where it first appears, jobs in index order within it), so that a worker, which keeps what it
/// loaded, runs stretches of jobs on one checkpoint rather than switching at every job of a
/// `--grid seed=… --grid ckpt=…` sweep. Output folders stay named by index.
fn grouped_by_models(jobs: Vec<Job>, graphs: &[ResolvedGraph]) -> Vec<Job> {
    let keys: Vec<String> = graphs.iter().map(loaded_models).collect();
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        first.entry(k.as_str()).or_insert(i);
    }
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| (first[keys[i].as_str()], i));
    let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| jobs[i].take()).collect()
}

/// `sweep GRAPH … --queue URL`: the checked jobs go on the stream; prints the sweep id.
fn submit(path: &Path, sets: &[String], sweep: Sweep, url: &str, group: &str, collect: bool) -> Result<ExitCode> {
    let registry = session::registry();
    let (mut jobs, graphs) = checked_jobs(path, sets, &sweep, &registry)?;
    for job in &mut jobs {
        job.collect = collect;
    }
    let jobs = grouped_by_models(jobs, &graphs);
    let q = QueueUrl::parse(url)?;
    let mut con = q.connect(Duration::from_secs(30))?;
    let submitted = queue::submit(&mut con, &q, group, &jobs)?;
    let id = &jobs[0].sweep;
    println!("sweep {id}: {} jobs queued on {}", submitted.added, q.shown);
    if submitted.done_before + submitted.queued_before > 0 {
        println!("an earlier submission of this sweep did {} jobs and has {} queued still", submitted.done_before, submitted.queued_before);
    }
    println!("follow it with: diffloom sweep status {id} --queue URL --wait");
    Ok(ExitCode::SUCCESS)
}

/// `sweep fetch ID --queue URL [-o OUTPUT] [--wait]`: writes the collected files where a local sweep
/// would have (OUTPUT/ID/NNNNN/…), never over an existing file, then deletes them from the queue. A
/// file is written beside its place, synced and linked into place before its entry is deleted, so a
/// fetch that is killed loses nothing; an entry that cannot be a file of the sweep is reported and
/// dropped; an error of the output folder itself (full, read-only) stops the fetch.
fn fetch(id: &str, url: &str, output: &Path, wait: bool) -> Result<ExitCode> {
    if Path::new(id).components().count() != 1 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("{id:?} is not a sweep id");
    }
    let q = QueueUrl::parse(url)?;
    let mut con = q.connect(Duration::from_secs(30))?;
    // An unknown id is an error now rather than an endless wait.
    let total = queue::status(&mut con, &q, id)?.total;
    if !queue::collects(&mut con, &q, id)? {
        bail!("sweep {id} was not submitted with --collect: its files are in the workers' output folders");
    }
    let mut counts = FetchCounts::default();
    loop {
        match fetch_page(&mut con, &q, id, total, output, &mut counts) {
            Ok(true) => {}
            Ok(false) if !wait => break,
            Ok(false) => {
                let finished = queue::status(&mut con, &q, id).map(|s| s.finished());
                match finished.and_then(|f| Ok(f && queue::collected_count(&mut con, &q, id)? == 0)) {
                    Ok(true) => {
                        let _ = queue::drop_collected(&mut con, &q, id);
                        break;
                    }
                    Ok(false) => std::thread::sleep(Duration::from_millis(500)),
                    Err(e) if e.is_connection() => con = reconnect(&q, &e)?,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(FetchError::Queue(e)) if e.is_connection() => con = reconnect(&q, &e)?,
            Err(FetchError::Queue(e)) => return Err(e.into()),
            Err(FetchError::Output(e)) => return Err(e),
        }
    }
    println!(
        "sweep {id}: fetched {} files into {} ({} were there already, {} entries skipped)",
        counts.fetched,
        output.join(id).display(),
        counts.kept,
        counts.skipped
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct FetchCounts {
    fetched: usize,
    kept: usize,
    skipped: usize,
}

enum FetchError {
    Queue(queue::QueueError),
    /// The output folder cannot take files (full, read-only, no permission).
    Output(anyhow::Error),
}

/// Waits for the queue to come back after a lost connection.
fn reconnect(q: &QueueUrl, e: &queue::QueueError) -> Result<queue::Connection> {
    eprintln!("sweep fetch: lost the queue ({e}); reconnecting");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        match q.connect(Duration::from_secs(30)) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => {}
        }
    }
}

/// Fetches one page of files; false when there was none.
fn fetch_page(con: &mut queue::Connection, q: &QueueUrl, id: &str, total: usize, output: &Path, counts: &mut FetchCounts) -> Result<bool, FetchError> {
    // A few files at a time: each may be large.
    let page = queue::collected(con, q, id, 8).map_err(FetchError::Queue)?;
    if page.is_empty() {
        return Ok(false);
    }
    let mut done = Vec::new();
    for file in page {
        let result = match (file.index, &file.path, &file.bytes) {
            (Some(index), Some(path), Some(bytes))
                if index < total && !path.is_empty() && Path::new(path).components().all(|c| matches!(c, std::path::Component::Normal(_))) =>
            {
                let job = Job { sweep: id.to_owned(), index, ..Job::default() };
                save_fetched(&job.output_dir(output), path, bytes)
            }
            _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a file of a job of this sweep")),
        };
        match result {
            Ok(true) => counts.fetched += 1,
            Ok(false) => counts.kept += 1,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied) => {
                let _ = queue::forget_collected(con, q, id, &done);
                return Err(FetchError::Output(anyhow::anyhow!("{}: {e}", output.display())));
            }
            Err(e) => {
                eprintln!("sweep fetch: skipping entry {} (job {:?}, {:?}): {e}", file.id, file.index, file.path);
                counts.skipped += 1;
            }
        }
        done.push(file.id);
    }
    queue::forget_collected(con, q, id, &done).map_err(FetchError::Queue)?;
    Ok(true)
}

/// Writes `bytes` as `dir/path` unless a file is there: beside it first, synced, then linked into place
/// (which never replaces a file). Ok(false): one was there.
fn save_fetched(dir: &Path, path: &str, bytes: &[u8]) -> std::io::Result<bool> {
    use std::io::Write;
    let target = dir.join(path);
    let parent = target.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent)?;
    if target.exists() {
        return Ok(false);
    }
    let mut tmp = tempfile::Builder::new().prefix(".fetch-").tempfile_in(parent)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    let linked = match std::fs::hard_link(tmp.path(), &target) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(e),
    };
    // The folder's entry is on disk before the queue forgets the file.
    std::fs::File::open(parent)?.sync_all()?;
    Ok(linked)
}

/// `sweep status ID --queue URL [--wait]`.
fn status(id: &str, url: &str, wait: bool) -> Result<ExitCode> {
    let q = QueueUrl::parse(url)?;
    let mut con = q.connect(Duration::from_secs(30))?;
    let mut s = queue::status(&mut con, &q, id)?;
    if wait && !s.finished() {
        let bar = indicatif::ProgressBar::new(s.total as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} jobs  {msg}  ETA {eta}") {
            bar.set_style(style);
        }
        bar.set_prefix(id.to_owned());
        loop {
            bar.set_position((s.done + s.failed + s.cancelled) as u64);
            bar.set_message(format!("{} running, {} failed", s.running, s.failed));
            if s.finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            // A lost connection (a Redis restart) is retried, not fatal, while waiting.
            match queue::status(&mut con, &q, id) {
                Ok(next) => s = next,
                Err(e) if e.is_connection() => {
                    std::thread::sleep(Duration::from_secs(1));
                    if let Ok(c) = q.connect(Duration::from_secs(30)) {
                        con = c;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        bar.finish_and_clear();
    }
    println!(
        "sweep {id}: {} jobs: {} done, {} running, {} pending, {} failed, {} cancelled{}",
        s.total,
        s.done,
        s.running,
        s.pending,
        s.failed,
        s.cancelled,
        if s.cancel_requested { " (cancel requested)" } else { "" }
    );
    if let Some((first, last)) = s.span_ms.filter(|(a, b)| b > a) {
        let minutes = (last - first) as f64 / 60_000.0;
        println!("overall: {:.1} jobs/min between the first and the last finished job", (s.done + s.failed) as f64 / minutes);
    }
    for (name, w) in s.workers.iter().filter(|(_, w)| w.done + w.failed > 0) {
        let rate = if w.secs > 0.0 { format!("{:.1} jobs/min", w.done as f64 * 60.0 / w.secs) } else { "-".into() };
        println!("worker {name}: {} done, {} failed, {rate} ({:.3} s per job)", w.done, w.failed, if w.done > 0 { w.secs / w.done as f64 } else { 0.0 });
    }
    for (index, worker, error) in &s.failures {
        println!("job {index} failed on {worker}: {error}");
    }
    Ok(if s.failed == 0 && (!wait || s.finished()) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `sweep cancel ID --queue URL`.
fn cancel(id: &str, url: &str, group: &str) -> Result<ExitCode> {
    let q = QueueUrl::parse(url)?;
    let mut con = q.connect(Duration::from_secs(30))?;
    let dropped = queue::cancel(&mut con, &q, group, id)?;
    println!("sweep {id}: cancelled; {dropped} queued jobs dropped (running jobs stop at their next step)");
    Ok(ExitCode::SUCCESS)
}

pub fn sweep(path: &Path, sets: &[String], sweep: Sweep, settings: Settings) -> Result<ExitCode> {
    let registry = session::registry();
    let (jobs, graphs) = checked_jobs(path, sets, &sweep, &registry)?;
    let root = settings.output_dir.clone();
    let options = run_options(settings)?;
    let cancel = options.cancel.clone();
    install_ctrlc(cancel.clone(), None);
    let mut executor = Executor::new(options, usize::MAX);
    let id = &jobs[0].sweep;
    println!("sweep {id}: {} jobs, outputs in {}", jobs.len(), root.join(id).display());
    let (mut ran, mut skipped, mut failed) = (0, 0, 0);
    let bar = indicatif::ProgressBar::new(jobs.len() as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} jobs  ETA {eta}") {
        bar.set_style(style);
    }
    bar.set_prefix(id.clone());
    for (job, graph) in jobs.iter().zip(&graphs) {
        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        let Some(publish) = Publish::begin(&root, job).with_context(|| format!("{}: cannot write", root.display()))? else {
            skipped += 1;
            bar.inc(1);
            continue;
        };
        executor.options.output_dir = publish.dir().to_path_buf();
        let started = Instant::now();
        let report = executor.run(graph);
        let error_file = root.join(id).join(format!("{:05}.error", job.index));
        match report.error {
            None => {
                let files = std::fs::read_dir(publish.dir()).map(|d| d.count()).unwrap_or(0);
                publish.commit().with_context(|| format!("{}: cannot publish job {}", root.display(), job.index))?;
                let _ = std::fs::remove_file(&error_file);
                ran += 1;
                bar.println(format!("job {} ({}): {files} files, {:.1} s", job.index, job.describe(), started.elapsed().as_secs_f64()));
            }
            Some(e) => {
                publish.abandon();
                if matches!(e.cause, diffloom_core::NodeError::Cancelled) {
                    break;
                }
                failed += 1;
                let _ = std::fs::write(&error_file, format!("{e}\n"));
                bar.println(format!("job {} ({}) FAILED: {e}", job.index, job.describe()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let pending = jobs.len() - ran - skipped - failed;
    println!("sweep {id}: {ran} ran, {skipped} already done, {failed} failed, {pending} not run");
    Ok(if failed == 0 && pending == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
