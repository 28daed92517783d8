//! The loaded Stable Diffusion parts as graph values (MODEL, CLIP, VAE) and what nodes do with them:
//! prompt encoding with weights and textual inversions, VAE encoding and decoding, plain and tiled.

use std::cell::OnceCell;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use diffloom_core::value::CondEntry;
use diffloom_core::NodeError;
use tch::{Device, Kind, Tensor};

use crate::builtin::loaders::gib;
use crate::checkpoint::detect::Family;
use crate::checkpoint::safetensors::SafetensorsFile;
use crate::checkpoint::Loaded;
use crate::models::clip::{ClipOutput, ClipTextModel};
use crate::models::unet::Unet;
use crate::models::vae::AutoencoderKl;
use crate::prompt::{self, EmbeddingSource, Slot};
use crate::sampling::model_sampling::SamplingMode;
use crate::tiles::tiled_scale;
use crate::tokenizer::ClipTokenizer;

/// MODEL: the denoising UNet and how to interpret its output.
#[derive(Clone)]
pub struct SdModel {
    pub unet: Loaded<Unet>,
    pub family: Family,
    /// How its output is read and its schedule (the detected prediction, or ModelSamplingDiscrete's).
    pub sampling: SamplingMode,
    /// The checkpoint's file name, for errors that involve the model and another file.
    pub name: String,
    /// Hooks added by patch nodes (FreeU, RescaleCFG, …), shared with the MODEL they came from.
    pub patches: Rc<crate::patches::ModelPatches>,
}

/// CLIP: the text encoder, its tokenizer, and the layer CLIPSetLastLayer chose.
#[derive(Clone)]
pub struct SdClip {
    pub model: Loaded<ClipTextModel>,
    pub tokenizer: Rc<ClipTokenizer>,
    pub family: Family,
    /// ComfyUI's `layer_idx`: None for the family default, else -1 (last), -2 (penultimate), ….
    pub layer: Option<i64>,
}

/// VAE: the autoencoder.
pub struct SdVae {
    /// The autoencoder and its tensors by name (CheckpointSave writes them back).
    pub model: Loaded<AutoencoderKl>,
}

/// The spatial factor between pixels and latents.
pub const VAE_FACTOR: i64 = 8;

thread_local! {
    static DEFAULT_TOKENIZER: OnceCell<Rc<ClipTokenizer>> = const { OnceCell::new() };
}

/// The CLIP tokenizer from the set-up's vocabulary, loaded once per process.
pub fn default_tokenizer() -> Result<Rc<ClipTokenizer>, String> {
    DEFAULT_TOKENIZER.with(|cell| {
        if let Some(t) = cell.get() {
            return Ok(t.clone());
        }
        let t = Rc::new(ClipTokenizer::from_dir(&ClipTokenizer::locate_default()?)?);
        let _ = cell.set(t.clone());
        Ok(t)
    })
}

impl SdClip {
    /// Which hidden state the current layer setting selects (ComfyUI: SD 1.x defaults to the last
    /// layer, SD 2.x to the penultimate; both apply the final layer norm to an intermediate layer;
    /// an index beyond the layer count means the last).
    pub fn output(&self) -> ClipOutput {
        let layer = self.layer.or(self.family.spec().default_clip_layer);
        match layer {
            Some(i) if i.abs() <= self.model.num_layers() && i != -1 => ClipOutput::Hidden { index: i, layer_norm: true },
            _ => ClipOutput::Last,
        }
    }

    /// The padding token (the family's).
    fn pad(&self) -> u32 {
        self.family.spec().pad_token
    }

