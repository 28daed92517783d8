//! `diffloom validate FILE`: every problem, or "ok".

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::session;

pub fn validate(file: &Path, sets: &[String]) -> Result<ExitCode> {
    let graph = session::load_graph(file, sets, &session::registry())?;
    println!("{}: ok ({} nodes)", file.display(), graph.nodes.len());
    Ok(ExitCode::SUCCESS)
}
