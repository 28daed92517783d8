//! Processing an image or latent in overlapping tiles to bound memory, blending the tiles with linear
//! feathering over the overlap: ComfyUI's `comfy.utils.tiled_scale`, position for position.

use tch::{Kind, Tensor};

use diffloom_core::NodeError;

/// Multiplies the `n` slices of `t` along `dim` next to one edge (the start, or with `at_end` the end) by
/// 1/n, 2/n, …, n/n going inwards: the linear fade ComfyUI uses for tile seams, pasted latents and
/// conditioning areas. Slices beyond `t`'s size are skipped.
pub fn fade_edge(t: &Tensor, dim: i64, n: i64, at_end: bool) -> Result<(), NodeError> {
    let len = t.size()[dim as usize];
    for i in 0..n.min(len) {
        let at = if at_end { len - 1 - i } else { i };
        let _ = t.narrow(dim, at, 1).f_mul_scalar_((i + 1) as f64 / n as f64)?;
    }
    Ok(())
}

/// Applies `f` to overlapping `tile_h`×`tile_w` tiles of `x` `[b, c, h, w]` (CPU) and blends the results,
/// whose spatial size is `scale` times the input's and whose channel count is `out_channels`.
pub fn tiled_scale(
    x: &Tensor,
    f: &mut dyn FnMut(&Tensor) -> Result<Tensor, NodeError>,
    tile_h: i64,
    tile_w: i64,
    overlap: i64,
    scale: f64,
    out_channels: i64,
) -> Result<Tensor, NodeError> {
    let size = x.size();
    let (b, h, w) = (size[0], size[2], size[3]);
    let (tile_h, tile_w) = (tile_h.max(1), tile_w.max(1));
    // Tiles must advance: with an overlap as large as a tile, ComfyUI's range() step would be zero.
    let overlap = overlap.clamp(0, tile_h.min(tile_w) - 1);
    let up = |v: i64| (v as f64 * scale).round_ties_even() as i64;
    let (tile, dims) = ([tile_h, tile_w], [h, w]);
    let mut outputs = Vec::with_capacity(b as usize);
    for i in 0..b {
        let s = x.narrow(0, i, 1);
        if h <= tile_h && w <= tile_w {
            outputs.push(f(&s)?.to_device(tch::Device::Cpu).to_kind(Kind::Float));
            continue;
        }
        let out = Tensor::zeros([1, out_channels, up(h), up(w)], (Kind::Float, tch::Device::Cpu));
        let div = Tensor::zeros([1, out_channels, up(h), up(w)], (Kind::Float, tch::Device::Cpu));
        let positions = |d: usize| -> Vec<i64> {
            if dims[d] > tile[d] {
                let step = (tile[d] - overlap) as usize;
                (0..(dims[d] - overlap).max(0)).step_by(step).collect()
            } else {
                vec![0]
            }
        };
        for py in positions(0) {
            for px in positions(1) {
                let mut s_in = s.shallow_clone();
                let mut starts = [0i64; 2];
                for (d, p) in [py, px].into_iter().enumerate() {
                    let pos = p.min(dims[d] - overlap).max(0);
                    let len = tile[d].min(dims[d] - pos);
                    s_in = s_in.narrow(d as i64 + 2, pos, len);
                    starts[d] = up(pos);
                }
                let ps = f(&s_in)?.to_device(tch::Device::Cpu).to_kind(Kind::Float);
                let mask = Tensor::ones_like(&ps);
                for d in 0..2 {
                    let dim = d as i64 + 2;
                    let feather = up(overlap);
                    let len = mask.size()[d + 2];
                    if feather >= len {
                        continue;
                    }
                    fade_edge(&mask, dim, feather, false)?;
                    fade_edge(&mask, dim, feather, true)?;
                }
                let (mh, mw) = (mask.size()[2], mask.size()[3]);
                let _ = out.narrow(2, starts[0], mh).narrow(3, starts[1], mw).f_add_(&(&ps * &mask))?;
                let _ = div.narrow(2, starts[0], mh).narrow(3, starts[1], mw).f_add_(&mask)?;
            }
        }
        outputs.push(out / div);
    }
    Ok(Tensor::cat(&outputs, 0))
}

#[cfg(test)]
#[path = "tests/tiles.rs"]
mod tests;
