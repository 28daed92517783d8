//! ComfyUI's `latent` category: empty latents and the VAE's way in and out.

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Args, Ctx, Int, Node, NodeError, Schema, Value, ValueType};
use tch::{Device, Kind, Tensor};

use super::image::MAX_RESOLUTION;
use super::loaders::part;
use crate::sd::{SdVae, VAE_FACTOR};

fn latent(samples: Tensor) -> Value {
    Value::Latent(Latent { samples: Shared(samples), noise_mask: None })
}

pub struct EmptyLatentImage;
impl Node for EmptyLatentImage {
    fn schema(&self) -> Schema {
        Schema::new("EmptyLatentImage", "latent")
            .input("width", Int::new(512).range(16, MAX_RESOLUTION).step(8))
            .input("height", Int::new(512).range(16, MAX_RESOLUTION).step(8))
            .input("batch_size", Int::new(1).range(1, 4096))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (w, h, b) = (a.i64("width")?, a.i64("height")?, a.i64("batch_size")?);
        Ok(vec![latent(Tensor::f_zeros([b, 4, h / VAE_FACTOR, w / VAE_FACTOR], (Kind::Float, Device::Cpu))?)])
    }
}

pub struct VAEDecode;
impl Node for VAEDecode {
    fn schema(&self) -> Schema {
        Schema::new("VAEDecode", "latent").input("samples", ValueType::Latent).input("vae", ValueType::Vae).output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = part(a, "vae")?;
        let _guard = tch::no_grad_guard();
        Ok(vec![Value::Image(Shared(vae.decode(&a.latent("samples")?.samples, None)?))])
    }
}

pub struct VAEEncode;
impl Node for VAEEncode {
    fn schema(&self) -> Schema {
        Schema::new("VAEEncode", "latent")
            .describe("Encodes images to latents: the mean of the VAE's distribution (no random draw), as ComfyUI.")
            .input("pixels", ValueType::Image)
            .input("vae", ValueType::Vae)
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = part(a, "vae")?;
        let _guard = tch::no_grad_guard();
        Ok(vec![latent(vae.encode(a.image("pixels")?, None)?)])
    }
}

pub struct VAEDecodeTiled;
impl Node for VAEDecodeTiled {
    fn schema(&self) -> Schema {
        Schema::new("VAEDecodeTiled", "_for_testing")
            .describe("Decodes in overlapping tiles to bound memory (temporal_* only matter for video models).")
            .input("samples", ValueType::Latent)
            .input("vae", ValueType::Vae)
            .input("tile_size", Int::new(512).range(64, 4096).step(32))
            .input("overlap", Int::new(64).range(0, 4096).step(32))
            .input("temporal_size", Int::new(64).range(8, 4096).step(4))
            .input("temporal_overlap", Int::new(8).range(4, 4096).step(4))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = part(a, "vae")?;
        let tile = a.i64("tile_size")?;
        // ComfyUI shrinks the overlap to a quarter of the tile when it is larger.
        let overlap = a.i64("overlap")?.min(tile / 4);
        let _guard = tch::no_grad_guard();
        let image = vae.decode(&a.latent("samples")?.samples, Some((tile / VAE_FACTOR, overlap / VAE_FACTOR)))?;
        Ok(vec![Value::Image(Shared(image))])
    }
}

pub struct VAEEncodeTiled;
impl Node for VAEEncodeTiled {
    fn schema(&self) -> Schema {
        Schema::new("VAEEncodeTiled", "_for_testing")
            .describe("Encodes in overlapping tiles to bound memory (temporal_* only matter for video models).")
            .input("pixels", ValueType::Image)
            .input("vae", ValueType::Vae)
            .input("tile_size", Int::new(512).range(64, 4096).step(64))
            .input("overlap", Int::new(64).range(0, 4096).step(32))
            .input("temporal_size", Int::new(64).range(8, 4096).step(4))
            .input("temporal_overlap", Int::new(8).range(4, 4096).step(4))
            .output("LATENT", ValueType::Latent)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let vae: &SdVae = part(a, "vae")?;
        let _guard = tch::no_grad_guard();
        Ok(vec![latent(vae.encode(a.image("pixels")?, Some((a.i64("tile_size")?, a.i64("overlap")?)))?)])
    }
}
