//! ComfyUI's `image` category: loading, saving, previewing, scaling, inverting, blending, cropping.

use std::path::Path;

use diffloom_core::value::Shared;
use diffloom_core::{Args, Combo, Ctx, Float, Int, Locator, Node, NodeError, Schema, Str, Value, ValueType};
use tch::{Kind, Tensor};

use super::shared::{choice_index, mask_nchw, MAX_RESOLUTION};
use crate::imageio;
use crate::models::rrdbnet::RrdbNet;
use crate::resample::{common_upscale, CROP_METHODS, IMAGE_METHODS};
use crate::tiles::tiled_scale;

/// Hash of a file's bytes, so that editing an input file re-runs the node and touching it does not.
pub(crate) fn file_token(files: &Locator, input: &str, literals: &Args) -> Result<Option<String>, NodeError> {
    let Some(Value::String(name)) = literals.get(input) else { return Ok(None) };
    let path = files.image(input, name)?;
    Ok(Some(blake3::hash(&imageio::read(&path)?).to_hex().to_string()))
}

fn nchw(image: &Tensor) -> Result<Tensor, NodeError> {
    Ok(image.f_permute([0, 3, 1, 2])?)
}

fn nhwc(x: &Tensor) -> Result<Tensor, NodeError> {
    Ok(x.f_permute([0, 2, 3, 1])?.f_contiguous()?)
}

