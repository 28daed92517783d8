//! Unit tests of `file.rs`.
use super::*;

fn parse_str(text: &str) -> Result<GraphFile, GraphError> {
    parse(Path::new("t.ron"), text)
}

#[test]
fn reads_literals_links_and_params() {
    let g = parse_str(
        r#"(version: 1, params: {"seed": 18446744073709551615, "p": "x"}, nodes: {
            "a": (type: "T", inputs: {"i": 3, "f": 0.5, "s": "hi", "b": true, "l": Link("b", "IMAGE"), "p": Param("seed")}),
        })"#,
    )
    .unwrap();
    assert_eq!(g.params.get("seed"), Some(&Literal::UInt(u64::MAX)));
    let inputs = &g.nodes.get("a").unwrap().inputs;
    assert_eq!(inputs.get("i"), Some(&InputValue::Literal(Literal::Int(3))));
    assert_eq!(inputs.get("f"), Some(&InputValue::Literal(Literal::Float(0.5))));
    assert_eq!(inputs.get("s"), Some(&InputValue::Literal(Literal::String("hi".into()))));
    assert_eq!(inputs.get("b"), Some(&InputValue::Literal(Literal::Bool(true))));
    assert_eq!(inputs.get("l"), Some(&InputValue::Ref(Reference::Link("b".into(), "IMAGE".into()))));
    assert_eq!(inputs.get("p"), Some(&InputValue::Ref(Reference::Param("seed".into()))));
}

#[test]
fn duplicate_node_ids_are_rejected_with_position() {
    let err = parse_str("(version: 1, nodes: {\n \"a\": (type: \"T\"),\n \"a\": (type: \"U\"),\n})").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("duplicate key \"a\""), "{msg}");
    assert!(msg.starts_with("t.ron:3:"), "{msg}");
}

#[test]
fn round_trips_through_ron() {
    let text = r#"(version: 1, nodes: {"a": (type: "T", title: "x", inputs: {"l": Link("b", "O"), "n": -2})})"#;
    let g = parse_str(text).unwrap();
    let again = parse_str(&to_ron(&g)).unwrap();
    assert_eq!(again.nodes.0[0].1.inputs, g.nodes.0[0].1.inputs);
    assert_eq!(again.nodes.0[0].1.title.as_deref(), Some("x"));
}
