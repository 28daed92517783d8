//! ComfyUI's `mask` category. MASK is `[batch, height, width]` float in 0..1.

use diffloom_core::value::Shared;
use diffloom_core::{Args, Bool, Combo, Ctx, Float, Int, Node, NodeError, Schema, Value, ValueType};
use tch::{Device, Kind, Tensor};

use super::shared::{choice_index, MAX_RESOLUTION};

/// A MASK input as `[b, h, w]`.
fn mask3(a: &Args, input: &str) -> Result<Tensor, NodeError> {
    let m = a.mask(input)?;
    let s = m.size();
    Ok(m.f_reshape([-1, s[s.len() - 2], s[s.len() - 1]])?)
}

pub struct MaskToImage;
impl Node for MaskToImage {
    fn schema(&self) -> Schema {
        Schema::new("MaskToImage", "mask").input("mask", ValueType::Mask).output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let m = mask3(a, "mask")?;
        let s = m.size();
        Ok(vec![Value::Image(Shared(m.f_unsqueeze(-1)?.f_expand([s[0], s[1], s[2], 3], false)?.f_contiguous()?))])
    }
}

/// ComfyUI's MaskPreview ("Preview Mask"): each mask as a grey image in the temporary folder, as
/// PreviewImage saves them but without the graph in the file (ComfyUI's PreviewMask writes none).
pub struct MaskPreview;
impl Node for MaskPreview {
    fn schema(&self) -> Schema {
        Schema::new("MaskPreview", "mask")
            .describe("Writes masks as grey images to the temporary folder (diffloom-preview in the system temp directory unless set) to look at.")
            .input("mask", ValueType::Mask)
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let m = a.mask("mask")?;
        let s = m.size();
        if s.len() < 2 {
            return Err(NodeError::input("mask", format!("expected a [batch, height, width] mask, got shape {s:?}")));
        }
        // mask.reshape(-1, 1, h, w).movedim(1, -1).expand(-1, -1, -1, 3)
        let (h, w) = (s[s.len() - 2], s[s.len() - 1]);
        let image = m.f_reshape([-1, h, w, 1])?.f_expand([-1, h, w, 3], false)?;
        let dir = cx.files.folders.temp_dir.clone();
        super::image::save_batch(cx, &image, &dir, "preview", "temp", false)?;
        Ok(vec![])
    }
}

pub struct ImageToMask;
impl Node for ImageToMask {
    fn schema(&self) -> Schema {
        Schema::new("ImageToMask", "mask")
            .input("image", ValueType::Image)
            .input("channel", Combo::of(&["red", "green", "blue", "alpha"]))
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let img = a.image("image")?;
        let c = choice_index(a, "channel", &["red", "green", "blue", "alpha"])?;
        if c >= img.size()[3] {
            return Err(NodeError::input("channel", "the image has no alpha channel (LoadImage gives alpha as its MASK output)"));
        }
        Ok(vec![Value::Mask(Shared(img.f_select(3, c)?.f_contiguous()?))])
    }
}

pub struct InvertMask;
impl Node for InvertMask {
    fn schema(&self) -> Schema {
        Schema::new("InvertMask", "mask").input("mask", ValueType::Mask).output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::Mask(Shared(a.mask("mask")?.f_neg()?.f_add_scalar(1.0)?))])
    }
}

pub struct SolidMask;
impl Node for SolidMask {
    fn schema(&self) -> Schema {
        Schema::new("SolidMask", "mask")
            .input("value", Float::new(1.0).range(0.0, 1.0))
            .input("width", Int::new(512).range(1, MAX_RESOLUTION))
            .input("height", Int::new(512).range(1, MAX_RESOLUTION))
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let t = Tensor::f_full([1, a.i64("height")?, a.i64("width")?], a.float("value")?, (Kind::Float, Device::Cpu))?;
        Ok(vec![Value::Mask(Shared(t))])
    }
}

