//! The `diffloom` command line: parses arguments, runs one subcommand, prints errors once with their
//! whole context chain, and chooses the exit code in one place.

#![forbid(unsafe_code)]

mod cli;
mod cmd;
mod session;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging(args.verbose);
    // Node panics are caught and reported as node errors naming the node; the default hook would also
    // print a raw panic message first.
    std::panic::set_hook(Box::new(|info| tracing::debug!("caught panic: {info}")));
    match cmd::run(args) {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<diffloom_core::ValidationErrors>() {
                // One line per problem, each a complete sentence naming file, node and input.
                Some(list) => {
                    for problem in &list.0 {
                        eprintln!("error: {problem}");
                    }
                    eprintln!("{} problem{} found", list.0.len(), if list.0.len() == 1 { "" } else { "s" });
                }
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

fn init_logging(verbose: bool) {
    let default = if verbose { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("DIFFLOOM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
