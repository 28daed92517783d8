//! The SD model stack on the project's tiny random-weight checkpoints: loading, shapes, detection,
//! and every kind of corrupt file.

use diffloom_nodes::checkpoint::detect::{Family, Prediction};
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
use diffloom_nodes::models::clip::ClipOutput;
use tch::{Device, Kind, Tensor};

use crate::util::Dir;

#[test]
fn tiny_checkpoints_load_and_run_with_the_right_shapes() {
    let d = Dir::new();
    for (family, inpaint) in [(Family::Sd1, false), (Family::Sd2, false), (Family::Sd1, true)] {
        let path = d.join("m.safetensors");
        let config = tiny_config(family, inpaint);
        write_checkpoint(&path, &config, Kind::Float, 7, true).unwrap();
        let ck = load_checkpoint(&path, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(ck.config, config);
        let unet = ck.unet.unwrap();
        let c_in = if inpaint { 9 } else { 4 };
        let x = Tensor::randn([2, c_in, 16, 12], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 77, 32], (Kind::Float, Device::Cpu));
        let out = unet.forward(&x, &Tensor::from_slice(&[999f32, 1.0]), &ctx);
        assert_eq!(out.size(), [2, 4, 16, 12]);
        assert!(out.isfinite().all().int64_value(&[]) == 1);
        let clip = ck.clip.unwrap();
        let tokens = Tensor::from_slice(&[49406i64, 320, 1125, 49407]).view([1, 4]);
        assert_eq!(clip.encode(&tokens, ClipOutput::Last).size(), [1, 4, 32]);
        let vae = ck.vae.unwrap();
        let img = Tensor::rand([1, 3, 64, 48], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let z = vae.encode_mean(&img);
        assert_eq!(z.size(), [1, 4, 8, 6]);
        assert_eq!(vae.decode(&z).size(), [1, 3, 64, 48]);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn detection_from_shapes_matches_the_written_config() {
    // Without the metadata, the channel widths, levels, res blocks and attention levels come from the
    // shapes alone; head layout falls back to the released models' (SD 1.x: 8 heads).
    let d = Dir::new();
    let path = d.join("m.safetensors");
    let config = tiny_config(Family::Sd1, false);
    write_checkpoint(&path, &config, Kind::Float, 7, false).unwrap();
    let file = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&path).unwrap();
    let shapes = file.tensors().iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let found = diffloom_nodes::checkpoint::detect::detect(&path, &shapes, &Default::default()).unwrap();
    let (want, got) = (config.unet.unwrap(), found.unet.unwrap());
    assert_eq!((got.in_channels, got.model_channels, &got.channel_mult, got.num_res_blocks), (4, 64, &want.channel_mult, 1));
    assert_eq!((&got.attention_resolutions, got.context_dim, got.use_linear_in_transformer), (&want.attention_resolutions, 32, false));
    assert_eq!(found.vae, config.vae);
    let clip = found.clip.unwrap();
    assert_eq!((clip.hidden_size, clip.num_layers, clip.vocab_size), (32, 3, 49408));
    assert_eq!((found.family, found.prediction), (Family::Sd1, Prediction::Eps));
}

/// Loads `bytes` as a checkpoint and returns the error message.
fn load_error(d: &Dir, name: &str, bytes: &[u8]) -> String {
    let path = d.write(name, bytes);
    match load_checkpoint(&path, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    }
}

/// A valid tiny SD1 file's bytes.
fn tiny_bytes(d: &Dir) -> Vec<u8> {
    let path = d.join("valid.safetensors");
    write_checkpoint(&path, &tiny_config(Family::Sd1, false), Kind::Float, 1, true).unwrap();
    std::fs::read(&path).unwrap()
}

#[test]
fn corrupt_and_unsupported_files_get_clear_errors() {
    let d = Dir::new();
    let good = tiny_bytes(&d);
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let p = |n: &str| d.join(n).display().to_string();

    assert_eq!(load_error(&d, "empty.safetensors", b""), format!("{}: the file is empty", p("empty.safetensors")));
    let msg = load_error(&d, "trunc.safetensors", &good[..good.len() - 1000]);
    assert!(msg.starts_with(&p("trunc.safetensors")) && msg.contains("invalid safetensors header"), "{msg}");
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&(good.len() as u64 * 2).to_le_bytes());
    let msg = load_error(&d, "huge.safetensors", &huge);
    assert!(msg.contains("the header claims") && msg.contains("truncated or not a safetensors file"), "{msg}");
    // A header that lies about one tensor's offsets.
    let header = std::str::from_utf8(&good[8..8 + header_len]).unwrap();
    let lying = header.replacen("\"data_offsets\":[0,", "\"data_offsets\":[4,", 1);
    assert_ne!(lying, header);
    let mut bad = good[..8].to_vec();
    bad.extend_from_slice(lying.as_bytes());
    bad.extend_from_slice(&good[8 + header_len..]);
    let msg = load_error(&d, "lying.safetensors", &bad);
    assert!(msg.contains("invalid safetensors header"), "{msg}");
    // Pickles are read as data (tests/pickle.rs); broken ones are errors naming the file.
    let msg = load_error(&d, "model.ckpt", b"PK\x03\x04 archive/data.pkl");
    assert!(msg.starts_with(&p("model.ckpt")) && msg.contains("not a readable zip archive"), "{msg}");
    let msg = load_error(&d, "old.ckpt", b"\x80\x02}q\x00(X.\x00\x00\x00\x00");
    assert!(msg.starts_with(&p("old.ckpt")) && msg.contains("not one torch.save wrote"), "{msg}");
    std::fs::create_dir(d.join("folder")).unwrap();
    let msg = load_checkpoint(&d.join("folder"), Device::Cpu, Kind::Float).err().unwrap().to_string();
    assert!(msg.contains("folder: is a directory"), "{msg}");
}

/// Rewrites the tiny SD1 file with `edit` applied to its tensor list.
fn edited(d: &Dir, name: &str, edit: impl Fn(&mut Vec<(String, Tensor)>)) -> String {
    let src = d.join("src.safetensors");
    write_checkpoint(&src, &tiny_config(Family::Sd1, false), Kind::Float, 1, true).unwrap();
    let file = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&src).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file.tensors().keys().map(|k| (k.clone(), file.load(k, Device::Cpu, None).unwrap())).collect();
    edit(&mut tensors);
    let out = d.join(name);
    diffloom_nodes::checkpoint::synthetic::write_safetensors(&out, &tensors, Some(file.metadata.clone())).unwrap();
    match load_checkpoint(&out, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{name} loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_keys_and_wrong_shapes_name_the_key() {
    let d = Dir::new();
    let key = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight";
    let msg = edited(&d, "missing.safetensors", |t| t.retain(|(k, _)| k != key));
    assert_eq!(msg, format!("{}: missing tensor \"{key}\"", d.join("missing.safetensors").display()));
    let msg = edited(&d, "shape.safetensors", |t| {
        let e = t.iter_mut().find(|(k, _)| k == key).unwrap();
        e.1 = Tensor::zeros([32, 127], (Kind::Float, Device::Cpu));
    });
    assert_eq!(msg, format!("{}: tensor \"{key}\" has shape [32, 127], expected [64, 256]", d.join("shape.safetensors").display()));
}

#[test]
fn a_wrong_dtype_for_a_weight_is_named() {
    let d = Dir::new();
    let key = "first_stage_model.decoder.conv_in.bias";
    let msg = edited(&d, "dtype.safetensors", |t| {
        let e = t.iter_mut().find(|(k, _)| k == key).unwrap();
        e.1 = e.1.to_kind(Kind::Int64);
    });
    assert_eq!(
        msg,
        format!("{}: tensor \"{key}\" has dtype I64 (model weights are floating point), which diffloom cannot load", d.join("dtype.safetensors").display())
    );
}

#[test]
fn full_checkpoints_with_ema_weights_and_schedule_buffers_load() {
    // Unpruned files also hold model_ema.* copies and LDM's schedule buffers; they are not read.
    let d = Dir::new();
    let src = d.join("src.safetensors");
    write_checkpoint(&src, &tiny_config(Family::Sd1, false), Kind::Float, 1, true).unwrap();
    let file = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&src).unwrap();
    let mut tensors: Vec<(String, Tensor)> = file.tensors().keys().map(|k| (k.clone(), file.load(k, Device::Cpu, None).unwrap())).collect();
    tensors.push(("model_ema.decay".into(), Tensor::from_slice(&[0.9999f32])));
    tensors.push(("model_ema.diffusion_modelinput_blocks00weight".into(), Tensor::zeros([64, 4, 3, 3], (Kind::Float, Device::Cpu))));
    tensors.push(("alphas_cumprod".into(), Tensor::ones([1000], (Kind::Float, Device::Cpu))));
    let full = d.join("full.safetensors");
    diffloom_nodes::checkpoint::synthetic::write_safetensors(&full, &tensors, Some(file.metadata.clone())).unwrap();
    let ck = load_checkpoint(&full, Device::Cpu, Kind::Float).unwrap();
    assert!(ck.unet.is_some() && ck.vae.is_some() && ck.clip.is_some());
}

#[test]
fn standalone_vae_files_load_with_or_without_the_prefix() {
    let d = Dir::new();
    let src = d.join("src.safetensors");
    write_checkpoint(&src, &tiny_config(Family::Sd1, false), Kind::Half, 1, false).unwrap();
    let file = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&src).unwrap();
    for (name, strip) in [("prefixed.safetensors", false), ("bare.safetensors", true)] {
        let tensors: Vec<(String, Tensor)> = file
            .tensors()
            .keys()
            .filter(|k| k.starts_with("first_stage_model."))
            .map(|k| {
                let out = if strip { k.trim_start_matches("first_stage_model.").to_owned() } else { k.clone() };
                (out, file.load(k, Device::Cpu, None).unwrap())
            })
            .collect();
        let path = d.join(name);
        diffloom_nodes::checkpoint::synthetic::write_safetensors(&path, &tensors, None).unwrap();
        let (vae, bytes) = diffloom_nodes::checkpoint::load::load_vae(&path, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(vae.config, tiny_config(Family::Sd1, false).vae.unwrap(), "{name}");
        assert!(bytes > 0);
    }
    // A whole checkpoint given as a VAE file: its first_stage_model.* part loads.
    let (vae, bytes) = diffloom_nodes::checkpoint::load::load_vae(&src, Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(vae.config, tiny_config(Family::Sd1, false).vae.unwrap());
    assert!(bytes > 0);
}

#[test]
fn unsupported_families_are_named() {
    let d = Dir::new();
    for (key, family) in [
        ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", "SDXL"),
        ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "Stable Diffusion 3"),
        ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ] {
        let path = d.join("x.safetensors");
        let t = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        diffloom_nodes::checkpoint::synthetic::write_safetensors(&path, &[(key.to_owned(), t)], None).unwrap();
        let msg = load_checkpoint(&path, Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(msg.ends_with(&format!("not supported yet: this looks like {family} (diffloom runs SD 1.x and 2.x)")), "{msg}");
    }
}

#[test]
fn full_size_sd1_and_sd2_checkpoints_are_detected_and_run() {
    // Full SD 1.5 / SD 2.x dimensions with random weights, fp16 as most downloads are, no embedded
    // config: everything is detected from the key names and shapes, as for a user's file.
    use diffloom_nodes::checkpoint::synthetic::full_config;
    let d = Dir::new();
    for family in [Family::Sd1, Family::Sd2] {
        let path = d.join("full.safetensors");
        let config = full_config(family);
        write_checkpoint(&path, &config, Kind::Half, 3, false).unwrap();
        let ck = load_checkpoint(&path, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(ck.config.unet, config.unet, "{family:?}");
        assert_eq!(ck.config.vae, config.vae, "{family:?}");
        assert_eq!(ck.config.clip, config.clip, "{family:?}");
        assert_eq!(ck.config.family, family);
        let _g = tch::no_grad_guard();
        let clip = ck.clip.unwrap();
        let ctx = clip.encode(&Tensor::from_slice(&[49406i64, 320, 1125, 49407]).view([1, 4]), ClipOutput::Last);
        let unet = ck.unet.unwrap();
        let eps = unet.forward(&Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu)), &Tensor::from_slice(&[500f32]), &ctx);
        assert_eq!(eps.size(), [1, 4, 8, 8]);
        let img = ck.vae.unwrap().decode(&eps);
        assert_eq!(img.size(), [1, 3, 64, 64]);
        assert_eq!(img.isfinite().all().int64_value(&[]), 1, "{family:?}");
        drop(unet);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn a_header_length_that_looks_like_a_pickle_opcode_is_still_safetensors() {
    // 640 = 0x280: the file starts with the bytes 0x80 0x02, like a protocol-2 pickle.
    let d = Dir::new();
    let json = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut header = json.as_bytes().to_vec();
    header.resize(640, b' ');
    let mut bytes = 640u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&[0u8; 8]);
    let path = d.write("looks_like_pickle.safetensors", &bytes);
    assert_eq!(&bytes[..2], &[0x80, 0x02]);
    let file = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.load("w", Device::Cpu, None).unwrap().size(), [2]);
}

// Issue 11: per-level transformer depths are detected from a file's own keys and survive loading.
#[test]
fn per_level_transformer_depths_are_detected() {
    let d = Dir::new();
    let path = d.join("deep.safetensors");
    let mut config = tiny_config(Family::Sd1, false);
    if let Some(u) = config.unet.as_mut() {
        u.transformer_depth = vec![1, 2];
    }
    write_checkpoint(&path, &config, Kind::Float, 4, false).unwrap();
    let ck = load_checkpoint(&path, Device::Cpu, Kind::Float).unwrap();
    let unet = ck.unet.unwrap();
    assert_eq!(unet.config.transformer_depth, [1, 2]);
    assert_eq!(unet.config.depth_middle(), 2);
    let _g = tch::no_grad_guard();
    let out = unet.forward(
        &Tensor::ones([1, 4, 8, 8], (Kind::Float, Device::Cpu)),
        &Tensor::from_slice(&[10f32]),
        &Tensor::ones([1, 77, 32], (Kind::Float, Device::Cpu)),
    );
    assert_eq!(out.size(), [1, 4, 8, 8]);
}

/// The part loaders reassemble a checkpoint: UNETLoader, CLIPLoader and VAELoader on its parts (in
/// diffloom's single-file names, and in the diffusers folder diffusers writes from it), DiffusersLoader
/// on the folder, and CheckpointLoader with a v1 config all sample what CheckpointLoaderSimple does;
/// a "parameterization: v" config makes it a v-prediction model.
#[test]
fn part_loaders_reassemble_the_checkpoint() {
    use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
    use diffloom_nodes::checkpoint::synthetic::{detectable_tiny_config, write_safetensors};
    let d = Dir::new();
    let ck = d.join("model.safetensors");
    write_checkpoint(&ck, &detectable_tiny_config(Family::Sd1), Kind::Float, 5, true).unwrap();
    // The parts in single-file names: the UNet bare, the text encoder as transformers saves it.
    let f = SafetensorsFile::open(&ck).unwrap();
    let part = |prefix: &str, rename: &str| -> Vec<(String, Tensor)> {
        f.tensors().keys().filter_map(|k| Some((format!("{rename}{}", k.strip_prefix(prefix)?), f.load(k, Device::Cpu, None).unwrap()))).collect()
    };
    write_safetensors(&d.join("unet.safetensors"), &part("model.diffusion_model.", ""), None).unwrap();
    write_safetensors(&d.join("clip.safetensors"), &part("cond_stage_model.transformer.", ""), None).unwrap();
    let folder = d.join("diffusers");
    crate::parity::run_reference("reference.py", &[&ck, &d.join("ref.safetensors"), std::path::Path::new("--save-diffusers"), &folder]);
    std::fs::write(d.join("v1.yaml"), "model:\n  params:\n    parameterization: \"eps\"\n").unwrap();
    std::fs::write(d.join("v2.yaml"), "model:\n  params:\n    parameterization: \"v\"\n").unwrap();
    let graph = |loaders: &str, model: &str, clip: &str| {
        format!(
            r#"{loaders}
            "vae": (type: "VAELoader", inputs: {{"vae_name": {ck:?}}}),
            "p": (type: "CLIPTextEncode", inputs: {{"text": "a harbour at dawn", "clip": {clip}}}),
            "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64}}),
            "s": (type: "KSampler", inputs: {{"model": {model}, "seed": 4, "steps": 2, "cfg": 3.0, "positive": Link("p", "CONDITIONING"), "negative": Link("p", "CONDITIONING"), "latent_image": Link("e", "LATENT")}}),
            "dec": (type: "VAEDecode", inputs: {{"samples": Link("s", "LATENT"), "vae": Link("vae", "VAE")}}),"#
        )
    };
    let run = |nodes: String| -> Tensor {
        match &crate::util::outputs(&d, &nodes, &[("dec", "IMAGE", 0)]).unwrap_or_else(|e| panic!("{e}"))[0] {
            diffloom_core::Value::Image(t) => t.0.shallow_clone(),
            other => panic!("{other:?}"),
        }
    };
    let simple =
        run(graph(&format!(r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),"#), r#"Link("c", "MODEL")"#, r#"Link("c", "CLIP")"#));
    let parts = |unet: &std::path::Path, clip: &std::path::Path| {
        graph(
            &format!(
                r#""u": (type: "UNETLoader", inputs: {{"unet_name": {unet:?}, "weight_dtype": "default"}}),
                "t": (type: "CLIPLoader", inputs: {{"clip_name": {clip:?}, "type": "stable_diffusion"}}),"#
            ),
            r#"Link("u", "MODEL")"#,
            r#"Link("t", "CLIP")"#,
        )
    };
    let cases = [
        ("unet + clip files", parts(&d.join("unet.safetensors"), &d.join("clip.safetensors"))),
        ("diffusers parts", parts(&folder.join("unet/diffusion_pytorch_model.safetensors"), &folder.join("text_encoder/model.safetensors"))),
        (
            "DiffusersLoader",
            graph(&format!(r#""c": (type: "DiffusersLoader", inputs: {{"model_path": {folder:?}}}),"#), r#"Link("c", "MODEL")"#, r#"Link("c", "CLIP")"#),
        ),
        (
            "CheckpointLoader v1",
            graph(
                &format!(r#""c": (type: "CheckpointLoader", inputs: {{"config_name": {:?}, "ckpt_name": {ck:?}}}),"#, d.join("v1.yaml")),
                r#"Link("c", "MODEL")"#,
                r#"Link("c", "CLIP")"#,
            ),
        ),
    ];
    for (what, nodes) in cases {
        let err = crate::util::max_abs_diff(&run(nodes), &simple);
        println!("{what}: {err:.2e}");
        assert!(err < 1e-5, "{what}: {err}");
    }
    let v = run(graph(
        &format!(r#""c": (type: "CheckpointLoader", inputs: {{"config_name": {:?}, "ckpt_name": {ck:?}}}),"#, d.join("v2.yaml")),
        r#"Link("c", "MODEL")"#,
        r#"Link("c", "CLIP")"#,
    ));
    assert!(crate::util::max_abs_diff(&v, &simple) > 1e-3, "the v config changed nothing");
    // Text encoders for other families are refused by name.
    let nodes = format!(r#""t": (type: "CLIPLoader", inputs: {{"clip_name": {:?}, "type": "sd3"}}),"#, d.join("clip.safetensors"));
    let e = crate::util::outputs(&d, &nodes, &[("t", "CLIP", 0)]).expect_err("sd3 is refused");
    assert!(e.contains("type") && e.contains("sd3"), "{e}");
}

/// A checkpoint's parts are read when a node first uses them: a graph without VAEDecode never reads the
/// VAE, each part's load is reported under the node that needed it, and a broken part is an error
/// naming the file and the node input that asked for it.
#[test]
fn checkpoint_parts_load_only_when_used() {
    let d = Dir::new();
    let ck = crate::util::tiny_sd1(&d, "m.safetensors");
    let nodes = format!(
        r#"(version: 1, nodes: {{
        "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "p": (type: "CLIPTextEncode", inputs: {{"text": "a fox", "clip": Link("c", "CLIP")}}),
        "e": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 64}}),
        "s": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "steps": 2, "positive": Link("p", "CONDITIONING"), "negative": Link("p", "CONDITIONING"), "latent_image": Link("e", "LATENT")}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("s", "LATENT")}})}})"#
    );
    let (mut ex, reg) = crate::util::executor(&d, 1 << 30);
    let r = crate::util::run_graph(&mut ex, &reg, &d, &nodes, &[]);
    assert!(r.error.is_none(), "{}", r.error.unwrap());
    let said = |id: &str| r.nodes.iter().find(|n| n.id == id).map(|n| n.messages.join("\n")).unwrap_or_default();
    assert!(said("c").contains("opened") && !said("c").contains("loaded"), "{}", said("c"));
    assert!(said("p").contains("loaded the text encoder of m"), "{}", said("p"));
    assert!(said("s").contains("loaded the UNet of m"), "{}", said("s"));
    assert!(!r.to_string().contains("VAE"), "{r}");
    let path = d.join("graph.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
    let Some(diffloom_core::Value::Vae(vae)) = ex.cached_output(&resolved, "c", 2) else { panic!("no VAE handle") };
    assert!(!vae.is_loaded(), "the VAE was never read");
    let Some(diffloom_core::Value::Model(model)) = ex.cached_output(&resolved, "c", 0) else { panic!("no MODEL handle") };
    assert!(model.is_loaded());

    // A VAE whose weights are damaged fails when VAEDecode asks for it, naming the file and the input.
    let eager = edited(&d, "bad.safetensors", |tensors| tensors.retain(|(k, _)| k != "first_stage_model.decoder.conv_out.weight"));
    assert!(eager.contains("decoder.conv_out.weight"), "{eager}");
    let bad = d.join("bad.safetensors");
    let graph = nodes.replace(&format!("{ck:?}"), &format!("{bad:?}")).replace(
        r#""o": (type: "PreviewAny", inputs: {"source": Link("s", "LATENT")})"#,
        r#""v": (type: "VAEDecode", inputs: {"samples": Link("s", "LATENT"), "vae": Link("c", "VAE")}), "o": (type: "PreviewAny", inputs: {"source": Link("v", "IMAGE")})"#,
    );
    let r = crate::util::run_graph(&mut ex, &reg, &d, &graph, &[]);
    let err = r.error.expect("an error").to_string();
    assert!(err.contains("node \"v\"") && err.contains("\"vae\"") && err.contains("bad.safetensors") && err.contains("decoder.conv_out.weight"), "{err}");
}

