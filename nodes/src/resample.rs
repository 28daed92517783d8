//! Resizing NCHW tensors the way ComfyUI's `comfy.utils.common_upscale` does, shared by the image and
//! latent scaling nodes.

use diffloom_core::NodeError;
use tch::{Kind, Tensor};

/// ComfyUI's image upscale methods, in its order.
pub const IMAGE_METHODS: &[&str] = &["nearest-exact", "bilinear", "area", "bicubic", "lanczos"];
/// ComfyUI's crop choices.
pub const CROP_METHODS: &[&str] = &["disabled", "center"];

/// Resizes `x` (`[N, C, H, W]`) to `width`×`height`. With `crop == "center"` the input is first cropped
/// to the target aspect ratio around its centre, as ComfyUI does (Python's round: ties to even).
pub fn common_upscale(x: &Tensor, width: i64, height: i64, method: &str, crop: &str) -> Result<Tensor, NodeError> {
    let size = x.size();
    let (old_h, old_w) = (size[2], size[3]);
    let x = if crop == "center" {
        let old_aspect = old_w as f64 / old_h as f64;
        let new_aspect = width as f64 / height as f64;
        let (mut cx, mut cy) = (0i64, 0i64);
        if old_aspect > new_aspect {
            cx = ((old_w as f64 - old_w as f64 * (new_aspect / old_aspect)) / 2.0).round_ties_even() as i64;
        } else if old_aspect < new_aspect {
            cy = ((old_h as f64 - old_h as f64 * (old_aspect / new_aspect)) / 2.0).round_ties_even() as i64;
        }
        x.f_narrow(2, cy, old_h - 2 * cy)?.f_narrow(3, cx, old_w - 2 * cx)?
    } else {
        x.shallow_clone()
    };
    let out = [height, width];
    Ok(match method {
        "nearest-exact" => x.f_internal_upsample_nearest_exact2d(out, None, None)?,
        "bilinear" => x.f_upsample_bilinear2d(out, false, None, None)?,
        "bicubic" => x.f_upsample_bicubic2d(out, false, None, None)?,
        "area" => x.f_adaptive_avg_pool2d(out)?,
        "lanczos" => lanczos(&x, width, height)?,
        "bislerp" => bislerp(&x, width, height)?,
        other => return Err(NodeError::Failed(format!("unknown upscale method {other:?}"))),
    })
}

/// Lanczos3 per image and channel in f32. ComfyUI goes through 8-bit PIL images here; we keep full
/// precision, so results differ from ComfyUI's by up to one 8-bit step.
fn lanczos(x: &Tensor, width: i64, height: i64) -> Result<Tensor, NodeError> {
    let size = x.size();
    let (n, c, h, w) = (size[0], size[1], size[2] as u32, size[3] as u32);
    let planes = x.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([n * c, h as i64, w as i64])?;
    let mut out = Vec::with_capacity((n * c) as usize);
    for i in 0..n * c {
        let data = Vec::<f32>::try_from(&planes.f_get(i)?.f_view([-1])?)?;
        let img = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(w, h, data).ok_or_else(|| NodeError::Failed("plane has the wrong size".into()))?;
        let resized = image::imageops::resize(&img, width as u32, height as u32, image::imageops::FilterType::Lanczos3);
        out.push(Tensor::f_from_slice(resized.as_raw())?.f_view([height, width])?);
    }
    Ok(Tensor::f_stack(&out, 0)?.f_view([n, c, height, width])?.f_to_kind(x.kind())?)
}

/// For resizing a side from `old` to `new` pixels: per output pixel the two source indices and the
/// weight of the second, as bilinear interpolation (align_corners=False) places them.
fn bilinear_taps(old: i64, new: i64) -> Result<(Tensor, Tensor, Tensor), NodeError> {
    let resize = |t: Tensor| t.f_view([1, 1, 1, old])?.f_upsample_bilinear2d([1, new], false, None, None)?.f_view([new]);
    let coords = resize(Tensor::f_arange(old, (Kind::Float, tch::Device::Cpu))?)?;
    let ratios = coords.f_sub(&coords.f_floor()?)?;
    // The upper neighbour: interpolating [1, 2, …, old − 1, old − 1] and truncating gives min(i + 1, old − 1).
    let upper = Tensor::f_arange_start(1, old + 1, (Kind::Float, tch::Device::Cpu))?.f_clamp_max(old as f64 - 1.0)?;
    let upper = resize(upper)?.f_to_kind(Kind::Int64)?;
    Ok((coords.f_to_kind(Kind::Int64)?, upper, ratios))
}

