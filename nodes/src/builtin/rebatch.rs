//! ComfyUI's `comfy_extras/nodes_rebatch.py`: RebatchLatents and RebatchImages take lists (every
//! batch reaching them) and return lists of batches of `batch_size`, which the executor then runs
//! their consumers over one by one (`core/src/exec/lists.rs`).

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Ctx, Int, Node, NodeError, Schema, Value, ValueType};
use tch::{Device, Kind, Tensor};

use crate::sd::VAE_FACTOR;

/// The list node's `batch_size` (a list of one INT, as ComfyUI passes widgets to list nodes).
fn batch_size(a: &Args) -> Result<i64, NodeError> {
    match a.list("batch_size")?.first() {
        Some(Value::Int(n)) => i64::try_from(*n).map_err(|_| NodeError::input("batch_size", "too large")),
        _ => Err(NodeError::input("batch_size", "expected an INT")),
    }
}

/// A run of latent items being gathered: samples, their full-resolution masks and batch indices.
struct Batch {
    samples: Tensor,
    masks: Tensor,
    indices: Vec<i64>,
}

impl Batch {
    /// ComfyUI's `get_batch`: a latent's items, with its noise mask (all ones at pixel size when it has
    /// none) repeated to the batch, and its batch indices (else `offset..`).
    fn of(latent: &Latent, offset: i64) -> Result<Batch, NodeError> {
        let samples = latent.samples.0.shallow_clone();
        let s = samples.size();
        let (b, h, w) = (s[0], s[s.len() - 2], s[s.len() - 1]);
        let mut masks = match &latent.noise_mask {
            Some(m) => m.0.shallow_clone(),
            None => Tensor::f_ones([b, 1, h * VAE_FACTOR, w * VAE_FACTOR], (Kind::Float, Device::Cpu))?,
        };
        // ComfyUI resizes a mask of another size here but discards the result; masks are kept as they are.
        let mb = masks.size()[0];
        if mb < b {
            masks = masks.f_repeat([(b - 1) / mb + 1, 1, 1, 1])?.f_narrow(0, 0, b)?;
        }
        let indices = latent.batch_index.clone().unwrap_or_else(|| (offset..offset + b).collect());
        Ok(Batch { samples, masks, indices })
    }

    fn len(&self) -> i64 {
        self.samples.size()[0]
    }

    /// Items `start..start + n` (fewer at the end).
    fn slice(&self, start: i64, n: i64) -> Result<Batch, NodeError> {
        let take = |t: &Tensor| -> Result<Tensor, NodeError> {
            let len = t.size()[0];
            let from = start.min(len);
            Ok(t.f_narrow(0, from, n.min(len - from))?)
        };
        let indices = self.indices.iter().skip(start as usize).take(n as usize).copied().collect();
        Ok(Batch { samples: take(&self.samples)?, masks: take(&self.masks)?, indices })
    }

    fn append(self, next: Batch) -> Result<Batch, NodeError> {
        if self.masks.size()[1..] != next.masks.size()[1..] {
            return Err(NodeError::input("latents", format!("noise masks of sizes {:?} and {:?} cannot share a batch", self.masks.size(), next.masks.size())));
        }
        let indices = self.indices.into_iter().chain(next.indices).collect();
        Ok(Batch { samples: Tensor::f_cat(&[self.samples, next.samples], 0)?, masks: Tensor::f_cat(&[self.masks, next.masks], 0)?, indices })
    }

    /// The latent ComfyUI outputs: a mask that is all ones is dropped.
    fn into_latent(self) -> Result<Value, NodeError> {
        let full = self.masks.f_mean(Kind::Float)?.double_value(&[]) == 1.0;
        Ok(Value::Latent(Latent { samples: Shared(self.samples), noise_mask: (!full).then_some(Shared(self.masks)), batch_index: Some(self.indices) }))
    }
}

pub struct RebatchLatents;
impl Node for RebatchLatents {
    fn schema(&self) -> Schema {
        Schema::new("RebatchLatents", "latent/batch")
            .input_is_list()
            .input("latents", ValueType::Latent)
            .input("batch_size", Int::new(1).range(1, 4096))
            .list_output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let size = batch_size(a)?;
        let mut out = Vec::new();
        let mut current: Option<Batch> = None;
        let mut processed = 0;
        for value in a.list("latents")? {
            let Value::Latent(latent) = value else { return Err(NodeError::input("latents", "expected LATENT items")) };
            let next = Batch::of(latent, processed)?;
            processed += next.indices.len() as i64;
            current = Some(match current.take() {
                None => next,
                // Another size starts a new batch; the gathered one (at most `size` items) goes out.
                Some(cur) if cur.samples.size()[2..] != next.samples.size()[2..] => {
                    out.push(cur.slice(0, size)?.into_latent()?);
                    next
                }
                Some(cur) => cur.append(next)?,
            });
            // Only more than `size` items are split off (ComfyUI's `>`): a full batch waits for the end.
            if let Some(cur) = current.take() {
                if cur.len() > size {
                    let full = cur.len() / size;
                    for i in 0..full {
                        out.push(cur.slice(i * size, size)?.into_latent()?);
                    }
                    current = (full * size < cur.len()).then(|| cur.slice(full * size, cur.len() - full * size)).transpose()?;
                } else {
                    current = Some(cur);
                }
            }
        }
        if let Some(cur) = current {
            out.push(cur.slice(0, size)?.into_latent()?);
        }
        Ok(vec![Value::List(out)])
    }
}

pub struct RebatchImages;
impl Node for RebatchImages {
    fn schema(&self) -> Schema {
        Schema::new("RebatchImages", "image/batch")
            .input_is_list()
            .input("images", ValueType::Image)
            .input("batch_size", Int::new(1).range(1, 4096))
            .list_output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let size = batch_size(a)? as usize;
        let mut items = Vec::new();
        for value in a.list("images")? {
            let Value::Image(image) = value else { return Err(NodeError::input("images", "expected IMAGE items")) };
            items.extend(image.0.f_split(1, 0)?);
        }
        let mut out = Vec::new();
        for chunk in items.chunks(size) {
            if chunk.iter().any(|t| t.size()[1..] != chunk[0].size()[1..]) {
                return Err(NodeError::input("images", "images of different sizes cannot share a batch"));
            }
            out.push(Value::Image(Shared(Tensor::f_cat(chunk, 0)?)));
        }
        Ok(vec![Value::List(out)])
    }
}