/// `--max-memory` (the per-thread budget): a VAE decode whose estimated peak does not fit runs in
/// smaller batches, or in tiles when one image does not fit, saying so; the images are those of the
/// whole decode (batches) or of ComfyUI's tiled fallback (tiles).
#[test]
fn vae_decode_keeps_to_the_memory_budget() {
    use diffloom_core::Value;
    let d = Dir::new();
    let ck = crate::util::tiny_sd1(&d, "m.safetensors");
    let graph = format!(
        r#"(version: 1, nodes: {{
        "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {ck:?}}}),
        "i": (type: "LoadImage", inputs: {{"image": "in.png"}}),
        "e": (type: "VAEEncode", inputs: {{"pixels": Link("i", "IMAGE"), "vae": Link("c", "VAE")}}),
        "n": (type: "RepeatLatentBatch", inputs: {{"samples": Link("e", "LATENT"), "amount": 3}}),
        "v": (type: "VAEDecode", inputs: {{"samples": Link("n", "LATENT"), "vae": Link("c", "VAE")}}),
        "t": (type: "VAEDecodeTiled", inputs: {{"samples": Link("n", "LATENT"), "vae": Link("c", "VAE"), "tile_size": 512, "overlap": 128}}),
        "o": (type: "PreviewAny", inputs: {{"source": Link("v", "IMAGE")}}), "o2": (type: "PreviewAny", inputs: {{"source": Link("t", "IMAGE")}})}})"#
    );
    d.png("in.png", 128, 128, 3);
    let decode = |budget: Option<u64>| {
        diffloom_nodes::budget::set_max_memory(budget);
        let (mut ex, reg) = crate::util::executor(&d, 1 << 30);
        let r = crate::util::run_graph(&mut ex, &reg, &d, &graph, &[]);
        diffloom_nodes::budget::set_max_memory(None);
        assert!(r.error.is_none(), "{}", r.error.unwrap());
        let said = r.nodes.iter().find(|n| n.id == "v").map(|n| n.messages.join("\n")).unwrap_or_default();
        let path = d.join("graph.ron");
        let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
        let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
        let mut image = |id: &str| match ex.cached_output(&resolved, id, 0) {
            Some(Value::Image(t)) => t.0,
            other => panic!("{other:?}"),
        };
        (said, image("v"), image("t"))
    };
    let per_item = 2178 * 16 * 16 * 64 * 4u64;
    let (said, whole, tiled_node) = decode(None);
    assert!(!said.contains("decoded"), "{said}");
    let (said, batched, _) = decode(Some(per_item * 3 / 2));
    assert!(said.contains("decoded 1 at a time"), "{said}");
    assert!((&batched - &whole).abs().max().double_value(&[]) < 1e-5);
    let (said, tiled, _) = decode(Some(per_item / 2));
    assert!(said.contains("decoded in tiles"), "{said}");
    // ComfyUI's fallback tiles are 64 latent pixels with 16 of overlap: VAEDecodeTiled's 512 and 128 pixels.
    assert_eq!((&tiled - &tiled_node).abs().max().double_value(&[]), 0.0);
    assert_eq!(tiled.size(), whole.size());
}