/// Spherical interpolation between the rows of `a` and `b` (`[n, c]`) by `r` (`[n, 1]`), the length
/// interpolated linearly; nearly parallel rows take `a`, nearly opposite ones a linear blend.
fn slerp(a: &Tensor, b: &Tensor, r: &Tensor) -> Result<Tensor, NodeError> {
    let (na, nb) = (a.f_norm_scalaropt_dim(2, [-1], true)?, b.f_norm_scalaropt_dim(2, [-1], true)?);
    // Zero vectors get a zero direction rather than NaN.
    let unit = |v: &Tensor, n: &Tensor| -> Result<Tensor, NodeError> { Ok(v.f_div(n)?.f_nan_to_num(0.0, 0.0, 0.0)?.f_mul(&n.f_ne(0.0)?)?) };
    let (ua, ub) = (unit(a, &na)?, unit(b, &nb)?);
    let dot = ua.f_mul(&ub)?.f_sum_dim_intlist(&[-1i64][..], true, Kind::Float)?;
    let omega = dot.f_acos()?;
    let so = omega.f_sin()?;
    let one_minus = r.f_neg()?.f_add_scalar(1.0)?;
    let res = omega.f_mul(&one_minus)?.f_sin()?.f_div(&so)?.f_mul(&ua)?.f_add(&omega.f_mul(r)?.f_sin()?.f_div(&so)?.f_mul(&ub)?)?;
    let res = res.f_mul(&na.f_mul(&one_minus)?.f_add(&nb.f_mul(r)?)?)?;
    let lerp = a.f_mul(&one_minus)?.f_add(&b.f_mul(r)?)?;
    let res = res.f_where_self(&dot.f_le(1.0 - 1e-5)?, a)?;
    Ok(lerp.f_where_self(&dot.f_lt(1e-5 - 1.0)?, &res)?)
}

/// ComfyUI's `bislerp`: a bilinear resize whose interpolation is spherical across the channels (each
/// pixel a vector), along the width first, then the height. Computed in fp32.
pub fn bislerp(x: &Tensor, width: i64, height: i64) -> Result<Tensor, NodeError> {
    let kind = x.kind();
    let x = x.f_to_kind(Kind::Float)?;
    let s = x.size();
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    // Along the width: gather both neighbours of every output column, as [n·h·w_new, c] rows.
    let (i1, i2, r) = bilinear_taps(w, width)?;
    let rows = |t: &Tensor| -> Result<Tensor, NodeError> { Ok(t.f_permute([0, 2, 3, 1])?.f_reshape([-1, c])?) };
    let a = rows(&x.f_index_select(3, &i1)?)?;
    let b = rows(&x.f_index_select(3, &i2)?)?;
    let r = r.f_view([1, 1, width])?.f_expand([n, h, width], false)?.f_reshape([-1, 1])?;
    let x = slerp(&a, &b, &r)?.f_reshape([n, h, width, c])?.f_permute([0, 3, 1, 2])?;
    // Along the height.
    let (i1, i2, r) = bilinear_taps(h, height)?;
    let a = rows(&x.f_index_select(2, &i1)?)?;
    let b = rows(&x.f_index_select(2, &i2)?)?;
    let r = r.f_view([1, height, 1])?.f_expand([n, height, width], false)?.f_reshape([-1, 1])?;
    let out = slerp(&a, &b, &r)?.f_reshape([n, height, width, c])?.f_permute([0, 3, 1, 2])?;
    Ok(out.f_contiguous()?.f_to_kind(kind)?)
}
