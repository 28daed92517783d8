//! `diffloom run FILE`: validate, run, print the per-node report.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use diffloom_core::{Executor, RunOptions};

use crate::session;

/// A one-shot run keeps everything it computes; the bound matters for long-lived `watch` sessions.
const CACHE_LIMIT: usize = usize::MAX;

pub fn run(file: &Path, sets: &[String], output_dir: &Path, device: Option<&str>) -> Result<ExitCode> {
    let registry = session::registry();
    let graph = session::load_graph(file, sets, &registry)?;
    let cancel = Arc::new(AtomicBool::new(false));
    install_ctrlc(cancel.clone());
    let mut options = RunOptions::new(session::device(device)?, output_dir);
    options.cancel = cancel;
    let mut executor = Executor::new(options, CACHE_LIMIT);
    let report = executor.run(&graph);
    println!("{report}");
    match report.error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => Err(e.into()),
    }
}

/// First Ctrl-C: stop at the next node or sampling step, keeping finished files. Second: exit now.
fn install_ctrlc(cancel: Arc<AtomicBool>) {
    let result = ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("stopping at the next step (Ctrl-C again to quit now)");
    });
    if let Err(e) = result {
        tracing::warn!("Ctrl-C handling unavailable: {e}");
    }
}
