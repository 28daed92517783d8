//! Executor overhead on a generated 2,000-node graph of cheap nodes: parse, validation, a cold run and a
//! fully cached re-run, as µs per node. Prints figures; it is not a timed test.
//!
//! Run: scripts/bench.sh executor     (target: cached re-run ≤ 20 µs per node)

use std::path::Path;
use std::time::{Duration, Instant};

use diffloom_core::graph::file;
use diffloom_core::validate::validate;
use diffloom_core::{Executor, RunOptions};

/// 1,000 PrimitiveString, 500 StringConcatenate joining pairs of them, 500 PreviewAny outputs.
fn generate() -> String {
    let mut g = String::from("(version: 1, nodes: {\n");
    for i in 0..1000 {
        g.push_str(&format!("\"p{i}\": (type: \"PrimitiveString\", inputs: {{\"value\": \"s{i}\"}}),\n"));
    }
    for i in 0..500 {
        g.push_str(&format!(
            "\"c{i}\": (type: \"StringConcatenate\", inputs: {{\"string_a\": Link(\"p{}\", \"STRING\"), \"string_b\": Link(\"p{}\", \"STRING\"), \"delimiter\": \"-\"}}),\n",
            2 * i,
            2 * i + 1
        ));
        g.push_str(&format!("\"o{i}\": (type: \"PreviewAny\", inputs: {{\"source\": Link(\"c{i}\", \"STRING\")}}),\n"));
    }
    g.push_str("})\n");
    g
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn per_node(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let text = generate();
    let path = Path::new("bench.ron");
    let registry = diffloom_nodes::registry();
    let reps = 15;

    let parse_t = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                let _ = file::parse(path, &text).expect("parse");
                t.elapsed()
            })
            .collect(),
    );
    let parsed = file::parse(path, &text).expect("parse");
    let n = parsed.nodes.0.len();
    let validate_t = median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                let _ = validate(path, &parsed, &registry).expect("valid");
                t.elapsed()
            })
            .collect(),
    );
    let graph = validate(path, &parsed, &registry).expect("valid");

    let mut cold = Vec::new();
    let mut cold_overhead = Vec::new();
    let mut cached = Vec::new();
    for _ in 0..reps {
        let options = RunOptions::new(tch::Device::Cpu, "bench-out");
        let mut ex = Executor::new(options, 1 << 30);
        let r = ex.run(&graph);
        assert!(r.error.is_none() && r.ran().len() == n, "cold run ran {} of {n}", r.ran().len());
        cold.push(r.total);
        cold_overhead.push(r.overhead);
        let r = ex.run(&graph);
        assert!(r.ran().is_empty(), "cached run ran {:?}", r.ran().len());
        cached.push(r.total);
    }
    let (cold, cold_overhead, cached) = (median(cold), median(cold_overhead), median(cached));

    println!("executor overhead, {n}-node graph of cheap nodes (median of {reps}):");
    println!("  parse (RON)              {:>8.2} µs/node", per_node(parse_t, n));
    println!("  validate + resolve       {:>8.2} µs/node", per_node(validate_t, n));
    println!("  cold run, all nodes      {:>8.2} µs/node  (of which keys + cache lookups {:.2})", per_node(cold, n), per_node(cold_overhead, n));
    let c = per_node(cached, n);
    println!("  fully cached re-run      {:>8.2} µs/node  (target ≤ 20 µs/node: {:.3}× of target)", c, c / 20.0);
}
