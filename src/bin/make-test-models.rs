//! Writes the project's random-weight test checkpoints (real single-file key layout, no download):
//!
//!   make-test-models DIR            tiny SD1, SD2, SD2 unCLIP and SD1-inpainting models, a LoRA, ESRGAN
//!                                   upscalers, a ControlNet and T2I-Adapters (with a four-level SD1 model
//!                                   for them)
//!   make-test-models DIR --full     also full-size SD1 and SD2 files (fp16, ~2 and ~2.6 GB)
//!   make-test-models DIR --full-sd1 only the full-size SD1 file
//!
//! Existing files are kept when they already hold the wanted configuration.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use diffloom_nodes::checkpoint::detect::{Family, CONFIG_METADATA_KEY};
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;
use diffloom_nodes::checkpoint::synthetic::{
    full_config, tiny_adapter_config, tiny_config, tiny_controlnet_config, tiny_four_level_config, tiny_unclip_config, write_checkpoint, write_controlnet,
    write_lora, write_rrdbnet, write_t2i_adapter, write_unclip_checkpoint,
};
use diffloom_nodes::models::rrdbnet::RrdbConfig;
use tch::{Device, Kind};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.iter().find(|a| !a.starts_with("--")).map(PathBuf::from) else {
        eprintln!("usage: make-test-models DIR [--full]");
        return ExitCode::from(2);
    };
    let full = args.iter().any(|a| a == "--full");
    let full_sd1 = args.iter().any(|a| a == "--full-sd1");
    match run(&dir, full, full_sd1) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Whether `path` exists and (for files that embed it) carries `config`.
fn up_to_date<C: serde::de::DeserializeOwned + PartialEq>(path: &Path, config: &C, embed: bool) -> bool {
    match SafetensorsFile::open(path) {
        Ok(f) if embed => f.metadata.get(CONFIG_METADATA_KEY).and_then(|j| serde_json::from_str::<C>(j).ok()).as_ref() == Some(config),
        Ok(_) => true,
        Err(_) => false,
    }
}

fn run(dir: &Path, full: bool, full_sd1_only: bool) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut jobs = if full_sd1_only {
        vec![]
    } else {
        vec![
            ("tiny-sd1.safetensors", tiny_config(Family::Sd1, false), Kind::Float, 1, true),
            ("tiny-sd2.safetensors", tiny_config(Family::Sd2, false), Kind::Float, 2, true),
            ("tiny-sd1-inpaint.safetensors", tiny_config(Family::Sd1, true), Kind::Float, 3, true),
            ("tiny-sd1-4level.safetensors", tiny_four_level_config(), Kind::Float, 6, true),
        ]
    };
    if full_sd1_only {
        jobs.push(("full-sd1.safetensors", full_config(Family::Sd1), Kind::Half, 4, false));
    }
    if full {
        jobs.push(("full-sd1.safetensors", full_config(Family::Sd1), Kind::Half, 4, false));
        jobs.push(("full-sd2.safetensors", full_config(Family::Sd2), Kind::Half, 5, false));
    }
    let mut rewritten = Vec::new();
    for (name, config, kind, seed, embed) in jobs {
        let path = dir.join(name);
        if up_to_date(&path, &config, embed) {
            continue;
        }
        rewritten.push(name);
        // Written under a temporary name first, so an interrupted run leaves no half file behind.
        let tmp = dir.join(format!(".{name}.tmp"));
        write_checkpoint(&tmp, &config, kind, seed, embed).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if !full_sd1_only {
        // A kohya-layout LoRA for the tiny SD1 model (linear, 1×1 and 3×3 conv modules, text encoder).
        let lora = dir.join("tiny-sd1-lora.safetensors");
        if !lora.exists() || rewritten.contains(&"tiny-sd1.safetensors") {
            let ck = load_checkpoint(&dir.join("tiny-sd1.safetensors"), Device::Cpu, Kind::Float).map_err(|e| e.to_string())?;
            let (Some(unet), Some(clip)) = (&ck.unet, &ck.clip) else { return Err("tiny-sd1 has no UNet or CLIP".into()) };
            let tmp = dir.join(".tiny-sd1-lora.safetensors.tmp");
            write_lora(&tmp, unet, clip, 4, 15).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &lora).map_err(|e| format!("{}: {e}", lora.display()))?;
            println!("wrote {}", lora.display());
        }
        // Narrow but complete RRDBNets (growth 32 as published; spandrel assumes it): x4 and x2
        // (pixel-unshuffle) in Real-ESRGAN's layout, x4 and x2 in the original ESRGAN one.
        let rrdb = |upsamples, shuffle| RrdbConfig { in_nc: 3, out_nc: 3, nf: 16, gc: 32, nb: 2, upsamples, shuffle };
        let upscalers = [
            ("tiny-realesrgan-x4.safetensors", rrdb(2, 1), false, 11),
            ("tiny-realesrgan-x2.safetensors", rrdb(2, 2), false, 12),
            ("tiny-esrgan-x4.safetensors", rrdb(2, 1), true, 13),
            ("tiny-esrgan-x2.safetensors", rrdb(1, 1), true, 14),
        ];
        for (name, config, original_layout, seed) in upscalers {
            let path = dir.join(name);
            if up_to_date(&path, &config, true) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.tmp"));
            write_rrdbnet(&tmp, &config, original_layout, seed).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !full_sd1_only {
        // ControlNet 1.1's single-file layout for tiny-sd1; T2I-Adapters (full, grey-scale hints; light,
        // RGB) for tiny-sd1-4level, whose block layout is SD 1.x's.
        let controlnet = tiny_controlnet_config(tiny_config(Family::Sd1, false).unet.as_ref().ok_or("no UNet config")?);
        let path = dir.join("tiny-sd1-controlnet.safetensors");
        if !up_to_date(&path, &controlnet, true) {
            let tmp = dir.join(".tiny-sd1-controlnet.safetensors.tmp");
            write_controlnet(&tmp, &controlnet, Kind::Float, 21).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
        // An SD 2.1 unCLIP model: tiny-sd2 with a class-label input and an OpenCLIP image encoder.
        let (unclip, vision) = tiny_unclip_config();
        let path = dir.join("tiny-sd2-unclip.safetensors");
        if !up_to_date(&path, &unclip, true) {
            let tmp = dir.join(".tiny-sd2-unclip.safetensors.tmp");
            write_unclip_checkpoint(&tmp, &unclip, &vision, Kind::Float, 7).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
        for (name, light, seed) in [("tiny-t2i-adapter.safetensors", false, 22), ("tiny-t2i-adapter-light.safetensors", true, 23)] {
            let config = tiny_adapter_config(light);
            let path = dir.join(name);
            if up_to_date(&path, &config, true) {
                continue;
            }
            let tmp = dir.join(format!(".{name}.tmp"));
            write_t2i_adapter(&tmp, &config, seed).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !full_sd1_only {
        // GLIGEN for tiny-sd1: a fuser per transformer, phrase embeddings as wide as its text encoder.
        let path = dir.join("tiny-sd1-gligen.safetensors");
        if !path.exists() || rewritten.contains(&"tiny-sd1.safetensors") {
            let config = tiny_config(Family::Sd1, false);
            let (Some(unet), Some(clip)) = (&config.unet, &config.clip) else { return Err("tiny-sd1 has no UNet or CLIP config".into()) };
            let tmp = dir.join(".tiny-sd1-gligen.safetensors.tmp");
            diffloom_nodes::checkpoint::synthetic::write_gligen(&tmp, unet, clip.hidden_size, 24).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