/// One step of grey dilation with a 3×3 kernel: the square, or the cross when `tapered` (ComfyUI's
/// `tapered_corners`).
fn dilate(m: &Tensor, tapered: bool) -> Result<Tensor, NodeError> {
    let x = m.f_unsqueeze(1)?;
    if !tapered {
        return Ok(x.f_max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false)?.f_squeeze_dim(1)?);
    }
    // Cross: the maximum of the pixel and its four neighbours (edges padded with -inf).
    let p = x.f_pad([1, 1, 1, 1], "constant", f64::NEG_INFINITY)?;
    let (h, w) = (m.size()[1], m.size()[2]);
    let at = |dy: i64, dx: i64| p.narrow(2, 1 + dy, h).narrow(3, 1 + dx, w);
    let out = at(0, 0).f_maximum(&at(-1, 0))?.f_maximum(&at(1, 0))?.f_maximum(&at(0, -1))?.f_maximum(&at(0, 1))?;
    Ok(out.f_squeeze_dim(1)?)
}

pub struct GrowMask;
impl Node for GrowMask {
    fn schema(&self) -> Schema {
        Schema::new("GrowMask", "mask")
            .describe("Grows (or, negative, shrinks) the mask by whole pixels.")
            .input("mask", ValueType::Mask)
            .input("expand", Int::new(0).range(-MAX_RESOLUTION, MAX_RESOLUTION))
            .input("tapered_corners", Bool(true))
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let expand = a.i64("expand")?;
        let tapered = a.boolean("tapered_corners")?;
        let mut m = mask3(a, "mask")?;
        for _ in 0..expand.abs() {
            // Erosion is dilation of the inverse.
            m = if expand > 0 { dilate(&m, tapered)? } else { dilate(&m.f_neg()?, tapered)?.f_neg()? };
        }
        Ok(vec![Value::Mask(Shared(m))])
    }
}

pub struct FeatherMask;
impl Node for FeatherMask {
    fn schema(&self) -> Schema {
        Schema::new("FeatherMask", "mask")
            .input("mask", ValueType::Mask)
            .input("left", Int::new(0).range(0, MAX_RESOLUTION))
            .input("top", Int::new(0).range(0, MAX_RESOLUTION))
            .input("right", Int::new(0).range(0, MAX_RESOLUTION))
            .input("bottom", Int::new(0).range(0, MAX_RESOLUTION))
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let out = mask3(a, "mask")?.f_mul_scalar(1.0)?; // a fresh tensor: the steps below write into it
        let (h, w) = (out.size()[1], out.size()[2]);
        let (l, r) = (a.i64("left")?.min(w), a.i64("right")?.min(w));
        let (t, b) = (a.i64("top")?.min(h), a.i64("bottom")?.min(h));
        // Linear ramps from each edge, exactly as ComfyUI's loops (whose right and bottom ramps start at
        // index −0, i.e. the first column or row).
        let scale = |dim: i64, index: i64, rate: f64| -> Result<(), NodeError> {
            let _ = out.f_narrow(dim, index, 1)?.f_mul_scalar_(rate)?;
            Ok(())
        };
        for x in 0..l {
            scale(2, x, (x + 1) as f64 / l as f64)?;
        }
        for x in 0..r {
            scale(2, (w - x) % w, (x + 1) as f64 / r as f64)?;
        }
        for y in 0..t {
            scale(1, y, (y + 1) as f64 / t as f64)?;
        }
        for y in 0..b {
            scale(1, (h - y) % h, (y + 1) as f64 / b as f64)?;
        }
        Ok(vec![Value::Mask(Shared(out))])
    }
}

