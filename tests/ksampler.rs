//! The sampling nodes in graphs on the tiny model: every sampler × scheduler pair, determinism,
//! img2img and masks, two-pass graphs, and bad input.

use diffloom_core::{RunReport, Value};
use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::sampling::samplers::SAMPLER_NAMES;
use diffloom_nodes::sampling::schedulers::SCHEDULER_NAMES;
use tch::Kind;

use crate::util::{executor, run_graph, Dir};

fn ckpt(d: &Dir) -> String {
    let p = d.join("tiny.safetensors");
    if !p.exists() {
        crate::util::tiny_sd1(d, "tiny.safetensors");
    }
    p.display().to_string()
}

/// A txt2img graph around `sampler_node` (RON of a node named "s" reading "m", "pos", "neg", "lat"),
/// saving the latent's description through PreviewAny "o".
fn graph(d: &Dir, sampler_node: &str, extra: &str) -> String {
    graph_out(d, sampler_node, "LATENT", extra)
}

/// [`graph`] for a sampler node whose latent output is named `out`.
fn graph_out(d: &Dir, sampler_node: &str, out: &str, extra: &str) -> String {
    format!(
        r#"(version: 1, nodes: {{
            "c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {:?}}}),
            "pos": (type: "CLIPTextEncode", inputs: {{"text": "a red house", "clip": Link("c", "CLIP")}}),
            "neg": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
            "lat": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 48, "batch_size": 2}}),
            "s": {sampler_node},
            "o": (type: "PreviewAny", inputs: {{"source": Link("s", {out:?})}}),
            {extra}
        }})"#,
        ckpt(d)
    )
}

fn ksampler(sampler: &str, scheduler: &str, steps: i64, cfg: f64, denoise: f64, latent: &str) -> String {
    format!(
        r#"(type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 42, "steps": {steps}, "cfg": {cfg:?},
            "sampler_name": {sampler:?}, "scheduler": {scheduler:?}, "positive": Link("pos", "CONDITIONING"),
            "negative": Link("neg", "CONDITIONING"), "latent_image": Link("{latent}", "LATENT"), "denoise": {denoise:?}}})"#
    )
}

