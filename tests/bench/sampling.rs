//! Sampler overhead: time per step spent outside the UNet (sampler arithmetic, guidance, noise, the
//! per-step NaN check) next to the UNet's own time per step, for the tiny and the full-size SD 1.5 UNet
//! (batch 1 latent with cond + uncond, 64×64 latents for the full model). Prints figures; it is not a
//! timed test.
//!
//! Run: scripts/bench.sh sampling   (target: overhead ≤ 2% of the full-size model's step time)

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use diffloom_core::value::{CondEntry, Latent, Shared};
use diffloom_nodes::checkpoint::detect::Family;
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
use diffloom_nodes::sampling::ksampler::{sample, Guider, Request, SamplerSpec};
use diffloom_nodes::sampling::model_sampling::ModelSampling;
use diffloom_nodes::sampling::samplers::SAMPLER_NAMES;
use diffloom_nodes::sampling::schedulers::calculate_sigmas;
use diffloom_nodes::sd::SdModel;
use tch::{Device, Kind, Tensor};

fn bench(label: &str, ckpt: &Path, latent_hw: i64, steps: i64, samplers: &[&str]) {
    let ck = load_checkpoint(ckpt, Device::Cpu, Kind::Float).expect("load");
    let ctx_dim = ck.config.unet.as_ref().map_or(768, |u| u.context_dim);
    let model = SdModel {
        unet: ck.unet.expect("unet"),
        family: ck.config.family,
        sampling: ck.config.prediction.into(),
        name: "bench".into(),
        patches: Default::default(),
    };
    let cond = vec![CondEntry::new(Tensor::randn([1, 77, ctx_dim], (Kind::Float, Device::Cpu)))];
    let latent = Latent { samples: Shared(Tensor::zeros([1, 4, latent_hw, latent_hw], (Kind::Float, Device::Cpu))), noise_mask: None, batch_index: None };
    let sigmas = calculate_sigmas(&ModelSampling::new(model.sampling), "karras", steps).unwrap();
    let cancel = AtomicBool::new(false);
    println!("{label}: {steps} steps, latent {latent_hw}×{latent_hw}, cfg 7 (cond + uncond batched)");
    for sampler in samplers {
        let (guider, spec) = (Guider::cfg(&model, cond.clone(), cond.clone(), 7.0), SamplerSpec::named(sampler).expect("a sampler"));
        let r = Request {
            guider: &guider,
            latent: &latent,
            seed: 1,
            add_noise: true,
            sampler: &spec,
            sigmas: &sigmas,
            cancel: &cancel,
            label: "",
            progress: &|_, _, _| {},
        };
        let t = Instant::now();
        let out = sample(&r).expect("sample");
        let total = t.elapsed().as_secs_f64();
        let model_s = out.model_time.as_secs_f64();
        let n = steps as f64;
        println!(
            "  {sampler:<30} model {:>9.2} ms/step   outside the model {:>7.3} ms/step   = {:>6.3}% of the model's time",
            model_s / n * 1e3,
            (total - model_s) / n * 1e3,
            100.0 * (total - model_s) / model_s
        );
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tiny = std::env::temp_dir().join("diffloom-bench-tiny.safetensors");
    write_checkpoint(&tiny, &tiny_config(Family::Sd1, false), Kind::Float, 1, true).expect("tiny model");
    let _g = tch::no_grad_guard();
    bench("tiny UNet", &tiny, 16, 20, SAMPLER_NAMES);
    let full = root.join("models/bench/full-sd1.safetensors");
    if full.exists() {
        // A sampler's own arithmetic does not grow with the model, so the tiny run above covers every
        // sampler; the full-size run takes one of each kind (DIFFLOOM_BENCH_ALL=1 for all of them).
        let some: &[&str] = &[
            "euler",
            "euler_ancestral",
            "heun",
            "dpmpp_2m",
            "dpmpp_2m_sde",
            "dpmpp_3m_sde",
            "uni_pc",
            "deis",
            "ipndm_v",
            "res_multistep",
            "er_sde",
            "seeds_3",
            "sa_solver",
            "dpmpp_2m_cfg_pp",
            "cfgpp_ud10_ab",
            "lcm",
        ];
        let all = std::env::var("DIFFLOOM_BENCH_ALL").is_ok_and(|v| v == "1");
        bench("full-size SD 1.5 UNet (fp32)", &full, 64, 3, if all { SAMPLER_NAMES } else { some });
    } else {
        println!("(no {}: scripts/bench.sh sampling makes it)", full.display());
    }
}