    /// ComfyUI's `encode_token_weights`: every 77-token window encoded, weights applied as
    /// `(z - z_empty) * w + z_empty` against the encoding of an empty prompt, windows concatenated along
    /// the tokens: `[1, 77 * windows, dim]`.
    pub fn encode(&self, text: &str, embeddings: Option<&dyn EmbeddingSource>) -> Result<CondEntry, NodeError> {
        let fail = |m: String| NodeError::input("text", m);
        let windows = prompt::tokenize(&self.tokenizer, text, self.pad(), embeddings).map_err(fail)?;
        let has_weights = windows.windows.iter().flatten().any(|(_, w)| *w != 1.0);
        let mut rows: Vec<Vec<Slot>> = windows.windows.iter().map(|w| w.iter().map(|(s, _)| s.clone()).collect()).collect();
        if has_weights {
            let mut empty = vec![Slot::Token(crate::tokenizer::START), Slot::Token(crate::tokenizer::END)];
            empty.resize(77, Slot::Token(self.pad()));
            rows.push(empty);
        }
        let dim = self.model.config.hidden_size;
        let ids: Vec<i64> = rows
            .iter()
            .flatten()
            .map(|s| match s {
                Slot::Token(t) => *t as i64,
                Slot::Embedding { .. } => 0,
            })
            .collect();
        let device = self.model.device();
        let tokens = Tensor::from_slice(&ids).view([rows.len() as i64, 77]).to_device(device);
        let x = self.model.embed_tokens(&tokens);
        for (r, row) in rows.iter().enumerate() {
            for (p, slot) in row.iter().enumerate() {
                if let Slot::Embedding { embedding, row: er } = slot {
                    let v = windows.embeddings[*embedding].get(*er);
                    if v.size()[0] != dim {
                        return Err(fail(format!(
                            "a textual-inversion embedding has width {}, but this text encoder's is {dim} \
                             (an embedding made for another model family?)",
                            v.size()[0]
                        )));
                    }
                    x.get(r as i64).get(p as i64).copy_(&v.to_device(device).to_kind(x.kind()));
                }
            }
        }
        let z = self.model.encode_embeddings(&x, self.output()).to_kind(Kind::Float).to_device(Device::Cpu);
        let sections = windows.windows.len() as i64;
        let mut out = Vec::with_capacity(sections as usize);
        for (k, window) in windows.windows.iter().enumerate() {
            let mut zk = z.get(k as i64);
            if has_weights {
                let empty = z.get(sections);
                let weights: Vec<f32> = window.iter().map(|(_, w)| *w as f32).collect();
                let w = Tensor::from_slice(&weights).unsqueeze(1);
                zk = (&zk - &empty) * w + &empty;
            }
            out.push(zk);
        }
        Ok(CondEntry::new(Tensor::cat(&out, 0).unsqueeze(0)))
    }
}

/// Textual inversions in the embeddings folders (subfolders allowed), named as in ComfyUI:
/// `embedding:name` tries `name`, then `name.safetensors`, `name.pt` and `name.bin`, in each folder.
pub struct EmbeddingDir {
    pub dirs: Vec<PathBuf>,
    pub family: Family,
}

impl EmbeddingSource for EmbeddingDir {
    fn embedding(&self, name: &str) -> Result<Tensor, String> {
        let unknown = || {
            let searched: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
            match searched.is_empty() {
                true => format!("unknown embedding {name:?}: no embeddings folder is set (--models DIR, --embeddings DIR or the configuration file)"),
                false => format!("unknown embedding {name:?} (searched {})", searched.join(", ")),
            }
        };
        if name.is_empty() || Path::new(name).components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(unknown());
        }
        let candidates = self.dirs.iter().flat_map(|d| ["", ".safetensors", ".pt", ".bin"].map(|ext| d.join(format!("{name}{ext}"))));
        let path = candidates.into_iter().find(|p| p.is_file()).ok_or_else(unknown)?;
        let file = SafetensorsFile::open(&path).map_err(|e| e.to_string())?;
        let preferred = self.family.spec().embedding_key;
        let mut names: Vec<&String> = file.tensors().keys().collect();
        // File order, so "the first tensor" means what ComfyUI's loader gets.
        names.sort_by_key(|n| file.info(n).map_or(0, |i| i.start));
        let key = names
            .iter()
            .find(|n| n.as_str() == preferred)
            .or_else(|| names.iter().find(|n| n.starts_with("string_to_param")))
            .or_else(|| names.first())
            .ok_or_else(|| format!("{}: holds no tensors", path.display()))?;
        let t = file.load(key, Device::Cpu, Some(Kind::Float)).map_err(|e| e.to_string())?;
        match t.dim() {
            1 | 2 => Ok(t),
            _ => Err(format!("{}: tensor {key:?} has shape {:?}; expected [n, dim] or [dim]", path.display(), t.size())),
        }
    }
}