pub struct MaskComposite;
impl Node for MaskComposite {
    fn schema(&self) -> Schema {
        Schema::new("MaskComposite", "mask")
            .input("destination", ValueType::Mask)
            .input("source", ValueType::Mask)
            .input("x", Int::new(0).range(0, MAX_RESOLUTION))
            .input("y", Int::new(0).range(0, MAX_RESOLUTION))
            .input("operation", Combo::of(&["multiply", "add", "subtract", "and", "or", "xor"]))
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let out = mask3(a, "destination")?.f_mul_scalar(1.0)?; // a fresh tensor: the steps below write into it
        let src = mask3(a, "source")?;
        let (h, w) = (out.size()[1], out.size()[2]);
        let (x, y) = (a.i64("x")?, a.i64("y")?);
        let (vw, vh) = ((w - x).min(src.size()[2]), (h - y).min(src.size()[1]));
        if vw <= 0 || vh <= 0 {
            return Ok(vec![Value::Mask(Shared(out))]);
        }
        let mut region = out.f_narrow(1, y, vh)?.f_narrow(2, x, vw)?;
        let s = src.f_narrow(1, 0, vh)?.f_narrow(2, 0, vw)?;
        let combined = match a.string("operation")? {
            "multiply" => region.f_mul(&s)?,
            "add" => region.f_add(&s)?,
            "subtract" => region.f_sub(&s)?,
            "and" => region.f_round()?.f_to_kind(Kind::Bool)?.f_logical_and(&s.f_round()?.f_to_kind(Kind::Bool)?)?.f_to_kind(Kind::Float)?,
            "or" => region.f_round()?.f_to_kind(Kind::Bool)?.f_logical_or(&s.f_round()?.f_to_kind(Kind::Bool)?)?.f_to_kind(Kind::Float)?,
            _ => region.f_round()?.f_to_kind(Kind::Bool)?.f_logical_xor(&s.f_round()?.f_to_kind(Kind::Bool)?)?.f_to_kind(Kind::Float)?,
        };
        region.f_copy_(&combined.f_expand_as(&region)?)?;
        Ok(vec![Value::Mask(Shared(out.f_clamp(0.0, 1.0)?))])
    }
}

/// ComfyUI's ThresholdMask: 1 where the mask is strictly above `value`, else 0.
pub struct ThresholdMask;
impl Node for ThresholdMask {
    fn schema(&self) -> Schema {
        Schema::new("ThresholdMask", "mask")
            .input("mask", ValueType::Mask)
            .input("value", Float::new(0.5).range(0.0, 1.0).step(0.01))
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        // The threshold is compared as float32, as torch casts the Python scalar.
        let value = a.float("value")? as f32 as f64;
        Ok(vec![Value::Mask(Shared(a.mask("mask")?.f_gt(value)?.f_to_kind(Kind::Float)?))])
    }
}

/// ComfyUI's CropMask: Python slicing, so a crop starting past the edge is empty (not an error).
pub struct CropMask;
impl Node for CropMask {
    fn schema(&self) -> Schema {
        Schema::new("CropMask", "mask")
            .input("mask", ValueType::Mask)
            .input("x", Int::new(0).range(0, MAX_RESOLUTION))
            .input("y", Int::new(0).range(0, MAX_RESOLUTION))
            .input("width", Int::new(512).range(1, MAX_RESOLUTION))
            .input("height", Int::new(512).range(1, MAX_RESOLUTION))
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let m = mask3(a, "mask")?;
        let (h, w) = (m.size()[1], m.size()[2]);
        let (x, y) = (a.i64("x")?.min(w), a.i64("y")?.min(h));
        let (x1, y1) = ((x + a.i64("width")?).min(w), (y + a.i64("height")?).min(h));
        Ok(vec![Value::Mask(Shared(m.f_narrow(1, y, y1 - y)?.f_narrow(2, x, x1 - x)?.f_contiguous()?))])
    }
}

/// ComfyUI's ImageColorToMask: 1 where the pixel's 8-bit colour (rounded half to even) is `color`
/// (0xRRGGBB).
pub struct ImageColorToMask;
impl Node for ImageColorToMask {
    fn schema(&self) -> Schema {
        Schema::new("ImageColorToMask", "mask").input("image", ValueType::Image).input("color", Int::new(0).range(0, 0xFFFFFF)).output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        if image.size()[3] < 3 {
            return Err(NodeError::input("image", "needs 3 colour channels"));
        }
        let t = image.f_clamp(0.0, 1.0)?.f_mul_scalar(255.0)?.f_round()?.f_to_kind(Kind::Int)?;
        let channel = |c: i64, shift: i64| -> Result<Tensor, NodeError> { Ok(t.f_select(3, c)?.f_bitwise_left_shift_tensor_scalar(shift)?) };
        let v = channel(0, 16)?.f_add(&channel(1, 8)?)?.f_add(&channel(2, 0)?)?;
        Ok(vec![Value::Mask(Shared(v.f_eq(a.i64("color")?)?.f_to_kind(Kind::Float)?))])
    }
}

