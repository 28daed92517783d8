//! The image filters ComfyUI's preprocessor nodes take from kornia 0.9, op for op so results agree bit
//! for bit on the CPU: Canny edges (`kornia.filters.canny` with ComfyUI's arguments) and flat
//! morphology (`kornia.morphology` with an all-ones square kernel and geodesic borders).

use std::collections::VecDeque;
use std::f64::consts::PI;

use tch::{Device, Kind, Tensor};

/// Correlation of `x` `[b, c, h, w]` with `weight` (no bias, stride 1, no padding).
fn correlate(x: &Tensor, weight: &Tensor) -> Tensor {
    x.conv2d(weight, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
}

/// kornia's 5-tap Gaussian for sigma 1, computed with the same ops (so with the same rounding).
fn gaussian_taps() -> Tensor {
    let x = Tensor::arange(5, (Kind::Float, Device::Cpu)) - 2.0;
    let dist = x.pow_tensor_scalar(2.0);
    let dist = &dist - dist.min();
    let g = (dist.neg() / 2.0).exp();
    &g / g.sum_dim_intlist(-1, true, Kind::Float)
}

/// Canny edges of `x` `[b, 1 or 3, h, w]` (0..1): kornia's 5×5 blur (sigma 1), unnormalised Sobel,
/// non-maximum suppression with its tie rule, thresholds `low` and `high` on the gradient magnitude and
/// hysteresis. Returns `(magnitude after suppression, edges in {0, 1})`, both `[b, 1, h, w]`.
pub fn canny(x: &Tensor, low: f64, high: f64) -> Result<(Tensor, Tensor), String> {
    let s = x.size();
    let (b, c, h, w) = match s.as_slice() {
        [b, c, h, w] => (*b, *c, *h, *w),
        _ => return Err(format!("expected an image batch [b, c, h, w], got {s:?}")),
    };
    if low > high {
        return Err(format!("the low threshold ({low}) is above the high threshold ({high})"));
    }
    if low <= 0.0 {
        return Err(format!("the low threshold must be above 0, got {low}"));
    }
    if h < 3 || w < 3 {
        return Err(format!("the image is {w}×{h} pixels; edge detection needs at least 3×3"));
    }
    let x = x.to_kind(Kind::Float).to_device(Device::Cpu);
    let gray = match c {
        // rgb_to_grayscale: two fused multiply-adds (addcmul), as kornia computes it.
        3 => {
            let weight = |v: f64| Tensor::from(v as f32);
            (x.select(1, 0) * weight(0.299)).addcmul(&x.select(1, 1), &weight(0.587)).addcmul(&x.select(1, 2), &weight(0.114)).unsqueeze(1)
        }
        1 => x.shallow_clone(),
        _ => return Err(format!("edge detection takes 1 or 3 channels, the image has {c}")),
    };
    let k = gaussian_taps();
    let blurred = correlate(&gray.reflection_pad2d([2, 2, 0, 0]), &k.view([1, 1, 1, 5]));
    let blurred = correlate(&blurred.reflection_pad2d([0, 0, 2, 2]), &k.view([1, 1, 5, 1]));
    let sobel = Tensor::from_slice(&[-1f32, 0., 1., -2., 0., 2., -1., 0., 1., -1., -2., -1., 0., 0., 0., 1., 2., 1.]).view([2, 1, 3, 3]);
    let grad = correlate(&blurred.replication_pad2d([1, 1, 1, 1]), &sobel);
    let (gx, gy) = (grad.narrow(1, 0, 1), grad.narrow(1, 1, 1));

    // The magnitude with a one-pixel border of sqrt(eps), what out-of-image neighbours compare against.
    let (gxp, gyp) = (gx.constant_pad_nd([1, 1, 1, 1]), gy.constant_pad_nd([1, 1, 1, 1]));
    let padded = (&gxp * &gxp + &gyp * &gyp + 1e-6).sqrt();
    let angle = gy.atan2(&gx).nan_to_num(None, None, None);
    let angle_45 = (angle * (4.0 / PI)).round();
    let pos = angle_45.remainder(8).to_kind(Kind::Int64);
    let neg = (&angle_45 + 4.0).remainder(8).to_kind(Kind::Int64);
    // Neighbour k = 0..7 counter-clockwise from +x (y down), then the pixel itself.
    const OFFSETS: [(i64, i64); 9] = [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 0)];
    let window: Vec<Tensor> = OFFSETS.iter().map(|(dy, dx)| padded.narrow(2, 1 + dy, h).narrow(3, 1 + dx, w)).collect();
    let window = Tensor::stack(&window, 2);
    let magnitude = window.select(2, 8);
    let nb = window.gather(2, &Tensor::stack(&[&pos, &neg], 2), false);
    // Towards +x and +y a tie is a maximum; the other six directions need a strict one.
    let beats = |n: &Tensor, d: &Tensor| magnitude.gt_tensor(n).logical_or(&d.eq(0).logical_or(&d.eq(2)).logical_and(&magnitude.eq_tensor(n)));
    let is_max =
        beats(&nb.select(2, 0), &pos).logical_and(&beats(&nb.select(2, 1), &neg)).logical_and(&magnitude.gt_tensor(&padded.narrow(2, 0, 1).narrow(3, 0, 1)));
    let magnitude = &magnitude * is_max.to_kind(Kind::Float);

    let strong = magnitude.gt(high);
    let weak = magnitude.gt(low);
    let edges = hysteresis(&strong, &weak, b, h, w);
    Ok((magnitude, edges))
}

