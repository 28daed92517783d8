//! Typed errors. Each variant carries data; `Display` is the sentence a user reads, and names the file,
//! the node id and the input wherever there is one.

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

/// A graph file that could not be read or parsed.
#[derive(Debug, Error)]
pub enum GraphError {
    /// The file could not be read (missing, a directory, no permission).
    #[error("{}: cannot read the graph file: {message}", .file.display())]
    Read { file: PathBuf, message: String },
    /// The bytes are not UTF-8 text.
    #[error("{}: not a text file: invalid UTF-8 at byte {offset}", .file.display())]
    NotUtf8 { file: PathBuf, offset: usize },
    /// RON syntax or structure error at a 1-based line and column.
    #[error("{}:{line}:{column}: {message}", .file.display())]
    Syntax { file: PathBuf, line: usize, column: usize, message: String },
    /// A `--set name=value` that names no parameter or does not parse as its type.
    #[error("{}: --set {name}: {message}", .file.display())]
    Param { file: PathBuf, name: String, message: String },
}

/// One problem found by validation. A graph may have many; all are reported together.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidationError {
    pub file: PathBuf,
    /// The node the problem is in, if any.
    pub node: Option<String>,
    /// That node's id in ComfyUI, for imported workflows.
    pub comfy_id: Option<String>,
    /// The input of that node, if any.
    pub input: Option<String>,
    pub kind: ValidationKind,
}

/// What is wrong, with the data a message needs.
#[derive(Clone, Debug, PartialEq)]
pub enum ValidationKind {
    UnsupportedVersion { found: u32, supported: u32 },
    UnknownNodeType { name: String, suggestion: Option<String> },
    MissingInput,
    UnknownInput { suggestion: Option<String> },
    UnknownLinkNode { target: String, suggestion: Option<String> },
    UnknownOutput { target: String, output: String, available: Vec<String> },
    TypeMismatch { expected: String, found: String },
    BelowMin { value: String, min: String },
    AboveMax { value: String, max: String },
    NotAChoice { value: String, choices: Vec<String>, suggestion: Option<String> },
    UnknownParam { name: String, suggestion: Option<String> },
    LinkNotAllowed,
    Cycle { nodes: Vec<String> },
    NoOutputNode,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(node) = &self.node {
            write!(f, ": node {node:?}{}", comfy_suffix(&self.comfy_id))?;
        }
        if let Some(input) = &self.input {
            write!(f, ", input {input:?}")?;
        }
        write!(f, ": {}", self.kind)
    }
}

/// The sentence of a problem, as a user reads it after the file, node and input it concerns.
impl fmt::Display for ValidationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = |s: &Option<String>| s.as_ref().map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default();
        match self {
            ValidationKind::UnsupportedVersion { found, supported } => {
                write!(f, "format version {found} is not supported (this diffloom reads versions 1 to {supported})")
            }
            ValidationKind::UnknownNodeType { name, suggestion } => {
                write!(f, "unknown node type {name:?}{}", hint(suggestion))
            }
            ValidationKind::MissingInput => write!(f, "required input is missing"),
            ValidationKind::UnknownInput { suggestion } => write!(f, "no such input{}", hint(suggestion)),
            ValidationKind::UnknownLinkNode { target, suggestion } => {
                write!(f, "links to node {target:?}, which does not exist{}", hint(suggestion))
            }
            ValidationKind::UnknownOutput { target, output, available } => {
                write!(f, "node {target:?} has no output {output:?} (its outputs: {})", quoted_list(available))
            }
            ValidationKind::TypeMismatch { expected, found } => write!(f, "expected {expected}, got {found}"),
            ValidationKind::BelowMin { value, min } => write!(f, "{value} is below the minimum {min}"),
            ValidationKind::AboveMax { value, max } => write!(f, "{value} is above the maximum {max}"),
            ValidationKind::NotAChoice { value, choices, suggestion } => write!(f, "{value:?} is not one of {}{}", quoted_list(choices), hint(suggestion)),
            ValidationKind::UnknownParam { name, suggestion } => {
                write!(f, "parameter {name:?} is not declared in `params`{}", hint(suggestion))
            }
            ValidationKind::LinkNotAllowed => write!(f, "a link is not allowed here"),
            ValidationKind::Cycle { nodes } => write!(f, "cycle through nodes {}", quoted_list(nodes)),
            ValidationKind::NoOutputNode => {
                write!(f, "the graph has no output node (SaveImage, PreviewImage, …), so nothing would run")
            }
        }
    }
}

/// ` (ComfyUI #12)` for a node that came from a ComfyUI workflow, so both ids are named.
fn comfy_suffix(id: &Option<String>) -> String {
    id.as_ref().map(|id| format!(" (ComfyUI #{id})")).unwrap_or_default()
}

fn quoted_list(items: &[String]) -> String {
    items.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
}

/// Every problem validation found, in file order.
#[derive(Debug)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}

/// A failure inside one node's `execute`.
#[derive(Debug, Error)]
pub enum NodeError {
    /// An input value the node cannot use.
    #[error("input {input:?}: {message}")]
    Input { input: String, message: String },
    /// A file the node reads or writes.
    #[error("{}: {message}", .path.display())]
    File { path: PathBuf, message: String },
    /// Anything else the node reports.
    #[error("{0}")]
    Failed(String),
    /// libtorch reported an error (caught as a C++ exception, not an abort).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The node panicked; the run stopped cleanly.
    #[error("internal error (panic): {0}")]
    Panic(String),
    /// The run was cancelled (Ctrl-C, or a newer save in `watch`).
    #[error("cancelled")]
    Cancelled,
}

impl NodeError {
    pub fn input(input: &str, message: impl Into<String>) -> NodeError {
        NodeError::Input { input: input.to_owned(), message: message.into() }
    }

    pub fn file(path: impl Into<PathBuf>, message: impl fmt::Display) -> NodeError {
        NodeError::File { path: path.into(), message: message.to_string() }
    }
}

/// A run that stopped: which node failed and why. Results computed before it stay cached.
#[derive(Debug, Error)]
#[error("{}: node {node:?}{} ({node_type}): {cause}", .file.display(), comfy_suffix(.comfy_id))]
pub struct RunError {
    pub file: PathBuf,
    pub node: String,
    /// The node's id in ComfyUI, for imported workflows.
    pub comfy_id: Option<String>,
    pub node_type: String,
    /// Part of the message above (not a `source`, so that it is printed once).
    pub cause: NodeError,
}
