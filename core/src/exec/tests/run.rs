//! Unit tests of `run.rs`.
use std::path::Path;
use std::rc::Rc;

use super::*;
use crate::graph::file::parse;
use crate::node::{Node, Schema, Str};
use crate::registry::{Origin, Registry};
use crate::validate::validate;
use crate::value::ValueType;
use tch::Device;

/// Behaves as its name says: panics, returns nothing, or returns an INT for a STRING output.
struct Misbehaving(&'static str);
impl Node for Misbehaving {
    fn schema(&self) -> Schema {
        Schema::new(self.0, "test").input("s", Str::new("x")).output("STRING", ValueType::String)
    }
    fn execute(&self, _cx: &mut Ctx, _a: &Args) -> Result<Vec<Value>, NodeError> {
        match self.0 {
            "Panics" => panic!("index out of bounds"),
            "ReturnsNothing" => Ok(vec![]),
            "Passes" => Ok(vec![Value::String("ok".into())]),
            _ => Ok(vec![Value::Int(3)]),
        }
    }
}

struct Sink;
impl Node for Sink {
    fn schema(&self) -> Schema {
        Schema::new("Sink", "test").input("v", ValueType::Any).output_node()
    }
    fn execute(&self, _cx: &mut Ctx, _a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![])
    }
}

fn run_one(node_type: &str) -> RunReport {
    let mut reg = Registry::new();
    for n in ["Panics", "ReturnsNothing", "ReturnsInt"] {
        reg.register(Rc::new(Misbehaving(n)), Origin::Builtin).unwrap();
    }
    reg.register(Rc::new(Sink), Origin::Builtin).unwrap();
    let text = format!(r#"(version: 1, nodes: {{"bad": (type: "{node_type}"), "sink": (type: "Sink", inputs: {{"v": Link("bad", "STRING")}})}})"#);
    let file = Path::new("g.ron");
    let graph = validate(file, &parse(file, &text).unwrap(), &reg).unwrap();
    let options = RunOptions::new(Device::Cpu, "unused");
    Executor::new(options, 1 << 20).run(&graph)
}

#[test]
fn a_panicking_node_becomes_a_node_error() {
    let report = run_one("Panics");
    let err = report.error.expect("error");
    assert_eq!(err.to_string(), "g.ron: node \"bad\" (Panics): internal error (panic): index out of bounds");
    assert_eq!(report.nodes.last().unwrap().status, NodeStatus::Failed);
}

#[test]
fn outputs_are_checked_against_the_schema() {
    let err = run_one("ReturnsNothing").error.expect("error");
    assert_eq!(err.to_string(), "g.ron: node \"bad\" (ReturnsNothing): returned 0 outputs, but the node declares 1");
    let err = run_one("ReturnsInt").error.expect("error");
    assert_eq!(err.to_string(), "g.ron: node \"bad\" (ReturnsInt): output \"STRING\" should be STRING, but the node returned INT");
}

/// A node that opts out of caching (ComfyUI's IS_CHANGED = NaN).
struct Volatile;
impl Node for Volatile {
    fn schema(&self) -> Schema {
        Schema::new("Volatile", "test").output("STRING", ValueType::String).never_cache()
    }
    fn execute(&self, _cx: &mut Ctx, _a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::String("now".into())])
    }
}

#[test]
fn never_cached_nodes_and_their_dependents_run_every_time() {
    let mut reg = Registry::new();
    reg.register(Rc::new(Volatile), Origin::Builtin).unwrap();
    reg.register(Rc::new(Misbehaving("Passes")), Origin::Builtin).unwrap();
    reg.register(Rc::new(Sink), Origin::Builtin).unwrap();
    let file = Path::new("g.ron");
    let text = r#"(version: 1, nodes: {"v": (type: "Volatile"), "s": (type: "Sink", inputs: {"v": Link("v", "STRING")}),
        "p": (type: "Passes"), "s2": (type: "Sink", inputs: {"v": Link("p", "STRING")})})"#;
    let graph = validate(file, &parse(file, text).unwrap(), &reg).unwrap();
    let mut ex = Executor::new(RunOptions::new(Device::Cpu, "unused"), 1 << 20);
    assert_eq!(ex.run(&graph).ran(), ["v", "s", "p", "s2"]);
    assert_eq!(ex.run(&graph).ran(), ["v", "s"]);
}

#[test]
fn cancellation_stops_before_the_next_node() {
    let mut reg = Registry::new();
    reg.register(Rc::new(Misbehaving("ReturnsInt")), Origin::Builtin).unwrap();
    reg.register(Rc::new(Sink), Origin::Builtin).unwrap();
    let file = Path::new("g.ron");
    let text = r#"(version: 1, nodes: {"a": (type: "ReturnsInt"), "s": (type: "Sink", inputs: {"v": Link("a", "STRING")})})"#;
    let graph = validate(file, &parse(file, text).unwrap(), &reg).unwrap();
    let options = RunOptions::new(Device::Cpu, "unused");
    options.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let report = Executor::new(options, 1 << 20).run(&graph);
    assert!(matches!(report.error.map(|e| e.cause), Some(NodeError::Cancelled)));
}