/// Keeps the weak pixels 8-connected to a strong one through weak ones (the fixed point of kornia's
/// hysteresis loop, reached by a flood fill instead of whole-image passes).
fn hysteresis(strong: &Tensor, weak: &Tensor, b: i64, h: i64, w: i64) -> Tensor {
    let flat = |t: &Tensor| -> Vec<bool> { Vec::<bool>::try_from(t.flatten(0, -1)).unwrap_or_default() };
    let (strong, weak) = (flat(strong), flat(weak));
    let (h, w) = (h as usize, w as usize);
    let mut keep = vec![false; strong.len()];
    let mut queue = VecDeque::new();
    for (i, s) in strong.iter().enumerate() {
        if *s {
            keep[i] = true;
            queue.push_back(i);
        }
    }
    while let Some(i) = queue.pop_front() {
        let (plane, y, x) = (i / (h * w), (i / w) % h, i % w);
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let (ny, nx) = (y as i64 + dy, x as i64 + dx);
                if (dy, dx) == (0, 0) || ny < 0 || nx < 0 || ny >= h as i64 || nx >= w as i64 {
                    continue;
                }
                let j = plane * h * w + ny as usize * w + nx as usize;
                if weak.get(j).copied().unwrap_or(false) && !keep[j] {
                    keep[j] = true;
                    queue.push_back(j);
                }
            }
        }
    }
    let values: Vec<f32> = keep.iter().map(|k| if *k { 1.0 } else { 0.0 }).collect();
    Tensor::from_slice(&values).view([b, 1, h as i64, w as i64])
}

/// ComfyUI's ImageMorphology operations.
pub const MORPHOLOGY_OPS: [&str; 7] = ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"];

/// Grey dilation of `x` `[b, c, h, w]` by a k×k square: the maximum over rows y−(k−o−1)..y+o and the
/// same columns, o = k / 2 (kornia reflects the element, so even sizes reach further down and right);
/// pixels outside the image do not count. Separable, so large kernels stay cheap.
fn dilate(x: &Tensor, k: i64) -> Tensor {
    let o = k / 2;
    let padded = x.pad([k - o - 1, o, k - o - 1, o], "constant", f64::NEG_INFINITY);
    padded.max_pool2d([1, k], [1, 1], [0, 0], [1, 1], false).max_pool2d([k, 1], [1, 1], [0, 0], [1, 1], false)
}

/// Grey erosion: the minimum over rows y−o..y+(k−o−1) and the same columns.
fn erode(x: &Tensor, k: i64) -> Tensor {
    let o = k / 2;
    let padded = x.neg().pad([o, k - o - 1, o, k - o - 1], "constant", f64::NEG_INFINITY);
    padded.max_pool2d([1, k], [1, 1], [0, 0], [1, 1], false).max_pool2d([k, 1], [1, 1], [0, 0], [1, 1], false).neg()
}

/// One of [`MORPHOLOGY_OPS`] with a `k`×`k` all-ones kernel on `x` `[b, c, h, w]`, per channel.
pub fn morphology(x: &Tensor, op: &str, k: i64) -> Result<Tensor, String> {
    if k < 1 {
        return Err(format!("the kernel size must be at least 1, got {k}"));
    }
    let x = x.to_kind(Kind::Float);
    Ok(match op {
        "erode" => erode(&x, k),
        "dilate" => dilate(&x, k),
        "open" => dilate(&erode(&x, k), k),
        "close" => erode(&dilate(&x, k), k),
        "gradient" => dilate(&x, k) - erode(&x, k),
        "top_hat" => &x - dilate(&erode(&x, k), k),
        "bottom_hat" => erode(&dilate(&x, k), k) - &x,
        other => return Err(format!("unknown operation {other:?}; one of {}", MORPHOLOGY_OPS.join(", "))),
    })
}
