//! The SD nodes on tiny random-weight checkpoints: prompt encoding (windows, weights, textual
//! inversions, CLIP layers), VAE encode/decode (plain and tiled), empty latents, and loader caching.

use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint, write_safetensors};
use diffloom_nodes::prompt::{tokenize, Slot};
use diffloom_nodes::sd::default_tokenizer;
use tch::{Device, Kind, Tensor};

use crate::util::{executor, run_graph, Dir};

const GIB: usize = 1 << 30;

fn ckpt(d: &Dir, family: Family) -> String {
    let path = d.join(&format!("{family:?}.safetensors"));
    if !path.exists() {
        write_checkpoint(&path, &tiny_config(family, false), Kind::Float, 5, true).unwrap();
    }
    path.display().to_string()
}

/// Encodes each prompt with a fresh graph and returns the CONDITIONING tensors `[1, tokens, dim]`.
fn encode(d: &Dir, family: Family, layer: Option<i64>, prompts: &[&str]) -> Vec<Tensor> {
    let (mut ex, reg) = executor(d, GIB);
    ex.options.folders.add("embeddings", d.join("embeddings"));
    let ck = ckpt(d, family);
    let clip = match layer {
        Some(l) => format!(r#""skip": (type: "CLIPSetLastLayer", inputs: {{"clip": Link("c", "CLIP"), "stop_at_clip_layer": {l}}}),"#),
        None => String::new(),
    };
    let src = if layer.is_some() { "skip" } else { "c" };
    prompts
        .iter()
        .map(|p| {
            let g = format!(
                r#"(version: 1, nodes: {{
                    "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
                    {clip}
                    "e": (type: "CLIPTextEncode", inputs: {{"text": {p:?}, "clip": Link("{src}", "CLIP")}}),
                    "o": (type: "PreviewAny", inputs: {{"source": Link("e", "CONDITIONING")}}),
                }})"#
            );
            let r = run_graph(&mut ex, &reg, d, &g, &[]);
            assert!(r.error.is_none(), "{p}: {}", r.error.unwrap());
            // The CLIPTextEncode node's own output, from the executor's cache.
            let path = d.join("graph.ron");
            let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
            let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
            match ex.cached_output(&resolved, "e", 0) {
                Some(diffloom_core::Value::Conditioning(c)) => c[0].cross_attn.0.shallow_clone(),
                other => panic!("{p}: no CONDITIONING from the node: {other:?}"),
            }
        })
        .collect()
}

fn direct_clip(d: &Dir, family: Family, layer: Option<i64>) -> diffloom_nodes::sd::SdClip {
    let ck = diffloom_nodes::checkpoint::load::load_checkpoint(std::path::Path::new(&ckpt(d, family)), Device::Cpu, Kind::Float).unwrap();
    diffloom_nodes::sd::SdClip { model: ck.clip.unwrap(), tokenizer: default_tokenizer().unwrap(), family, layer }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn prompts_encode_to_77_token_windows() {
    let d = Dir::new();
    let long = "a very long prompt about a lighthouse at dusk, ".repeat(12);
    let out = encode(&d, Family::Sd1, None, &["a photo of a cat", &long]);
    assert_eq!(out[0].size(), [1, 77, 32]);
    assert_eq!(out[1].size(), [1, 154, 32]);
}

#[test]
fn weights_follow_comfyuis_formula() {
    let d = Dir::new();
    let clip = direct_clip(&d, Family::Sd1, None);
    let enc = |p: &str| clip.encode(p, None).unwrap().cross_attn.0;
    let (plain, neutral, weighted, empty) = (enc("cat"), enc("(cat:1.0)"), enc("(cat:1.5)"), enc(""));
    assert_eq!(max_diff(&plain, &neutral), 0.0);
    // Slot 1 holds "cat": (z - z_empty) * 1.5 + z_empty; every other slot is untouched.
    let expect = (plain.get(0).get(1) - empty.get(0).get(1)) * 1.5 + empty.get(0).get(1);
    assert!(max_diff(&weighted.get(0).get(1), &expect) < 1e-5);
    assert!(max_diff(&weighted.get(0).get(1), &plain.get(0).get(1)) > 1e-3);
    // (Encoded in a batch with the empty prompt, the other slots may differ in the last bits.)
    assert!(max_diff(&weighted.get(0).narrow(0, 2, 75), &plain.get(0).narrow(0, 2, 75)) < 1e-6);
}

#[test]
fn sd2_pads_with_zero_and_sd1_with_the_end_token() {
    let tok = default_tokenizer().unwrap();
    for (pad, family) in [(49407u32, "sd1"), (0, "sd2")] {
        let w = tokenize(&tok, "a photo of a cat", pad, None).unwrap();
        let ids: Vec<u32> = w.windows[0]
            .iter()
            .map(|(s, _)| match s {
                Slot::Token(t) => *t,
                _ => u32::MAX,
            })
            .collect();
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407], "{family}");
        assert!(ids[7..].iter().all(|t| *t == pad), "{family}");
    }
}