pub struct LoadImage;
impl Node for LoadImage {
    fn schema(&self) -> Schema {
        Schema::new("LoadImage", "image")
            .describe("Loads a PNG, JPEG or WebP file. MASK is 1 - alpha (64×64 zeros without alpha), as ComfyUI.")
            .input("image", Str::required())
            .doc("file name in the input directory (subfolders and ComfyUI's `[input]`/`[output]` annotations allowed), or a path")
            .output("IMAGE", ValueType::Image)
            .output("MASK", ValueType::Mask)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_token(files, "image", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        load_image_and_mask(&cx.files.image("image", a.string("image")?)?)
    }
}

/// LoadImage's outputs for the file at `path`.
fn load_image_and_mask(path: &Path) -> Result<Vec<Value>, NodeError> {
    let img = imageio::load(path)?;
    let mask = match img.alpha {
        Some(alpha) => alpha.f_neg()?.f_add_scalar(1.0)?,
        None => Tensor::f_zeros([1, 64, 64], (Kind::Float, tch::Device::Cpu))?,
    };
    Ok(vec![Value::Image(Shared(img.rgb)), Value::Mask(Shared(mask))])
}

/// A LoadImageOutput name as ComfyUI's frontend sends it: `[output]` added unless annotated already.
fn in_output(name: &str) -> String {
    let n = name.trim_end();
    if [" [output]", " [input]", " [temp]"].iter().any(|a| n.ends_with(a)) {
        name.to_owned()
    } else {
        format!("{n} [output]")
    }
}

/// ComfyUI's LoadImageOutput: LoadImage reading from the output directory. ComfyUI's frontend lists the
/// output folder and sends `name [output]`; here a name without an annotation is looked up there too
/// (`[input]`/`[temp]` still pick their folder).
pub struct LoadImageOutput;
impl Node for LoadImageOutput {
    fn schema(&self) -> Schema {
        Schema::new("LoadImageOutput", "image")
            .describe("Loads an image from the output folder (as LoadImage: MASK is 1 - alpha, 64×64 zeros without alpha).")
            .input("image", Str::required())
            .doc("file name in the output directory (subfolders allowed; `[input]`/`[temp]` annotations pick those folders)")
            .output("IMAGE", ValueType::Image)
            .output("MASK", ValueType::Mask)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        let Some(Value::String(name)) = literals.get("image") else { return Ok(None) };
        let path = files.image("image", &in_output(name))?;
        Ok(Some(blake3::hash(&imageio::read(&path)?).to_hex().to_string()))
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        load_image_and_mask(&cx.files.image("image", &in_output(a.string("image")?))?)
    }
}

pub struct LoadImageMask;
impl Node for LoadImageMask {
    fn schema(&self) -> Schema {
        Schema::new("LoadImageMask", "mask")
            .describe("Loads one channel of an image file as a MASK (alpha is inverted, as ComfyUI).")
            .input("image", Str::required())
            .input("channel", Combo::of(&["alpha", "red", "green", "blue"]))
            .output("MASK", ValueType::Mask)
    }
    fn change_token(&self, files: &Locator, literals: &Args) -> Result<Option<String>, NodeError> {
        file_token(files, "image", literals)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let img = imageio::load(&cx.files.image("image", a.string("image")?)?)?;
        let mask = match (a.string("channel")?, img.alpha) {
            ("alpha", Some(alpha)) => alpha.f_neg()?.f_add_scalar(1.0)?,
            ("alpha", None) => Tensor::f_zeros([1, 64, 64], (Kind::Float, tch::Device::Cpu))?,
            (_, _) => img.rgb.f_select(3, choice_index(a, "channel", &["red", "green", "blue"])?)?.f_contiguous()?,
        };
        Ok(vec![Value::Mask(Shared(mask))])
    }
}

/// Saves every image of the batch into `dir` (with the graph embedded when `with_texts`), reporting each
/// path, and lists them as ComfyUI's UI does (`{filename, subfolder, type}`, `kind` being "output" or
/// "temp").
pub(crate) fn save_batch(cx: &mut Ctx, images: &Tensor, dir: &Path, prefix: &str, kind: &str, with_texts: bool) -> Result<(), NodeError> {
    imageio::check_confined(cx, dir, prefix)?;
    let mut shown = Vec::new();
    for i in 0..images.size()[0] {
        cx.check_cancel()?;
        let rgb = imageio::to_rgb8(&images.f_get(i)?)?;
        let texts = if with_texts { (cx.image_texts)(rgb.width(), rgb.height()) } else { Vec::new() };
        let path = imageio::save_png(dir, prefix, &rgb, &texts)?;
        cx.messages.push(format!("wrote {}", path.display()));
        let rel = path.strip_prefix(dir).unwrap_or(&path);
        let subfolder = rel.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let filename = rel.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        shown.push(serde_json::json!({"filename": filename, "subfolder": subfolder, "type": kind}));
    }
    cx.ui.insert("images".to_owned(), serde_json::Value::Array(shown));
    Ok(())
}

pub struct SaveImage;
impl Node for SaveImage {
    fn schema(&self) -> Schema {
        Schema::new("SaveImage", "image")
            .describe(
                "Saves images as numbered PNGs (<prefix>_00001_.png, …) in the output directory, with the graph \
                       embedded; never overwrites a file.",
            )
            .input("images", ValueType::Image)
            .input("filename_prefix", Str::new("diffloom"))
            .doc("file name prefix; may contain subfolders")
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let dir = cx.output_dir.to_path_buf();
        save_batch(cx, a.image("images")?, &dir, a.string("filename_prefix")?, "output", true)?;
        Ok(vec![])
    }
}

pub struct PreviewImage;
impl Node for PreviewImage {
    fn schema(&self) -> Schema {
        Schema::new("PreviewImage", "image")
            .describe("Writes images to the temporary folder (diffloom-preview in the system temp directory unless set) to look at.")
            .input("images", ValueType::Image)
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let dir = cx.files.folders.temp_dir.clone();
        save_batch(cx, a.image("images")?, &dir, "preview", "temp", true)?;
        Ok(vec![])
    }
}

/// ComfyUI's ImageScale: 0 for one side keeps the aspect ratio, 0 for both leaves the image as is.
pub struct ImageScale;
impl Node for ImageScale {
    fn schema(&self) -> Schema {
        Schema::new("ImageScale", "image/upscaling")
            .input("image", ValueType::Image)
            .input("upscale_method", Combo::of(IMAGE_METHODS))
            .input("width", Int::new(512).range(0, MAX_RESOLUTION))
            .input("height", Int::new(512).range(0, MAX_RESOLUTION))
            .input("crop", Combo::of(CROP_METHODS))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let (mut width, mut height) = (a.i64("width")?, a.i64("height")?);
        if width == 0 && height == 0 {
            return Ok(vec![Value::Image(image.clone())]);
        }
        let size = image.size();
        let (h, w) = (size[1] as f64, size[2] as f64);
        if width == 0 {
            width = ((w * height as f64 / h).round_ties_even() as i64).max(1);
        } else if height == 0 {
            height = ((h * width as f64 / w).round_ties_even() as i64).max(1);
        }
        let out = common_upscale(&nchw(image)?, width, height, a.string("upscale_method")?, a.string("crop")?)?;
        Ok(vec![Value::Image(Shared(nhwc(&out)?))])
    }
}

pub struct ImageScaleBy;
impl Node for ImageScaleBy {
    fn schema(&self) -> Schema {
        Schema::new("ImageScaleBy", "image/upscaling")
            .input("image", ValueType::Image)
            .input("upscale_method", Combo::of(IMAGE_METHODS))
            .input("scale_by", Float::new(1.0).range(0.01, 8.0))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let scale = a.float("scale_by")?;
        let size = image.size();
        let width = ((size[2] as f64 * scale).round_ties_even() as i64).max(1);
        let height = ((size[1] as f64 * scale).round_ties_even() as i64).max(1);
        let out = common_upscale(&nchw(image)?, width, height, a.string("upscale_method")?, "disabled")?;
        Ok(vec![Value::Image(Shared(nhwc(&out)?))])
    }
}

/// ComfyUI's ImageUpscaleWithModel: the model runs on 512×512 tiles overlapping by 32 pixels, each
/// clamped to 0..1, blended with feathered edges (`tiled_scale`), so memory is bounded by the tile, not
/// the image; when a tile does not fit in memory the tile side is halved, down to 128.
pub struct ImageUpscaleWithModel;
impl Node for ImageUpscaleWithModel {
    fn schema(&self) -> Schema {
        Schema::new("ImageUpscaleWithModel", "image/upscaling")
            .input("upscale_model", ValueType::UpscaleModel)
            .input("image", ValueType::Image)
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let model: &RrdbNet = a.handle("upscale_model")?;
        let image = a.image("image")?;
        let out = upscale_tiled(model, &nchw(image)?, cx, 512, 32)?;
        Ok(vec![Value::Image(Shared(nhwc(&out.f_clamp(0.0, 1.0)?)?))])
    }
}

/// `x` `[b, c, h, w]` upscaled by `model` in `tile`-sized tiles (halved on allocation failure).
pub fn upscale_tiled(model: &RrdbNet, x: &Tensor, cx: &Ctx, mut tile: i64, overlap: i64) -> Result<Tensor, NodeError> {
    let c = x.size()[1];
    if c != model.config.in_nc {
        return Err(NodeError::input("image", format!("the image has {c} channels; this upscaler takes {}", model.config.in_nc)));
    }
    let scale = model.config.scale();
    let device = model.device();
    loop {
        let mut run = |t: &Tensor| -> Result<Tensor, NodeError> {
            cx.check_cancel()?;
            Ok(model.upscale(&t.to_device(device)).to_device(tch::Device::Cpu))
        };
        let attempt =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tiled_scale(x, &mut run, tile, tile, overlap, scale as f64, model.config.out_nc)));
        match attempt {
            Ok(result) => return result,
            Err(panic) => {
                let message = diffloom_core::exec::run::panic_message(&panic);
                let out_of_memory = message.contains("out of memory") || message.contains("can't allocate memory");
                if !out_of_memory || tile / 2 < 128 {
                    return Err(NodeError::Failed(format!("upscaling with {tile}×{tile} tiles: {message}")));
                }
                tile /= 2;
            }
        }
    }
}

