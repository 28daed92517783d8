//! One file per subcommand.

mod export;
mod import;
mod nodes;
mod run;
mod serve;
mod show;
mod sweep;
mod validate;
mod version;
mod watch;
mod worker;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand.
pub fn run(cli: Cli) -> Result<ExitCode> {
    crate::session::set_plugin_dirs(cli.plugins.clone());
    let Some(command) = cli.command else {
        // clap's arg_required_else_help leaves exactly this case: --version without a subcommand.
        return version::version(cli.verbose);
    };
    match command {
        Command::Run { args } => {
            let (file, set, settings) = run::Settings::from_args(args, cli.device)?;
            run::run(&file, &set, settings)
        }
        Command::Watch { args, cache_mb, debounce_ms } => {
            let (file, set, settings) = run::Settings::from_args(args, cli.device)?;
            watch::watch(&file, &set, settings, cache_mb << 20, std::time::Duration::from_millis(debounce_ms))
        }
        Command::Sweep(cmd) => sweep::command(cmd, cli.device),
        Command::Worker(args) => worker::worker(args, cli.device),
        Command::Validate { file, set } => validate::validate(&file, &set),
        Command::Show { file, format, set } => show::show(&file, format, &set),
        Command::Export { file, format, output, set, models, extra_model_paths } => {
            let folders = crate::session::folders(&models, &extra_model_paths, None, std::path::Path::new("input"))?;
            export::export(&file, format, output.as_deref(), &set, &folders)
        }
        Command::Import { file, output } => import::import(&file, output.as_deref()),
        Command::Serve {
            listen,
            port,
            models,
            extra_model_paths,
            graphs,
            input_dir,
            output_dir,
            user_dir,
            front_end_root,
            token,
            cache_mb,
            dtype,
            preview_method,
            queue,
            group,
        } => {
            let folders = crate::session::folders(&models, &extra_model_paths, None, &input_dir)?;
            let settings = serve::Settings {
                listen,
                port,
                folders,
                graphs,
                output_dir,
                user_dir,
                front_end_root,
                token,
                cache_bytes: cache_mb << 20,
                dtype: dtype.map(|d| d.kind()),
                preview_method,
                queue: queue
                    .map(|url| diffloom_sweep::queue::QueueUrl::parse(&url).map(|url| diffloom_server::remote::QueueConfig { url, group }))
                    .transpose()?,
            };
            serve::serve(settings, cli.device)
        }
        Command::Nodes { name, json, coverage } => nodes::nodes(name.as_deref(), json, coverage),
    }
}
