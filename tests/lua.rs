//! Lua plugins: the API, the sandbox (every escape attempt refused), error reporting with file and
//! line, output type checks, name clashes, reloading, and the shipped plugins.

use diffloom_core::{Executor, Registry, RunReport, Value};
use diffloom_plugins::{load_plugins, reload};

use crate::util::{executor, run_graph, Dir};

/// A registry with the built-ins and the plugins of `d/plugins`.
fn registry(d: &Dir) -> (Registry, Vec<String>) {
    let mut r = diffloom_nodes::registry();
    let errors = load_plugins(&[d.join("plugins")], &mut r).into_iter().map(|e| e.to_string()).collect();
    (r, errors)
}

fn run(d: &Dir, ex: &mut Executor, reg: &Registry, nodes: &str) -> RunReport {
    run_graph(ex, reg, d, &format!("(version: 1, nodes: {{ {nodes} }})"), &[])
}

/// Output `out` of node `id` after a run.
fn output(d: &Dir, ex: &mut Executor, reg: &Registry, nodes: &str, id: &str, out: usize) -> Value {
    let r = run(d, ex, reg, nodes);
    assert!(r.error.is_none(), "{}", r.error.unwrap());
    let path = d.join("graph.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, reg).unwrap();
    ex.cached_output(&resolved, id, out).expect("cached output")
}

fn tensor(v: &Value) -> tch::Tensor {
    match v {
        Value::Image(t) | Value::Mask(t) => t.0.shallow_clone(),
        Value::Latent(l) => l.samples.0.shallow_clone(),
        other => panic!("not a tensor: {other:?}"),
    }
}

const PROBE: &str = r#"
diffloom.node {
  name = "Probe",
  inputs = { { "image", "IMAGE" }, { "code", "STRING", default = "" } },
  outputs = { { "IMAGE", "IMAGE" }, { "STRING", "STRING" } },
  execute = function(a)
    local f = assert(load(a.code))
    return f(a.image)
  end,
}
"#;

#[test]
fn the_tensor_api_runs_whole_tensor_operations() {
    let d = Dir::new();
    d.png("in.png", 8, 6, 3);
    d.write("plugins/probe.lua", PROBE);
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let (mut ex, _) = executor(&d, 1 << 30);
    let probe = |code: &str| {
        format!(
            r#""load": (type: "LoadImage", inputs: {{"image": "in.png"}}),
           "p": (type: "Probe", inputs: {{"image": Link("load", "IMAGE"), "code": {code:?}}}),
           "o": (type: "PreviewAny", inputs: {{"source": Link("p", "STRING")}}),"#
        )
    };
    let img = tensor(&output(&d, &mut ex, &reg, &probe("local x = ... return x, 'ok'"), "load", 0));
    let cases: Vec<(&str, Box<dyn Fn(&tch::Tensor) -> tch::Tensor>)> = vec![
        ("local x = ... return (x * 2 - 0.5):clamp(0, 1), ''", Box::new(|t| (t * 2.0 - 0.5).clamp(0.0, 1.0))),
        ("local x = ... return 1 - x, ''", Box::new(|t| t.neg() + 1.0)),
        (
            "local x = ... return x:channels({1, 0.5, 0}, {0, 0, 0.25}), ''",
            Box::new(|t| t * tch::Tensor::from_slice(&[1.0f32, 0.5, 0.0]) + tch::Tensor::from_slice(&[0.0f32, 0.0, 0.25])),
        ),
        ("local x = ... return x:crop(2, 1, 4, 3), ''", Box::new(|t| t.narrow(2, 2, 4).narrow(1, 1, 3))),
        ("local x = ... return x:pad(1, 0, 0, 2, 0.5):crop(1, 0, 8, 6), ''", Box::new(|t| t.shallow_clone())),
        ("local x = ... return x:resize(4, 3, 'area'), ''", Box::new(|t| t.permute([0, 3, 1, 2]).adaptive_avg_pool2d([3, 4]).permute([0, 2, 3, 1]))),
        ("local x = ... return x:gray():lerp(x, 1), ''", Box::new(|t| t.shallow_clone())),
    ];
    for (code, expect) in cases {
        let got = tensor(&output(&d, &mut ex, &reg, &probe(code), "p", 0));
        let want = expect(&img);
        assert_eq!(got.size(), want.size(), "{code}");
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{code}: {diff}");
    }
    // Statistics and small tables come back as Lua numbers.
    let s = output(
        &d,
        &mut ex,
        &reg,
        &probe("local x = ... local t = x:crop(0,0,1,1):to_table() return x, string.format('%d %.4f %.4f', #t, x:mean(), x:max())"),
        "p",
        1,
    );
    let Value::String(s) = s else { panic!() };
    assert_eq!(s, format!("3 {:.4} {:.4}", img.mean(tch::Kind::Float).double_value(&[]), img.max().double_value(&[])));
}

/// Runs Probe with `code`, returning the error message.
fn probe_error(d: &Dir, code: &str) -> String {
    let (reg, _) = registry(d);
    let (mut ex, _) = executor(d, 1 << 30);
    let nodes = format!(
        r#""load": (type: "LoadImage", inputs: {{"image": "in.png"}}),
           "p": (type: "Probe", inputs: {{"image": Link("load", "IMAGE"), "code": {code:?}}}),
           "o": (type: "PreviewAny", inputs: {{"source": Link("p", "STRING")}}),"#
    );
    run(d, &mut ex, &reg, &nodes).error.expect("the plugin call fails").to_string()
}

#[test]
fn every_sandbox_escape_is_refused_and_the_host_survives() {
    let d = Dir::new();
    d.png("in.png", 4, 4, 1);
    d.write("plugins/probe.lua", PROBE);
    let cases = [
        ("os.execute('touch /tmp/pwned')", "attempt to index a nil value (global 'os')"),
        ("io.open('/etc/passwd')", "attempt to index a nil value (global 'io')"),
        ("require('os')", "attempt to call a nil value (global 'require')"),
        ("dofile('/etc/passwd')", "attempt to call a nil value (global 'dofile')"),
        ("debug.getinfo(1)", "attempt to index a nil value (global 'debug')"),
        ("package.loadlib('libc.so.6', 'system')", "attempt to index a nil value (global 'package')"),
        ("return assert(load('\\27Lua\\84\\0'))()", "attempt to load a binary chunk"),
        ("return string.dump(print)", "attempt to call a nil value (field 'dump')"),
        ("local s = string.rep('x', 1024 * 1024 * 1024)", "not enough memory"),
        ("local t = {} for i = 1, 1e9 do t[i] = i end", "not enough memory"),
        ("while true do end", "exceeded its limit of"),
        ("local function f(n) return 1 + f(n + 1) end return f(1)", "stack overflow"),
    ];
    for (code, want) in cases {
        let err = probe_error(&d, code);
        assert!(err.contains("node \"p\" (Probe)") && err.contains(want), "{code}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    // After all that, the same host process runs plugins normally.
    let err = probe_error(&d, "local x = ... return x, 42");
    assert!(err.contains("output \"STRING\": expected STRING, got a Lua integer"), "{err}");
}

#[test]
fn errors_name_the_plugin_file_and_line() {
    let d = Dir::new();
    d.png("in.png", 4, 4, 1);
    d.write("plugins/broken_syntax.lua", "diffloom.node {\n  name = 'X',\n  inputs = {\n}\nlocal = 3\n");
    d.write("plugins/no_execute.lua", "\n\ndiffloom.node { name = 'NoExec' }\n");
    d.write("plugins/bad_type.lua", "diffloom.node { name = 'BadType', inputs = { {'x', 'PICTURE'} }, outputs = {}, execute = function() end }\n");
    d.write("plugins/clash.lua", "diffloom.node { name = 'ImageInvert', outputs = {}, execute = function() end }\n");
    d.write(
        "plugins/fails.lua",
        "diffloom.node {\n  name = 'Fails',\n  outputs = { {'INT', 'INT'} },\n  execute = function(a)\n    local t = nil\n    return t.field\n  end,\n}\n",
    );
    let (reg, errors) = registry(&d);
    let all = errors.join("\n");
    let file = |n: &str| d.join("plugins").join(n).canonicalize().unwrap().display().to_string();
    assert!(all.contains(&format!("{}:5:", file("broken_syntax.lua"))), "{all}");
    assert!(all.contains(&format!("{}:3: NoExec: a node needs an `execute` function", file("no_execute.lua"))), "{all}");
    assert!(all.contains("BadType: input \"x\": unknown type \"PICTURE\""), "{all}");
    assert!(all.contains(&format!("node type \"ImageInvert\" from {} clashes with the one from built-in", file("clash.lua"))), "{all}");
    assert_eq!(errors.len(), 4, "{all}");
    // The good plugin loaded beside the broken ones; its runtime error names file and line.
    let (mut ex, _) = executor(&d, 1 << 30);
    let err = run(&d, &mut ex, &reg, r#""f": (type: "Fails"), "o": (type: "PreviewAny", inputs: {"source": Link("f", "INT")}),"#).error.unwrap().to_string();
    assert!(err.contains(&format!("node \"f\" (Fails): {}:6: attempt to index a nil value (local 't')", file("fails.lua"))), "{err}");
}

#[test]
fn two_plugins_with_one_name_clash_naming_both_files() {
    let d = Dir::new();
    let node = "diffloom.node { name = 'Twice', outputs = {}, output_node = true, execute = function() end }\n";
    d.write("plugins/a.lua", node);
    d.write("plugins/b.lua", node);
    let (_, errors) = registry(&d);
    let a = d.join("plugins/a.lua").canonicalize().unwrap();
    let b = d.join("plugins/b.lua").canonicalize().unwrap();
    assert_eq!(errors, [format!("node type \"Twice\" from {} clashes with the one from {}", b.display(), a.display())]);
}

#[test]
fn an_edited_plugin_reruns_exactly_its_nodes_and_a_broken_edit_keeps_the_old_one() {
    let d = Dir::new();
    let v1 = "diffloom.node { name = 'Const', outputs = { {'INT', 'INT'} }, execute = function() return 1 end }\n";
    d.write("plugins/const.lua", v1);
    let (mut reg, errors) = registry(&d);
    assert!(errors.is_empty());
    let (mut ex, _) = executor(&d, 1 << 30);
    let nodes = r#""c": (type: "Const"), "o": (type: "PreviewAny", inputs: {"source": Link("c", "INT")}),
                   "s": (type: "PrimitiveString", inputs: {"value": "x"}), "o2": (type: "PreviewAny", inputs: {"source": Link("s", "STRING")}),"#;
    assert_eq!(run(&d, &mut ex, &reg, nodes).ran(), ["c", "o", "s", "o2"]);
    assert!(run(&d, &mut ex, &reg, nodes).ran().is_empty());
    let path = d.join("plugins/const.lua").canonicalize().unwrap();
    d.write("plugins/const.lua", v1.replace("return 1", "return 2"));
    assert_eq!(reload(&path, &mut reg).unwrap(), ["Const"]);
    let r = run(&d, &mut ex, &reg, nodes);
    assert_eq!(r.ran(), ["c", "o"]);
    assert_eq!(r.nodes.iter().find(|n| n.id == "o").unwrap().messages, ["2"]);
    d.write("plugins/const.lua", "diffloom.node { name = 'Const', outputs = { {'INT', 'INT'} }, execute = function() return 3 end\n");
    let err = reload(&path, &mut reg).unwrap_err().to_string();
    assert!(err.contains("const.lua:2:"), "{err}");
    // The previous version still runs (and is still cached).
    assert!(run(&d, &mut ex, &reg, nodes).ran().is_empty());
}

#[test]
fn shipped_plugins_behave() {
    let d = Dir::new();
    std::fs::create_dir_all(d.join("plugins")).unwrap();
    for f in ["levels.lua", "prompt_template.lua", "mask_from_color.lua"] {
        std::fs::copy(crate::util::repo().join("plugins/lua").join(f), d.join("plugins").join(f)).unwrap();
    }
    // Left half pure green, right half grey.
    let img = image::RgbImage::from_fn(8, 4, |x, _| if x < 4 { image::Rgb([0, 255, 0]) } else { image::Rgb([128, 128, 128]) });
    img.save(d.join("in.png")).unwrap();
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let (mut ex, _) = executor(&d, 1 << 30);
    let load = r#""load": (type: "LoadImage", inputs: {"image": "in.png"}),"#;
    // Default levels are the identity.
    let nodes = format!(
        r#"{load} "l": (type: "ColorLevels", inputs: {{"image": Link("load", "IMAGE")}}), "o": (type: "PreviewAny", inputs: {{"source": Link("l", "IMAGE")}}),"#
    );
    let out = tensor(&output(&d, &mut ex, &reg, &nodes, "l", 0));
    let input = tensor(&output(&d, &mut ex, &reg, &nodes, "load", 0));
    assert!((&out - &input).abs().max().double_value(&[]) < 1e-6);
    // Saturation 0 is grey everywhere: the three channels agree.
    let nodes = format!(
        r#"{load} "l": (type: "ColorLevels", inputs: {{"image": Link("load", "IMAGE"), "saturation": 0.0}}), "o": (type: "PreviewAny", inputs: {{"source": Link("l", "IMAGE")}}),"#
    );
    let grey = tensor(&output(&d, &mut ex, &reg, &nodes, "l", 0));
    assert!((grey.select(3, 0) - grey.select(3, 1)).abs().max().double_value(&[]) < 1e-6);
    // The mask covers exactly the green half.
    let nodes = format!(
        r#"{load} "m": (type: "MaskFromColor", inputs: {{"image": Link("load", "IMAGE"), "threshold": 10}}), "o": (type: "PreviewAny", inputs: {{"source": Link("m", "MASK")}}),"#
    );
    let mask = tensor(&output(&d, &mut ex, &reg, &nodes, "m", 0));
    assert_eq!(mask.size(), [1, 4, 8]);
    assert_eq!(mask.narrow(2, 0, 4).min().double_value(&[]), 1.0);
    assert_eq!(mask.narrow(2, 4, 4).max().double_value(&[]), 0.0);
    // Templates fill slots, and an unknown slot is named.
    let nodes = r#""t": (type: "PromptTemplate", inputs: {"template": "{subject}, {style}, {extra}", "subject": "a fox", "style": "ink"}), "o": (type: "PreviewAny", inputs: {"source": Link("t", "STRING")}),"#;
    let r = run(&d, &mut ex, &reg, nodes);
    assert_eq!(r.nodes.iter().find(|n| n.id == "o").unwrap().messages, ["a fox, ink"]);
    let nodes = r#""t": (type: "PromptTemplate", inputs: {"template": "{subjct}"}), "o": (type: "PreviewAny", inputs: {"source": Link("t", "STRING")}),"#;
    let err = run(&d, &mut ex, &reg, nodes).error.unwrap().to_string();
    assert!(err.contains("unknown slot {subjct}"), "{err}");
}

#[test]
fn seed_sweep_grid_tiles_equal_single_ksampler_runs() {
    let d = Dir::new();
    std::fs::create_dir_all(d.join("plugins")).unwrap();
    std::fs::copy(crate::util::repo().join("plugins/lua/seed_sweep.lua"), d.join("plugins/seed_sweep.lua")).unwrap();
    let ckpt = crate::util::tiny_sd1(&d, "tiny.safetensors");
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let (mut ex, _) = executor(&d, 1 << 30);
    let base = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {:?}}}),
           "p": (type: "CLIPTextEncode", inputs: {{"text": "a fox", "clip": Link("c", "CLIP")}}),
           "n": (type: "CLIPTextEncode", inputs: {{"text": "", "clip": Link("c", "CLIP")}}),
           "l": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 32}}),"#,
        ckpt.display().to_string()
    );
    let sweep = format!(
        r#"{base} "g": (type: "SeedSweepGrid", inputs: {{"model": Link("c", "MODEL"), "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"),
        "latent_image": Link("l", "LATENT"), "vae": Link("c", "VAE"), "seed": 10, "count": 3, "columns": 2, "steps": 3, "cfg": 5.0}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("g", "IMAGE")}}),"#
    );
    let grid = tensor(&output(&d, &mut ex, &reg, &sweep, "g", 0));
    assert_eq!(grid.size(), [1, 64, 128, 3]);
    let single = format!(
        r#"{base} "k": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 11, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("l", "LATENT")}}),
        "v": (type: "VAEDecode", inputs: {{"samples": Link("k", "LATENT"), "vae": Link("c", "VAE")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("v", "IMAGE")}}),"#
    );
    let one = tensor(&output(&d, &mut ex, &reg, &single, "v", 0));
    // Seed 11 is the second tile (top right); the fourth tile is blank.
    assert_eq!((grid.narrow(1, 0, 32).narrow(2, 64, 64) - &one).abs().max().double_value(&[]), 0.0);
    assert_eq!(grid.narrow(1, 32, 32).narrow(2, 64, 64).abs().max().double_value(&[]), 0.0);
}

