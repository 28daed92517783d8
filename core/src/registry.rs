//! The one table of node types, built-in and plugin, that validation, `diffloom nodes` and the executor
//! read (ComfyUI's `NODE_CLASS_MAPPINGS`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::rc::Rc;

use thiserror::Error;

use crate::node::{Node, Schema};

/// Where a node type comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Builtin,
    /// A Lua plugin file.
    Plugin(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin => f.write_str("built-in"),
            Origin::Plugin(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A registered node type: its implementation, its schema (read once) and its origin.
#[derive(Clone)]
pub struct Entry {
    pub node: Rc<dyn Node>,
    pub schema: Rc<Schema>,
    pub origin: Origin,
}

/// Registration failed because the name is taken.
#[derive(Debug, Error)]
#[error("node type {name:?} from {new} clashes with the one from {existing}")]
pub struct RegistryError {
    pub name: String,
    pub existing: Origin,
    pub new: Origin,
}

/// Node types by name.
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a node type; a name that is already registered is an error naming both origins.
    pub fn register(&mut self, node: Rc<dyn Node>, origin: Origin) -> Result<(), RegistryError> {
        let schema = Rc::new(node.schema());
        if let Some(existing) = self.entries.get(&schema.name) {
            return Err(RegistryError { name: schema.name.clone(), existing: existing.origin.clone(), new: origin });
        }
        self.entries.insert(schema.name.clone(), Entry { node, schema, origin });
        Ok(())
    }

    /// Removes every node type registered from `origin` (a plugin file being reloaded).
    pub fn remove_origin(&mut self, origin: &Origin) -> Vec<String> {
        let names: Vec<String> = self.entries.iter().filter(|(_, e)| &e.origin == origin).map(|(n, _)| n.clone()).collect();
        for n in &names {
            self.entries.remove(n);
        }
        names
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// All entries, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The registered name closest to `name`, for "did you mean".
    pub fn suggest(&self, name: &str) -> Option<String> {
        closest(name, self.entries.keys().map(String::as_str))
    }
}

/// The candidate closest to `word` when it is close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let lower = word.to_lowercase();
    candidates
        .map(|c| (strsim::jaro_winkler(&lower, &c.to_lowercase()), c))
        .filter(|(score, _)| *score > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_owned())
}