/// Runs the graph and returns the LATENT samples of node "s", read back from the executor's cache.
fn latent_of(d: &Dir, g: &str) -> (RunReport, tch::Tensor) {
    let (mut ex, reg) = executor(d, 1 << 30);
    let r = run_graph(&mut ex, &reg, d, g, &[]);
    assert!(r.error.is_none(), "{}", r.error.as_ref().unwrap());
    let path = d.join("graph.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
    let out = ex.cached_output(&resolved, "s", 0).expect("cached LATENT of s");
    let Value::Latent(l) = out else { panic!("not a latent") };
    (r, l.samples.0)
}

fn max_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn every_sampler_and_scheduler_pair_runs_in_a_graph() {
    let d = Dir::new();
    for sampler in SAMPLER_NAMES {
        for scheduler in SCHEDULER_NAMES {
            let g = graph(&d, &ksampler(sampler, scheduler, 3, 5.0, 1.0, "lat"), "");
            let (r, latent) = latent_of(&d, &g);
            assert_eq!(latent.size(), [2, 4, 6, 8], "{sampler}/{scheduler}");
            assert_eq!(latent.isfinite().all().int64_value(&[]), 1, "{sampler}/{scheduler}");
            assert!(r.ran().contains(&"s"));
        }
    }
}

#[test]
fn the_same_graph_and_seed_give_bit_identical_latents() {
    let d = Dir::new();
    for sampler in ["euler_ancestral", "dpmpp_2m"] {
        let g = graph(&d, &ksampler(sampler, "karras", 4, 7.0, 1.0, "lat"), "");
        let (_, a) = latent_of(&d, &g);
        let (_, b) = latent_of(&d, &g);
        assert_eq!(max_diff(&a, &b), 0.0, "{sampler}");
        let other = g.replace("\"seed\": 42", "\"seed\": 43");
        let (_, c) = latent_of(&d, &other);
        assert!(max_diff(&a, &c) > 1e-3, "{sampler}: the seed must matter");
    }
}

#[test]
fn cfg_one_skips_the_uncond_pass() {
    let d = Dir::new();
    let (r, _) = latent_of(&d, &graph(&d, &ksampler("euler", "normal", 5, 1.0, 1.0, "lat"), ""));
    let msg = r.nodes.iter().find(|n| n.id == "s").unwrap().messages.join(" ");
    assert!(msg.contains("5 steps of euler, 5 model calls"), "{msg}");
}

#[test]
fn denoise_zero_returns_the_input_and_img2img_uses_the_tail_of_the_schedule() {
    let d = Dir::new();
    d.png("in.png", 64, 48, 5);
    let extra = r#""img": (type: "LoadImage", inputs: {"image": "in.png"}),
        "enc": (type: "VAEEncode", inputs: {"pixels": Link("img", "IMAGE"), "vae": Link("c", "VAE")}),"#;
    let (_, encoded) = {
        let g = graph(&d, &ksampler("euler", "normal", 4, 7.0, 0.0, "enc"), extra);
        latent_of(&d, &g)
    };
    // denoise 0: the latent comes back unchanged.
    let direct = {
        let ck = diffloom_nodes::checkpoint::load::load_checkpoint(std::path::Path::new(&ckpt(&d)), tch::Device::Cpu, Kind::Float).unwrap();
        let vae = diffloom_nodes::sd::SdVae { model: ck.vae.unwrap() };
        let img = diffloom_nodes::imageio::load(&d.join("in.png")).unwrap().rgb;
        vae.encode(&img, None).unwrap()
    };
    assert_eq!(max_diff(&encoded, &direct), 0.0);
    // denoise 0.5 with 4 steps runs 4 steps of an 8-step schedule, staying near the input.
    let (r, half) = latent_of(&d, &graph(&d, &ksampler("euler", "normal", 4, 7.0, 0.5, "enc"), extra));
    assert!(r.nodes.iter().find(|n| n.id == "s").unwrap().messages[0].starts_with("4 steps of euler"));
    let (_, full) = latent_of(&d, &graph(&d, &ksampler("euler", "normal", 4, 7.0, 1.0, "enc"), extra));
    assert!(max_diff(&half, &direct) < max_diff(&full, &direct), "img2img at 0.5 stays closer to the input");
}

#[test]
fn split_sigmas_two_passes_equal_one_pass_for_a_deterministic_sampler() {
    let d = Dir::new();
    let common = r#""model": Link("c", "MODEL"), "cfg": 6.0, "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING")"#;
    let extra = format!(
        r#""sched": (type: "BasicScheduler", inputs: {{"model": Link("c", "MODEL"), "scheduler": "karras", "steps": 6}}),
        "split": (type: "SplitSigmas", inputs: {{"sigmas": Link("sched", "SIGMAS"), "step": 2}}),
        "pick": (type: "KSamplerSelect", inputs: {{"sampler_name": "heun"}}),
        "first": (type: "SamplerCustom", inputs: {{{common}, "add_noise": true, "noise_seed": 5, "sampler": Link("pick", "SAMPLER"),
            "sigmas": Link("split", "high_sigmas"), "latent_image": Link("lat", "LATENT")}}),
        "whole": (type: "SamplerCustom", inputs: {{{common}, "add_noise": true, "noise_seed": 5, "sampler": Link("pick", "SAMPLER"),
            "sigmas": Link("sched", "SIGMAS"), "latent_image": Link("lat", "LATENT")}}),
        "o2": (type: "PreviewAny", inputs: {{"source": Link("whole", "output")}}),"#
    );
    let second = format!(
        r#"(type: "SamplerCustom", inputs: {{{common}, "add_noise": false, "noise_seed": 5, "sampler": Link("pick", "SAMPLER"),
            "sigmas": Link("split", "low_sigmas"), "latent_image": Link("first", "output")}})"#
    );
    let g = graph_out(&d, &second, "output", &extra);
    let (_, two_pass) = latent_of(&d, &g);
    let path = d.join("graph.ron");
    let (mut ex, reg) = executor(&d, 1 << 30);
    let r = run_graph(&mut ex, &reg, &d, &g, &[]);
    assert!(r.error.is_none());
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
    let Value::Latent(whole) = ex.cached_output(&resolved, "whole", 0).unwrap() else { panic!() };
    // The second pass starts from the first pass's latent, unscaled and scaled again: tiny rounding.
    assert!(max_diff(&two_pass, &whole.samples) < 1e-4, "{}", max_diff(&two_pass, &whole.samples));
}