#[test]
fn conditioning_tensors_can_be_read_and_rebuilt() {
    let d = Dir::new();
    d.write(
        "plugins/cond.lua",
        "diffloom.node { name = 'ScaleCond', inputs = { {'c', 'CONDITIONING'}, {'k', 'FLOAT', default = 2.0} },\n  outputs = { {'CONDITIONING', 'CONDITIONING'}, {'STRING', 'STRING'} },\n  execute = function(a)\n    local ts = a.c:tensors()\n    local shape = ts[1]:shape()\n    return diffloom.conditioning({ ts[1] * a.k }), string.format('%d %dx%dx%d', a.c:len(), shape[1], shape[2], shape[3])\n  end }\n",
    );
    let ckpt = crate::util::tiny_sd1(&d, "tiny.safetensors");
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let (mut ex, _) = executor(&d, 1 << 30);
    let nodes = format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {:?}}}),
           "p": (type: "CLIPTextEncode", inputs: {{"text": "a fox", "clip": Link("c", "CLIP")}}),
           "s": (type: "ScaleCond", inputs: {{"c": Link("p", "CONDITIONING")}}),
           "o": (type: "PreviewAny", inputs: {{"source": Link("s", "STRING")}}),
           "o2": (type: "PreviewAny", inputs: {{"source": Link("s", "CONDITIONING")}}),"#,
        ckpt.display().to_string()
    );
    let Value::Conditioning(scaled) = output(&d, &mut ex, &reg, &nodes, "s", 0) else { panic!() };
    let Value::Conditioning(orig) = output(&d, &mut ex, &reg, &nodes, "p", 0) else { panic!() };
    assert_eq!(((&scaled[0].cross_attn.0) - (&orig[0].cross_attn.0) * 2.0).abs().max().double_value(&[]), 0.0);
    let Value::String(s) = output(&d, &mut ex, &reg, &nodes, "s", 1) else { panic!() };
    assert_eq!(s, "1 1x77x32");
}

