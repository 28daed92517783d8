//! diffloom-nodes: the built-in nodes and what they need (image I/O, resampling; later the SD model
//! stack and samplers).

pub mod builtin;
pub mod checkpoint;
pub mod imageio;
pub mod lora;
pub mod models;
pub mod prompt;
pub mod resample;
pub mod sampling;
pub mod sd;
pub mod tiles;
pub mod tokenizer;

use std::rc::Rc;

use diffloom_core::{Node, Origin, Registry};

use builtin::sampling as sampling_nodes;
use builtin::{conditioning, image, latent, loaders, mask, primitive};

/// Every built-in node, ordered by category as `diffloom nodes` lists them.
pub fn builtin() -> Vec<Rc<dyn Node>> {
    vec![
        // loaders
        Rc::new(loaders::CheckpointLoaderSimple),
        Rc::new(loaders::VAELoader),
        Rc::new(loaders::UpscaleModelLoader),
        Rc::new(loaders::LoraLoader),
        Rc::new(loaders::LoraLoaderModelOnly),
        // conditioning
        Rc::new(conditioning::CLIPTextEncode),
        Rc::new(conditioning::CLIPSetLastLayer),
        Rc::new(conditioning::ConditioningCombine),
        Rc::new(conditioning::ConditioningConcat),
        Rc::new(conditioning::ConditioningZeroOut),
        Rc::new(conditioning::ConditioningSetArea),
        Rc::new(conditioning::ConditioningSetAreaPercentage),
        Rc::new(conditioning::ConditioningSetAreaStrength),
        Rc::new(conditioning::ConditioningSetMask),
        Rc::new(conditioning::InpaintModelConditioning),
        // sampling
        Rc::new(sampling_nodes::KSampler),
        Rc::new(sampling_nodes::KSamplerAdvanced),
        Rc::new(sampling_nodes::SamplerCustom),
        Rc::new(sampling_nodes::KSamplerSelect),
        Rc::new(sampling_nodes::BasicScheduler),
        Rc::new(sampling_nodes::KarrasScheduler),
        Rc::new(sampling_nodes::ExponentialScheduler),
        Rc::new(sampling_nodes::SplitSigmas),
        Rc::new(sampling_nodes::ModelSamplingDiscrete),
        // latent
        Rc::new(latent::EmptyLatentImage),
        Rc::new(latent::VAEEncode),
        Rc::new(latent::VAEDecode),
        Rc::new(latent::VAEEncodeTiled),
        Rc::new(latent::VAEDecodeTiled),
        Rc::new(latent::VAEEncodeForInpaint),
        Rc::new(latent::SetLatentNoiseMask),
        Rc::new(latent::LatentUpscale),
        Rc::new(latent::LatentUpscaleBy),
        Rc::new(latent::RepeatLatentBatch),
        Rc::new(latent::LatentFromBatch),
        Rc::new(latent::LatentComposite),
        // image
        Rc::new(image::LoadImage),
        Rc::new(image::SaveImage),
        Rc::new(image::PreviewImage),
        Rc::new(image::ImageInvert),
        Rc::new(image::ImageScale),
        Rc::new(image::ImageScaleBy),
        Rc::new(image::ImageUpscaleWithModel),
        Rc::new(image::ImageBlend),
        Rc::new(image::ImageCrop),
        Rc::new(image::ImagePadForOutpaint),
        Rc::new(image::ImageCompositeMasked),
        // mask
        Rc::new(image::LoadImageMask),
        Rc::new(mask::MaskToImage),
        Rc::new(mask::ImageToMask),
        Rc::new(mask::InvertMask),
        Rc::new(mask::SolidMask),
        Rc::new(mask::GrowMask),
        Rc::new(mask::FeatherMask),
        Rc::new(mask::MaskComposite),
        // utils
        Rc::new(primitive::PRIMITIVE_INT),
        Rc::new(primitive::PRIMITIVE_FLOAT),
        Rc::new(primitive::PRIMITIVE_STRING),
        Rc::new(primitive::PRIMITIVE_STRING_MULTILINE),
        Rc::new(primitive::PRIMITIVE_BOOLEAN),
        Rc::new(primitive::StringConcatenate),
        Rc::new(primitive::PreviewAny),
    ]
}

/// A registry holding the built-in nodes.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    for node in builtin() {
        r.register(node, Origin::Builtin).expect("unique built-in names"); // invariant: tested by builtin_names_are_unique
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn builtin_names_are_unique() {
        let mut names: Vec<String> = super::builtin().iter().map(|n| n.schema().name).collect();
        let before = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), before);
    }
}