#[test]
fn bad_sampling_input_is_named() {
    let d = Dir::new();
    let cases = [
        (
            r#"(type: "KSampler", inputs: {"model": Link("c", "MODEL"), "steps": 0, "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"), "latent_image": Link("lat", "LATENT")})"#,
            "input \"steps\": 0 is below the minimum 1",
        ),
        (
            r#"(type: "KSampler", inputs: {"model": Link("c", "MODEL"), "denoise": 1.5, "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"), "latent_image": Link("lat", "LATENT")})"#,
            "input \"denoise\": 1.5 is above the maximum 1",
        ),
        (
            r#"(type: "KSampler", inputs: {"model": Link("c", "MODEL"), "sampler_name": "euler_a", "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"), "latent_image": Link("lat", "LATENT")})"#,
            "input \"sampler_name\": \"euler_a\" is not one of",
        ),
    ];
    for (node, want) in cases {
        let g = graph(&d, node, "");
        let path = d.write("bad.ron", &g);
        let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
        let err = diffloom_core::validate::validate(&path, &parsed, &diffloom_nodes::registry()).err().unwrap().to_string();
        assert!(err.contains(&format!("node \"s\", {want}")), "{err}");
    }
    // Negative sigmas fail at run time, naming the input (a latent of the wrong channel count is
    // refused by the sampling call itself: masks_wrong_channels_and_nans_through_the_sampling_api).
    let extra = r#""k": (type: "ManualSigmas", inputs: {"sigmas": "2, 1, -0.5"}),
        "pick": (type: "KSamplerSelect", inputs: {"sampler_name": "euler"}),"#;
    let node = r#"(type: "SamplerCustom", inputs: {"model": Link("c", "MODEL"), "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"),
        "sampler": Link("pick", "SAMPLER"), "sigmas": Link("k", "SIGMAS"), "latent_image": Link("lat", "LATENT")})"#;
    let (mut ex, reg) = executor(&d, 1 << 30);
    let err = run_graph(&mut ex, &reg, &d, &graph_out(&d, node, "output", extra), &[]).error.unwrap().to_string();
    assert!(err.contains("node \"s\" (SamplerCustom): input \"sigmas\": sigmas must be finite and not negative"), "{err}");
    let img = r#""img": (type: "LoadImage", inputs: {"image": "x.png"}),"#;
    d.png("x.png", 16, 16, 1);
    let node = r#"(type: "KSampler", inputs: {"model": Link("c", "MODEL"), "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"), "latent_image": Link("bad", "LATENT")})"#;
    let extra = format!(r#"{img} "bad": (type: "VAEEncode", inputs: {{"pixels": Link("img", "IMAGE"), "vae": Link("c", "VAE")}}),"#);
    // A 2×2 latent of a VAE-encoded 16×16 image is small but valid: it samples.
    let ok = run_graph(&mut ex, &reg, &d, &graph(&d, node, &extra), &[]);
    assert!(ok.error.is_none(), "{}", ok.error.unwrap());
}

