//! Why a ComfyUI workflow could not be converted: each message names the file, and the ComfyUI node
//! id, type and input where there is one.

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ImportError {
    #[error("{}: cannot read: {message}", .file.display())]
    Read { file: PathBuf, message: String },
    /// The file is not a workflow in any format diffloom reads, or its structure is broken.
    #[error("{}: {message}", .file.display())]
    Format { file: PathBuf, message: String },
    /// A node's input cannot be converted.
    #[error("{}: ComfyUI node #{comfy_id} ({node_type}), input {input:?}: {message}", .file.display())]
    Node { file: PathBuf, comfy_id: String, node_type: String, input: String, message: String },
    /// Node types neither built in nor provided by a plugin (custom-node packs), all of them at once.
    #[error("{}: {}", .file.display(), UnknownList(.unknown))]
    UnknownNodes { file: PathBuf, unknown: Vec<UnknownNode> },
}

impl ImportError {
    pub fn at(file: &Path, message: impl Into<String>) -> ImportError {
        ImportError::Format { file: file.to_path_buf(), message: message.into() }
    }
}

/// One unknown node type and the nodes (ComfyUI id, title) that use it.
#[derive(Clone, Debug, PartialEq)]
pub struct UnknownNode {
    pub class_type: String,
    pub nodes: Vec<(String, Option<String>)>,
    /// The closest built-in or plugin node name, when one is close.
    pub suggestion: Option<String>,
}

struct UnknownList<'a>(&'a [UnknownNode]);

impl fmt::Display for UnknownList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} node type{} diffloom does not have (from custom-node packs?); nothing was run:", if n == 1 { "" } else { "s" })?;
        for u in self.0 {
            let nodes: Vec<String> = u.nodes.iter().map(|(id, title)| title.as_ref().map_or(format!("#{id}"), |t| format!("#{id} {t:?}"))).collect();
            write!(f, "\n  {:?} used by node{} {}", u.class_type, if nodes.len() == 1 { "" } else { "s" }, nodes.join(", "))?;
            if let Some(s) = &u.suggestion {
                write!(f, " (did you mean {s:?}?)")?;
            }
        }
        Ok(())
    }
}
