//! The format and the validator against the corpus of broken graphs in tests/data/broken: each file is
//! paired with the exact messages `diffloom validate` must print (NAME.expected).

use crate::util::{repo, stderr, Dir};

#[test]
fn every_broken_graph_gets_its_exact_messages() {
    let dir = repo().join("tests/data/broken");
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for graph in names.iter().filter(|p| p.extension().is_some_and(|e| e == "ron")) {
        let rel = graph.strip_prefix(repo()).unwrap();
        let expected = std::fs::read_to_string(graph.with_extension("expected")).unwrap_or_else(|_| panic!("{} has no .expected file", rel.display()));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffloom")).args(["validate", rel.to_str().unwrap()]).current_dir(repo()).output().unwrap();
        if out.status.code() != Some(1) || stderr(&out) != expected {
            failures.push(format!("{}: exit {:?}\n--- got\n{}--- expected\n{}", rel.display(), out.status.code(), stderr(&out), expected));
        }
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} broken graphs found");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn validation_reports_every_problem_at_once() {
    // Seven problems on several nodes come out in one validation, not one at a time.
    let file = repo().join("tests/data/broken/many_errors.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&file).unwrap();
    let errors = diffloom_core::validate::validate(&file, &parsed, &diffloom_nodes::registry()).err().expect("invalid").0;
    assert_eq!(errors.len(), 7, "{errors:?}");
    let nodes: std::collections::BTreeSet<String> = errors.iter().filter_map(|e| e.to_string().split('"').nth(1).map(str::to_owned)).collect();
    assert!(nodes.len() >= 3, "the problems come from {nodes:?}");
}

#[test]
fn example_graphs_validate() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("graphs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ron") {
            let out = Dir::new().diffloom(&["validate", path.to_str().unwrap()]);
            assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn non_utf8_graph_names_the_byte() {
    let d = Dir::new();
    d.write("bin.ron", b"(version: 1, nodes: {\"a\xff\": (type: \"X\")})");
    let out = d.diffloom(&["validate", "bin.ron"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: bin.ron: not a text file: invalid UTF-8 at byte 23\n");
}

#[test]
fn missing_and_directory_graph_files_are_clear_errors() {
    let d = Dir::new();
    let out = d.diffloom(&["run", "nope.ron"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: nope.ron: cannot read the graph file: No such file"), "{}", stderr(&out));
    std::fs::create_dir(d.join("adir.ron")).unwrap();
    let out = d.diffloom(&["validate", "adir.ron"]);
    assert_eq!(stderr(&out), "error: adir.ron: cannot read the graph file: it is a directory, not a file\n");
}

#[test]
fn thousands_of_nodes_and_megabytes_of_text_validate() {
    let d = Dir::new();
    let mut g = String::from("(version: 1, params: {\"big\": \"");
    g.push_str(&"x".repeat(4 << 20));
    g.push_str("\"}, nodes: {\n\"n0\": (type: \"PrimitiveString\", inputs: {\"value\": Param(\"big\")}),\n");
    for i in 1..5000 {
        g.push_str(&format!("\"n{i}\": (type: \"StringConcatenate\", inputs: {{\"string_a\": Link(\"n{}\", \"STRING\"), \"string_b\": \"y\"}}),\n", i - 1));
    }
    g.push_str("\"show\": (type: \"PreviewAny\", inputs: {\"source\": Link(\"n4999\", \"STRING\")}),\n})");
    d.write("big.ron", &g);
    assert!(g.len() > 4 << 20);
    let out = d.diffloom(&["validate", "big.ron"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(crate::util::stdout(&out), "big.ron: ok (5001 nodes)\n");
}

#[test]
fn set_overrides_are_checked_against_the_declared_params() {
    let d = Dir::new();
    let g = repo().join("graphs/image_ops.ron");
    let g = g.to_str().unwrap();
    let out = d.diffloom(&["validate", g, "--set", "scael=2"]);
    assert!(stderr(&out).contains("--set scael: the graph declares no parameter \"scael\" (did you mean \"scale\"?)"), "{}", stderr(&out));
    let out = d.diffloom(&["validate", g, "--set", "scale=big"]);
    assert!(stderr(&out).contains("--set scale: expected a number, got \"big\""), "{}", stderr(&out));
    let out = d.diffloom(&["validate", g, "--set", "scale=100"]);
    assert!(stderr(&out).contains("node \"bigger\", input \"scale_by\": 100 is above the maximum 8"), "{}", stderr(&out));
    let out = d.diffloom(&["validate", g, "--set", "noequals"]);
    assert!(stderr(&out).contains("--set \"noequals\": expected NAME=VALUE"), "{}", stderr(&out));
}
