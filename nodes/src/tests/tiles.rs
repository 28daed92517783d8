//! Unit tests of `tiles.rs`.
use super::*;

#[test]
fn tiling_an_identity_reproduces_the_input_with_no_seams() {
    let x = Tensor::rand([2, 3, 37, 53], (Kind::Float, tch::Device::Cpu));
    for (th, tw, overlap) in [(16, 16, 4), (8, 32, 8), (32, 8, 2), (5, 5, 5), (64, 64, 8)] {
        let mut id = |t: &Tensor| Ok(t.shallow_clone());
        let y = tiled_scale(&x, &mut id, th, tw, overlap, 1.0, 3).unwrap();
        let err = (&y - &x).abs().max().double_value(&[]);
        assert!(err < 1e-6, "tiles {th}×{tw} overlap {overlap}: {err}");
    }
}

#[test]
fn scaled_tiles_land_at_scaled_positions() {
    // A ×2 nearest upscale done in tiles equals the whole-image upscale.
    let x = Tensor::rand([1, 3, 30, 22], (Kind::Float, tch::Device::Cpu));
    let mut up = |t: &Tensor| {
        let s = t.size();
        Ok(t.upsample_nearest2d([s[2] * 2, s[3] * 2], None, None))
    };
    let whole = up(&x).unwrap();
    let tiled = tiled_scale(&x, &mut up, 12, 12, 4, 2.0, 3).unwrap();
    assert!((&tiled - &whole).abs().max().double_value(&[]) < 1e-6);
}
