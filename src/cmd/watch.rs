//! `diffloom watch FILE`: runs the graph, then re-runs it whenever the graph file or an input file it
//! reads is saved. The executor (and its cache, loaded models included) lives across runs, so each
//! re-run executes only the changed nodes and their dependents. A save during a run cancels it at the
//! next node or sampling step; a broken save prints its errors and keeps the last good graph.
//!
//! The watcher follows directories, not files: editors save by writing in place, by writing a temporary
//! file and renaming it over, or by deleting and re-creating, and only the directory sees all three.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diffloom_core::graph::{ResolvedGraph, ResolvedInput};
use diffloom_core::{Executor, Locator, NodeError, Value};
use notify::{RecursiveMode, Watcher};

use super::run::{install_ctrlc, run_options, Settings};
use crate::session;

/// Absolute form of `path` without requiring it to exist (its directory must).
fn absolute(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    match path.file_name() {
        Some(name) => dir.join(name),
        None => dir,
    }
}

/// The files a graph reads: string inputs that name an existing file.
fn input_files(graph: &ResolvedGraph, files: &Locator) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for node in &graph.nodes {
        for input in &node.inputs {
            if let ResolvedInput::Value(Value::String(s)) = input {
                out.extend(files.any(s).map(|p| absolute(&p)));
            }
        }
    }
    out
}

pub fn watch(file: &Path, sets: &[String], settings: Settings, cache_bytes: usize, debounce: Duration) -> Result<ExitCode> {
    let mut registry = session::registry();
    let plugin_files: Vec<PathBuf> = session::plugin_dirs().iter().flat_map(|d| diffloom_plugins::host::plugin_files(d)).map(|p| absolute(&p)).collect();
    let options = run_options(settings)?;
    let cancel = options.cancel.clone();
    let quit = Arc::new(AtomicBool::new(false));
    install_ctrlc(cancel.clone(), Some(quit.clone()));
    let mut executor = Executor::new(options, cache_bytes);

    let graph_path = absolute(file);
    let mut always: HashSet<PathBuf> = plugin_files.iter().cloned().collect();
    always.insert(graph_path.clone());
    let watched: Arc<Mutex<HashSet<PathBuf>>> = Arc::new(Mutex::new(always.clone()));
    let (tx, rx) = channel::<(PathBuf, Instant)>();
    let mut watcher = {
        let (watched, cancel) = (watched.clone(), cancel.clone());
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if event.kind.is_access() {
                return;
            }
            let set = watched.lock().map(|s| s.clone()).unwrap_or_default();
            for path in event.paths {
                if set.contains(&absolute(&path)) {
                    // Stop the run in progress at its next step; the new one starts after the quiet time.
                    cancel.store(true, Ordering::SeqCst);
                    let _ = tx.send((path, Instant::now()));
                }
            }
        })
        .context("cannot start the file watcher")?
    };
    let mut watched_dirs: HashSet<PathBuf> = HashSet::new();
    let mut watch_dir = |dir: &Path, watcher: &mut notify::RecommendedWatcher| {
        if watched_dirs.insert(dir.to_path_buf()) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                eprintln!("warning: cannot watch {}: {e}", dir.display());
            }
        }
    };
    for p in &always {
        if let Some(dir) = p.parent() {
            watch_dir(dir, &mut watcher);
        }
    }

    let mut run_number = 0;
    let mut reason = "start".to_owned();
    let mut saved_at: Option<Instant> = None;
    loop {
        match session::load_graph(file, sets, &registry) {
            Ok(graph) => {
                let inputs = input_files(&graph, &executor.options.locator(&graph.graph_dir));
                if let Ok(mut set) = watched.lock() {
                    set.retain(|p| always.contains(p));
                    set.extend(inputs.iter().cloned());
                }
                for p in &inputs {
                    if let Some(dir) = p.parent() {
                        watch_dir(dir, &mut watcher);
                    }
                }
                run_number += 1;
                cancel.store(false, Ordering::SeqCst);
                let latency = saved_at.map(|t| format!(", {:.0} ms after the save", t.elapsed().as_secs_f64() * 1e3)).unwrap_or_default();
                println!("== run {run_number} ({reason}{latency})");
                let report = executor.run(&graph);
                println!("{report}");
                match &report.error {
                    Some(e) if matches!(e.cause, NodeError::Cancelled) => println!("cancelled: a newer save arrived"),
                    Some(e) => println!("error: {e}"),
                    None => {}
                }
            }
            Err(e) => {
                match e.downcast_ref::<diffloom_core::ValidationErrors>() {
                    Some(list) => list.0.iter().for_each(|p| println!("error: {p}")),
                    None => println!("error: {e:#}"),
                }
                println!("keeping the last good graph; fix the file and save again");
            }
        }
        println!("watching {} (Ctrl-C to quit)", file.display());

        // Wait for a save, then for the burst of events an editor makes to settle.
        let first = loop {
            if quit.load(Ordering::SeqCst) {
                return Ok(ExitCode::SUCCESS);
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(event) => break event,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(ExitCode::SUCCESS),
            }
        };
        let mut changed: Vec<PathBuf> = vec![first.0];
        saved_at = Some(first.1);
        while let Ok((path, _)) = rx.recv_timeout(debounce) {
            changed.push(path);
        }
        changed.sort();
        changed.dedup();
        // An edited plugin re-registers its nodes; their cache keys carry the source's hash, so exactly
        // those nodes (and what depends on them) re-run. A broken edit keeps the previous version.
        for path in changed.iter().filter(|p| p.extension().is_some_and(|e| e == "lua")) {
            match diffloom_plugins::reload(&absolute(path), &mut registry) {
                Ok(names) => println!("reloaded {}: {}", path.display(), names.join(", ")),
                Err(e) => println!("plugin error: {e} (keeping the previous version)"),
            }
        }
        reason =
            changed.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect::<Vec<_>>().join(", ") + " changed";
    }
}
