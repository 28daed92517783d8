//! diffloom-nodes: the built-in nodes and what they need (image I/O, resampling; later the SD model
//! stack and samplers).

pub mod budget;
pub mod builtin;
pub mod checkpoint;
pub mod control;
pub mod family;
pub mod filters;
pub mod imageio;
pub mod lora;
pub mod models;
pub mod patches;
pub mod prompt;
pub mod resample;
pub mod sampling;
pub mod sd;
pub mod tiles;
pub mod tokenizer;
pub mod webp;

use std::rc::Rc;

use diffloom_core::{Node, Origin, Registry};

use builtin::sampling as sampling_nodes;
use builtin::{
    animation, conditioning, controlnet, custom_sampling as custom, gligen, image, latent, loaders, mask, model_merging, model_patches, preprocessors,
    primitive, quantize, rebatch, strings,
};

/// Every built-in node, ordered by category as `diffloom nodes` lists them.
pub fn builtin() -> Vec<Rc<dyn Node>> {
    vec![
        // loaders
        Rc::new(loaders::CheckpointLoaderSimple),
        Rc::new(loaders::VAELoader),
        Rc::new(loaders::UpscaleModelLoader),
        Rc::new(loaders::LoraLoader),
        Rc::new(loaders::LoraLoaderModelOnly),
        Rc::new(gligen::GLIGENLoader),
        Rc::new(loaders::ControlNetLoader),
        Rc::new(loaders::DiffControlNetLoader),
        Rc::new(loaders::CheckpointLoader),
        Rc::new(loaders::DiffusersLoader),
        Rc::new(loaders::UNETLoader),
        Rc::new(loaders::CLIPLoader),
        Rc::new(loaders::HypernetworkLoader),
        Rc::new(loaders::CLIPVisionLoader),
        Rc::new(loaders::StyleModelLoader),
        Rc::new(loaders::UnClipCheckpointLoader),
        // conditioning
        Rc::new(conditioning::CLIPTextEncode),
        Rc::new(conditioning::CLIPSetLastLayer),
        Rc::new(conditioning::ConditioningCombine),
        Rc::new(conditioning::ConditioningConcat),
        Rc::new(conditioning::ConditioningZeroOut),
        Rc::new(conditioning::ConditioningAverage),
        Rc::new(conditioning::ConditioningSetTimestepRange),
        Rc::new(conditioning::ConditioningSetArea),
        Rc::new(conditioning::ConditioningSetAreaPercentage),
        Rc::new(conditioning::ConditioningSetAreaStrength),
        Rc::new(conditioning::ConditioningSetMask),
        Rc::new(conditioning::InpaintModelConditioning),
        Rc::new(conditioning::InstructPixToPixConditioning),
        Rc::new(conditioning::CLIPVisionEncode),
        // conditioning/style_model
        Rc::new(conditioning::StyleModelApply),
        Rc::new(conditioning::UnClipConditioning),
        // conditioning/controlnet
        Rc::new(controlnet::ControlNetApplyAdvanced),
        Rc::new(controlnet::ControlNetApply),
        // conditioning/gligen
        Rc::new(gligen::GLIGENTextBoxApply),
        // sampling
        Rc::new(sampling_nodes::KSampler),
        Rc::new(sampling_nodes::KSamplerAdvanced),
        Rc::new(sampling_nodes::ModelSamplingDiscrete),
        // model patches (advanced/model, model_patches/unet, advanced/guidance, …)
        Rc::new(model_patches::RescaleCFG),
        Rc::new(model_patches::FreeUNode),
        Rc::new(model_patches::FreeUV2),
        Rc::new(model_patches::PatchModelAddDownscale),
        Rc::new(model_patches::CFGZeroStar),
        Rc::new(model_patches::CFGNorm),
        Rc::new(model_patches::APG),
        Rc::new(model_patches::DifferentialDiffusion),
        Rc::new(model_patches::PerturbedAttentionGuidance),
        Rc::new(model_patches::SelfAttentionGuidance),
        Rc::new(model_patches::HyperTileNode),
        Rc::new(model_patches::TomePatchModel),
        Rc::new(model_patches::EpsilonScaling),
        Rc::new(model_patches::TemporalScoreRescaling),
        Rc::new(model_patches::TCFG),
        // advanced/model_merging, attention multipliers
        Rc::new(model_merging::ModelMergeSimple),
        Rc::new(model_merging::ModelMergeBlocks),
        Rc::new(model_merging::ModelMergeSubtract),
        Rc::new(model_merging::ModelMergeAdd),
        Rc::new(model_merging::ModelMergeSD("ModelMergeSD1")),
        Rc::new(model_merging::ModelMergeSD("ModelMergeSD2")),
        Rc::new(model_merging::UNetSelfAttentionMultiply),
        Rc::new(model_merging::UNetCrossAttentionMultiply),
        Rc::new(model_merging::CLIPAttentionMultiply),
        Rc::new(model_merging::CLIPMergeSimple),
        Rc::new(model_merging::CLIPMergeSubtract),
        Rc::new(model_merging::CLIPMergeAdd),
        Rc::new(model_merging::CheckpointSave),
        Rc::new(model_merging::ModelSave),
        Rc::new(model_merging::CLIPSave),
        Rc::new(model_merging::VAESave),
        Rc::new(model_merging::LoraSave),
        // sampling/custom_sampling
        Rc::new(custom::SamplerCustom),
        Rc::new(custom::SamplerCustomAdvanced),
        Rc::new(custom::RandomNoise),
        Rc::new(custom::DisableNoise),
        Rc::new(custom::AddNoise),
        Rc::new(custom::CFGGuider),
        Rc::new(custom::BasicGuider),
        Rc::new(custom::DualCFGGuider),
        Rc::new(custom::PerpNegGuider),
        Rc::new(custom::KSamplerSelect),
        Rc::new(custom::SamplerEulerAncestral),
        Rc::new(custom::SamplerEulerAncestralCFGPP),
        Rc::new(custom::SamplerLMS),
        Rc::new(custom::SamplerDpmpp3mSde),
        Rc::new(custom::SamplerDpmpp2mSde),
        Rc::new(custom::SamplerDpmppSde),
        Rc::new(custom::SamplerDpmpp2sAncestral),
        Rc::new(custom::SamplerDPMAdaptative),
        Rc::new(custom::SamplerErSde),
        Rc::new(custom::SamplerSASolver),
        Rc::new(custom::SamplerSEEDS2),
        Rc::new(custom::SamplerLCMUpscale),
        Rc::new(custom::SamplerEulerCFGpp),
        Rc::new(custom::BasicScheduler),
        Rc::new(custom::KarrasScheduler),
        Rc::new(custom::ExponentialScheduler),
        Rc::new(custom::PolyexponentialScheduler),
        Rc::new(custom::LaplaceScheduler),
        Rc::new(custom::VPScheduler),
        Rc::new(custom::BetaSamplingScheduler),
        Rc::new(custom::SDTurboScheduler),
        Rc::new(custom::AlignYourStepsScheduler),
        Rc::new(custom::GITSScheduler),
        Rc::new(custom::SplitSigmas),
        Rc::new(custom::SplitSigmasDenoise),
        Rc::new(custom::FlipSigmas),
        Rc::new(custom::SetFirstSigma),
        Rc::new(custom::ExtendIntermediateSigmas),
        Rc::new(custom::SamplingPercentToSigma),
        Rc::new(custom::ManualSigmas),
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
        Rc::new(rebatch::RebatchLatents),
        Rc::new(latent::LatentFromBatch),
        Rc::new(latent::LatentComposite),
        Rc::new(latent::LatentCompositeMasked),
        // latent/transform
        Rc::new(latent::LatentFlip),
        Rc::new(latent::LatentRotate),
        Rc::new(latent::LatentCrop),
        // latent/advanced
        Rc::new(latent::LatentAdd),
        Rc::new(latent::LatentSubtract),
        Rc::new(latent::LatentMultiply),
        Rc::new(latent::LatentInterpolate),
        Rc::new(latent::LatentBatchSeedBehavior),
        // latent/batch, _for_testing
        Rc::new(latent::LatentBatch),
        Rc::new(latent::LatentBlend),
        Rc::new(latent::SaveLatent),
        Rc::new(latent::LoadLatent),
        // image
        Rc::new(image::LoadImage),
        Rc::new(image::LoadImageOutput),
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
        Rc::new(image::GetImageSize),
        Rc::new(image::EmptyImage),
        Rc::new(image::ImageBatch),
        Rc::new(image::ImageAddNoise),
        Rc::new(image::ImageScaleToTotalPixels),
        Rc::new(image::ImageScaleToMaxDimension),
        // image/transform, image/batch
        Rc::new(image::ImageFlip),
        Rc::new(image::ImageRotate),
        Rc::new(image::RepeatImageBatch),
        Rc::new(rebatch::RebatchImages),
        Rc::new(image::ImageFromBatch),
        Rc::new(image::ResizeAndPadImage),
        Rc::new(image::ImageStitch),
        // image/animation
        Rc::new(animation::SaveAnimatedPNG),
        Rc::new(animation::SaveAnimatedWEBP),
        // image/postprocessing
        Rc::new(image::ImageBlur),
        Rc::new(image::ImageSharpen),
        Rc::new(quantize::ImageQuantize),
        // image/preprocessors, image/postprocessing
        Rc::new(preprocessors::Canny),
        Rc::new(preprocessors::Morphology),
        // mask
        Rc::new(image::LoadImageMask),
        Rc::new(mask::MaskToImage),
        Rc::new(mask::MaskPreview),
        Rc::new(mask::ImageToMask),
        Rc::new(mask::InvertMask),
        Rc::new(mask::SolidMask),
        Rc::new(mask::GrowMask),
        Rc::new(mask::FeatherMask),
        Rc::new(mask::MaskComposite),
        Rc::new(mask::ThresholdMask),
        Rc::new(mask::CropMask),
        Rc::new(mask::ImageColorToMask),
        // mask/compositing
        Rc::new(mask::SplitImageWithAlpha),
        Rc::new(mask::JoinImageWithAlpha),
        Rc::new(mask::PorterDuffImageComposite),
        // utils
        Rc::new(primitive::PRIMITIVE_INT),
        Rc::new(primitive::PRIMITIVE_FLOAT),
        Rc::new(primitive::PRIMITIVE_STRING),
        Rc::new(primitive::PRIMITIVE_STRING_MULTILINE),
        Rc::new(primitive::PRIMITIVE_BOOLEAN),
        Rc::new(primitive::StringConcatenate),
        Rc::new(strings::StringLength),
        Rc::new(strings::StringSubstring),
        Rc::new(strings::StringReplace),
        Rc::new(strings::StringContains),
        Rc::new(strings::StringCompare),
        Rc::new(strings::StringTrim),
        Rc::new(strings::CaseConverter),
        Rc::new(strings::RegexMatch),
        Rc::new(strings::RegexExtract),
        Rc::new(strings::RegexReplace),
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
