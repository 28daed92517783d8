//! `diffloom sweep GRAPH --grid seed=1..100 [--grid …] [--rows FILE]`: the graph rendered once per
//! parameter set, in order, in one process (models loaded once, results shared through the cache).
//! Each job writes into `<output>/<sweep id>/<job index>/`, published when it finishes; a sweep run
//! again skips the jobs already done, and a failed job leaves its error in `<job index>.error` and
//! does not stop the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use diffloom_core::graph::file;
use diffloom_core::validate::{apply_params, validate};
use diffloom_core::{Executor, Origin, Registry, ResolvedGraph};
use diffloom_sweep::{expand, grid, sweep_id, Grid, Job, Publish};

use super::run::{install_ctrlc, run_options, Settings};
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
        })
        .collect();
    // The plugins the graph uses (every job uses the same node types); an invalid first job is
    // reported by the validation that follows.
    if let Ok(graph) = load_job(&jobs[0], registry) {
        let plugins = plugin_hashes(&graph)?;
        for job in &mut jobs {
            job.plugins = plugins.clone();
        }
    }
    Ok(jobs)
}

/// File name → BLAKE3 of the source of each plugin file whose nodes `graph` uses.
pub fn plugin_hashes(graph: &ResolvedGraph) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for node in &graph.nodes {
        if let Origin::Plugin(file) = &node.entry.origin {
            let source = std::fs::read(file).with_context(|| format!("{}: cannot read the plugin", file.display()))?;
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.insert(name, blake3::hash(&source).to_hex().to_string());
        }
    }
    Ok(out)
}

/// Refuses a job whose plugins differ from this process's (another version would render something
/// else under the same sweep).
pub fn check_plugins(job: &Job, graph: &ResolvedGraph) -> Result<()> {
    let here = plugin_hashes(graph)?;
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

pub fn sweep(path: &Path, sets: &[String], sweep: Sweep, settings: Settings) -> Result<ExitCode> {
    let registry = session::registry();
    let jobs = jobs(path, sets, &sweep, &registry)?;
    // Every job is checked before any runs: a typo in one row fails now, not an hour in.
    let mut graphs = Vec::with_capacity(jobs.len());
    let mut problems = Vec::new();
    for job in &jobs {
        match load_job(job, &registry).and_then(|g| check_plugins(job, &g).map(|_| g)) {
            Ok(g) => graphs.push(g),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!("{} of {} jobs are invalid:\n{}", problems.len(), jobs.len(), problems.join("\n"));
    }
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
