//! One file per subcommand.

mod nodes;
mod run;
mod show;
mod validate;
mod watch;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> Result<ExitCode> {
    crate::session::set_plugin_dirs(cli.plugins.clone());
    match cli.command {
        Command::Run { file, set, output_dir, dtype, embeddings } => run::run(
            &file,
            &set,
            run::Settings { output_dir, device: cli.device, dtype: dtype.map(|d| d.kind()), embeddings },
        ),
        Command::Watch { file, set, output_dir, dtype, embeddings, cache_mb, debounce_ms } => watch::watch(
            &file,
            &set,
            run::Settings { output_dir, device: cli.device, dtype: dtype.map(|d| d.kind()), embeddings },
            cache_mb << 20,
            std::time::Duration::from_millis(debounce_ms),
        ),
        Command::Validate { file, set } => validate::validate(&file, &set),
        Command::Show { file, format, set } => show::show(&file, format, &set),
        Command::Nodes { name, json } => nodes::nodes(name.as_deref(), json),
    }
}