/// bf16 on the CPU: the VAE runs channels-last there (fp32 keeps ComfyUI's NCHW). Its encode and
/// decode stay those of fp32 within bf16's precision, the latents leave contiguous, and fp32 decodes
/// in NCHW as ComfyUI does.
#[test]
fn vae_in_bf16_runs_channels_last_with_fp32s_results() {
    let d = Dir::new();
    let path = d.join("m.safetensors");
    write_checkpoint(&path, &tiny_config(Family::Sd1, false), Kind::Float, 3, true).unwrap();
    let f32_vae = load_checkpoint(&path, Device::Cpu, Kind::Float).unwrap().vae.unwrap();
    let bf16_vae = load_checkpoint(&path, Device::Cpu, Kind::BFloat16).unwrap().vae.unwrap();
    tch::manual_seed(0);
    let img = Tensor::rand([2, 3, 64, 48], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let (z32, z16) = (f32_vae.encode_mean(&img), bf16_vae.encode_mean(&img).to_kind(Kind::Float));
    assert!(z16.is_contiguous() && z32.is_contiguous());
    let rel = |a: &Tensor, b: &Tensor| ((a - b).abs().max() / b.abs().max()).double_value(&[]);
    println!("bf16 vs fp32: latents {:.2e}", rel(&z16, &z32));
    assert!(rel(&z16, &z32) < 0.05, "{}", rel(&z16, &z32));
    let (x32, x16) = (f32_vae.decode(&z32), bf16_vae.decode(&z32).to_kind(Kind::Float));
    println!("bf16 vs fp32: images {:.2e}", rel(&x16, &x32));
    assert!(rel(&x16, &x32) < 0.05, "{}", rel(&x16, &x32));
    // The layout the decode ran in shows in its output's strides: NCHW for fp32 (ComfyUI's, whose
    // latents are contiguous), channels-last in bf16.
    assert!(x32.is_contiguous(), "fp32 decoded channels-last");
    let x16 = bf16_vae.decode(&z32);
    assert!(!x16.is_contiguous() && x16.permute([0, 2, 3, 1]).is_contiguous(), "bf16 decoded in NCHW: {:?}", x16.stride());
}
