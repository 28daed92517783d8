//! `diffloom run FILE`: validate, run, print the per-node report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use diffloom_core::{Executor, RunOptions};

use crate::session;

/// A one-shot run keeps everything it computes; the bound matters for long-lived `watch` sessions.
const CACHE_LIMIT: usize = usize::MAX;

/// What `run` takes besides the graph.
pub struct Settings {
    pub output_dir: PathBuf,
    pub device: Option<String>,
    pub dtype: Option<tch::Kind>,
    pub folders: diffloom_core::Folders,
    /// The persistent cache's directory and bound in bytes; None with `--no-disk-cache`.
    pub disk_cache: Option<(PathBuf, u64)>,
    /// `--max-memory` in bytes.
    pub max_memory: Option<u64>,
}

impl Settings {
    /// Splits the command line's run arguments into the graph file, its `--set`s and the settings.
    pub fn from_args(args: crate::cli::RunArgs, device: Option<String>) -> Result<(PathBuf, Vec<String>, Settings)> {
        let folders = session::folders(&args.models, &args.extra_model_paths, args.embeddings.as_deref(), &args.input_dir)?;
        let disk_cache = if args.no_disk_cache { None } else { args.cache_dir.or_else(session::default_cache_dir).map(|d| (d, args.disk_cache_mb << 20)) };
        let settings = Settings {
            output_dir: args.output_dir,
            device,
            dtype: args.dtype.map(|d| d.kind()),
            folders,
            disk_cache,
            max_memory: args.max_memory.map(|m| m << 20),
        };
        Ok((args.file, args.set, settings))
    }
}

/// The executor's options for these settings.
pub fn run_options(settings: Settings) -> Result<RunOptions> {
    let mut options = RunOptions::new(session::device(settings.device.as_deref())?, settings.output_dir);
    options.dtype = settings.dtype;
    options.image_texts = Some(diffloom_comfy::metadata::image_texts(settings.folders.clone()));
    options.folders = settings.folders;
    // Convolution algorithms chosen by timing them once per shape (the shapes of a run repeat).
    if options.device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    // The executor runs graphs on this thread.
    diffloom_nodes::budget::set_max_memory(settings.max_memory);
    if let Some((dir, limit)) = settings.disk_cache {
        // A cache that cannot be opened costs speed, not the run: say so and go on without it.
        match diffloom_core::DiskCache::open(&dir, limit) {
            Ok(cache) => {
                options.disk_cache = Some(Arc::new(cache));
                options.folders.content_keys = true;
            }
            Err(e) => tracing::warn!("{}: cannot use the cache directory ({e}); results stay in memory", dir.display()),
        }
    }
    Ok(options)
}

pub fn run(file: &Path, sets: &[String], settings: Settings) -> Result<ExitCode> {
    let registry = session::registry();
    let graph = session::load_graph(file, sets, &registry)?;
    let options = run_options(settings)?;
    install_ctrlc(options.cancel.clone(), None);
    let mut executor = Executor::new(options, CACHE_LIMIT);
    let report = executor.run(&graph);
    println!("{report}");
    if let Some(peak) = diffloom_nodes::builtin::loaders::peak_rss() {
        println!("peak resident memory {:.2} GiB", peak as f64 / (1u64 << 30) as f64);
    }
    match report.error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => Err(e.into()),
    }
}

/// First Ctrl-C: stop at the next node or sampling step, keeping finished files (and set `quit`, for
/// `watch`). Second: exit now.
pub fn install_ctrlc(cancel: Arc<AtomicBool>, quit: Option<Arc<AtomicBool>>) {
    let result = ctrlc::set_handler(move || {
        if let Some(q) = &quit {
            q.store(true, Ordering::SeqCst);
        }
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("stopping at the next step (Ctrl-C again to quit now)");
    });
    if let Err(e) = result {
        tracing::warn!("Ctrl-C handling unavailable: {e}");
    }
}
