//! diffloom-core: the graph format, validation, the node trait and registry, and the cached executor.
//! No model code lives here; nodes come from `diffloom-nodes` and Lua plugins.

#![forbid(unsafe_code)]

pub mod dtypes;
pub mod error;
pub mod exec;
pub mod graph;
pub mod node;
pub mod paths;
pub mod registry;
pub mod validate;
pub mod value;

pub use error::{GraphError, NodeError, RunError, ValidationError, ValidationErrors, ValidationKind};
pub use exec::{DiskCache, Executor, NodeReport, NodeStatus, Observer, RunOptions, RunReport};
pub use graph::{GraphFile, ResolvedGraph};
pub use node::{Args, Bool, Combo, Ctx, Float, InputKind, Int, Node, Schema, Str};
pub use paths::{Folders, Locator};
pub use registry::{Origin, Registry};
pub use value::{Handle, Latent, Shared, Value, ValueType};