#[test]
fn masks_wrong_channels_and_nans_through_the_sampling_api() {
    use diffloom_core::value::{CondEntry, Latent, Shared};
    use diffloom_nodes::sampling::ksampler::{sample, Guider, Request, SamplerSpec};
    use std::sync::atomic::AtomicBool;
    use tch::{Device, Tensor};
    let d = Dir::new();
    let ck = diffloom_nodes::checkpoint::load::load_checkpoint(std::path::Path::new(&ckpt(&d)), Device::Cpu, Kind::Float).unwrap();
    let model = diffloom_nodes::sd::SdModel {
        unet: ck.unet.unwrap(),
        family: Family::Sd1,
        sampling: ck.config.prediction.into(),
        name: "tiny".into(),
        patches: Default::default(),
    };
    let cond = vec![CondEntry::new(Tensor::randn([1, 77, 32], (Kind::Float, Device::Cpu)))];
    let cancel = AtomicBool::new(false);
    let sigmas = [14.6, 5.0, 1.0, 0.0];
    let _g = tch::no_grad_guard();
    let (guider, euler) = (Guider::cfg(&model, cond.clone(), cond.clone(), 3.0), SamplerSpec::named("euler").unwrap());
    fn req<'a>(guider: &'a Guider, sampler: &'a SamplerSpec, latent: &'a Latent, sigmas: &'a [f64], cancel: &'a AtomicBool) -> Request<'a> {
        Request { guider, latent, seed: 1, add_noise: true, sampler, sigmas, cancel, label: "t", progress: &|_, _, _| {} }
    }
    // Mask: left half resampled (1), right half kept (0): the kept half comes back as it went in.
    let input = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let mask = Tensor::cat(&[Tensor::ones([1, 8, 4], (Kind::Float, Device::Cpu)), Tensor::zeros([1, 8, 4], (Kind::Float, Device::Cpu))], 2);
    let latent = Latent { samples: Shared(input.shallow_clone()), noise_mask: Some(Shared(mask)), batch_index: None };
    let out = sample(&req(&guider, &euler, &latent, &sigmas, &cancel)).unwrap().samples;
    let kept = (out.narrow(3, 4, 4) - input.narrow(3, 4, 4)).abs().max().double_value(&[]);
    let changed = (out.narrow(3, 0, 4) - input.narrow(3, 0, 4)).abs().max().double_value(&[]);
    assert!(kept < 1e-5 && changed > 0.1, "kept {kept}, changed {changed}");
    // A 3-channel latent does not fit the model.
    let latent = Latent { samples: Shared(Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu))), noise_mask: None, batch_index: None };
    let err = sample(&req(&guider, &euler, &latent, &sigmas, &cancel)).err().unwrap().to_string();
    assert!(err.contains("input \"latent_image\": a latent of shape [1, 3, 8, 8] does not fit this model, which needs 4 channels"), "{err}");
    // NaN in the latent stops the run at the first step instead of producing a black image.
    let latent = Latent { samples: Shared(Tensor::full([1, 4, 8, 8], f64::NAN, (Kind::Float, Device::Cpu))), noise_mask: None, batch_index: None };
    let err = sample(&req(&guider, &euler, &latent, &sigmas, &cancel)).err().unwrap().to_string();
    assert!(err.contains("the latent became NaN at step 1 of 3"), "{err}");
    // Cancellation between steps.
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let latent = Latent { samples: Shared(Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu))), noise_mask: None, batch_index: None };
    assert!(matches!(sample(&req(&guider, &euler, &latent, &sigmas, &cancel)), Err(diffloom_core::NodeError::Cancelled)));
}