impl SdVae {
    /// LATENT samples `[b, 4, h/8, w/8]` (the VAE's unscaled values, as ComfyUI's) for IMAGE `[b, h, w, 3]` in 0..1, whose sides are
    /// first cropped around the centre to multiples of 8 (ComfyUI's `vae_encode_crop_pixels`). With
    /// `tile`, encoding runs in overlapping tiles (`(tile, overlap)` in pixels).
    pub fn encode(&self, image: &Tensor, tile: Option<(i64, i64)>) -> Result<Tensor, NodeError> {
        let s = image.size();
        let (h, w) = (s[1], s[2]);
        if h < VAE_FACTOR || w < VAE_FACTOR {
            return Err(NodeError::input("pixels", format!("the image is {w}×{h}; the VAE needs at least 8×8")));
        }
        let crop = |x: Tensor, d: i64, n: i64| {
            let keep = n / VAE_FACTOR * VAE_FACTOR;
            if keep == n {
                x
            } else {
                x.narrow(d, (n % VAE_FACTOR) / 2, keep)
            }
        };
        let pixels = crop(crop(image.shallow_clone(), 1, h), 2, w).narrow(3, 0, 3).permute([0, 3, 1, 2]);
        let device = self.model.device();
        let mut enc = |x: &Tensor| -> Result<Tensor, NodeError> {
            let x = (x.to_device(device) * 2.0 - 1.0).to_kind(Kind::Float);
            Ok(self.model.encode_mean(&x).to_kind(Kind::Float).to_device(Device::Cpu))
        };
        let latent = match tile {
            None => enc(&pixels)?,
            Some((t, o)) => {
                let lc = self.model.config.embed_dim;
                let f = 1.0 / VAE_FACTOR as f64;
                (tiled_scale(&pixels, &mut enc, t, t, o, f, lc)?
                    + tiled_scale(&pixels, &mut enc, t / 2, t * 2, o, f, lc)?
                    + tiled_scale(&pixels, &mut enc, t * 2, t / 2, o, f, lc)?)
                    / 3.0
            }
        };
        Ok(latent)
    }

