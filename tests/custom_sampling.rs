//! The custom-sampling graph (issue 12): SamplerCustomAdvanced with NOISE, GUIDER, SAMPLER and SIGMAS
//! nodes equals KSampler where ComfyUI says it does, each sampler node equals the named sampler at its
//! defaults, the guiders reduce to CFG where their formulas do, conditioning over time, and the
//! schedulers and sigma tools against k-diffusion, numpy and values by hand.

use diffloom_core::Value;
use diffloom_nodes::builtin::custom_sampling::manual_sigmas;
use diffloom_nodes::sampling::gits::GITS_NOISE_LEVELS;
use diffloom_nodes::sampling::schedulers::{align_your_steps, gits, laplace, loglinear_interp, sd_turbo, AYS_NOISE_LEVELS};
use tch::{Device, Tensor};

use crate::parity::run_reference;
use crate::util::{call, max_abs_diff, outputs, tiny_sd1, Dir};

/// The shared part of every graph: the tiny checkpoint, prompts, a 2-image latent.
fn base(d: &Dir) -> String {
    let ckpt = d.join("tiny.safetensors");
    if !ckpt.exists() {
        tiny_sd1(d, "tiny.safetensors");
    }
    format!(
        r#""c": (type: "CheckpointLoaderSimple", inputs: {{"ckpt_name": {:?}}}),
        "pos": (type: "CLIPTextEncode", inputs: {{"text": "a red house", "clip": Link("c", "CLIP")}}),
        "pos2": (type: "CLIPTextEncode", inputs: {{"text": "a blue boat", "clip": Link("c", "CLIP")}}),
        "neg": (type: "CLIPTextEncode", inputs: {{"text": "blurry", "clip": Link("c", "CLIP")}}),
        "empty": (type: "CLIPTextEncode", inputs: {{"text": "", "clip": Link("c", "CLIP")}}),
        "lat": (type: "EmptyLatentImage", inputs: {{"width": 64, "height": 48, "batch_size": 2}}),"#,
        ckpt.display().to_string()
    )
}

/// The latent output `index` of node `id` in a graph of `base` plus `nodes`.
fn latent(d: &Dir, nodes: &str, id: &str, index: usize) -> Tensor {
    let out = outputs(d, &format!("{} {nodes}", base(d)), &[(id, if index == 0 { "output" } else { "denoised_output" }, index)]);
    let out = out.unwrap_or_else(|e| panic!("{e}"));
    match &out[0] {
        Value::Latent(l) => l.samples.0.shallow_clone(),
        v => panic!("not a latent: {v:?}"),
    }
}

/// KSampler's LATENT.
fn ksampler(d: &Dir, sampler: &str, scheduler: &str, cfg: f64, positive: &str, negative: &str) -> Tensor {
    let node = format!(
        r#""k": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 42, "steps": 3, "cfg": {cfg:?}, "sampler_name": {sampler:?},
            "scheduler": {scheduler:?}, "positive": Link({positive:?}, "CONDITIONING"), "negative": Link({negative:?}, "CONDITIONING"),
            "latent_image": Link("lat", "LATENT"), "denoise": 1.0}}),"#
    );
    let out = outputs(d, &format!("{} {node}", base(d)), &[("k", "LATENT", 0)]).unwrap_or_else(|e| panic!("{e}"));
    match &out[0] {
        Value::Latent(l) => l.samples.0.shallow_clone(),
        v => panic!("not a latent: {v:?}"),
    }
}

/// SamplerCustomAdvanced "s" with the given GUIDER node "g" and SAMPLER node "smp", RandomNoise 42 and
/// BasicScheduler (normal, 3 steps).
fn advanced(d: &Dir, guider: &str, sampler: &str) -> Tensor {
    let nodes = format!(
        r#""noise": (type: "RandomNoise", inputs: {{"noise_seed": 42}}),
        "g": {guider},
        "smp": {sampler},
        "sig": (type: "BasicScheduler", inputs: {{"model": Link("c", "MODEL"), "scheduler": "normal", "steps": 3, "denoise": 1.0}}),
        "s": (type: "SamplerCustomAdvanced", inputs: {{"noise": Link("noise", "NOISE"), "guider": Link("g", "GUIDER"),
            "sampler": Link("smp", "SAMPLER"), "sigmas": Link("sig", "SIGMAS"), "latent_image": Link("lat", "LATENT")}}),"#
    );
    latent(d, &nodes, "s", 0)
}

