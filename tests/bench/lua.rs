//! Lua plugin overhead: the cost of calling a trivial Lua node against a trivial built-in node, and the
//! shipped ColorLevels (Lua, tensor API) on a 1024×1024 image against the same operations as a Rust
//! node. Prints figures; it is not a timed test.
//!
//! Run: scripts/bench.sh lua   (target: Lua colour grade ≤ 1.5× the built-in)

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use diffloom_core::value::Shared;
use diffloom_core::{Args, Ctx, Executor, Float, Int, Node, NodeError, Origin, Registry, RunOptions, Schema, Value, ValueType};
use tch::{Kind, Tensor};

/// A trivial built-in: INT in, INT out.
struct NoopRust;
impl Node for NoopRust {
    fn schema(&self) -> Schema {
        Schema::new("NoopRust", "bench").input("x", Int::new(0)).output("INT", ValueType::Int)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::Int(a.int("x")? + 1)])
    }
}

/// ColorLevels' operations written in Rust.
struct LevelsRust;
impl Node for LevelsRust {
    fn schema(&self) -> Schema {
        Schema::new("LevelsRust", "bench")
            .input("image", ValueType::Image)
            .input("black_point", Float::new(0.0))
            .input("white_point", Float::new(1.0))
            .input("gamma", Float::new(1.0))
            .input("saturation", Float::new(1.0))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (b, w, g, s) = (a.float("black_point")?, a.float("white_point")?, a.float("gamma")?, a.float("saturation")?);
        let x = ((a.image("image")?.0.shallow_clone() - b) / (w - b)).clamp(0.0, 1.0).pow_tensor_scalar(1.0 / g);
        let luma = (&x * Tensor::from_slice(&[0.299f32, 0.587, 0.114])).sum_dim_intlist(-1, true, Kind::Float).expand_as(&x).contiguous();
        Ok(vec![Value::Image(Shared(luma.lerp(&x, s).clamp(0.0, 1.0)))])
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn run_graph(reg: &Registry, dir: &Path, text: &str, reps: usize) -> f64 {
    let path = dir.join("bench.ron");
    std::fs::write(&path, text).unwrap();
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let graph = diffloom_core::validate::validate(&path, &parsed, reg).unwrap_or_else(|e| panic!("{e}"));
    median(
        (0..reps)
            .map(|_| {
                let mut ex = Executor::new(RunOptions::new(tch::Device::Cpu, dir.join("out")), 1 << 30);
                let t = Instant::now();
                let r = ex.run(&graph);
                assert!(r.error.is_none(), "{}", r.error.unwrap());
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    std::fs::write(
        dir.path().join("plugins/noop.lua"),
        "diffloom.node { name = 'NoopLua', inputs = { {'x', 'INT', default = 0} }, outputs = { {'INT', 'INT'} }, execute = function(a) return a.x + 1 end }\n",
    )
    .unwrap();
    std::fs::copy(root.join("plugins/lua/levels.lua"), dir.path().join("plugins/levels.lua")).unwrap();
    let mut reg = diffloom_nodes::registry();
    reg.register(Rc::new(NoopRust), Origin::Builtin).unwrap();
    reg.register(Rc::new(LevelsRust), Origin::Builtin).unwrap();
    let errors = diffloom_plugins::load_plugins(&[dir.path().join("plugins")], &mut reg);
    assert!(errors.is_empty(), "{errors:?}");

    let n = 1000;
    let chain = |ty: &str| {
        let mut g = format!("(version: 1, nodes: {{\"n0\": (type: \"{ty}\", inputs: {{\"x\": 0}}),\n");
        for i in 1..n {
            g.push_str(&format!("\"n{i}\": (type: \"{ty}\", inputs: {{\"x\": Link(\"n{}\", \"INT\")}}),\n", i - 1));
        }
        g.push_str(&format!("\"o\": (type: \"PreviewAny\", inputs: {{\"source\": Link(\"n{}\", \"INT\")}})}})", n - 1));
        g
    };
    let lua_chain = run_graph(&reg, dir.path(), &chain("NoopLua"), 9);
    let rust_chain = run_graph(&reg, dir.path(), &chain("NoopRust"), 9);
    println!("trivial node, {n}-node chain, cold runs (median of 9):");
    println!("  Lua       {:>8.2} µs per node", lua_chain * 1e6 / n as f64);
    println!("  built-in  {:>8.2} µs per node   (Lua overhead {:.2} µs per call)", rust_chain * 1e6 / n as f64, (lua_chain - rust_chain) * 1e6 / n as f64);

    tch::manual_seed(0);
    let img = Tensor::rand([1, 1024, 1024, 3], (Kind::Float, tch::Device::Cpu));
    image::RgbImage::from_raw(1024, 1024, Vec::<u8>::try_from((img * 255.0).to_kind(Kind::Uint8).flatten(0, -1)).unwrap())
        .unwrap()
        .save(dir.path().join("big.png"))
        .unwrap();
    let grade = |ty: &str| {
        format!(
            r#"(version: 1, nodes: {{
                "load": (type: "LoadImage", inputs: {{"image": "big.png"}}),
                "g": (type: "{ty}", inputs: {{"image": Link("load", "IMAGE"), "black_point": 0.05, "white_point": 0.9, "gamma": 1.4, "saturation": 1.3}}),
                "o": (type: "PreviewAny", inputs: {{"source": Link("g", "IMAGE")}}),
            }})"#
        )
    };
    let load_only = run_graph(
        &reg,
        dir.path(),
        r#"(version: 1, nodes: {"load": (type: "LoadImage", inputs: {"image": "big.png"}), "o": (type: "PreviewAny", inputs: {"source": Link("load", "IMAGE")})})"#,
        9,
    );
    let lua = run_graph(&reg, dir.path(), &grade("ColorLevels"), 9) - load_only;
    let rust = run_graph(&reg, dir.path(), &grade("LevelsRust"), 9) - load_only;
    println!("colour grade of a 1024×1024 image (levels, gamma, saturation; median of 9, image loading subtracted):");
    println!("  Lua ColorLevels   {:>8.2} ms", lua * 1e3);
    println!("  built-in (Rust)   {:>8.2} ms   ratio {:.2}× (target ≤ 1.5×)", rust * 1e3, lua / rust);
}