#[test]
fn long_words_split_across_windows_and_short_ones_move_whole() {
    let tok = default_tokenizer().unwrap();
    // 72 single-token words, then a 5-token word: it moves whole to the second window.
    let prompt = format!("{} (a b c d e:1.1)", "x ".repeat(72));
    let w = tokenize(&tok, &prompt, 49407, None).unwrap();
    assert_eq!(w.windows.len(), 2);
    assert_eq!(w.windows[0].iter().filter(|(_, wt)| *wt != 1.0).count(), 0);
    assert_eq!(w.windows[1].iter().filter(|(_, wt)| (*wt - 1.1).abs() < 1e-9).count(), 5);
    assert!(w.windows.iter().all(|win| win.len() == 77));
}

#[test]
fn textual_inversions_fill_slots_and_unknown_ones_are_errors() {
    let d = Dir::new();
    std::fs::create_dir_all(d.join("embeddings")).unwrap();
    let vectors = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
    write_safetensors(&d.join("embeddings/mystyle.safetensors"), &[("emb_params".into(), vectors.shallow_clone())], None).unwrap();
    write_safetensors(&d.join("embeddings/wide.safetensors"), &[("emb_params".into(), Tensor::randn([1, 768], (Kind::Float, Device::Cpu)))], None).unwrap();
    let tok = default_tokenizer().unwrap();
    let source = diffloom_nodes::sd::EmbeddingDir { dirs: vec![d.join("embeddings")], family: Family::Sd1 };
    let w = tokenize(&tok, "a photo, embedding:mystyle cat", 49407, Some(&source)).unwrap();
    let slots: Vec<&Slot> = w.windows[0].iter().map(|(s, _)| s).collect();
    assert_eq!(slots[4], &Slot::Embedding { embedding: 0, row: 0 });
    assert_eq!(slots[5], &Slot::Embedding { embedding: 0, row: 1 });
    let clip = direct_clip(&d, Family::Sd1, None);
    let with = clip.encode("a photo, embedding:mystyle cat", Some(&source)).unwrap().cross_attn.0;
    let without = clip.encode("a photo, cat", Some(&source)).unwrap().cross_attn.0;
    assert!(max_diff(&with, &without) > 1e-3);

    let (mut ex, reg) = executor(&d, GIB);
    ex.options.folders.add("embeddings", d.join("embeddings"));
    let ck = ckpt(&d, Family::Sd1);
    for (prompt, want) in [
        ("a embedding:nosuch cat", "input \"text\": unknown embedding \"nosuch\""),
        ("a embedding:wide cat", "input \"text\": a textual-inversion embedding has width 768, but this text encoder's is 32"),
        ("a embedding:../escape", "unknown embedding \"../escape\""),
    ] {
        let g = format!(
            r#"(version: 1, nodes: {{
                "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
                "prompt": (type: "CLIPTextEncode", inputs: {{"text": {prompt:?}, "clip": Link("c", "CLIP")}}),
                "o": (type: "PreviewAny", inputs: {{"source": Link("prompt", "CONDITIONING")}}),
            }})"#
        );
        let err = run_graph(&mut ex, &reg, &d, &g, &[]).error.expect("fails").to_string();
        assert!(err.contains("node \"prompt\" (CLIPTextEncode): ") && err.contains(want), "{err}");
    }
}