// Issue 11: a LATENT that passes through a Lua node keeps its noise mask and its batch indices (they
// were dropped, so inpainting lost its mask and a latent split off a batch its noise).
#[test]
fn a_latent_through_lua_keeps_its_noise_mask_and_batch_index() {
    let d = Dir::new();
    d.write(
        "plugins/scale.lua",
        r#"
diffloom.node {
  name = "LatentScale",
  inputs = { { "latent", "LATENT" }, { "by", "FLOAT", default = 1.0 } },
  outputs = { { "LATENT", "LATENT" } },
  execute = function(a) return a.latent * a.by end,
}
"#,
    );
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let (mut ex, _) = executor(&d, 1 << 30);
    let nodes = r#"
        "e": (type: "EmptyLatentImage", inputs: {"width": 64, "height": 64, "batch_size": 3}),
        "m": (type: "SolidMask", inputs: {"value": 0.5, "width": 64, "height": 64}),
        "n": (type: "SetLatentNoiseMask", inputs: {"samples": Link("e", "LATENT"), "mask": Link("m", "MASK")}),
        "b": (type: "LatentFromBatch", inputs: {"samples": Link("n", "LATENT"), "batch_index": 1, "length": 2}),
        "s": (type: "LatentScale", inputs: {"latent": Link("b", "LATENT"), "by": 2.0}),
        "o": (type: "PreviewAny", inputs: {"source": Link("s", "LATENT")}),
    "#;
    let Value::Latent(l) = output(&d, &mut ex, &reg, nodes, "s", 0) else { panic!("not a latent") };
    assert_eq!(l.batch_index.as_deref(), Some(&[1i64, 2][..]));
    let mask = l.noise_mask.expect("the noise mask is kept");
    assert_eq!(mask.flatten(0, -1).double_value(&[0]), 0.5);
}