/// ComfyUI's SplitImageWithAlpha: the first three channels, and 1 − alpha as the mask (zeros without
/// alpha).
pub struct SplitImageWithAlpha;
impl Node for SplitImageWithAlpha {
    fn schema(&self) -> Schema {
        Schema::new("SplitImageWithAlpha", "mask/compositing")
            .input("image", ValueType::Image)
            .output("IMAGE", ValueType::Image)
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let c = image.size()[3];
        let rgb = image.f_narrow(3, 0, c.min(3))?.f_contiguous()?;
        let alpha = if c > 3 { image.f_select(3, 3)? } else { image.f_select(3, 0)?.f_ones_like()? };
        Ok(vec![Value::Image(Shared(rgb)), Value::Mask(Shared(alpha.f_neg()?.f_add_scalar(1.0)?))])
    }
}

/// ComfyUI's JoinImageWithAlpha: the image's first three channels and 1 − mask (resized bilinear to the
/// image) as alpha; the batch is the smaller of the two (a single mask is not repeated, as ComfyUI).
pub struct JoinImageWithAlpha;
impl Node for JoinImageWithAlpha {
    fn schema(&self) -> Schema {
        Schema::new("JoinImageWithAlpha", "mask/compositing").input("image", ValueType::Image).input("alpha", ValueType::Mask).output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let m = mask3(a, "alpha")?;
        let s = image.size();
        let n = s[0].min(m.size()[0]);
        let alpha = m.f_unsqueeze(1)?.f_upsample_bilinear2d([s[1], s[2]], false, None, None)?.f_squeeze_dim(1)?.f_neg()?.f_add_scalar(1.0)?;
        let rgb = image.f_narrow(0, 0, n)?.f_narrow(3, 0, s[3].min(3))?;
        let out = Tensor::f_cat(&[rgb, alpha.f_narrow(0, 0, n)?.f_unsqueeze(-1)?], 3)?;
        Ok(vec![Value::Image(Shared(out))])
    }
}

/// PorterDuffImageComposite's modes, in ComfyUI's enum order.
pub const PORTER_DUFF_MODES: &[&str] = &[
    "ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN", "MULTIPLY", "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN",
    "SRC_OUT", "SRC_OVER", "XOR",
];

/// `x` `[h, w, c]` resized (bicubic, centre crop) to `w`×`h`, as ComfyUI's per-item `common_upscale`.
fn resize_hwc(x: &Tensor, w: i64, h: i64) -> Result<Tensor, NodeError> {
    let out = crate::resample::common_upscale(&x.f_unsqueeze(0)?.f_permute([0, 3, 1, 2])?, w, h, "bicubic", "center")?;
    Ok(out.f_permute([0, 2, 3, 1])?.f_squeeze_dim(0)?)
}