    /// IMAGE `[b, h*8, w*8, 3]` in 0..1 for LATENT samples; with `tile` (in latent pixels), decoding
    /// runs in overlapping tiles, averaged over three tile shapes as ComfyUI does.
    pub fn decode(&self, samples: &Tensor, tile: Option<(i64, i64)>) -> Result<Tensor, NodeError> {
        let c = samples.size()[1];
        if c != self.model.config.embed_dim {
            return Err(NodeError::input("samples", format!("the latent has {c} channels, this VAE's have {}", self.model.config.embed_dim)));
        }
        let device = self.model.device();
        // A libtorch failure (a device out of memory) becomes an error rather than a panic, so the
        // whole-image decode can fall back to tiles.
        let mut dec = |z: &Tensor| -> Result<Tensor, NodeError> {
            let run = || self.model.decode(&z.to_device(device).to_kind(Kind::Float)).to_kind(Kind::Float).to_device(Device::Cpu);
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).map_err(|p| NodeError::Failed(diffloom_core::exec::run::panic_message(&p)))
        };
        let tiled = |dec: &mut dyn FnMut(&Tensor) -> Result<Tensor, NodeError>, t: i64, o: i64| -> Result<Tensor, NodeError> {
            let f = VAE_FACTOR as f64;
            Ok((tiled_scale(samples, dec, t * 2, t / 2, o, f, 3)?
                + tiled_scale(samples, dec, t / 2, t * 2, o, f, 3)?
                + tiled_scale(samples, dec, t, t, o, f, 3)?)
                / 3.0)
        };
        let images = match tile {
            Some((t, o)) => tiled(&mut dec, t, o)?,
            None => self.decode_within_budget(samples, &mut dec, &tiled)?,
        };
        Ok(((images + 1.0) / 2.0).clamp(0.0, 1.0).permute([0, 2, 3, 1]).contiguous())
    }

    /// Bytes ComfyUI reckons a decode of one latent of `h × w` takes at its peak (its
    /// `memory_used_decode` for SD's VAE: 2178 · h · w · 64 · the VAE dtype's element size).
    pub fn decode_peak_per_item(&self, h: i64, w: i64) -> u64 {
        2178 * (h * w) as u64 * 64 * self.model.kind().elt_size_in_bytes() as u64
    }

    /// What a decode may take: the `--max-memory` budget and, on a GPU, its free memory (the lower of
    /// the two), each with how the report names it. A GPU whose free memory cannot be read leaves
    /// only the out-of-memory retry.
    fn decode_limit(&self) -> Option<(u64, String)> {
        let budget = crate::budget::max_memory().map(|b| (b, format!("--max-memory {}", gib(b))));
        let free = match self.model.device() {
            Device::Cuda(i) if crate::budget::use_free_memory() => match diffloom_aten::cuda_free_memory(i) {
                Ok((free, _)) => Some((free, format!("the {} free on cuda:{i}", gib(free)))),
                Err(why) => {
                    tracing::debug!("free memory on cuda:{i} unknown ({why}); a decode that runs out retries in tiles");
                    None
                }
            },
            _ => None,
        };
        [budget, free].into_iter().flatten().min_by_key(|(b, _)| *b)
    }

    /// A whole-image decode that keeps to `--max-memory` and to a GPU's free memory as ComfyUI keeps
    /// to free memory: the batch in chunks that fit, in tiles (64 latent pixels, overlap 16) when one
    /// item does not (ComfyUI would try it and tile on running out; the estimate avoids the failed
    /// attempt); and tiles again when the device runs out of memory anyway.
    fn decode_within_budget(
        &self,
        samples: &Tensor,
        dec: &mut dyn FnMut(&Tensor) -> Result<Tensor, NodeError>,
        tiled: &dyn Fn(&mut dyn FnMut(&Tensor) -> Result<Tensor, NodeError>, i64, i64) -> Result<Tensor, NodeError>,
    ) -> Result<Tensor, NodeError> {
        let s = samples.size();
        let per_item = self.decode_peak_per_item(s[2], s[3]);
        let note = |why: String| diffloom_core::exec::notes::note(why);
        if let Some((limit, name)) = self.decode_limit() {
            if per_item > limit {
                note(format!("decoded in tiles: one image's decode takes about {}, over {name}", gib(per_item)));
                return tiled(dec, 64, 16);
            }
            let fit = (limit / per_item).max(1) as i64;
            if fit < s[0] {
                note(format!("decoded {fit} at a time: {} images take about {}, over {name}", s[0], gib(per_item * s[0] as u64)));
                let parts = samples.split(fit, 0).iter().map(&mut *dec).collect::<Result<Vec<_>, _>>()?;
                return Ok(Tensor::cat(&parts, 0));
            }
        }
        match dec(samples) {
            Err(NodeError::Failed(why)) if crate::budget::is_out_of_memory(&why) => {
                note("ran out of memory decoding the whole image; decoded in tiles instead (as ComfyUI retries)".into());
                tiled(dec, 64, 16)
            }
            other => other,
        }
    }
}
