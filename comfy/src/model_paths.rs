//! ComfyUI's `extra_model_paths.yaml`: named sections, each with an optional `base_path`, an optional
//! `is_default`, and folder names mapped to one or more directories (one per line), as
//! `utils/extra_config.py` reads it.
//!
//! ```yaml
//! comfyui:
//!     base_path: ~/ComfyUI/
//!     is_default: true
//!     checkpoints: models/checkpoints/
//!     loras: |
//!         models/loras/
//!         models/more_loras/
//! ```

use std::path::{Component, Path, PathBuf};

use diffloom_core::Folders;
use serde_yaml_ng::Value;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelPathsError {
    #[error("{}: cannot read: {message}", .file.display())]
    Read { file: PathBuf, message: String },
    #[error("{}: {message}", .file.display())]
    Format { file: PathBuf, message: String },
}

/// One directory the file adds: (folder name, directory, whether it is searched first).
pub type Entry = (String, PathBuf, bool);

/// Reads the file's entries in file order.
pub fn read(file: &Path) -> Result<Vec<Entry>, ModelPathsError> {
    let text = std::fs::read_to_string(file).map_err(|e| ModelPathsError::Read { file: file.to_path_buf(), message: e.to_string() })?;
    parse(file, &text)
}

/// Parses the file's text; relative paths are relative to the file's directory (or to `base_path`).
pub fn parse(file: &Path, text: &str) -> Result<Vec<Entry>, ModelPathsError> {
    let err = |message: String| ModelPathsError::Format { file: file.to_path_buf(), message };
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| err(e.to_string()))?;
    let yaml_dir = absolute(file.parent().unwrap_or(Path::new(".")));
    let mut out = Vec::new();
    let Value::Mapping(sections) = doc else {
        return if doc.is_null() { Ok(out) } else { Err(err("expected named sections (comfyui: {base_path: …, checkpoints: …})".into())) };
    };
    for (name, conf) in sections {
        let section = name.as_str().unwrap_or("?").to_owned();
        let conf = match conf {
            Value::Null => continue,
            Value::Mapping(m) => m,
            _ => return Err(err(format!("section {section:?}: expected folder names mapped to paths"))),
        };
        let base = match conf.get("base_path") {
            None | Some(Value::Null) => None,
            Some(Value::String(b)) => Some(join(&yaml_dir, &expand(b))),
            Some(_) => return Err(err(format!("section {section:?}: base_path must be a path"))),
        };
        let is_default = matches!(conf.get("is_default"), Some(Value::Bool(true)));
        for (key, value) in &conf {
            let Some(folder) = key.as_str() else { continue };
            if folder == "base_path" || folder == "is_default" {
                continue;
            }
            let Value::String(paths) = value else {
                return Err(err(format!("section {section:?}, {folder}: expected a path or several, one per line")));
            };
            for line in paths.split('\n').map(str::trim).filter(|l| !l.is_empty()) {
                let dir = join(base.as_deref().unwrap_or(&yaml_dir), &expand(line));
                out.push((folder.to_owned(), normalize(&dir), is_default));
            }
        }
    }
    Ok(out)
}

/// Adds the entries to `folders`: `is_default` ones before every folder already there, as ComfyUI
/// does, the rest after.
pub fn apply(folders: &mut Folders, entries: Vec<Entry>) {
    let mut first = Folders::default();
    for (folder, dir, is_default) in entries {
        if is_default {
            first.add(&folder, dir);
        } else {
            folders.add(&folder, dir);
        }
    }
    first.models.append(&mut folders.models);
    folders.models = first.models;
}

/// `~` and `$VAR`/`${VAR}` expanded, as `os.path.expanduser(os.path.expandvars(…))`.
fn expand(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(inner) => match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match std::env::var(name) {
            Ok(v) if !name.is_empty() => out.push_str(&v),
            _ => out.push_str(&rest[i..i + 1 + len]),
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    match (out.strip_prefix('~'), std::env::var("HOME")) {
        (Some(tail), Ok(home)) if tail.is_empty() || tail.starts_with('/') => format!("{home}{tail}"),
        _ => out,
    }
}

fn join(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// `os.path.normpath`: `.` and `..` resolved lexically.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[path = "tests/model_paths.rs"]
mod tests;
