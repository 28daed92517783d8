//! The class-label (ADM) input `y` of SD 2.1 unCLIP UNets, one per cond, as ComfyUI's
//! `SD21UNCLIP.encode_adm` makes it when sampling starts: `unclip_adm` of the entry's
//! unCLIPConditioning list with the sampler's seed minus 10, or zeros for an entry without one.

use diffloom_core::NodeError;
use tch::{Kind, Tensor};

use super::conds::Cond;
use super::noise::seed_bits;
use crate::models::noise_aug::{unclip_adm, NoiseAugmentor, UnclipInput};
use crate::models::unet::Unet;

/// Sets `y` on every cond of `sides` (named by `inputs`, for errors) for `unet` sampled with `seed`.
/// A UNet without a class-label input takes none; an entry carrying unCLIP image embeddings is then an
/// error naming its input and `model_name` (ComfyUI ignores them silently).
pub fn attach_adm(sides: &mut [Vec<Cond>], inputs: &[&str], unet: &Unet, model_name: &str, seed: i128) -> Result<(), NodeError> {
    let Some(adm) = unet.config.adm_in_channels else {
        for (side, input) in sides.iter().zip(inputs) {
            if side.iter().any(|c| !c.unclip.is_empty()) {
                return Err(NodeError::input(
                    input,
                    format!(
                        "unCLIPConditioning's image embedding needs an SD 2.1 unCLIP model (a UNet with a class-label input, \
                         model.diffusion_model.label_emb.*, loaded with unCLIPCheckpointLoader); {model_name} has none"
                    ),
                ));
            }
        }
        return Ok(());
    };
    // The augmentor's width is the image embedding's; the ADM vector is it and its noise level's embedding.
    let aug = NoiseAugmentor::new(adm / 2);
    let seed = seed_bits(seed - 10);
    let device = unet.device();
    for (side, input) in sides.iter_mut().zip(inputs) {
        for c in side.iter_mut() {
            let y = if c.unclip.is_empty() {
                Tensor::zeros([1, adm], (Kind::Float, tch::Device::Cpu))
            } else {
                let list: Vec<UnclipInput> = c
                    .unclip
                    .iter()
                    .map(|u| UnclipInput { image_embeds: &u.image_embeds.0, strength: u.strength, noise_augmentation: u.noise_augmentation })
                    .collect();
                unclip_adm(&list, &aug, seed, device).map_err(|e| NodeError::input(input, format!("unCLIPConditioning on {model_name}: {e}")))?
            };
            if y.size() != [1, adm] {
                return Err(NodeError::input(input, format!("the unCLIP vector is {:?} wide; {model_name}'s UNet takes {adm}", y.size())));
            }
            c.y = Some(y);
        }
    }
    Ok(())
}
