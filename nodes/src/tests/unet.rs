//! Unit tests of `unet.rs`: per-level transformer depths and the class-label input (issue 11: the
//! UNet config holds what SDXL will need, so it is an addition, not a hunt).

use tch::{Device, Kind, Tensor};

use super::*;
use crate::checkpoint::detect::Family;
use crate::checkpoint::synthetic::tiny_config;
use crate::checkpoint::Weights;

fn tiny(depth: Vec<i64>, adm: Option<i64>) -> (Unet, Vec<String>) {
    let mut config = tiny_config(Family::Sd1, false).unet.unwrap();
    config.transformer_depth = depth;
    config.adm_in_channels = adm;
    let w = Weights::synthetic(Kind::Float, 3);
    let unet = Unet::new(&w.root(), config);
    let names = w.synthetic.map(|s| s.into_inner().made.into_iter().map(|(k, _)| k).collect()).unwrap_or_default();
    (unet, names)
}

#[test]
fn each_level_gets_its_own_transformer_depth() {
    let (_, names) = tiny(vec![1, 2], None);
    let has = |k: &str| names.iter().any(|n| n == k);
    // Level 0 (input block 1) has one block, level 1 (input block 3) two, the middle the deepest level's.
    assert!(has("input_blocks.1.1.transformer_blocks.0.norm1.weight") && !has("input_blocks.1.1.transformer_blocks.1.norm1.weight"));
    assert!(has("input_blocks.3.1.transformer_blocks.1.norm1.weight"));
    assert!(has("middle_block.1.transformer_blocks.1.norm1.weight"));
    // One number means every level, as configs written before per-level depths have it.
    let old: UnetConfig =
        serde_json::from_str(&serde_json::to_string(&tiny(vec![1], None).0.config).unwrap().replace("\"transformer_depth\":[1]", "\"transformer_depth\":1"))
            .unwrap();
    assert_eq!(old.transformer_depth, [1]);
    assert_eq!((old.depth_at(0), old.depth_at(1), old.depth_middle()), (1, 1, 1));
}

#[test]
fn a_class_label_input_moves_the_prediction_and_is_optional() {
    let _g = tch::no_grad_guard();
    let (unet, names) = tiny(vec![1], Some(8));
    assert!(names.iter().any(|n| n == "label_emb.0.0.weight") && names.iter().any(|n| n == "label_emb.0.2.weight"));
    let x = Tensor::ones([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let (t, ctx) = (Tensor::from_slice(&[500f32]), Tensor::ones([1, 77, 32], (Kind::Float, Device::Cpu)));
    let plain = unet.forward(&x, &t, &ctx);
    let zero = unet.forward_with_class(&x, &t, &ctx, Some(&Tensor::zeros([1, 8], (Kind::Float, Device::Cpu))));
    let one = unet.forward_with_class(&x, &t, &ctx, Some(&Tensor::ones([1, 8], (Kind::Float, Device::Cpu))));
    assert!((&one - &zero).abs().max().double_value(&[]) > 1e-4, "the label changes nothing");
    assert!((&plain - &one).abs().max().double_value(&[]) > 1e-4);
}
