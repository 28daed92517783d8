//! The graph file as written: RON, deserialized with serde, nothing resolved yet.
//!
//! ```ron
//! (
//!     version: 1,
//!     params: { "seed": 42, "prompt": "a lighthouse at dusk" },
//!     nodes: {
//!         "load": (type: "LoadImage", inputs: { "image": "inputs/photo.png" }),
//!         "scale": (type: "ImageScaleBy", inputs: { "image": Link("load", "IMAGE"), "scale_by": 0.5 }),
//!         "save": (type: "SaveImage", title: "Result", inputs: { "images": Link("scale", "IMAGE") }),
//!     },
//! )
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::GraphError;

/// The format version this build writes. Version 2 added the canvas fields of [`NodeEntry`] (ComfyUI
/// id, position, size, group, colours) and graph notes; version 1 files still read.
pub const FORMAT_VERSION: u32 = 2;

/// The versions this build reads.
pub const READ_VERSIONS: std::ops::RangeInclusive<u32> = 1..=FORMAT_VERSION;

/// A whole graph file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GraphFile {
    /// The format version, [`FORMAT_VERSION`] for files this build writes.
    pub version: u32,
    /// Graph-level parameters with their default values; inputs refer to them as `Param("name")`,
    /// and `diffloom run --set name=value` overrides them.
    #[serde(default, skip_serializing_if = "Entries::is_empty")]
    pub params: Entries<Literal>,
    /// Free-form notes on the whole graph (ComfyUI `Note` nodes no group holds); informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Nodes keyed by their id, in file order.
    pub nodes: Entries<NodeEntry>,
}

/// One node as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node type (`"KSampler"`).
    #[serde(rename = "type")]
    pub node_type: String,
    /// Inputs by name, in file order.
    #[serde(default)]
    pub inputs: Entries<InputValue>,
    /// A display title; informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Free-form notes; informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// What ComfyUI's canvas knows of the node (imported workflows, `serve`); informational.
    #[serde(default, skip_serializing_if = "Canvas::is_empty")]
    pub canvas: Canvas,
}

/// A node's place on ComfyUI's canvas: kept so that a workflow exported back to ComfyUI looks as it
/// did, and so that errors can name the id ComfyUI shows.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Canvas {
    /// The node's id in ComfyUI (`"3"`; `"12:5"` for a node inside subgraph instance 12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comfy_id: Option<String>,
    /// Position `(x, y)` on the canvas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<(f64, f64)>,
    /// Size `(width, height)` on the canvas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<(f64, f64)>,
    /// The title of the group the node sits in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Title bar colour (`"#322"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    /// Body colour (`"#533"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgcolor: Option<String>,
}

impl Canvas {
    pub fn is_empty(&self) -> bool {
        *self == Canvas::default()
    }
}

/// What an input is set to: a literal, a link to another node's output, or a graph parameter.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum InputValue {
    Ref(Reference),
    Literal(Literal),
}

/// The two kinds of non-literal input, written `Link("node", "OUTPUT")` and `Param("name")`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub enum Reference {
    /// Node id and output name.
    Link(String, String),
    /// A graph parameter's name.
    Param(String),
}

/// A literal value in a graph file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Literal {
    Bool(bool),
    Int(i64),
    /// Integers above i64::MAX (ComfyUI seeds go up to 2^64-1).
    UInt(u64),
    Float(f64),
    String(String),
}

impl Literal {
    /// The literal's type as a ComfyUI type name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Literal::Bool(_) => "BOOLEAN",
            Literal::Int(_) | Literal::UInt(_) => "INT",
            Literal::Float(_) => "FLOAT",
            Literal::String(_) => "STRING",
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Int(i) => write!(f, "{i}"),
            Literal::UInt(u) => write!(f, "{u}"),
            Literal::Float(x) => write!(f, "{x:?}"),
            Literal::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// A RON map with string keys that keeps file order and rejects duplicate keys (serde's maps keep the
/// last of two equal keys silently, which would hide a copy-pasted node).
#[derive(Clone, Debug, PartialEq)]
pub struct Entries<V>(pub Vec<(String, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Entries(Vec::new())
    }
}

impl<V> Entries<V> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map with string keys, like { \"name\": ... }")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    let value = map.next_value()?;
                    out.push((key, value));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(EntriesVisitor(PhantomData))
    }
}

impl<V: Serialize> Serialize for Entries<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Reads and parses a graph file.
pub fn read(file: &Path) -> Result<(String, GraphFile), GraphError> {
    let bytes = std::fs::read(file).map_err(|e| GraphError::Read {
        file: file.to_path_buf(),
        message: if file.is_dir() { "it is a directory, not a file".to_owned() } else { e.to_string() },
    })?;
    let text = String::from_utf8(bytes).map_err(|e| GraphError::NotUtf8 { file: file.to_path_buf(), offset: e.utf8_error().valid_up_to() })?;
    let graph = parse(file, &text)?;
    Ok((text, graph))
}

/// Parses graph text; `file` is only used in errors.
pub fn parse(file: &Path, text: &str) -> Result<GraphFile, GraphError> {
    if text.trim().is_empty() {
        return Err(GraphError::Syntax {
            file: file.to_path_buf(),
            line: 1,
            column: 1,
            message: "the file is empty; a graph reads (version: 1, nodes: { ... })".to_owned(),
        });
    }
    ron_options().from_str::<GraphFile>(text).map_err(|e| GraphError::Syntax {
        file: file.to_path_buf(),
        line: e.span.start.line,
        column: e.span.start.col,
        message: explain(&e.code.to_string()),
    })
}

/// RON with implicit `Some`, so that optional fields read `title: "x"` rather than `title: Some("x")`.
fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME)
}

/// Makes serde's generic messages about the untagged input enum say what an input may be.
fn explain(message: &str) -> String {
    if message.contains("untagged enum InputValue") {
        "an input must be a number, a string, true/false, Link(\"node\", \"OUTPUT\") or Param(\"name\")".to_owned()
    } else if message.contains("untagged enum Literal") {
        "a parameter must be a number, a string or true/false".to_owned()
    } else {
        message.to_owned()
    }
}

/// Writes `graph` as pretty RON (used to embed the graph, parameters applied, in saved images).
pub fn to_ron(graph: &GraphFile) -> String {
    let config = ron::ser::PrettyConfig::new().struct_names(false);
    // Serializing plain strings, numbers, maps and tuples cannot fail; an empty string would only lose
    // the embedded copy of the graph, never the run.
    ron_options().to_string_pretty(graph, config).unwrap_or_default()
}

#[cfg(test)]
#[path = "tests/file.rs"]
mod tests;
