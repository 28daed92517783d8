//! Loading a whole checkpoint: a single-file LDM `.safetensors` (or a standalone VAE file) into the
//! UNet, text encoder and VAE.

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tch::{Device, Kind};

use super::detect::{self, ModelConfig, Prediction, Shapes};
use super::safetensors::SafetensorsFile;
use super::{LoadError, Weights};
use crate::models::clip::ClipTextModel;
use crate::models::unet::Unet;
use crate::models::vae::AutoencoderKl;

/// The models of one checkpoint, shared by the nodes that use them.
pub struct Checkpoint {
    pub config: ModelConfig,
    pub unet: Option<Rc<Unet>>,
    pub clip: Option<Rc<ClipTextModel>>,
    pub vae: Option<Rc<AutoencoderKl>>,
    /// Bytes of all loaded tensors in the target kind.
    pub bytes: usize,
    pub load_time: Duration,
}

/// The shapes of every tensor in a file.
fn shapes(file: &SafetensorsFile) -> Shapes {
    file.tensors().iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect()
}

/// Loads a single-file checkpoint onto `device` in `kind`.
pub fn load_checkpoint(path: &Path, device: Device, kind: Kind) -> Result<Checkpoint, LoadError> {
    let started = Instant::now();
    let file = Rc::new(SafetensorsFile::open(path)?);
    let shapes = shapes(&file);
    let mut config = detect::detect(path, &shapes, &file.metadata)?;
    if config.family == detect::Family::Sd2 && config.prediction == Prediction::Eps && !file.metadata.contains_key(detect::CONFIG_METADATA_KEY) {
        if let Ok(bias) = file.load(detect::SD2_V_PROBE, Device::Cpu, Some(Kind::Float)) {
            config.prediction = detect::sd2_prediction(bias.std(false).double_value(&[]));
        }
    }
    let mut bytes = 0;
    let unet = match &config.unet {
        Some(c) => {
            let w = Weights::from_prefix(file.clone(), detect::UNET_PREFIX, device, kind);
            let m = Unet::new(&w.root(), c.clone());
            w.finish()?;
            bytes += w.loaded_bytes();
            Some(Rc::new(m))
        }
        None => None,
    };
    let clip = match (&config.clip, detect::clip_root(&shapes)) {
        (Some(c), Some((_, root))) => {
            let w = Weights::from_prefix(file.clone(), &root, device, kind);
            let m = ClipTextModel::new(&w.root(), c.clone());
            w.finish()?;
            bytes += w.loaded_bytes();
            Some(Rc::new(m))
        }
        _ => None,
    };
    let vae = match &config.vae {
        Some(c) => {
            let w = Weights::from_prefix(file.clone(), detect::VAE_PREFIX, device, kind);
            let m = AutoencoderKl::new(&w.root(), c.clone());
            w.finish()?;
            bytes += w.loaded_bytes();
            Some(Rc::new(m))
        }
        None => None,
    };
    Ok(Checkpoint { config, unet, clip, vae, bytes, load_time: started.elapsed() })
}

/// Loads a standalone VAE file: keys with or without the `first_stage_model.` prefix.
pub fn load_vae(path: &Path, device: Device, kind: Kind) -> Result<(AutoencoderKl, usize), LoadError> {
    let file = Rc::new(SafetensorsFile::open(path)?);
    let shapes = shapes(&file);
    let prefix = if shapes.keys().any(|k| k.starts_with(detect::VAE_PREFIX)) { detect::VAE_PREFIX } else { "" };
    let config = match file.metadata.get(detect::CONFIG_METADATA_KEY) {
        Some(_) => detect::detect(path, &shapes, &file.metadata)?.vae,
        None => {
            let prefixed: HashMap<String, Vec<i64>> =
                shapes.iter().map(|(k, v)| (format!("{}{}", detect::VAE_PREFIX, k.strip_prefix(prefix).unwrap_or(k)), v.clone())).collect();
            detect::detect(path, &prefixed, &HashMap::new()).ok().and_then(|c| c.vae)
        }
    };
    let config = config.ok_or_else(|| LoadError::Unsupported {
        file: path.to_path_buf(),
        message: "not a VAE: no encoder.conv_in / decoder.conv_in tensors in the LDM layout".into(),
    })?;
    let w = Weights::from_prefix(file, prefix, device, kind);
    let vae = AutoencoderKl::new(&w.root(), config);
    w.finish()?;
    Ok((vae, w.loaded_bytes()))
}