fn cfg_guider(cfg: f64) -> String {
    format!(
        r#"(type: "CFGGuider", inputs: {{"model": Link("c", "MODEL"), "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"), "cfg": {cfg:?}}})"#
    )
}

fn select(name: &str) -> String {
    format!(r#"(type: "KSamplerSelect", inputs: {{"sampler_name": {name:?}}})"#)
}

// Issue 12: SamplerCustomAdvanced with RandomNoise, CFGGuider, KSamplerSelect and BasicScheduler is
// KSampler (identical latents), for a deterministic and a noise-drawing sampler.
#[test]
fn sampler_custom_advanced_equals_ksampler() {
    let d = Dir::new();
    for sampler in ["euler", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m_cfg_pp"] {
        let a = ksampler(&d, sampler, "normal", 6.0, "pos", "neg");
        let b = advanced(&d, &cfg_guider(6.0), &select(sampler));
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{sampler}");
    }
    // DisableNoise: the latent is sampled as it is (seed 0 for the step noise), unlike RandomNoise.
    let nodes = format!(
        r#""noise": (type: "DisableNoise", inputs: {{}}), "g": {}, "smp": {},
        "sig": (type: "BasicScheduler", inputs: {{"model": Link("c", "MODEL"), "scheduler": "normal", "steps": 3, "denoise": 1.0}}),
        "s": (type: "SamplerCustomAdvanced", inputs: {{"noise": Link("noise", "NOISE"), "guider": Link("g", "GUIDER"),
            "sampler": Link("smp", "SAMPLER"), "sigmas": Link("sig", "SIGMAS"), "latent_image": Link("lat", "LATENT")}}),"#,
        cfg_guider(6.0),
        select("euler")
    );
    let quiet = latent(&d, &nodes, "s", 0);
    // `denoised_output` is the last step's first denoised estimate, as ComfyUI's callback keeps it: after
    // a full euler run it is the output itself (the last step lands on it); stopped halfway (SplitSigmas'
    // high half) it is not the still-noisy output.
    let run = |split: bool| {
        let sigmas = if split { r#"Link("split", "high_sigmas")"# } else { r#"Link("sig", "SIGMAS")"# };
        let nodes = format!(
            r#""noise": (type: "RandomNoise", inputs: {{"noise_seed": 3}}), "g": {}, "smp": {},
            "sig": (type: "BasicScheduler", inputs: {{"model": Link("c", "MODEL"), "scheduler": "normal", "steps": 4, "denoise": 1.0}}),
            "split": (type: "SplitSigmas", inputs: {{"sigmas": Link("sig", "SIGMAS"), "step": 2}}),
            "s": (type: "SamplerCustomAdvanced", inputs: {{"noise": Link("noise", "NOISE"), "guider": Link("g", "GUIDER"),
                "sampler": Link("smp", "SAMPLER"), "sigmas": {sigmas}, "latent_image": Link("lat", "LATENT")}}),"#,
            cfg_guider(6.0),
            select("euler")
        );
        (latent(&d, &nodes, "s", 0), latent(&d, &nodes, "s", 1))
    };
    let (out, estimate) = run(false);
    assert!(max_abs_diff(&out, &estimate) <= 1e-4 * out.abs().max().double_value(&[]), "full run");
    let (out, estimate) = run(true);
    assert!(max_abs_diff(&out, &estimate) > 1e-2, "halfway, denoised_output is the output");
    assert!(max_abs_diff(&quiet, &ksampler(&d, "euler", "normal", 6.0, "pos", "neg")) > 1e-3);
}

// Issue 12: every sampler node at its defaults is the sampler of the same name (noise_device "gpu"
// names the _gpu variant, which equals the plain one on the CPU).
#[test]
fn sampler_nodes_at_their_defaults_equal_the_named_samplers() {
    let d = Dir::new();
    let cases = [
        (r#"(type: "SamplerEulerAncestral", inputs: {})"#, "euler_ancestral"),
        (r#"(type: "SamplerEulerAncestralCFGPP", inputs: {})"#, "euler_ancestral_cfg_pp"),
        (r#"(type: "SamplerLMS", inputs: {})"#, "lms"),
        (r#"(type: "SamplerDPMPP_3M_SDE", inputs: {})"#, "dpmpp_3m_sde_gpu"),
        (r#"(type: "SamplerDPMPP_2M_SDE", inputs: {})"#, "dpmpp_2m_sde_gpu"),
        (r#"(type: "SamplerDPMPP_2M_SDE", inputs: {"solver_type": "heun", "noise_device": "cpu"})"#, "dpmpp_2m_sde_heun"),
        (r#"(type: "SamplerDPMPP_SDE", inputs: {})"#, "dpmpp_sde_gpu"),
        (r#"(type: "SamplerDPMPP_2S_Ancestral", inputs: {})"#, "dpmpp_2s_ancestral"),
        (r#"(type: "SamplerDPMAdaptative", inputs: {})"#, "dpm_adaptive"),
        (r#"(type: "SamplerER_SDE", inputs: {})"#, "er_sde"),
        (r#"(type: "SamplerSASolver", inputs: {"model": Link("c", "MODEL")})"#, "sa_solver"),
        (r#"(type: "SamplerSASolver", inputs: {"model": Link("c", "MODEL"), "use_pece": true})"#, "sa_solver_pece"),
        (r#"(type: "SamplerSEEDS2", inputs: {})"#, "seeds_2"),
        (r#"(type: "SamplerSEEDS2", inputs: {"solver_type": "phi_2", "r": 1.0, "eta": 0.0})"#, "exp_heun_2_x0"),
        (r#"(type: "SamplerEulerCFGpp", inputs: {})"#, "euler_cfg_pp"),
    ];
    for (node, name) in cases {
        let a = advanced(&d, &cfg_guider(5.0), node);
        let b = advanced(&d, &cfg_guider(5.0), &select(name));
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{node} vs {name}");
    }
    // Parameters matter: eta 0 turns euler_ancestral into euler.
    let a = advanced(&d, &cfg_guider(5.0), r#"(type: "SamplerEulerAncestral", inputs: {"eta": 0.0})"#);
    assert_eq!(max_abs_diff(&a, &advanced(&d, &cfg_guider(5.0), &select("euler"))), 0.0);
    // ER-SDE's ODE solver type draws no noise: the seed does not matter.
    let ode = r#"(type: "SamplerER_SDE", inputs: {"solver_type": "ODE"})"#;
    let a = advanced(&d, &cfg_guider(5.0), ode);
    assert!(max_abs_diff(&a, &advanced(&d, &cfg_guider(5.0), r#"(type: "SamplerER_SDE", inputs: {})"#)) > 1e-4);
    // The alternative Euler CFG++ and the LCM upscaler run (the latter grows the latent 1.5×).
    let alt = advanced(&d, &cfg_guider(5.0), r#"(type: "SamplerEulerCFGpp", inputs: {"version": "alternative"})"#);
    assert!(alt.isfinite().all().int64_value(&[]) == 1);
    let up = advanced(&d, &cfg_guider(5.0), r#"(type: "SamplerLCMUpscale", inputs: {"scale_ratio": 1.5})"#);
    assert_eq!(up.size(), [2, 4, 9, 12]);
    // Area conditioning cannot follow the growing latent: a clear error, not a shape panic.
    let nodes = r#""area": (type: "ConditioningSetArea", inputs: {"conditioning": Link("pos", "CONDITIONING"), "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}),
        "noise": (type: "RandomNoise", inputs: {"noise_seed": 1}),
        "g": (type: "CFGGuider", inputs: {"model": Link("c", "MODEL"), "positive": Link("area", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"), "cfg": 5.0}),
        "smp": (type: "SamplerLCMUpscale", inputs: {"scale_ratio": 1.5}),
        "sig": (type: "BasicScheduler", inputs: {"model": Link("c", "MODEL"), "scheduler": "normal", "steps": 3, "denoise": 1.0}),
        "s": (type: "SamplerCustomAdvanced", inputs: {"noise": Link("noise", "NOISE"), "guider": Link("g", "GUIDER"),
            "sampler": Link("smp", "SAMPLER"), "sigmas": Link("sig", "SIGMAS"), "latent_image": Link("lat", "LATENT")}),"#.to_string();
    let err = outputs(&d, &format!("{} {nodes}", base(&d)), &[("s", "output", 0)]).expect_err("an error");
    assert!(err.contains("node \"s\"") && err.contains("the latent changed size while sampling"), "{err}");
}

// Issue 12: the guiders follow their formulas: BasicGuider is CFG at 1; DualCFG with cond1 = cond2 is
// CFG of that against the negative (both styles); perp-neg with neg_scale 0 is CFG against the empty
// prompt; each differs from plain CFG otherwise.
#[test]
fn guiders_reduce_to_cfg_where_their_formulas_do() {
    let d = Dir::new();
    let euler = select("euler");
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let e = max_abs_diff(a, b);
        // Batching three sides instead of two changes the batch the rows are computed in, and the
        // guidance scales multiply that rounding over the steps.
        assert!(e <= 1e-3, "{what}: {e}");
    };
    let basic = advanced(&d, r#"(type: "BasicGuider", inputs: {"model": Link("c", "MODEL"), "conditioning": Link("pos", "CONDITIONING")})"#, &euler);
    close(&basic, &advanced(&d, &cfg_guider(1.0), &euler), "BasicGuider vs CFG 1");
    let cfg5 = advanced(&d, &cfg_guider(5.0), &euler);
    for style in ["regular", "nested"] {
        let dual = |c2: &str| {
            format!(
                r#"(type: "DualCFGGuider", inputs: {{"model": Link("c", "MODEL"), "cond1": Link("pos", "CONDITIONING"), "cond2": Link({c2:?}, "CONDITIONING"),
                "negative": Link("neg", "CONDITIONING"), "cfg_conds": 3.0, "cfg_cond2_negative": 5.0, "style": {style:?}}})"#
            )
        };
        close(&advanced(&d, &dual("pos"), &euler), &cfg5, &format!("DualCFG {style} with cond1 = cond2"));
        assert!(max_abs_diff(&advanced(&d, &dual("pos2"), &euler), &cfg5) > 1e-3, "{style}: cond2 changes nothing");
    }
    let perp = |neg_scale: f64| {
        format!(
            r#"(type: "PerpNegGuider", inputs: {{"model": Link("c", "MODEL"), "positive": Link("pos", "CONDITIONING"), "negative": Link("neg", "CONDITIONING"),
            "empty_conditioning": Link("empty", "CONDITIONING"), "cfg": 5.0, "neg_scale": {neg_scale:?}}})"#
        )
    };
    let against_empty = advanced(&d, &cfg_guider(5.0).replace(r#"Link("neg""#, r#"Link("empty""#), &euler);
    close(&advanced(&d, &perp(0.0), &euler), &against_empty, "PerpNeg at neg_scale 0");
    assert!(max_abs_diff(&advanced(&d, &perp(1.0), &euler), &against_empty) > 1e-3, "neg_scale changes nothing");
}

// Issue 12: ConditioningSetTimestepRange over the whole run changes nothing; two halves with
// different prompts give neither prompt's result; ConditioningAverage at strength 1 and 0 is one side.
#[test]
fn conditioning_over_time_and_averages() {
    let d = Dir::new();
    let range = |id: &str, src: &str, start: f64, end: f64| {
        format!(
            r#""{id}": (type: "ConditioningSetTimestepRange", inputs: {{"conditioning": Link({src:?}, "CONDITIONING"), "start": {start:?}, "end": {end:?}}}),"#
        )
    };
    let run = |extra: &str, positive: &str| {
        let node = format!(
            r#"{extra} "k": (type: "KSampler", inputs: {{"model": Link("c", "MODEL"), "seed": 42, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
                "scheduler": "normal", "positive": Link({positive:?}, "CONDITIONING"), "negative": Link("neg", "CONDITIONING"),
                "latent_image": Link("lat", "LATENT"), "denoise": 1.0}}),"#
        );
        match &outputs(&d, &format!("{} {node}", base(&d)), &[("k", "LATENT", 0)]).unwrap_or_else(|e| panic!("{e}"))[0] {
            Value::Latent(l) => l.samples.0.shallow_clone(),
            v => panic!("{v:?}"),
        }
    };
    let plain = run("", "pos");
    assert_eq!(max_abs_diff(&plain, &run(&range("r", "pos", 0.0, 1.0), "r")), 0.0, "a full range changes the result");
    let halves = format!(
        r#"{} {} "both": (type: "ConditioningCombine", inputs: {{"conditioning_1": Link("a", "CONDITIONING"), "conditioning_2": Link("b", "CONDITIONING")}}),"#,
        range("a", "pos", 0.0, 0.5),
        range("b", "pos2", 0.5, 1.0)
    );
    let switched = run(&halves, "both");
    assert!(max_abs_diff(&switched, &plain) > 1e-3 && max_abs_diff(&switched, &run("", "pos2")) > 1e-3);
    let avg = |w: f64| {
        format!(
            r#""avg": (type: "ConditioningAverage", inputs: {{"conditioning_to": Link("pos", "CONDITIONING"), "conditioning_from": Link("pos2", "CONDITIONING"), "conditioning_to_strength": {w:?}}}),"#
        )
    };
    assert_eq!(max_abs_diff(&run(&avg(1.0), "avg"), &plain), 0.0);
    assert_eq!(max_abs_diff(&run(&avg(0.0), "avg"), &run("", "pos2")), 0.0);
    assert!(max_abs_diff(&run(&avg(0.5), "avg"), &plain) > 1e-3);
}

fn sigmas_of(d: &Dir, node: &str) -> Vec<f64> {
    let nodes = format!(r#"{} "x": {node},"#, base(d));
    match &outputs(d, &nodes, &[("x", "SIGMAS", 0)]).unwrap_or_else(|e| panic!("{node}: {e}"))[0] {
        Value::Sigmas(t) => Vec::<f32>::try_from(&t.0).unwrap().into_iter().map(f64::from).collect(),
        v => panic!("{v:?}"),
    }
}

// Issue 12: the new schedulers: polyexponential and VP against k-diffusion's own functions, AYS and
// GITS tables with numpy's log-linear interpolation, Laplace and SD-Turbo by their definitions.
#[test]
fn schedulers_match_k_diffusion_numpy_and_their_definitions() {
    let d = Dir::new();
    let spec = d.write(
        "spec.json",
        serde_json::json!({"seed": 0, "shape": [1, 4, 2, 2], "sigmas": [1.0, 0.0], "samplers": [], "model": "toy",
            "schedules": [["polyexponential", 12, 0.03, 14.6, 1.7], ["vp", 9, 19.9, 0.1, 0.001], ["loglinear", 25], ["loglinear", 7]]})
        .to_string(),
    );
    let out = d.join("ref.safetensors");
    run_reference("sampler_reference.py", &[&spec, &out]);
    let r = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&out).unwrap();
    let theirs = |name: &str| Vec::<f64>::try_from(&r.load(name, Device::Cpu, None).unwrap().to_kind(tch::Kind::Double)).unwrap();
    let near = |a: &[f64], b: &[f64], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 2e-6 * y.abs().max(1.0), "{what}: {a:?} vs {b:?}");
        }
    };
    near(
        &sigmas_of(&d, r#"(type: "PolyexponentialScheduler", inputs: {"steps": 12, "sigma_min": 0.03, "sigma_max": 14.6, "rho": 1.7})"#),
        &theirs("polyexponential"),
        "polyexponential",
    );
    let vp = sigmas_of(&d, r#"(type: "VPScheduler", inputs: {"steps": 9})"#);
    near(&vp, &theirs("vp"), "vp");
    // k-diffusion's own exp(…) − 1 differs only where the exponent is small.
    for (a, b) in vp.iter().zip(theirs("vp.k_diffusion")) {
        assert!((a - b).abs() <= 3e-4 * b.max(1e-3), "vp vs k-diffusion: {vp:?}");
    }
    // AYS: 10 steps are the table itself (last set to 0); 24 steps its numpy log-linear interpolation.
    let sd1 = AYS_NOISE_LEVELS[0].1;
    let mut want = sd1.to_vec();
    *want.last_mut().unwrap() = 0.0;
    near(&align_your_steps("SD1", 10, 1.0).unwrap(), &want, "AYS SD1 10");
    let mut want = theirs("loglinear.25");
    *want.last_mut().unwrap() = 0.0;
    near(&sigmas_of(&d, r#"(type: "AlignYourStepsScheduler", inputs: {"model_type": "SD1", "steps": 24})"#), &want, "AYS SD1 24");
    near(&loglinear_interp(&sd1, 7), &theirs("loglinear.7"), "loglinear_interp 7");
    // Denoise keeps the tail: round(10·0.5) = 5 steps.
    assert_eq!(align_your_steps("SD1", 10, 0.5).unwrap().len(), 6);
    // GITS: the table row for 10 steps at 1.20, and its last row interpolated for 30.
    let row = GITS_NOISE_LEVELS.iter().find(|(c, _)| (*c - 1.2).abs() < 1e-9).unwrap().1[8];
    let mut want = row.to_vec();
    *want.last_mut().unwrap() = 0.0;
    near(&sigmas_of(&d, r#"(type: "GITSScheduler", inputs: {"coeff": 1.2, "steps": 10})"#), &want, "GITS 1.20/10");
    assert_eq!(gits(1.2, 30, 1.0).unwrap().len(), 31);
    assert!(gits(1.23, 10, 1.0).is_none());
    // Laplace: exp(μ − β·sign(½ − x)·log(1 − 2|½ − x| + 1e-5)), clamped, no final 0.
    let ours = laplace(5, 0.03, 14.6, 0.0, 0.5);
    let want: Vec<f64> = (0..5)
        .map(|k| {
            let x = k as f64 / 4.0;
            let l = -0.5 * (0.5 - x).signum() * (1.0 - 2.0 * (0.5 - x).abs() + 1e-5).ln();
            let l = if x == 0.5 { 0.0 } else { l };
            l.exp().clamp(0.03, 14.6)
        })
        .collect();
    near(&ours, &want, "laplace");
    // SD-Turbo: timesteps 999, 899, … from the one denoise picks, then 0.
    let ms = diffloom_nodes::sampling::model_sampling::ModelSampling::sd(diffloom_nodes::checkpoint::detect::Prediction::Eps);
    let turbo = sd_turbo(&ms, 3, 1.0);
    near(&turbo, &[ms.sigma(999.0), ms.sigma(899.0), ms.sigma(799.0), 0.0], "sd_turbo");
    near(&sd_turbo(&ms, 2, 0.5)[..2], &[ms.sigma(499.0), ms.sigma(399.0)], "sd_turbo denoise 0.5");
}

// Issue 12: the sigma tools, by hand.
#[test]
fn sigma_tools_by_hand() {
    let d = Dir::new();
    let manual = |s: &str| format!(r#"(type: "ManualSigmas", inputs: {{"sigmas": {s:?}}})"#);
    assert_eq!(manual_sigmas("1, 0.5").unwrap(), [1.0, 0.5]);
    assert_eq!(manual_sigmas("[14.6, 7.,3 .5 -2]").unwrap(), [14.6, 7.0, 3.0, 0.5, -2.0]);
    assert!(manual_sigmas("1..5").is_err());
    let with = |tool: &str| {
        let nodes = format!(r#""m": {}, "x": {tool},"#, manual("8, 4, 2, 1, 0"));
        let nodes = format!("{} {nodes}", base(&d));
        let names: &[(&str, &str, usize)] =
            if tool.contains("SplitSigmas") { &[("x", "high_sigmas", 0), ("x", "low_sigmas", 1)] } else { &[("x", "SIGMAS", 0)] };
        outputs(&d, &nodes, names)
            .map(|v| {
                v.iter()
                    .map(|x| match x {
                        Value::Sigmas(t) => Vec::<f32>::try_from(&t.0).unwrap().into_iter().map(f64::from).collect::<Vec<_>>(),
                        _ => vec![],
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    };
    let split = with(r#"(type: "SplitSigmasDenoise", inputs: {"sigmas": Link("m", "SIGMAS"), "denoise": 0.5})"#);
    // round(4 steps · 0.5) = 2 low steps: sigmas[:-2] and sigmas[-3:], sharing 2.
    assert_eq!(split[0], [8.0, 4.0, 2.0]);
    assert_eq!(split[1], [2.0, 1.0, 0.0]);
    assert_eq!(with(r#"(type: "FlipSigmas", inputs: {"sigmas": Link("m", "SIGMAS")})"#)[0], [0.0001f32 as f64, 1.0, 2.0, 4.0, 8.0]);
    // Flipped sigmas run the sampler backwards (unsampling), as ComfyUI allows.
    let nodes = format!(
        r#"{} "m": {}, "f": (type: "FlipSigmas", inputs: {{"sigmas": Link("m", "SIGMAS")}}),
        "pick": (type: "KSamplerSelect", inputs: {{"sampler_name": "euler"}}),
        "s": (type: "SamplerCustom", inputs: {{"model": Link("c", "MODEL"), "add_noise": false, "cfg": 1.0, "positive": Link("pos", "CONDITIONING"),
            "negative": Link("neg", "CONDITIONING"), "sampler": Link("pick", "SAMPLER"), "sigmas": Link("f", "SIGMAS"), "latent_image": Link("lat", "LATENT")}}),"#,
        base(&d),
        manual("8, 4, 2, 1, 0")
    );
    let up = outputs(&d, &nodes, &[("s", "output", 0)]).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(&up[0], Value::Latent(l) if l.samples.isfinite().all().int64_value(&[]) == 1 && l.samples.abs().max().double_value(&[]) > 1.0));
    assert_eq!(with(r#"(type: "SetFirstSigma", inputs: {"sigmas": Link("m", "SIGMAS"), "sigma": 20.0})"#)[0], [20.0, 4.0, 2.0, 1.0, 0.0]);
    let extended = with(r#"(type: "ExtendIntermediateSigmas", inputs: {"sigmas": Link("m", "SIGMAS"), "steps": 2, "end_at_sigma": 3.0})"#);
    assert_eq!(extended[0], [8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.0]);
    let nodes = format!(
        r#"{} "p": (type: "SamplingPercentToSigma", inputs: {{"model": Link("c", "MODEL"), "sampling_percent": 0.0}}),
        "q": (type: "SamplingPercentToSigma", inputs: {{"model": Link("c", "MODEL"), "sampling_percent": 0.0, "return_actual_sigma": true}}),"#,
        base(&d)
    );
    let v = outputs(&d, &nodes, &[("p", "sigma_value", 0), ("q", "sigma_value", 0)]).unwrap();
    assert!(matches!(v[0], Value::Float(f) if f == 999_999_999.9), "{:?}", v[0]);
    assert!(matches!(v[1], Value::Float(f) if (f - 14.614641).abs() < 1e-5), "{:?}", v[1]);
}

// Issue 11: silent defaults became errors: an unknown scheduler gave BasicScheduler an empty schedule
// (the sampler then returned its input), an unknown channel gave ImageToMask the red one.
#[test]
fn unknown_choices_are_errors_not_defaults() {
    use diffloom_core::{Handle, Shared};
    let d = Dir::new();
    let ck = diffloom_nodes::checkpoint::load::load_checkpoint(&tiny_sd1(&d, "m.safetensors"), Device::Cpu, tch::Kind::Float).unwrap();
    let model = diffloom_nodes::sd::SdModel {
        unet: ck.unet.unwrap(),
        family: ck.config.family,
        sampling: ck.config.prediction.into(),
        name: "tiny".into(),
        patches: Default::default(),
    };
    let model = Value::Model(Handle::new(model, 0, "tiny"));
    let err = call(
        &diffloom_nodes::builtin::custom_sampling::BasicScheduler,
        vec![("model", Some(model)), ("scheduler", Some(Value::String("nope".into()))), ("steps", Some(Value::Int(4))), ("denoise", Some(Value::Float(1.0)))],
    )
    .expect_err("an unknown scheduler is an error");
    assert!(err.to_string().contains("input \"scheduler\": unknown scheduler \"nope\""), "{err}");
    let image = Value::Image(Shared(Tensor::rand([1, 4, 4, 3], (tch::Kind::Float, Device::Cpu))));
    let err = call(&diffloom_nodes::builtin::mask::ImageToMask, vec![("image", Some(image)), ("channel", Some(Value::String("purple".into())))])
        .expect_err("an unknown channel is an error");
    assert!(err.to_string().contains("input \"channel\": \"purple\" is not one of red, green, blue, alpha"), "{err}");
}
