//! `diffloom export FILE --format api|ui`: a graph as a ComfyUI workflow.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use diffloom_core::validate::{apply_params, validate};
use diffloom_core::{Folders, Locator};

use super::import::write_new;
use crate::cli::ExportFormat;
use crate::session;

pub fn export(file: &Path, format: ExportFormat, output: Option<&Path>, sets: &[String], folders: &Folders) -> Result<ExitCode> {
    let registry = session::registry();
    let mut graph = session::read_graph(file, &registry)?;
    apply_params(file, &mut graph, &session::parse_sets(sets)?)?;
    // Only a valid graph is exported: ComfyUI would refuse the rest anyway, with less to go on.
    validate(file, &graph, &registry)?;
    let graph_dir = file.parent().unwrap_or(Path::new(""));
    let files = Locator { graph_dir, folders, output_dir: Path::new("output") };
    let model_name = |node: &str, input: &str, value: &str| diffloom_comfy::export::comfy_model_name(&files, node, input, value);
    let json = match format {
        ExportFormat::Api => serde_json::Value::Object(diffloom_comfy::api::to_api(&graph, &registry, file, &model_name)?),
        ExportFormat::Ui => diffloom_comfy::export::to_ui(&graph, &registry, file, &model_name)?,
    };
    let text = serde_json::to_string_pretty(&json)? + "\n";
    match output {
        None => print!("{text}"),
        Some(out) => write_new(out, text.as_bytes())?,
    }
    Ok(ExitCode::SUCCESS)
}
