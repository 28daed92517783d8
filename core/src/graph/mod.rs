//! Graph files: the RON as written ([`file`]) and the graph with links and types resolved ([`resolved`]).

pub mod file;
pub mod resolved;

pub use file::{Canvas, GraphFile, InputValue, Literal, NodeEntry, Reference};
pub use resolved::{ResolvedGraph, ResolvedInput, ResolvedNode};
