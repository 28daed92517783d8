//! Unit tests of `lists.rs`: mapping over lists, repeating the shorter list's last item, list outputs
//! concatenated, list nodes called once.
use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;

use crate::error::NodeError;
use crate::exec::{Executor, RunOptions};
use crate::graph::file::parse;
use crate::node::{Args, Ctx, Int, Node, Schema, Str};
use crate::registry::{Origin, Registry};
use crate::validate::validate;
use crate::value::{Value, ValueType};
use tch::Device;

/// `n` strings `prefix0`, `prefix1`, … as a list output (like RebatchLatents).
struct Split;
impl Node for Split {
    fn schema(&self) -> Schema {
        Schema::new("Split", "test").input("prefix", Str::new("a")).input("n", Int::new(3).min(0)).list_output("STRING", ValueType::String)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let prefix = a.string("prefix")?;
        Ok(vec![Value::List((0..a.int("n")?).map(|i| Value::String(format!("{prefix}{i}"))).collect())])
    }
}

/// `a + b`, one value at a time; counts its calls.
struct Concat(Rc<Cell<usize>>);
impl Node for Concat {
    fn schema(&self) -> Schema {
        Schema::new("Concat", "test").input("a", Str::new("")).input("b", Str::new("")).output("STRING", ValueType::String)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        self.0.set(self.0.get() + 1);
        Ok(vec![Value::String(format!("{}{}", a.string("a")?, a.string("b")?))])
    }
}

/// Joins a whole list (INPUT_IS_LIST); an output node, so that the graph runs it.
struct Join;
impl Node for Join {
    fn schema(&self) -> Schema {
        Schema::new("Join", "test").input_is_list().input("v", ValueType::String).input("sep", Str::new(",")).output("STRING", ValueType::String).output_node()
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let Value::String(sep) = &a.list("sep")?[0] else { unreachable!("bound as STRING") };
        let items: Vec<String> = a.list("v")?.iter().map(Value::describe).collect();
        Ok(vec![Value::String(items.join(sep))])
    }
}

fn run(text: &str) -> (Executor, crate::graph::ResolvedGraph, crate::exec::RunReport, usize) {
    let calls = Rc::new(Cell::new(0));
    let mut reg = Registry::new();
    reg.register(Rc::new(Split), Origin::Builtin).unwrap();
    reg.register(Rc::new(Concat(calls.clone())), Origin::Builtin).unwrap();
    reg.register(Rc::new(Join), Origin::Builtin).unwrap();
    let file = Path::new("g.ron");
    let graph = validate(file, &parse(file, text).unwrap(), &reg).unwrap();
    let mut ex = Executor::new(RunOptions::new(Device::Cpu, "unused"), 1 << 20);
    let report = ex.run(&graph);
    (ex, graph, report, calls.get())
}

#[test]
fn a_node_runs_once_per_item_and_the_shorter_list_repeats_its_last() {
    let (mut ex, graph, report, calls) = run(r#"(version: 1, nodes: {
        "x": (type: "Split", inputs: {"prefix": "a", "n": 3}), "y": (type: "Split", inputs: {"prefix": "b", "n": 2}),
        "c": (type: "Concat", inputs: {"a": Link("x", "STRING"), "b": Link("y", "STRING")}),
        "j": (type: "Join", inputs: {"v": Link("c", "STRING"), "sep": "+"})})"#);
    assert!(report.error.is_none(), "{:?}", report.error.map(|e| e.to_string()));
    assert_eq!(calls, 3);
    assert_eq!(ex.cached_output(&graph, "j", 0).map(|v| v.describe()), Some("a0b0+a1b1+a2b1".to_owned()));
}

#[test]
fn a_single_value_beside_a_list_is_used_for_every_item() {
    let (mut ex, graph, report, calls) = run(r#"(version: 1, nodes: {
        "x": (type: "Split", inputs: {"prefix": "a", "n": 2}),
        "c": (type: "Concat", inputs: {"a": Link("x", "STRING"), "b": "!"}),
        "j": (type: "Join", inputs: {"v": Link("c", "STRING")})})"#);
    assert!(report.error.is_none());
    assert_eq!(calls, 2);
    assert_eq!(ex.cached_output(&graph, "j", 0).map(|v| v.describe()), Some("a0!,a1!".to_owned()));
    // The mapped node's output is the list of its results.
    assert_eq!(ex.cached_output(&graph, "c", 0).map(|v| v.describe()), Some("[a0!, a1!]".to_owned()));
}

#[test]
fn a_list_output_mapped_over_a_list_is_concatenated() {
    // Split runs once per item of the outer list (n = 1 and n = 2 here), its lists joined: 3 items.
    let (mut ex, graph, report, _) = run(r#"(version: 1, nodes: {
        "p": (type: "Split", inputs: {"prefix": "p", "n": 2}),
        "x": (type: "Split", inputs: {"prefix": Link("p", "STRING"), "n": 2}),
        "j": (type: "Join", inputs: {"v": Link("x", "STRING")})})"#);
    assert!(report.error.is_none(), "{:?}", report.error.map(|e| e.to_string()));
    assert_eq!(ex.cached_output(&graph, "j", 0).map(|v| v.describe()), Some("p00,p01,p10,p11".to_owned()));
}

#[test]
fn an_empty_list_is_an_error_naming_the_input() {
    let (_, _, report, calls) = run(r#"(version: 1, nodes: {
        "x": (type: "Split", inputs: {"n": 0}),
        "c": (type: "Concat", inputs: {"a": Link("x", "STRING")}),
        "j": (type: "Join", inputs: {"v": Link("c", "STRING")})})"#);
    assert_eq!(calls, 0);
    let err = report.error.expect("an error").to_string();
    assert!(err.contains("node \"c\"") && err.contains("\"a\"") && err.contains("empty"), "{err}");
}
