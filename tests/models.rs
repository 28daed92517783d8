//! The SD model stack on the project's tiny random-weight checkpoints: loading, shapes, detection,
//! and every kind of corrupt file.

use diffloom_nodes::checkpoint::detect::{Family, Prediction};
use diffloom_nodes::checkpoint::load::load_checkpoint;
use diffloom_nodes::checkpoint::synthetic::{tiny_config, write_checkpoint};
use diffloom_nodes::models::clip::ClipOutput;
use tch::{Device, Kind, Tensor};

use crate::util::Dir;

#[test]
fn tiny_checkpoints_load_and_run_with_the_right_shapes() {
    let d = Dir::new();
    for (family, inpaint) in [(Family::Sd1, false), (Family::Sd2, false), (Family::Sd1, true)] {
        let path = d.join("m.safetensors");
        let config = tiny_config(family, inpaint);
        write_checkpoint(&path, &config, Kind::Float, 7, true).unwrap();
        let ck = load_checkpoint(&path, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(ck.config, config);
        let unet = ck.unet.unwrap();
        let c_in = if inpaint { 9 } else { 4 };
        let x = Tensor::randn([2, c_in, 16, 12], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 77, 32], (Kind::Float, Device::Cpu));
        let out = unet.forward(&x, &Tensor::from_slice(&[999f32, 1.0]), &ctx);
        assert_eq!(out.size(), [2, 4, 16, 12]);
        assert!(out.isfinite().all().int64_value(&[]) == 1);
        let clip = ck.clip.unwrap();
        let tokens = Tensor::from_slice(&[49406i64, 320, 1125, 49407]).view([1, 4]);
        assert_eq!(clip.encode(&tokens, ClipOutput::Last).size(), [1, 4, 32]);
        let vae = ck.vae.unwrap();
        let img = Tensor::rand([1, 3, 64, 48], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
        let z = vae.encode_mean(&img);
        assert_eq!(z.size(), [1, 4, 8, 6]);
        assert_eq!(vae.decode(&z).size(), [1, 3, 64, 48]);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn detection_from_shapes_matches_the_written_config() {
    // Without the metadata, the channel widths, levels, res blocks and attention levels come from the
    // shapes alone; head layout falls back to the released models' (SD 1.x: 8 heads).
    let d = Dir::new();
    let path = d.join("m.safetensors");
    let config = tiny_config(Family::Sd1, false);
    write_checkpoint(&path, &config, Kind::Float, 7, false).unwrap();
    let file = diffloom_nodes::checkpoint::safetensors::SafetensorsFile::open(&path).unwrap();
    let shapes = file.tensors().iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
    let found = diffloom_nodes::checkpoint::detect::detect(&path, &shapes, &Default::default()).unwrap();
    let (want, got) = (config.unet.unwrap(), found.unet.unwrap());
    assert_eq!((got.in_channels, got.model_channels, &got.channel_mult, got.num_res_blocks), (4, 32, &want.channel_mult, 1));
    assert_eq!((&got.attention_resolutions, got.context_dim, got.use_linear_in_transformer), (&want.attention_resolutions, 32, false));
    assert_eq!(found.vae, config.vae);
    let clip = found.clip.unwrap();
    assert_eq!((clip.hidden_size, clip.num_layers, clip.vocab_size), (32, 3, 49408));
    assert_eq!((found.family, found.prediction), (Family::Sd1, Prediction::Eps));
}
