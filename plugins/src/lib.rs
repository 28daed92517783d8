//! diffloom-plugins: custom nodes written in Lua 5.4 (mlua, vendored). A plugin is a `.lua` file that
//! declares nodes with `diffloom.node{…}`; they register beside the built-ins and are run, validated
//! and cached the same way.

#![forbid(unsafe_code)]

pub mod api;
pub mod hooks;
pub mod host;
pub mod sandbox;

pub use host::{load_file, load_plugins, reload, PluginError};
