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
        let img = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(w, h, data)
            .ok_or_else(|| NodeError::Failed("plane has the wrong size".into()))?;
        let resized = image::imageops::resize(&img, width as u32, height as u32, image::imageops::FilterType::Lanczos3);
        out.push(Tensor::f_from_slice(resized.as_raw())?.f_view([height, width])?);
    }
    Ok(Tensor::f_stack(&out, 0)?.f_view([n, c, height, width])?.f_to_kind(x.kind())?)
}