#[test]
fn clip_layers_follow_comfyui() {
    let d = Dir::new();
    for family in [Family::Sd1, Family::Sd2] {
        let enc = |layer: Option<i64>| direct_clip(&d, family, layer).encode("a photo of a cat", None).unwrap().cross_attn.0;
        let (default, last, penultimate, beyond) = (enc(None), enc(Some(-1)), enc(Some(-2)), enc(Some(-24)));
        match family {
            // SD 1.x defaults to the last layer, SD 2.x to the penultimate.
            Family::Sd1 => assert_eq!(max_diff(&default, &last), 0.0),
            Family::Sd2 => assert_eq!(max_diff(&default, &penultimate), 0.0),
        }
        assert!(max_diff(&last, &penultimate) > 1e-3);
        // More layers than the model has means the last one (the tiny models have 3).
        assert_eq!(max_diff(&beyond, &last), 0.0);
    }
}

/// Runs `nodes` (RON entries) whose output node "o" is a PreviewAny, returning the report's messages.
fn run_nodes(d: &Dir, nodes: &str) -> Result<Vec<String>, String> {
    let (mut ex, reg) = executor(d, GIB);
    let g = format!("(version: 1, nodes: {{ {nodes} }})");
    let r = run_graph(&mut ex, &reg, d, &g, &[]);
    match r.error {
        Some(e) => Err(e.to_string()),
        None => Ok(r.nodes.iter().flat_map(|n| n.messages.clone()).collect()),
    }
}

#[test]
fn vae_nodes_round_trip_with_crop_tiling_and_clear_errors() {
    let d = Dir::new();
    d.png("odd.png", 70, 45, 3);
    d.png("tiny.png", 6, 6, 3);
    let ck = ckpt(&d, Family::Sd1);
    let base =
        format!(r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}), "img": (type: "LoadImage", inputs: {{"image": "odd.png"}}),"#);
    let msgs = run_nodes(
        &d,
        &format!(
            r#"{base}
        "enc": (type: "VAEEncode", inputs: {{"pixels": Link("img", "IMAGE"), "vae": Link("c", "VAE")}}),
        "dec": (type: "VAEDecode", inputs: {{"samples": Link("enc", "LATENT"), "vae": Link("c", "VAE")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("enc", "LATENT")}}),
        "o2": (type: "PreviewAny", inputs: {{"source": Link("dec", "IMAGE")}}),"#
        ),
    )
    .unwrap();
    // 70×45 is cropped to 64×40 around the centre: latents 8×5, decoded 64×40.
    assert!(msgs.contains(&"LATENT [1, 4, 5, 8]".to_owned()), "{msgs:?}");
    assert!(msgs.contains(&"IMAGE [1, 40, 64, 3]".to_owned()), "{msgs:?}");
    let msgs = run_nodes(
        &d,
        &format!(
            r#"{base}
        "e": (type: "EmptyLatentImage", inputs: {{"width": 96, "height": 64, "batch_size": 2}}),
        "dec": (type: "VAEDecodeTiled", inputs: {{"samples": Link("e", "LATENT"), "vae": Link("c", "VAE"), "tile_size": 64, "overlap": 32}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("dec", "IMAGE")}}),"#
        ),
    )
    .unwrap();
    assert!(msgs.contains(&"IMAGE [2, 64, 96, 3]".to_owned()), "{msgs:?}");
    let err = run_nodes(
        &d,
        &format!(
            r#"{base}
        "small": (type: "LoadImage", inputs: {{"image": "tiny.png"}}),
        "enc": (type: "VAEEncode", inputs: {{"pixels": Link("small", "IMAGE"), "vae": Link("c", "VAE")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("enc", "LATENT")}}),"#
        ),
    )
    .unwrap_err();
    assert!(err.contains("node \"enc\" (VAEEncode): input \"pixels\": the image is 6×6; the VAE needs at least 8×8"), "{err}");
}