pub struct ImageInvert;
impl Node for ImageInvert {
    fn schema(&self) -> Schema {
        Schema::new("ImageInvert", "image").input("image", ValueType::Image).output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![Value::Image(Shared(a.image("image")?.f_neg()?.f_add_scalar(1.0)?))])
    }
}

/// ComfyUI's ImageBlend (comfy_extras/nodes_post_processing.py): image2 is resized (bicubic, centre
/// crop) to image1's size when they differ, blended by mode, mixed by `blend_factor`, clamped to 0..1.
pub struct ImageBlend;
impl Node for ImageBlend {
    fn schema(&self) -> Schema {
        Schema::new("ImageBlend", "image/postprocessing")
            .input("image1", ValueType::Image)
            .input("image2", ValueType::Image)
            .input("blend_factor", Float::new(0.5).range(0.0, 1.0))
            .input("blend_mode", Combo::of(&["normal", "multiply", "screen", "overlay", "soft_light", "difference"]))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (img1, img2) = (a.image("image1")?, a.image("image2")?);
        let (s1, s2) = (img1.size(), img2.size());
        if s1[0] != s2[0] && s1[0] != 1 && s2[0] != 1 {
            return Err(NodeError::input("image2", format!("batch of {} images does not match image1's batch of {} (one of them may be 1)", s2[0], s1[0])));
        }
        let img2 = if s1[1..] != s2[1..] { nhwc(&common_upscale(&nchw(img2)?, s1[2], s1[1], "bicubic", "center")?)? } else { img2.shallow_clone() };
        let f = a.float("blend_factor")?;
        let blended = blend(img1, &img2, a.string("blend_mode")?)?;
        let out = img1.f_mul_scalar(1.0 - f)?.f_add(&blended.f_mul_scalar(f)?)?.f_clamp(0.0, 1.0)?;
        Ok(vec![Value::Image(Shared(out))])
    }
}

fn blend(a: &Tensor, b: &Tensor, mode: &str) -> Result<Tensor, NodeError> {
    let one = |t: &Tensor| -> Result<Tensor, NodeError> { Ok(t.f_neg()?.f_add_scalar(1.0)?) };
    Ok(match mode {
        "normal" => b.shallow_clone(),
        "multiply" => a.f_mul(b)?,
        "screen" => one(&one(a)?.f_mul(&one(b)?)?)?,
        "overlay" => {
            let low = a.f_mul(b)?.f_mul_scalar(2.0)?;
            let high = one(&one(a)?.f_mul(&one(b)?)?.f_mul_scalar(2.0)?)?;
            low.f_where_self(&a.f_le(0.5)?, &high)?
        }
        "soft_light" => {
            // g(x) = ((16x - 12)x + 4)x for x <= 0.25, else sqrt(x)
            let poly = a.f_mul_scalar(16.0)?.f_sub_scalar(12.0)?.f_mul(a)?.f_add_scalar(4.0)?.f_mul(a)?;
            let g = poly.f_where_self(&a.f_le(0.25)?, &a.f_sqrt()?)?;
            let low = a.f_sub(&one(&b.f_mul_scalar(2.0)?)?.f_mul(a)?.f_mul(&one(a)?)?)?;
            let high = a.f_add(&b.f_mul_scalar(2.0)?.f_sub_scalar(1.0)?.f_mul(&g.f_sub(a)?)?)?;
            low.f_where_self(&b.f_le(0.5)?, &high)?
        }
        "difference" => a.f_sub(b)?,
        other => return Err(NodeError::Failed(format!("unknown blend mode {other:?}"))),
    })
}

/// ComfyUI's ImageCrop: x and y are clamped inside the image; the crop is cut off at its edges.
pub struct ImageCrop;
impl Node for ImageCrop {
    fn schema(&self) -> Schema {
        Schema::new("ImageCrop", "image/transform")
            .input("image", ValueType::Image)
            .input("width", Int::new(512).range(1, MAX_RESOLUTION))
            .input("height", Int::new(512).range(1, MAX_RESOLUTION))
            .input("x", Int::new(0).range(0, MAX_RESOLUTION))
            .input("y", Int::new(0).range(0, MAX_RESOLUTION))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let size = image.size();
        let (h, w) = (size[1], size[2]);
        let x = a.i64("x")?.min(w - 1);
        let y = a.i64("y")?.min(h - 1);
        let width = a.i64("width")?.min(w - x);
        let height = a.i64("height")?.min(h - y);
        let out = image.f_narrow(1, y, height)?.f_narrow(2, x, width)?.f_contiguous()?;
        Ok(vec![Value::Image(Shared(out))])
    }
}

