//! One file per subcommand.

mod nodes;
mod run;
mod show;
mod validate;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { file, set, output_dir } => run::run(&file, &set, &output_dir, cli.device.as_deref()),
        Command::Validate { file, set } => validate::validate(&file, &set),
        Command::Show { file, format, set } => show::show(&file, format, &set),
        Command::Nodes { name, json } => nodes::nodes(name.as_deref(), json),
    }
}