#[test]
fn tiled_decoding_of_a_single_tile_equals_plain_decoding() {
    let d = Dir::new();
    let ck = diffloom_nodes::checkpoint::load::load_checkpoint(std::path::Path::new(&ckpt(&d, Family::Sd1)), Device::Cpu, Kind::Float).unwrap();
    let vae = diffloom_nodes::sd::SdVae { model: ck.vae.unwrap() };
    let z = Tensor::randn([1, 4, 6, 6], (Kind::Float, Device::Cpu));
    let plain = vae.decode(&z, None).unwrap();
    let tiled = vae.decode(&z, Some((16, 4))).unwrap();
    assert!(max_diff(&plain, &tiled) < 1e-6);
    // Several tiles: same shape, every pixel covered, values in range.
    let z = Tensor::randn([1, 4, 20, 28], (Kind::Float, Device::Cpu));
    let (plain, tiled) = (vae.decode(&z, None).unwrap(), vae.decode(&z, Some((8, 2))).unwrap());
    assert_eq!(plain.size(), tiled.size());
    let (lo, hi) = (f64::try_from(tiled.min()).unwrap(), f64::try_from(tiled.max()).unwrap());
    assert!(lo >= 0.0 && hi <= 1.0, "{lo} {hi} nan={}", tiled.isnan().any().int64_value(&[]));
}

#[test]
fn missing_checkpoint_parts_are_named_where_they_are_needed() {
    let d = Dir::new();
    let mut config = tiny_config(Family::Sd1, false);
    config.clip = None;
    let path = d.join("noclip.safetensors");
    write_checkpoint(&path, &config, Kind::Float, 5, true).unwrap();
    let err = run_nodes(
        &d,
        &format!(
            r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {:?}}}),
        "e": (type: "CLIPTextEncode", inputs: {{"text": "x", "clip": Link("c", "CLIP")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("e", "CONDITIONING")}}),"#,
            path.display().to_string()
        ),
    )
    .unwrap_err();
    assert!(err.contains("node \"e\" (CLIPTextEncode): input \"clip\": ") && err.contains("noclip.safetensors has no text encoder"), "{err}");
}

#[test]
fn an_unchanged_checkpoint_loads_once() {
    let d = Dir::new();
    let ck = ckpt(&d, Family::Sd1);
    let (mut ex, reg) = executor(&d, GIB);
    let g = |seed_text: &str| {
        format!(
            r#"(version: 1, nodes: {{
        "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "c2": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "e": (type: "CLIPTextEncode", inputs: {{"text": {seed_text:?}, "clip": Link("c", "CLIP")}}),
        "e2": (type: "CLIPTextEncode", inputs: {{"text": "other", "clip": Link("c2", "CLIP")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("e", "CONDITIONING")}}),
        "o2": (type: "PreviewAny", inputs: {{"source": Link("e2", "CONDITIONING")}}),
    }})"#
        )
    };
    let r = run_graph(&mut ex, &reg, &d, &g("a"), &[]);
    // Two loader nodes of the same file share one result: the second is a cache hit.
    assert_eq!(r.ran(), ["c", "e", "e2", "o", "o2"]);
    let r = run_graph(&mut ex, &reg, &d, &g("b"), &[]);
    assert_eq!(r.ran(), ["e", "o"]);
}