/// ComfyUI's ImagePadForOutpaint: grey (0.5) borders around the image, and a mask that is 1 on the
/// borders and fades in over `feathering` pixels inside the image edges that were padded.
pub struct ImagePadForOutpaint;
impl Node for ImagePadForOutpaint {
    fn schema(&self) -> Schema {
        Schema::new("ImagePadForOutpaint", "image")
            .input("image", ValueType::Image)
            .input("left", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .input("top", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .input("right", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .input("bottom", Int::new(0).range(0, MAX_RESOLUTION).step(8))
            .input("feathering", Int::new(40).range(0, MAX_RESOLUTION))
            .output("IMAGE", ValueType::Image)
            .output("MASK", ValueType::Mask)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let s = image.size();
        let (h, w) = (s[1], s[2]);
        let (l, t, r, b, f) = (a.i64("left")?, a.i64("top")?, a.i64("right")?, a.i64("bottom")?, a.i64("feathering")?);
        let opts = (Kind::Float, tch::Device::Cpu);
        let padded = image.f_permute([0, 3, 1, 2])?.f_pad([l, r, t, b], "constant", 0.5)?.f_permute([0, 2, 3, 1])?.f_contiguous()?;
        // Distance to the nearest padded edge (an unpadded side counts as far away), as ComfyUI's loops.
        let inside = if f > 0 && f * 2 < h && f * 2 < w {
            let i = Tensor::f_arange(h, opts)?.f_unsqueeze(1)?.f_expand([h, w], false)?;
            let j = Tensor::f_arange(w, opts)?.f_unsqueeze(0)?.f_expand([h, w], false)?;
            let far_h = Tensor::f_full([h, w], h as f64, opts)?;
            let far_w = Tensor::f_full([h, w], w as f64, opts)?;
            let dt = if t != 0 { i.shallow_clone() } else { far_h.shallow_clone() };
            let db = if b != 0 { i.f_neg()?.f_add_scalar(h as f64)? } else { far_h };
            let dl = if l != 0 { j.shallow_clone() } else { far_w.shallow_clone() };
            let dr = if r != 0 { j.f_neg()?.f_add_scalar(w as f64)? } else { far_w };
            let d = dt.f_minimum(&db)?.f_minimum(&dl)?.f_minimum(&dr)?;
            let v = d.f_neg()?.f_add_scalar(f as f64)?.f_div_scalar(f as f64)?.f_clamp_min(0.0)?;
            v.f_mul(&v)?
        } else {
            Tensor::f_zeros([h, w], opts)?
        };
        let mask = inside.f_pad([l, r, t, b], "constant", 1.0)?.f_unsqueeze(0)?;
        Ok(vec![Value::Image(Shared(padded)), Value::Mask(Shared(mask))])
    }
}

/// ComfyUI's ImageCompositeMasked: `source` pasted onto `destination` at (x, y), through `mask` (1 =
/// source) when given, the source optionally resized to the destination first.
pub struct ImageCompositeMasked;
impl Node for ImageCompositeMasked {
    fn schema(&self) -> Schema {
        Schema::new("ImageCompositeMasked", "image")
            .input("destination", ValueType::Image)
            .input("source", ValueType::Image)
            .input("x", Int::new(0).range(0, MAX_RESOLUTION))
            .input("y", Int::new(0).range(0, MAX_RESOLUTION))
            .input("resize_source", diffloom_core::Bool(false))
            .optional("mask", ValueType::Mask)
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let dest = nchw(a.image("destination")?)?.f_mul_scalar(1.0)?;
        let mut src = nchw(a.image("source")?)?;
        let (ds, b) = (dest.size(), dest.size()[0]);
        if a.boolean("resize_source")? {
            src = src.f_upsample_bilinear2d([ds[2], ds[3]], false, None, None)?;
        }
        let sb = src.size()[0];
        if sb != b && sb != 1 {
            return Err(NodeError::input("source", format!("a batch of {sb} images does not fit the destination's {b}")));
        }
        let src = if sb == 1 && b > 1 { src.f_repeat([b, 1, 1, 1])? } else { src };
        let (sh, sw) = (src.size()[2], src.size()[3]);
        let (x, y) = (a.i64("x")?.min(ds[3]), a.i64("y")?.min(ds[2]));
        let mask = match a.opt_mask("mask")? {
            Some(m) => {
                let m = mask_nchw(m, b)?.f_upsample_bilinear2d([sh, sw], false, None, None)?;
                if m.size()[0] == 1 {
                    m.f_repeat([b, 1, 1, 1])?
                } else {
                    m
                }
            }
            None => Tensor::f_ones([b, 1, sh, sw], (Kind::Float, tch::Device::Cpu))?,
        };
        let (vw, vh) = ((ds[3] - x).min(sw), (ds[2] - y).min(sh));
        if vw > 0 && vh > 0 {
            let m = mask.f_narrow(2, 0, vh)?.f_narrow(3, 0, vw)?;
            let mut region = dest.f_narrow(2, y, vh)?.f_narrow(3, x, vw)?;
            let mixed = src.f_narrow(2, 0, vh)?.f_narrow(3, 0, vw)?.f_mul(&m)?.f_add(&region.f_mul(&m.f_neg()?.f_add_scalar(1.0)?)?)?;
            region.f_copy_(&mixed)?;
        }
        Ok(vec![Value::Image(Shared(nhwc(&dest)?))])
    }
}

fn image_out(t: Tensor) -> Result<Vec<Value>, NodeError> {
    Ok(vec![Value::Image(Shared(t))])
}

/// ComfyUI's GetImageSize: width, height and batch size (also shown in the run report, as ComfyUI's
/// progress text).
pub struct GetImageSize;
impl Node for GetImageSize {
    fn schema(&self) -> Schema {
        Schema::new("GetImageSize", "image")
            .input("image", ValueType::Image)
            .output("width", ValueType::Int)
            .output("height", ValueType::Int)
            .output("batch_size", ValueType::Int)
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = a.image("image")?.size();
        if s.len() < 3 {
            return Err(NodeError::input("image", format!("an image of shape {s:?} has no width and height")));
        }
        let (w, h, b) = (s[2], s[1], s[0]);
        cx.messages.push(format!("width: {w}, height: {h}\n batch size: {b}"));
        Ok([w, h, b].iter().map(|v| Value::Int(*v as i128)).collect())
    }
}

/// ComfyUI's EmptyImage: a solid colour given as 0xRRGGBB.
pub struct EmptyImage;
impl Node for EmptyImage {
    fn schema(&self) -> Schema {
        Schema::new("EmptyImage", "image")
            .input("width", Int::new(512).range(1, MAX_RESOLUTION))
            .input("height", Int::new(512).range(1, MAX_RESOLUTION))
            .input("batch_size", Int::new(1).range(1, 4096))
            .input("color", Int::new(0).range(0, 0xFFFFFF))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (w, h, b, color) = (a.i64("width")?, a.i64("height")?, a.i64("batch_size")?, a.i64("color")?);
        let planes = [16, 8, 0]
            .iter()
            .map(|shift| Tensor::f_full([b, h, w, 1], ((color >> shift) & 0xFF) as f64 / 255.0, (Kind::Float, tch::Device::Cpu)))
            .collect::<Result<Vec<_>, _>>()?;
        image_out(Tensor::f_cat(&planes, -1)?)
    }
}

/// ComfyUI's ImageFlip: "x-axis" turns the image upside down, "y-axis" mirrors it left to right.
pub struct ImageFlip;
impl Node for ImageFlip {
    fn schema(&self) -> Schema {
        Schema::new("ImageFlip", "image/transform")
            .input("image", ValueType::Image)
            .input("flip_method", Combo::of(super::latent::FLIPS))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let dim = if a.string("flip_method")?.starts_with('x') { 1 } else { 2 };
        image_out(a.image("image")?.f_flip([dim])?)
    }
}

/// ComfyUI's ImageRotate: clockwise quarter turns.
pub struct ImageRotate;
impl Node for ImageRotate {
    fn schema(&self) -> Schema {
        Schema::new("ImageRotate", "image/transform")
            .input("image", ValueType::Image)
            .input("rotation", Combo::of(super::latent::ROTATIONS))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let k = choice_index(a, "rotation", super::latent::ROTATIONS)?;
        image_out(a.image("image")?.f_rot90(k, [2, 1])?.f_contiguous()?)
    }
}

/// ComfyUI's ImageBatch (deprecated there): image2 appended to image1. When the channels differ by one,
/// the image with fewer gets a channel of 1.0 (alpha); when the sizes differ, image2 is resized
/// (bilinear, centre crop) to image1's.
pub struct ImageBatch;
impl Node for ImageBatch {
    fn schema(&self) -> Schema {
        Schema::new("ImageBatch", "image").input("image1", ValueType::Image).input("image2", ValueType::Image).output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (mut i1, mut i2) = (a.image("image1")?.shallow_clone(), a.image("image2")?.shallow_clone());
        let (c1, c2) = (i1.size()[3], i2.size()[3]);
        if c1 > c2 {
            i2 = i2.f_pad([0, 1], "constant", 1.0)?;
        } else if c2 > c1 {
            i1 = i1.f_pad([0, 1], "constant", 1.0)?;
        }
        let s1 = i1.size();
        if s1[1..] != i2.size()[1..] {
            i2 = nhwc(&common_upscale(&nchw(&i2)?, s1[2], s1[1], "bilinear", "center")?)?;
        }
        let out = Tensor::f_cat(&[i1, i2], 0).map_err(|e| NodeError::input("image2", format!("cannot join image1's batch: {e}")))?;
        image_out(out)
    }
}

pub struct RepeatImageBatch;
impl Node for RepeatImageBatch {
    fn schema(&self) -> Schema {
        Schema::new("RepeatImageBatch", "image/batch")
            .input("image", ValueType::Image)
            .input("amount", Int::new(1).range(1, 4096))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        image_out(a.image("image")?.f_repeat([a.i64("amount")?, 1, 1, 1])?)
    }
}

/// ComfyUI's ImageFromBatch: items `batch_index .. batch_index + length`, clamped to the batch.
pub struct ImageFromBatch;
impl Node for ImageFromBatch {
    fn schema(&self) -> Schema {
        Schema::new("ImageFromBatch", "image/batch")
            .input("image", ValueType::Image)
            .input("batch_index", Int::new(0).range(0, 4095))
            .input("length", Int::new(1).range(1, 4096))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let b = image.size()[0];
        let start = a.i64("batch_index")?.min(b - 1).max(0);
        let len = a.i64("length")?.min(b - start);
        image_out(image.f_narrow(0, start, len)?.f_contiguous()?)
    }
}

/// ComfyUI's ImageAddNoise: `clamp(image + strength * randn, 0, 1)`, the noise drawn as
/// `torch.manual_seed(seed); torch.randn(image.shape)` on the CPU.
pub struct ImageAddNoise;
impl Node for ImageAddNoise {
    fn schema(&self) -> Schema {
        Schema::new("ImageAddNoise", "image")
            .input("image", ValueType::Image)
            .input("seed", super::shared::seed())
            .input("strength", Float::new(0.5).range(0.0, 1.0).step(0.01))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let noise = diffloom_aten::Generator::cpu(crate::sampling::noise::seed_bits(a.int("seed")?)).randn_f32(&image.size());
        image_out(image.f_add(&noise.f_mul_scalar(a.float("strength")?)?)?.f_clamp(0.0, 1.0)?)
    }
}

/// ComfyUI's ImageScaleToTotalPixels: resized to about `megapixels` × 2^20 pixels, keeping the aspect
/// ratio, each side rounded to a multiple of `resolution_steps`.
pub struct ImageScaleToTotalPixels;
impl Node for ImageScaleToTotalPixels {
    fn schema(&self) -> Schema {
        Schema::new("ImageScaleToTotalPixels", "image/upscaling")
            .input("image", ValueType::Image)
            .input("upscale_method", Combo::of(IMAGE_METHODS))
            .input("megapixels", Float::new(1.0).range(0.01, 16.0).step(0.01))
            .input("resolution_steps", Int::new(1).range(1, 256))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let s = image.size();
        let (w, h) = (s[2] as f64, s[1] as f64);
        let steps = a.i64("resolution_steps")? as f64;
        let scale = (a.float("megapixels")? * 1024.0 * 1024.0 / (w * h)).sqrt();
        let width = ((w * scale / steps).round_ties_even() * steps) as i64;
        let height = ((h * scale / steps).round_ties_even() * steps) as i64;
        if width < 1 || height < 1 {
            return Err(NodeError::input("resolution_steps", format!("the image would be {width}×{height} pixels")));
        }
        image_out(nhwc(&common_upscale(&nchw(image)?, width, height, a.string("upscale_method")?, "disabled")?)?)
    }
}

/// ComfyUI's `gaussian_kernel`: a `size`×`size` Gaussian over the grid [-1, 1]² (sigma is relative to that
/// grid, not to pixels), normalised to sum 1; built with the same torch ops as ComfyUI.
fn gaussian_kernel(size: i64, sigma: f64) -> Result<Tensor, NodeError> {
    let line = Tensor::f_linspace(-1.0, 1.0, size, (Kind::Float, tch::Device::Cpu))?;
    let grid = Tensor::f_meshgrid_indexing(&[&line, &line], "ij")?;
    let (x, y) = (&grid[0], &grid[1]);
    let d = x.f_mul(x)?.f_add(&y.f_mul(y)?)?.f_sqrt()?;
    let g = d.f_mul(&d)?.f_neg()?.f_div_scalar(2.0 * sigma * sigma)?.f_exp()?;
    Ok(g.f_div(&g.f_sum(Kind::Float)?)?)
}

/// A depthwise convolution of the image with `kernel` over its reflect-padded borders, as ComfyUI's
/// ImageBlur and ImageSharpen (an error naming `radius_input` when the radius reaches the image size).
fn filter(image: &Tensor, kernel: &Tensor, r: i64, radius_input: &str) -> Result<Tensor, NodeError> {
    let s = image.size();
    if r >= s[1] || r >= s[2] {
        return Err(NodeError::input(radius_input, format!("{r} must be smaller than the image's {}×{} pixels (reflect padding)", s[2], s[1])));
    }
    let c = s[3];
    let k = kernel.f_repeat([c, 1, 1])?.f_unsqueeze(1)?;
    let size = 2 * r + 1;
    let padded = nchw(image)?.f_pad([r, r, r, r], "reflect", None)?;
    let out = padded.f_conv2d(&k, None::<Tensor>, [1, 1], [size / 2, size / 2], [1, 1], c)?;
    let (h, w) = (out.size()[2], out.size()[3]);
    nhwc(&out.f_narrow(2, r, h - 2 * r)?.f_narrow(3, r, w - 2 * r)?)
}

/// ComfyUI's ImageBlur: a Gaussian blur (not clamped).
pub struct ImageBlur;
impl Node for ImageBlur {
    fn schema(&self) -> Schema {
        Schema::new("ImageBlur", "image/postprocessing")
            .input("image", ValueType::Image)
            .input("blur_radius", Int::new(1).range(1, 31))
            .input("sigma", Float::new(1.0).range(0.1, 10.0).step(0.1))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let r = a.i64("blur_radius")?;
        let kernel = gaussian_kernel(2 * r + 1, a.float("sigma")?)?;
        image_out(filter(a.image("image")?, &kernel, r, "blur_radius")?)
    }
}

/// ComfyUI's ImageSharpen: the image minus `alpha` × 10 × its Gaussian blur, renormalised (the kernel
/// sums to 1), clamped to 0..1.
pub struct ImageSharpen;
impl Node for ImageSharpen {
    fn schema(&self) -> Schema {
        Schema::new("ImageSharpen", "image/postprocessing")
            .input("image", ValueType::Image)
            .input("sharpen_radius", Int::new(1).range(1, 31))
            .input("sigma", Float::new(1.0).range(0.1, 10.0).step(0.01))
            .input("alpha", Float::new(1.0).range(0.0, 5.0).step(0.01))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let r = a.i64("sharpen_radius")?;
        let kernel = gaussian_kernel(2 * r + 1, a.float("sigma")?)?.f_mul_scalar(-(a.float("alpha")? * 10.0))?;
        let mut centre = kernel.f_select(0, r)?.f_select(0, r)?;
        let value = centre.f_sub(&kernel.f_sum(Kind::Float)?)?.f_add_scalar(1.0)?;
        centre.f_copy_(&value)?;
        image_out(filter(a.image("image")?, &kernel, r, "sharpen_radius")?.f_clamp(0.0, 1.0)?)
    }
}

/// ComfyUI's ResizeAndPadImage: scaled to fit `target_width`×`target_height` keeping the aspect ratio
/// (sizes truncated, as Python's `int`), centred on a white or black canvas (every channel, alpha too).
pub struct ResizeAndPadImage;
impl Node for ResizeAndPadImage {
    fn schema(&self) -> Schema {
        Schema::new("ResizeAndPadImage", "image/transform")
            .input("image", ValueType::Image)
            .input("target_width", Int::new(512).range(1, MAX_RESOLUTION).step(1))
            .input("target_height", Int::new(512).range(1, MAX_RESOLUTION).step(1))
            .input("padding_color", Combo::of(&["white", "black"]))
            .input("interpolation", Combo::of(&["area", "bicubic", "nearest-exact", "bilinear", "lanczos"]))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let s = image.size();
        let (b, h, w, c) = (s[0], s[1], s[2], s[3]);
        let (tw, th) = (a.i64("target_width")?, a.i64("target_height")?);
        if tw < 1 || th < 1 {
            return Err(NodeError::input(if tw < 1 { "target_width" } else { "target_height" }, "must be at least 1"));
        }
        let scale = (tw as f64 / w as f64).min(th as f64 / h as f64);
        let (nw, nh) = ((w as f64 * scale) as i64, (h as f64 * scale) as i64);
        let pad = if a.string("padding_color")? == "black" { 0.0 } else { 1.0 };
        let padded = Tensor::f_full([b, c, th, tw], pad, (image.kind(), image.device()))?;
        // A side truncated to 0 pixels leaves the canvas alone (ComfyUI's "area" does; its other methods raise).
        if nw > 0 && nh > 0 {
            let resized = common_upscale(&nchw(image)?, nw, nh, a.string("interpolation")?, "disabled")?;
            padded.f_narrow(2, (th - nh) / 2, nh)?.f_narrow(3, (tw - nw) / 2, nw)?.f_copy_(&resized)?;
        }
        image_out(nhwc(&padded)?)
    }
}

/// ComfyUI's ImageScaleToMaxDimension: the longer side resized to `largest_size`, the other keeping the
/// aspect ratio (Python's round). Its method list has "bilinear" twice, kept as ComfyUI lists it.
pub struct ImageScaleToMaxDimension;
impl Node for ImageScaleToMaxDimension {
    fn schema(&self) -> Schema {
        Schema::new("ImageScaleToMaxDimension", "image/upscaling")
            .input("image", ValueType::Image)
            .input("upscale_method", Combo::of(&["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]))
            .input("largest_size", Int::new(512).range(0, MAX_RESOLUTION).step(1))
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image = a.image("image")?;
        let s = image.size();
        let (h, w) = (s[1], s[2]);
        let largest = a.i64("largest_size")?;
        let (width, height) = if h > w {
            (((w as f64 / h as f64) * largest as f64).round_ties_even() as i64, largest)
        } else if w > h {
            (largest, ((h as f64 / w as f64) * largest as f64).round_ties_even() as i64)
        } else {
            (largest, largest)
        };
        if width < 1 || height < 1 {
            return Err(NodeError::input("largest_size", format!("the {w}×{h} image would be {width}×{height} pixels")));
        }
        image_out(nhwc(&common_upscale(&nchw(image)?, width, height, a.string("upscale_method")?, "disabled")?)?)
    }
}

/// `image` `[b, …]` with its last item repeated up to `batch` items.
fn repeat_last(image: &Tensor, batch: i64) -> Result<Tensor, NodeError> {
    let b = image.size()[0];
    if b >= batch {
        return Ok(image.shallow_clone());
    }
    let last = image.f_narrow(0, b - 1, 1)?.f_repeat([batch - b, 1, 1, 1])?;
    Ok(Tensor::f_cat(&[image, &last], 0)?)
}

/// `image` padded with `value` along `dim` (1 = height, 2 = width) to `target`, half before (rounded
/// down) and the rest after.
fn pad_centred(image: &Tensor, dim: i64, target: i64, value: f64) -> Result<Tensor, NodeError> {
    let d = target - image.size()[dim as usize];
    if d <= 0 {
        return Ok(image.shallow_clone());
    }
    let (before, after) = (d / 2, d - d / 2);
    let pad = if dim == 1 { [0, 0, 0, 0, before, after] } else { [0, 0, before, after, 0, 0] };
    Ok(image.f_pad(pad, "constant", Some(value))?)
}

/// `image` with channels of ones appended up to `channels`.
fn pad_channels(image: &Tensor, channels: i64) -> Result<Tensor, NodeError> {
    let s = image.size();
    if s[3] >= channels {
        return Ok(image.shallow_clone());
    }
    let ones = Tensor::f_ones([s[0], s[1], s[2], channels - s[3]], (image.kind(), image.device()))?;
    Ok(Tensor::f_cat(&[image, &ones], 3)?)
}

/// ComfyUI's ImageStitch: image2 beside image1 (right, down, left or up), optionally resized to match
/// image1's height (left/right) or width (up/down) with lanczos, or else the smaller one padded (centred)
/// with the spacing colour (black for red/green/blue); batches padded by repeating their last image,
/// channels by ones; an optional spacing strip (odd widths made even).
pub struct ImageStitch;
impl Node for ImageStitch {
    fn schema(&self) -> Schema {
        Schema::new("ImageStitch", "image/transform")
            .describe("Stitches image2 to image1 in the given direction (image1 unchanged without image2), with optional spacing between them.")
            .input("image1", ValueType::Image)
            .input("direction", Combo::of(&["right", "down", "left", "up"]))
            .input("match_image_size", diffloom_core::Bool(true))
            .input("spacing_width", Int::new(0).range(0, 1024).step(2))
            .input("spacing_color", Combo::of(&["white", "black", "red", "green", "blue"]))
            .optional("image2", ValueType::Image)
            .output("IMAGE", ValueType::Image)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let image1 = a.image("image1")?;
        let image2 = match a.get("image2") {
            None => return Ok(vec![Value::Image(image1.clone())]),
            Some(Value::Image(t)) => t.0.shallow_clone(),
            Some(v) => return Err(NodeError::input("image2", format!("expected IMAGE, got {}", v.value_type()))),
        };
        let direction = a.string("direction")?;
        let horizontal = match direction {
            "right" | "left" => true,
            "down" | "up" => false,
            other => return Err(NodeError::input("direction", format!("{other:?} is not one of right, down, left, up"))),
        };
        let batch = image1.size()[0].max(image2.size()[0]);
        let mut image1 = repeat_last(image1, batch)?;
        let mut image2 = repeat_last(&image2, batch)?;
        let (s1, s2) = (image1.size(), image2.size());
        let (color, scalar): ([f64; 3], bool) = match a.string("spacing_color")? {
            "white" => ([1.0; 3], true),
            "black" => ([0.0; 3], true),
            "red" => ([1.0, 0.0, 0.0], false),
            "green" => ([0.0, 1.0, 0.0], false),
            "blue" => ([0.0, 0.0, 1.0], false),
            other => return Err(NodeError::input("spacing_color", format!("{other:?} is not one of white, black, red, green, blue"))),
        };
        if a.boolean("match_image_size")? {
            let aspect = s2[2] as f64 / s2[1] as f64;
            let (tw, th) = if horizontal { ((s1[1] as f64 * aspect) as i64, s1[1]) } else { (s1[2], (s1[2] as f64 / aspect) as i64) };
            if tw < 1 || th < 1 {
                return Err(NodeError::input("image2", format!("matching image1's size would make the {}×{} image {tw}×{th} pixels", s2[2], s2[1])));
            }
            image2 = nhwc(&common_upscale(&nchw(&image2)?, tw, th, "lanczos", "disabled")?)?;
        } else {
            let value = if scalar { color[0] } else { 0.0 };
            let dim = if horizontal { 1 } else { 2 };
            let target = s1[dim as usize].max(s2[dim as usize]);
            image1 = pad_centred(&image1, dim, target, value)?;
            image2 = pad_centred(&image2, dim, target, value)?;
        }
        let channels = image1.size()[3].max(image2.size()[3]);
        let image1 = pad_channels(&image1, channels)?;
        let image2 = pad_channels(&image2, channels)?;
        let (s1, s2) = (image1.size(), image2.size());
        let mut parts = if direction == "left" || direction == "up" { vec![image2, image1] } else { vec![image1, image2] };
        let spacing = a.i64("spacing_width")?;
        if spacing > 0 {
            let sw = spacing + spacing % 2;
            let shape = if horizontal { [s1[0], s1[1].max(s2[1]), sw, channels] } else { [s1[0], sw, s1[2].max(s2[2]), channels] };
            let mut values = vec![0.0f32; channels as usize];
            for (v, c) in values.iter_mut().zip(color) {
                *v = c as f32;
            }
            if channels == 4 {
                values[3] = 1.0;
            }
            let strip = Tensor::f_from_slice(&values)?.f_view([1, 1, 1, channels])?.f_expand(shape, false)?;
            parts.insert(1, strip.f_to_kind(parts[0].kind())?);
        }
        let out = Tensor::f_cat(&parts, if horizontal { 2 } else { 1 }).map_err(|e| NodeError::input("image2", e.to_string()))?;
        image_out(out)
    }
}
