//! What every subcommand needs: the node registry, the device, and a graph file read, parameterised and
//! validated.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use diffloom_core::graph::file;
use diffloom_core::validate::{apply_params, validate};
use diffloom_core::{Folders, GraphFile, Registry, ResolvedGraph};
use tch::Device;

/// The directory of the plugins that ship with diffloom: `$DIFFLOOM_PLUGINS_DIR`, else `plugins/lua` in
/// the first ancestor of the executable that has one.
pub fn shipped_plugins() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DIFFLOOM_PLUGINS_DIR") {
        return Some(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).map(|d| d.join("plugins").join("lua")).find(|d| d.is_dir())
}

static EXTRA_PLUGIN_DIRS: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();

/// Records the `--plugins` directories (once, at start-up).
pub fn set_plugin_dirs(dirs: Vec<PathBuf>) {
    let _ = EXTRA_PLUGIN_DIRS.set(dirs);
}

/// The user's configuration file: `$DIFFLOOM_CONFIG`, else `$XDG_CONFIG_HOME/diffloom/config.ron`, else
/// `~/.config/diffloom/config.ron`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DIFFLOOM_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("diffloom").join("config.ron"))
}

/// The configuration file's contents, relative paths being relative to the file:
/// `(plugins: ["dir", …], models: ["~/ComfyUI/models"], extra_model_paths: ["…/extra_model_paths.yaml"])`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// More Lua plugin directories.
    #[serde(default)]
    pub plugins: Vec<PathBuf>,
    /// Models directories in ComfyUI's layout, searched after `--models`.
    #[serde(default)]
    pub models: Vec<PathBuf>,
    /// ComfyUI `extra_model_paths.yaml` files, searched after `--extra-model-paths`.
    #[serde(default)]
    pub extra_model_paths: Vec<PathBuf>,
}

/// The configuration file's settings (empty without one; a broken one is reported and ignored).
pub fn config() -> Config {
    let Some(path) = config_path().filter(|p| p.is_file()) else { return Config::default() };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("warning: {}: cannot read: {e}", path.display());
            return Config::default();
        }
    };
    match ron::from_str::<Config>(&text) {
        Ok(c) => {
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            let rebase = |dirs: Vec<PathBuf>| dirs.into_iter().map(|d| if d.is_absolute() { d } else { base.join(d) }).collect();
            Config { plugins: rebase(c.plugins), models: rebase(c.models), extra_model_paths: rebase(c.extra_model_paths) }
        }
        Err(e) => {
            eprintln!("warning: {}:{}:{}: {} (the configuration is ignored)", path.display(), e.span.start.line, e.span.start.col, e.code);
            Config::default()
        }
    }
}

/// The plugin directories in effect: the shipped one, the configuration's, then the `--plugins` ones.
pub fn plugin_dirs() -> Vec<PathBuf> {
    shipped_plugins().into_iter().chain(config().plugins).chain(EXTRA_PLUGIN_DIRS.get().cloned().unwrap_or_default()).collect()
}

/// The model folders in effect: `--models` directories, `--extra-model-paths` files, then the
/// configuration's of both (entries marked `is_default` first, as ComfyUI does), then `--embeddings`.
pub fn folders(models: &[PathBuf], extra: &[PathBuf], embeddings: Option<&Path>, input_dir: &Path) -> Result<Folders> {
    let config = config();
    let mut folders = Folders { input_dir: input_dir.to_path_buf(), ..Folders::default() };
    for dir in models.iter().chain(&config.models) {
        anyhow::ensure!(dir.is_dir(), "--models {}: not a directory", dir.display());
        folders.add_models_dir(dir);
    }
    for file in extra.iter().chain(&config.extra_model_paths) {
        diffloom_comfy::model_paths::apply(&mut folders, diffloom_comfy::model_paths::read(file)?);
    }
    if let Some(dir) = embeddings {
        anyhow::ensure!(dir.is_dir(), "--embeddings {}: not a directory", dir.display());
        folders.add("embeddings", dir.to_path_buf());
    }
    Ok(folders)
}

/// The node types available to graphs: the built-ins, then the plugins. A broken plugin is reported and
/// skipped; the rest load.
pub fn registry() -> Registry {
    let mut r = diffloom_nodes::registry();
    for e in diffloom_plugins::load_plugins(&plugin_dirs(), &mut r) {
        eprintln!("warning: plugin skipped: {e}");
    }
    r
}

/// Parses `--device`: cpu, cuda, cuda:N; without it, CUDA when libtorch sees a GPU, else the CPU.
pub fn device(arg: Option<&str>) -> Result<Device> {
    let Some(arg) = arg else { return Ok(Device::cuda_if_available()) };
    let cuda = |n: usize| {
        let count = tch::Cuda::device_count() as usize;
        if n < count {
            Ok(Device::Cuda(n))
        } else if count == 0 {
            Err(anyhow!("--device {arg}: CUDA is not available (libtorch sees no GPU); use --device cpu"))
        } else {
            Err(anyhow!("--device {arg}: there are {count} CUDA devices (cuda:0 to cuda:{})", count - 1))
        }
    };
    match arg {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match arg.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => cuda(n),
            None => bail!("--device {arg}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// Splits `--set` arguments at the first `=`.
pub fn parse_sets(sets: &[String]) -> Result<Vec<(String, String)>> {
    sets.iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
            _ => bail!("--set {s:?}: expected NAME=VALUE"),
        })
        .collect()
}

/// Reads a graph: RON as it is; a ComfyUI workflow (`.json`, or a `.png`/`.webp` that carries one)
/// converted in memory.
pub fn read_graph(path: &Path, registry: &Registry) -> Result<GraphFile> {
    if diffloom_comfy::is_importable(path) {
        Ok(diffloom_comfy::import_file(path, registry)?.0)
    } else {
        Ok(file::read(path)?.1)
    }
}

/// Reads, parameterises and validates a graph file. Validation problems come back all together, one
/// per line.
pub fn load_graph(path: &Path, sets: &[String], registry: &Registry) -> Result<ResolvedGraph> {
    let sets = parse_sets(sets)?;
    let mut graph = read_graph(path, registry)?;
    apply_params(path, &mut graph, &sets)?;
    Ok(validate(path, &graph, registry)?)
}

/// The persistent cache's default directory: `$DIFFLOOM_CACHE_DIR`, else `$XDG_CACHE_HOME/diffloom`,
/// else `~/.cache/diffloom`; None when none of them is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("DIFFLOOM_CACHE_DIR").or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("diffloom"))).or_else(|| var("HOME").map(|h| h.join(".cache/diffloom")))
}