/// ComfyUI's `porter_duff_composite` on one item (images `[h, w, c]`, masks `[h, w, 1]`, of one size):
/// the image and the mask (1 − alpha). The formulas and their order are ComfyUI's, including its DARKEN
/// and LIGHTEN.
fn porter_duff(si: &Tensor, sa: &Tensor, di: &Tensor, da: &Tensor, mode: &str) -> (Tensor, Tensor) {
    let inv = |t: &Tensor| -t + 1.0;
    let (sa, da) = (inv(sa), inv(da));
    let (s, d) = (si * &sa, di * &da);
    let union = || &sa + &da - &sa * &da;
    let (alpha, image) = match mode {
        "ADD" => ((&sa + &da).clamp(0.0, 1.0), (&s + &d).clamp(0.0, 1.0)),
        "CLEAR" => (da.zeros_like(), d.zeros_like()),
        "DARKEN" => (union(), inv(&da) * &s + inv(&sa) * &d + s.minimum(&d)),
        "DST" => (da.shallow_clone(), d.shallow_clone()),
        "DST_ATOP" => (sa.shallow_clone(), &sa * &d + inv(&da) * &s),
        "DST_IN" => (&sa * &da, &d * &sa),
        "DST_OUT" => (inv(&sa) * &da, inv(&sa) * &d),
        "DST_OVER" => (&da + inv(&da) * &sa, &d + inv(&da) * &s),
        "LIGHTEN" => (union(), inv(&da) * &s + inv(&sa) * &d + s.maximum(&d)),
        "MULTIPLY" => (&sa * &da, &s * &d),
        "OVERLAY" => (union(), (&s * 2.0 * &d).where_self(&(&d * 2.0).lt_tensor(&da), &(&sa * &da - (&da - &s) * 2.0 * (&sa - &d)))),
        "SCREEN" => (union(), &s + &d - &s * &d),
        "SRC" => (sa.shallow_clone(), s.shallow_clone()),
        "SRC_ATOP" => (da.shallow_clone(), &da * &s + inv(&sa) * &d),
        "SRC_IN" => (&sa * &da, &s * &da),
        "SRC_OUT" => (inv(&da) * &sa, inv(&da) * &s),
        "SRC_OVER" => (&sa + inv(&sa) * &da, &s + inv(&sa) * &d),
        _ => (inv(&da) * &sa + inv(&sa) * &da, inv(&da) * &s + inv(&sa) * &d),
    };
    let image = (&image / &alpha).where_self(&alpha.gt(1e-5), &image.zeros_like()).clamp(0.0, 1.0);
    (image, inv(&alpha))
}

/// ComfyUI's PorterDuffImageComposite: per item (the smallest of the four batches; a single mask is not
/// repeated), the destination alpha, source and source alpha resized (bicubic, centre crop) to the
/// destination's size where they differ, then composited; masks are 1 − alpha, as everywhere.
pub struct PorterDuffImageComposite;
impl Node for PorterDuffImageComposite {
    fn schema(&self) -> Schema {
        Schema::new("PorterDuffImageComposite", "mask/compositing")
            .input("source", ValueType::Image)
            .input("source_alpha", ValueType::Mask)
            .input("destination", ValueType::Image)
            .input("destination_alpha", ValueType::Mask)
            .input("mode", Combo::of(PORTER_DUFF_MODES).default("DST"))
            .output("IMAGE", ValueType::Image)
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (source, destination) = (a.image("source")?, a.image("destination")?);
        let (source_alpha, destination_alpha) = (mask3(a, "source_alpha")?, mask3(a, "destination_alpha")?);
        let n = [source.size()[0], source_alpha.size()[0], destination.size()[0], destination_alpha.size()[0]].into_iter().min().unwrap_or(0);
        if n == 0 {
            return Err(NodeError::input("source", "an empty batch (ComfyUI cannot stack no images)"));
        }
        if source.size()[3] != destination.size()[3] {
            return Err(NodeError::input("source", format!("{} channels, the destination has {}", source.size()[3], destination.size()[3])));
        }
        let mode = a.string("mode")?;
        let (mut images, mut masks) = (Vec::new(), Vec::new());
        for i in 0..n {
            let di = destination.f_get(i)?;
            let (h, w) = (di.size()[0], di.size()[1]);
            let mut si = source.f_get(i)?;
            let mut sa = source_alpha.f_get(i)?.f_unsqueeze(2)?;
            let mut da = destination_alpha.f_get(i)?.f_unsqueeze(2)?;
            if da.size()[..2] != [h, w] {
                da = resize_hwc(&da, w, h)?;
            }
            if si.size() != di.size() {
                si = resize_hwc(&si, w, h)?;
            }
            if sa.size() != da.size() {
                sa = resize_hwc(&sa, w, h)?;
            }
            // Every tensor is now [h, w, 1 or c]: the operators below cannot meet a shape mismatch.
            let (image, mask) = porter_duff(&si, &sa, &di, &da, mode);
            images.push(image);
            masks.push(mask.f_squeeze_dim(2)?);
        }
        Ok(vec![Value::Image(Shared(Tensor::f_stack(&images, 0)?)), Value::Mask(Shared(Tensor::f_stack(&masks, 0)?))])
    }
}
