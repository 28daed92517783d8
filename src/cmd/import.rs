//! `diffloom import FILE`: a ComfyUI workflow as a RON graph.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use diffloom_core::graph::file;

use crate::session;

pub fn import(input: &Path, output: Option<&Path>) -> Result<ExitCode> {
    let registry = session::registry();
    let (graph, source) = diffloom_comfy::import_file(input, &registry)?;
    let ron = file::to_ron(&graph);
    match output {
        None => print!("{ron}"),
        Some(out) => {
            write_new(out, ron.as_bytes())?;
            eprintln!("{}: {} nodes, {} parameters from {source:?} → {}", input.display(), graph.nodes.0.len(), graph.params.0.len(), out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a file that must not exist yet: an existing file is never overwritten.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{}: cannot create (an existing file is never overwritten)", path.display()))?;
    f.write_all(bytes).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}