#[test]
fn model_sampling_discrete_switches_sampling_type_and_zsnr() {
    let d = Dir::new();
    let eps = ksampler("euler", "normal", 3, 1.0, 1.0, "lat");
    let (_, a) = latent_of(&d, &graph(&d, &eps, ""));
    let patched = eps.replace(r#"Link("c", "MODEL")"#, r#"Link("vmodel", "MODEL")"#);
    let with = |sampling: &str, zsnr: bool| {
        let extra = format!(r#""vmodel": (type: "ModelSamplingDiscrete", inputs: {{"model": Link("c", "MODEL"), "sampling": {sampling:?}, "zsnr": {zsnr}}}),"#);
        latent_of(&d, &graph(&d, &patched, &extra)).1
    };
    // "eps" without zsnr, as ComfyUI workflows carry it, is the detected model unchanged.
    assert_eq!(max_diff(&a, &with("eps", false)), 0.0);
    let mut seen = vec![a.shallow_clone()];
    for (sampling, zsnr) in [("v_prediction", false), ("eps", true), ("lcm", false), ("x0", false), ("img_to_img", false)] {
        let b = with(sampling, zsnr);
        assert!(b.isfinite().all().int64_value(&[]) == 1, "{sampling} zsnr={zsnr}: not finite");
        for (k, other) in seen.iter().enumerate() {
            assert!(max_diff(other, &b) > 1e-3, "{sampling} zsnr={zsnr} gives the same result as case {k}");
        }
        seen.push(b);
    }
    // The default of zsnr is false, as ComfyUI's.
    let extra = r#""vmodel": (type: "ModelSamplingDiscrete", inputs: {"model": Link("c", "MODEL"), "sampling": "eps"}),"#;
    assert_eq!(max_diff(&a, &latent_of(&d, &graph(&d, &patched, extra)).1), 0.0);
}

/// RebatchLatents (ComfyUI's list semantics): a batch of 4 split into lists of 2 samples item by item
/// as the whole batch does (each item keeps its batch index, so its seeded noise), the sampler running
/// once per list item; the decoded list saves every image.
#[test]
fn rebatched_latents_sample_as_the_whole_batch() {
    let d = Dir::new();
    let four = |g: String| g.replace(r#""height": 48, "batch_size": 2"#, r#""height": 48, "batch_size": 4"#);
    let g = four(graph(&d, &ksampler("euler", "normal", 3, 7.0, 1.0, "lat"), ""));
    let (_, all) = latent_of(&d, &g);
    assert_eq!(all.size()[0], 4);

    let extra = r#""re": (type: "RebatchLatents", inputs: {"latents": Link("lat", "LATENT"), "batch_size": 2}),
        "dec": (type: "VAEDecode", inputs: {"samples": Link("s", "LATENT"), "vae": Link("c", "VAE")}),
        "save": (type: "SaveImage", inputs: {"images": Link("dec", "IMAGE"), "filename_prefix": "re"}),"#;
    let g = four(graph(&d, &ksampler("euler", "normal", 3, 7.0, 1.0, "re"), extra));
    let (mut ex, reg) = executor(&d, 1 << 30);
    let r = run_graph(&mut ex, &reg, &d, &g, &[]);
    assert!(r.error.is_none(), "{}", r.error.as_ref().unwrap());
    let path = d.join("graph.ron");
    let (_, parsed) = diffloom_core::graph::file::read(&path).unwrap();
    let resolved = diffloom_core::validate::validate(&path, &parsed, &reg).unwrap();
    let Some(Value::List(parts)) = ex.cached_output(&resolved, "s", 0) else { panic!("the sampler's output is not a list") };
    let parts: Vec<tch::Tensor> = parts
        .iter()
        .map(|v| match v {
            Value::Latent(l) => {
                assert!(l.noise_mask.is_none(), "an all-ones mask is dropped");
                l.samples.0.shallow_clone()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(parts.iter().map(|p| p.size()[0]).collect::<Vec<_>>(), [2, 2]);
    let rebatched = tch::Tensor::cat(&parts, 0);
    // Same per-item noise and maths; only the UNet's batch size differs (float summation order).
    assert!(max_diff(&rebatched, &all) < 1e-4, "{}", max_diff(&rebatched, &all));
    assert!(max_diff(&parts[0], &parts[1]) > 1e-3, "the two halves got different noise");
    let saved: Vec<_> =
        std::fs::read_dir(d.join("output")).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("re_")).collect();
    assert_eq!(saved.len(), 4, "every item of both batches is saved");
}
