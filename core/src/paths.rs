//! Where files named in a graph are found: model files by name in ComfyUI's folder layout
//! (`checkpoints/`, `loras/`, …), images in the input directory (with ComfyUI's `[input]` annotations),
//! and plain paths in the working directory, then next to the graph.

use std::path::{Component, Path, PathBuf};

use crate::error::NodeError;

/// ComfyUI's model folder names (`folder_paths.py`), each with the subdirectory names a models
/// directory may hold it under (ComfyUI's legacy names: `clip` for text encoders, `unet` for diffusion
/// models, `t2i_adapter` beside `controlnet`).
pub const MODEL_FOLDERS: &[(&str, &[&str])] = &[
    ("checkpoints", &["checkpoints"]),
    ("configs", &["configs"]),
    ("loras", &["loras"]),
    ("vae", &["vae"]),
    ("text_encoders", &["text_encoders", "clip"]),
    ("diffusion_models", &["diffusion_models", "unet"]),
    ("clip_vision", &["clip_vision"]),
    ("style_models", &["style_models"]),
    ("embeddings", &["embeddings"]),
    ("diffusers", &["diffusers"]),
    ("vae_approx", &["vae_approx"]),
    ("controlnet", &["controlnet", "t2i_adapter"]),
    ("gligen", &["gligen"]),
    ("upscale_models", &["upscale_models"]),
    ("hypernetworks", &["hypernetworks"]),
    ("photomaker", &["photomaker"]),
    ("classifiers", &["classifiers"]),
];

/// The folder name ComfyUI uses for `name`, legacy aliases (`clip`, `unet`) mapped to the current one.
pub fn canonical_folder(name: &str) -> Option<&'static str> {
    MODEL_FOLDERS.iter().find(|(folder, dirs)| *folder == name || dirs.contains(&name)).map(|(folder, _)| *folder)
}

/// The directories searched for files: model folders in search order, and the input and temp
/// directories images are read from (the output directory is the run's own).
#[derive(Clone, Debug)]
pub struct Folders {
    /// (ComfyUI folder name, directory), in search order.
    pub models: Vec<(String, PathBuf)>,
    /// Where `LoadImage` names are looked up (ComfyUI's `input/`).
    pub input_dir: PathBuf,
    /// Where previews go and `[temp]`-annotated image names are looked up (`diffloom-preview` in the
    /// system's temporary directory by default).
    pub temp_dir: PathBuf,
    /// Names must resolve inside the folders (after `..`, absolute paths and symbolic links): set for
    /// prompts received over HTTP, where a name must not reach other files. Graphs run from the
    /// command line keep their paths.
    pub confined: bool,
    /// Model files enter cache keys by a hash of their contents rather than by their path and file
    /// version: set when results are kept on disk, where another process or machine must find them
    /// (hashing reads each model once); a process on its own needs only tell file versions apart.
    pub content_keys: bool,
}

impl Default for Folders {
    fn default() -> Folders {
        Folders { models: Vec::new(), input_dir: "input".into(), temp_dir: std::env::temp_dir().join("diffloom-preview"), confined: false, content_keys: false }
    }
}

impl Folders {
    /// Adds a models directory in ComfyUI's layout: each folder name's subdirectories of `base`.
    pub fn add_models_dir(&mut self, base: &Path) {
        for (folder, dirs) in MODEL_FOLDERS {
            for d in *dirs {
                self.models.push((folder.to_string(), base.join(d)));
            }
        }
    }

    /// Adds one directory for one folder (`extra_model_paths.yaml` entries, `--embeddings`).
    pub fn add(&mut self, folder: &str, dir: PathBuf) {
        let folder = canonical_folder(folder).map(str::to_owned).unwrap_or_else(|| folder.to_owned());
        if !self.models.iter().any(|(f, d)| *f == folder && *d == dir) {
            self.models.push((folder, dir));
        }
    }

    /// The directories of `folder`, in search order.
    pub fn dirs<'a>(&'a self, folder: &'a str) -> impl Iterator<Item = &'a Path> + 'a {
        let folder = canonical_folder(folder).unwrap_or(folder);
        self.models.iter().filter(move |(f, _)| f == folder).map(|(_, d)| d.as_path())
    }
}

/// Looks files up for one graph: [`Folders`], the run's output directory and the graph's own directory.
#[derive(Clone, Copy, Debug)]
pub struct Locator<'a> {
    pub graph_dir: &'a Path,
    pub folders: &'a Folders,
    pub output_dir: &'a Path,
}