// Issue 11: after a plugin is reloaded, another plugin's diffloom.call reaches the new version (each
// plugin used to keep the registry it was loaded with).
#[test]
fn diffloom_call_reaches_a_reloaded_node() {
    let d = Dir::new();
    let v1 = "diffloom.node { name = 'Const', outputs = { {'INT', 'INT'} }, execute = function() return 1 end }\n";
    d.write("plugins/const.lua", v1);
    d.write("plugins/caller.lua", "diffloom.node { name = 'Caller', outputs = { {'INT', 'INT'} }, execute = function() return diffloom.call('Const') end }\n");
    let (mut reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let nodes = r#""c": (type: "Caller"), "o": (type: "PreviewAny", inputs: {"source": Link("c", "INT")}),"#;
    let (mut ex, _) = executor(&d, 1 << 30);
    assert!(matches!(output(&d, &mut ex, &reg, nodes, "c", 0), Value::Int(1)));
    let path = d.join("plugins/const.lua").canonicalize().unwrap();
    d.write("plugins/const.lua", v1.replace("return 1", "return 2"));
    reload(&path, &mut reg).unwrap();
    let (mut fresh, _) = executor(&d, 1 << 30);
    assert!(matches!(output(&d, &mut fresh, &reg, nodes, "c", 0), Value::Int(2)));
}

// Issue 11: Lua declarations mean what built-in schemas mean: a FLOAT without a default is required
// (it used to default to 0.0), INT takes a step, an unsigned INT reaches seeds up to 2^64 − 1 (Lua
// holds them as two's complement and diffloom.call takes them back exactly), and an input can offer a
// built-in node's choices ("KSampler.sampler_name"), so a typo is a validation error with a suggestion.
#[test]
fn lua_declarations_follow_built_in_schema_semantics() {
    let d = Dir::new();
    d.write(
        "plugins/decl.lua",
        r#"
diffloom.node {
  name = "Decl",
  inputs = {
    { "f", "FLOAT" },
    { "n", "INT", default = 64, min = 8, step = 8 },
    { "seed", "INT", default = 0, unsigned = true },
    { "sampler", "KSampler.sampler_name", default = "euler" },
  },
  outputs = { { "NOISE", "NOISE" }, { "STRING", "STRING" } },
  execute = function(a) return diffloom.call("RandomNoise", { noise_seed = a.seed }), a.sampler end,
}
"#,
    );
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let schema = reg.get("Decl").unwrap().schema.clone();
    let kind = |n: &str| schema.input_spec(n).unwrap().kind.clone();
    assert!(matches!(kind("f"), diffloom_core::InputKind::Float { default: None, .. }), "{:?}", kind("f"));
    assert!(matches!(kind("n"), diffloom_core::InputKind::Int { default: Some(64), min: 8, step: 8, .. }), "{:?}", kind("n"));
    assert!(matches!(kind("seed"), diffloom_core::InputKind::Int { min: 0, max, .. } if max == u64::MAX as i128), "{:?}", kind("seed"));
    let diffloom_core::InputKind::Combo { choices, default } = kind("sampler") else { panic!("not a choice input") };
    assert_eq!(choices.len(), diffloom_nodes::sampling::samplers::SAMPLER_NAMES.len());
    assert_eq!(default.as_deref(), Some("euler"));

    let (mut ex, _) = executor(&d, 1 << 30);
    let graph = |inputs: &str| format!(r#""x": (type: "Decl", inputs: {{ {inputs} }}), "o": (type: "PreviewAny", inputs: {{"source": Link("x", "NOISE")}}),"#);
    let invalid = |nodes: &str| {
        let path = d.write("check.ron", format!("(version: 1, nodes: {{ {nodes} }})"));
        let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
        diffloom_core::validate::validate(&path, &parsed, &reg).err().expect("invalid").to_string()
    };
    // A FLOAT without a default must be given.
    let err = invalid(&graph(""));
    assert!(err.contains("node \"x\", input \"f\": required input is missing"), "{err}");
    // A choice typo is caught before running, with the nearest choice.
    let err = invalid(&graph(r#""f": 1.0, "sampler": "eulr""#));
    assert!(err.contains("\"eulr\"") && err.contains("euler"), "{err}");
    // The largest seed goes through Lua and back into RandomNoise exactly.
    let r = run(&d, &mut ex, &reg, &graph(r#""f": 1.0, "seed": 18446744073709551615"#));
    assert!(r.error.is_none(), "{}", r.error.unwrap());
    let shown = &r.nodes.iter().find(|n| n.id == "o").unwrap().messages;
    assert!(shown.iter().any(|m| m.contains("seed 18446744073709551615")), "{shown:?}");
    // A reference to a choice list that does not exist is a load error naming the plugin.
    d.write("plugins/decl.lua", r#"diffloom.node { name = "Bad", inputs = { { "s", "KSampler.nope" } }, outputs = {}, execute = function() end }"#);
    let (_, errors) = registry(&d);
    assert!(errors.iter().any(|e| e.contains("decl.lua") && e.contains("\"KSampler.nope\" names no built-in choice input")), "{errors:?}");
}

// Issue 11: diffloom.call binds inputs as the executor does, with the same sentences (a range error
// used to reach Lua users as Rust debug output, `BelowMin { value: "0", min: "1" }`).
#[test]
fn diffloom_call_reports_bad_inputs_in_the_validators_words() {
    let d = Dir::new();
    d.write(
        "plugins/callbad.lua",
        "diffloom.node { name = 'CallBad', outputs = { {'MASK', 'MASK'} }, execute = function() \
         return diffloom.call('SolidMask', { width = 0, height = 8 }) end }\n",
    );
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let (mut ex, _) = executor(&d, 1 << 30);
    let r = run(&d, &mut ex, &reg, r#""c": (type: "CallBad"), "o": (type: "PreviewAny", inputs: {"source": Link("c", "MASK")}),"#);
    let err = r.error.expect("an error").to_string();
    assert!(err.contains("diffloom.call(\"SolidMask\"): input \"width\": 0 is below the minimum 1"), "{err}");
    assert!(!err.contains("BelowMin"), "{err}");
}

/// The shipped hint plugin equals the built-in nodes it composes (Canny, then dilation and closing by
/// the stroke thickness), and its strokes are binary and wider than the edges.
#[test]
fn scribble_plugin_composes_canny_and_morphology() {
    let d = Dir::new();
    std::fs::create_dir_all(d.join("plugins")).unwrap();
    std::fs::copy(crate::util::repo().join("plugins/lua/scribble.lua"), d.join("plugins/scribble.lua")).unwrap();
    std::fs::copy(crate::util::repo().join("graphs/inputs/house.png"), d.join("in.png")).unwrap();
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let (mut ex, _) = executor(&d, 1 << 30);
    let nodes = r#""load": (type: "LoadImage", inputs: {"image": "in.png"}),
        "s": (type: "ScribbleFromEdges", inputs: {"image": Link("load", "IMAGE"), "low_threshold": 0.2, "high_threshold": 0.5, "thickness": 7}),
        "e": (type: "Canny", inputs: {"image": Link("load", "IMAGE"), "low_threshold": 0.2, "high_threshold": 0.5}),
        "d": (type: "Morphology", inputs: {"image": Link("e", "IMAGE"), "operation": "dilate", "kernel_size": 7}),
        "c": (type: "Morphology", inputs: {"image": Link("d", "IMAGE"), "operation": "close", "kernel_size": 7}),
        "o": (type: "PreviewAny", inputs: {"source": Link("s", "IMAGE")}), "o2": (type: "PreviewAny", inputs: {"source": Link("c", "IMAGE")}),"#;
    let scribble = tensor(&output(&d, &mut ex, &reg, nodes, "s", 0));
    let by_hand = tensor(&output(&d, &mut ex, &reg, nodes, "c", 0));
    let edges = tensor(&output(&d, &mut ex, &reg, nodes, "e", 0));
    assert_eq!(scribble.size(), [1, 512, 512, 3]);
    assert_eq!((&scribble - &by_hand).abs().max().double_value(&[]), 0.0);
    assert_eq!(scribble.ne(0.0).logical_and(&scribble.ne(1.0)).sum(tch::Kind::Int64).int64_value(&[]), 0, "not binary");
    let (s, e) = (scribble.sum(tch::Kind::Double).double_value(&[]), edges.sum(tch::Kind::Double).double_value(&[]));
    assert!(e > 1000.0 && s > 3.0 * e, "strokes {s} vs edges {e}");
}

/// A Lua plugin patches a model through the same hooks as the built-in patches
/// (`diffloom.patch_model`): a post-CFG function that keeps the estimate changes nothing, a CFG
/// function returning the conditional prediction samples as cfg 1 does, and a hook's errors and
/// runaway loops are reported with the plugin file (the budget counts per sampling run).
#[test]
fn lua_plugins_patch_models_through_the_same_hooks() {
    let d = Dir::new();
    std::fs::create_dir_all(d.join("plugins")).unwrap();
    d.write(
        "plugins/guidance.lua",
        r#"
diffloom.node {
  name = "LuaGuidance",
  category = "model_patches",
  inputs = { { "model", "MODEL" }, { "mode", "STRING", default = "keep" } },
  outputs = { { "MODEL", "MODEL" } },
  execute = function(a)
    if a.mode == "keep" then
      return diffloom.patch_model(a.model, { post_cfg = function(args) return args.denoised end })
    elseif a.mode == "cond" then
      return diffloom.patch_model(a.model, { cfg = function(args) return args.cond_denoised end })
    elseif a.mode == "loop" then
      return diffloom.patch_model(a.model, { post_cfg = function(args) while true do end end })
    end
    return diffloom.patch_model(a.model, { post_cfg = function(args) return 1 end })
  end,
}
"#,
    );
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let ck = crate::util::tiny_sd1(&d, "m.safetensors");
    let graph = |mode: &str, cfg: f64| {
        format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "g": (type: "LuaGuidance", inputs: {{"model": Link("c", "MODEL"), "mode": {mode:?}}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a fox", "clip": Link("c", "CLIP")}}),
            "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
            "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64}}),
            "s": (type: "KSampler", inputs: {{"model": Link("g", "MODEL"), "seed": 3, "steps": 2, "cfg": {cfg:?}, "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT")}}),
            "b": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 3, "steps": 2, "cfg": {cfg:?}, "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT")}}),
            "o": (type: "PreviewAny", inputs: {{"source": Link("s", "LATENT")}}), "o2": (type: "PreviewAny", inputs: {{"source": Link("b", "LATENT")}}),"#
        )
    };
    let (mut ex, _) = executor(&d, 1 << 30);
    let keep = tensor(&output(&d, &mut ex, &reg, &graph("keep", 5.0), "s", 0));
    let base = tensor(&output(&d, &mut ex, &reg, &graph("keep", 5.0), "b", 0));
    assert_eq!((&keep - &base).abs().max().double_value(&[]), 0.0);
    let cond = tensor(&output(&d, &mut ex, &reg, &graph("cond", 5.0), "s", 0));
    let cfg1 = tensor(&output(&d, &mut ex, &reg, &graph("keep", 1.0), "b", 0));
    let e = (&cond - &cfg1).abs().max().double_value(&[]);
    assert!(e < 1e-4, "the Lua CFG function returning the conditional prediction vs cfg 1: {e}");
    assert!((&cond - &base).abs().max().double_value(&[]) > 1e-3);
    for (mode, want) in [("bad", "must return a tensor"), ("loop", "limit")] {
        let err = run(&d, &mut ex, &reg, &graph(mode, 5.0)).error.expect("an error").to_string();
        assert!(err.contains("guidance.lua") && err.contains(want), "{mode}: {err}");
    }
}

// A list output reaches Lua as a sequence (RebatchImages through diffloom.call).
#[test]
fn a_list_output_is_a_lua_sequence() {
    let d = Dir::new();
    d.write(
        "plugins/count.lua",
        "diffloom.node { name = 'CountBatches', inputs = { {'image', 'IMAGE'} }, outputs = { {'INT', 'INT'} },\n  execute = function(a) local parts = diffloom.call('RebatchImages', { images = a.image, batch_size = 2 }); return #parts * 10 + parts[#parts]:shape()[1] end }\n",
    );
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let nodes = r#""e": (type: "EmptyImage", inputs: {"width": 8, "height": 8, "batch_size": 5}),
        "c": (type: "CountBatches", inputs: {"image": Link("e", "IMAGE")}), "o": (type: "PreviewAny", inputs: {"source": Link("c", "INT")}),"#;
    let (mut ex, _) = executor(&d, 1 << 30);
    // 5 images in batches of 2: three batches, the last holding one.
    assert!(matches!(output(&d, &mut ex, &reg, nodes, "c", 0), Value::Int(31)));
}

// Lua patches reach the UNet's block and attention hooks (ComfyUI's names), with an info table saying
// where they run; hooks returning their inputs change nothing, an attention-output hook halving its
// input equals UNetSelfAttentionMultiply's out = 0.5, and bad returns and endless hooks are errors
// naming the plugin.
#[test]
fn lua_plugins_reach_the_unet_block_and_attention_hooks() {
    let d = Dir::new();
    d.write(
        "plugins/unet_hooks.lua",
        r#"
local function where(info)
  assert(info.block == "input" or info.block == "middle" or info.block == "output", "block " .. tostring(info.block))
  assert(info.index >= 0 and info.sigma > 0 and #info.cond_or_uncond >= 1 and #info.original_shape == 4)
end
local function attn(info) where(info); assert(info.heads >= 1 and info.transformer >= 0) end
diffloom.node {
  name = "LuaUnetHooks",
  category = "model_patches",
  inputs = { { "model", "MODEL" }, { "mode", "STRING", default = "identity" } },
  outputs = { { "MODEL", "MODEL" } },
  execute = function(a)
    if a.mode == "identity" then
      return diffloom.patch_model(a.model, {
        input_block_patch = function(h, info) where(info); assert(info.block == "input"); return h end,
        input_block_patch_after_skip = function(h, info) where(info); return h end,
        output_block_patch = function(h, skip, info) where(info); assert(info.block == "output"); return h, skip end,
        attn1_patch = function(n, c, v, info) attn(info); return n, c, v end,
        attn1_output_patch = function(out, info) attn(info); return out end,
        attn2_patch = function(n, c, v, info) attn(info); return n, c, v end,
      })
    elseif a.mode == "half" then
      return diffloom.patch_model(a.model, { attn1_output_patch = function(out, info) return out * 0.5 end })
    elseif a.mode == "value" then
      return diffloom.patch_model(a.model, { attn1 = { ["middle:0"] = function(q, k, v, info)
        assert(info.block == "middle" and info.index == 0); return v end } })
    elseif a.mode == "shape" then
      return diffloom.patch_model(a.model, { input_block_patch = function(h, info) return h:pad(0, 1, 0, 0, 0) end })
    elseif a.mode == "typo" then
      return diffloom.patch_model(a.model, { input_block = function(h) return h end })
    end
    return diffloom.patch_model(a.model, { output_block_patch = function(h, skip) while true do end end })
  end,
}
"#,
    );
    let (reg, errors) = registry(&d);
    assert!(errors.is_empty(), "{errors:?}");
    let ck = crate::util::tiny_sd1(&d, "m.safetensors");
    let graph = |model: &str| {
        format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
            "g": {model},
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a fox", "clip": Link("c", "CLIP")}}),
            "n": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
            "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64}}),
            "s": (type: "KSampler", inputs: {{"model": Link("g", "MODEL"), "seed": 3, "steps": 2, "cfg": 5.0, "positive": Link("p", "CONDITIONING"), "negative": Link("n", "CONDITIONING"), "latent_image": Link("e", "LATENT")}}),
            "o": (type: "PreviewAny", inputs: {{"source": Link("s", "LATENT")}}),"#
        )
    };
    let lua = |mode: &str| graph(&format!(r#"(type: "LuaUnetHooks", inputs: {{"model": Link("c", "MODEL"), "mode": {mode:?}}})"#));
    let (mut ex, _) = executor(&d, 1 << 30);
    let diff = |a: &tch::Tensor, b: &tch::Tensor| (a - b).abs().max().double_value(&[]);
    let base = tensor(&output(
        &d,
        &mut ex,
        &reg,
        &graph(r#"(type: "ModelMergeSimple", inputs: {"model1": Link("c", "MODEL"), "model2": Link("c", "MODEL"), "ratio": 1.0})"#),
        "s",
        0,
    ));
    let identity = tensor(&output(&d, &mut ex, &reg, &lua("identity"), "s", 0));
    assert_eq!(diff(&identity, &base), 0.0);
    let half = tensor(&output(&d, &mut ex, &reg, &lua("half"), "s", 0));
    let multiply = graph(r#"(type: "UNetSelfAttentionMultiply", inputs: {"model": Link("c", "MODEL"), "q": 1.0, "k": 1.0, "v": 1.0, "out": 0.5})"#);
    let multiplied = tensor(&output(&d, &mut ex, &reg, &multiply, "s", 0));
    assert!(diff(&half, &base) > 1e-3, "halving self-attention changes the result");
    assert!(diff(&half, &multiplied) < 1e-5, "{}", diff(&half, &multiplied));
    let value = tensor(&output(&d, &mut ex, &reg, &lua("value"), "s", 0));
    assert!(diff(&value, &base) > 1e-4, "replacing the middle block's self-attention changes the result");
    for (mode, want) in [("shape", "shape"), ("typo", "unknown hook \"input_block\""), ("loop", "limit")] {
        let err = run(&d, &mut ex, &reg, &lua(mode)).error.expect("an error").to_string();
        assert!(err.contains("unet_hooks.lua") && err.contains(want), "{mode}: {err}");
    }
}