/// A name as ComfyUI keeps it (forward or backward slashes) made relative and free of `..`, as
/// `folder_paths.get_full_path` does (`relpath(join("/", name), "/")`), so a name cannot leave its folder.
pub fn folder_relative(name: &str) -> PathBuf {
    let unix = name.replace('\\', "/");
    let mut out = PathBuf::new();
    for c in Path::new(&unix).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

impl Locator<'_> {
    /// A plain path from an input: absolute as is; relative in the working directory if it exists
    /// there, else next to the graph file. The error names both places tried.
    pub fn path(&self, input: &str, path: &str) -> Result<PathBuf, NodeError> {
        if path.is_empty() {
            return Err(NodeError::input(input, "expected a file path, got an empty string"));
        }
        if self.folders.confined {
            return Err(NodeError::input(input, format!("{path:?}: this server takes only names inside its models and input folders")));
        }
        let p = Path::new(path);
        let candidates = [p.to_path_buf(), self.graph_dir.join(p)];
        let limit = if p.is_absolute() { 1 } else { 2 };
        candidates[..limit]
            .iter()
            .find(|c| c.exists())
            .cloned()
            .ok_or_else(|| NodeError::input(input, format!("file {path:?} not found (looked in the working directory and in {})", shown(self.graph_dir))))
    }

    /// A model file named as ComfyUI names it: an absolute path; else the name (subfolders and Windows
    /// separators allowed) in each directory of `folder` in order, then in the working directory, then
    /// next to the graph. The error names the input, the file and every place searched.
    pub fn model(&self, folder: &str, input: &str, name: &str) -> Result<PathBuf, NodeError> {
        self.find(self.folders.dirs(folder).collect(), input, name, &format!("{folder} folders"))
    }

    /// An image named as ComfyUI's `LoadImage` names it: `name`, `sub/name`, or with an annotation
    /// (`name [input]`, `[output]`, `[temp]`) that picks the directory; unannotated names are looked
    /// up in the input directory, then as plain paths.
    pub fn image(&self, input: &str, name: &str) -> Result<PathBuf, NodeError> {
        let (name, dir) = match name.trim_end() {
            n if n.ends_with(" [output]") => (&n[..n.len() - 9], self.output_dir),
            n if n.ends_with(" [temp]") => (&n[..n.len() - 7], self.folders.temp_dir.as_path()),
            n if n.ends_with(" [input]") => (&n[..n.len() - 8], self.folders.input_dir.as_path()),
            n => (n, self.folders.input_dir.as_path()),
        };
        self.find(vec![dir], input, name, "input directory")
    }

    /// The file a string input names, wherever it would be found (for `watch`, which reloads when
    /// any file a graph reads changes).
    pub fn any(&self, name: &str) -> Option<PathBuf> {
        let folders = MODEL_FOLDERS.iter().map(|(f, _)| self.model(f, "", name));
        [self.path("", name), self.image("", name)].into_iter().chain(folders).find_map(Result::ok).filter(|p| p.is_file())
    }

    fn find(&self, dirs: Vec<&Path>, input: &str, name: &str, what: &str) -> Result<PathBuf, NodeError> {
        if name.is_empty() {
            return Err(NodeError::input(input, "expected a file name, got an empty string"));
        }
        let p = Path::new(name);
        if p.is_absolute() && !self.folders.confined {
            return if p.exists() { Ok(p.to_path_buf()) } else { Err(NodeError::input(input, format!("file {name:?} not found"))) };
        }
        let relative = folder_relative(name);
        let mut searched: Vec<String> = Vec::new();
        for dir in &dirs {
            let c = dir.join(&relative);
            if c.exists() {
                if self.folders.confined && !inside(&c, dir) {
                    return Err(NodeError::input(input, format!("{name:?} leads outside {} (a symbolic link?)", shown(dir))));
                }
                return Ok(c);
            }
            searched.push(shown(dir));
        }
        if self.folders.confined {
            return Err(NodeError::input(input, format!("file {name:?} not found; searched {}", searched.join(", "))));
        }
        if let Ok(found) = self.path(input, name) {
            return Ok(found);
        }
        if dirs.is_empty() {
            searched.push(format!("(no {what} are set: use --models DIR or the configuration file)"));
        }
        searched.push("the working directory".to_owned());
        searched.push(shown(self.graph_dir));
        Err(NodeError::input(input, format!("file {name:?} not found; searched {}", searched.join(", "))))
    }
}

/// Whether `path` lies inside `dir` once both are resolved (symbolic links followed).
pub fn inside(path: &Path, dir: &Path) -> bool {
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}

fn shown(dir: &Path) -> String {
    if dir.as_os_str().is_empty() {
        "the graph's directory (.)".to_owned()
    } else {
        dir.display().to_string()
    }
}

#[cfg(test)]
#[path = "tests/paths.rs"]
mod tests;
