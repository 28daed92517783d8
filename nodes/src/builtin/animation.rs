//! ComfyUI's `image/animation` category: SaveAnimatedPNG (APNG as Pillow writes it) and SaveAnimatedWEBP
//! (WebP through libwebp with Pillow's settings).

use std::io::Write;

use diffloom_core::{Args, Bool, Combo, Ctx, Float, Int, Node, NodeError, Schema, Str, Value, ValueType};
use tch::{Kind, Tensor};

use crate::{imageio, webp};

/// One image `[H, W, C]` (C = 3 or 4) in 0..1 as 8-bit bytes, ComfyUI's `clip(255 * x).astype(uint8)`
/// (truncation).
fn to_u8(image: &Tensor) -> Result<Vec<u8>, NodeError> {
    let bytes = image.f_to_kind(Kind::Float)?.f_mul_scalar(255.0)?.f_clamp(0.0, 255.0)?.f_to_kind(Kind::Uint8)?.f_contiguous()?.f_view([-1])?;
    Ok(Vec::<u8>::try_from(&bytes)?)
}

/// A JSON text as Python's `json.dumps` writes it: `", "` and `": "` separators and every non-ASCII
/// character escaped (`\uXXXX`, surrogate pairs above U+FFFF), for a compact JSON text (serde_json's).
pub(crate) fn python_json(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len() + compact.len() / 8);
    let (mut in_string, mut escaped) = (false, false);
    for c in compact.chars() {
        if (c as u32) > 0x7f {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
            escaped = false;
            continue;
        }
        out.push(c);
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if c == ',' || c == ':' {
            out.push(' ');
        }
    }
    out
}

/// `n / d` in lowest terms.
fn reduced(n: u64, d: u64) -> (u64, u64) {
    let (mut a, mut b) = (n, d);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let g = a.max(1);
    (n / g, d / g)
}

/// One APNG frame as Pillow keeps it: the full image, the bounding box `(x0, y0, x1, y1)` of what
/// changed since the previous frame (None for the first), and its duration in ms.
struct Frame {
    pixels: Vec<u8>,
    bbox: Option<(usize, usize, usize, usize)>,
    duration: u64,
}

/// The bounding box of the pixels where `a` and `b` differ (Pillow's `subtract_modulo(...).getbbox()`).
fn diff_bbox(a: &[u8], b: &[u8], w: usize, h: usize, c: usize) -> Option<(usize, usize, usize, usize)> {
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) * c;
            if a[i..i + c] != b[i..i + c] {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    (x1 > 0).then_some((x0, y0, x1, y1))
}

/// Pillow's APNG frame list: consecutive identical frames merge (their durations add up, while the
/// summed delay still fits fcTL's 16-bit numerator), later frames keep the box of their change.
fn pillow_frames(images: Vec<Vec<u8>>, w: usize, h: usize, c: usize, duration: u64) -> Vec<Frame> {
    let mut frames: Vec<Frame> = Vec::new();
    for pixels in images {
        let bbox = match frames.last_mut() {
            None => None,
            Some(prev) => {
                let bbox = diff_bbox(&pixels, &prev.pixels, w, h, c);
                if bbox.is_none() && reduced(prev.duration + duration, 1000).0 <= 65535 {
                    prev.duration += duration;
                    continue;
                }
                bbox
            }
        };
        frames.push(Frame { pixels, bbox, duration });
    }
    frames
}

/// Pillow's private chunk payload `key\0json` for each of the run's `prompt` and `workflow`.
fn comf_chunks(texts: Vec<(String, String)>) -> Vec<Vec<u8>> {
    texts
        .into_iter()
        .filter(|(k, _)| k == "prompt" || k == "workflow")
        .map(|(k, v)| {
            let mut data = k.into_bytes();
            data.push(0);
            data.extend_from_slice(python_json(&v).as_bytes());
            data
        })
        .collect()
}

fn encode_apng(out: &mut std::fs::File, frames: &[Frame], (w, h, c): (usize, usize, usize), level: u8, chunks: &[Vec<u8>]) -> Result<(), String> {
    let e = |e: png::EncodingError| e.to_string();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(out), w as u32, h as u32);
    enc.set_color(if c == 4 { png::ColorType::Rgba } else { png::ColorType::Rgb });
    enc.set_depth(png::BitDepth::Eight);
    enc.set_deflate_compression(if level == 0 { png::DeflateCompression::NoCompression } else { png::DeflateCompression::Level(level) });
    let animated = frames.len() > 1;
    if animated {
        enc.set_animated(frames.len() as u32, 0).map_err(e)?;
        enc.set_dispose_op(png::DisposeOp::None).map_err(e)?;
        enc.set_blend_op(png::BlendOp::Source).map_err(e)?;
    }
    let mut writer = enc.write_header().map_err(e)?;
    for frame in frames {
        let (x0, y0, x1, y1) = frame.bbox.unwrap_or((0, 0, w, h));
        if animated {
            let (num, den) = reduced(frame.duration, 1000);
            writer.set_frame_delay(num as u16, den as u16).map_err(e)?;
            writer.set_frame_position(0, 0).map_err(e)?;
            writer.set_frame_dimension((x1 - x0) as u32, (y1 - y0) as u32).map_err(e)?;
            writer.set_frame_position(x0 as u32, y0 as u32).map_err(e)?;
        }
        let mut data = Vec::with_capacity((x1 - x0) * (y1 - y0) * c);
        for y in y0..y1 {
            data.extend_from_slice(&frame.pixels[(y * w + x0) * c..(y * w + x1) * c]);
        }
        writer.write_image_data(&data).map_err(e)?;
    }
    for chunk in chunks {
        writer.write_chunk(png::chunk::ChunkType(*b"comf"), chunk).map_err(e)?;
    }
    writer.finish().map_err(e)
}

/// ComfyUI's SaveAnimatedPNG: the batch as one APNG (Pillow's frames: identical neighbours merged,
/// later frames cropped to their change, loop forever, dispose none, blend source) with the run's
/// prompt and workflow in private `comf` chunks after the image data.
pub struct SaveAnimatedPNG;
impl Node for SaveAnimatedPNG {
    fn schema(&self) -> Schema {
        Schema::new("SaveAnimatedPNG", "image/animation")
            .describe("Saves the batch as one animated PNG (<prefix>_00001_.png, …) in the output directory; never overwrites a file.")
            .input("images", ValueType::Image)
            .input("filename_prefix", Str::new("ComfyUI"))
            .doc("file name prefix; may contain subfolders")
            .input("fps", Float::new(6.0).range(0.01, 1000.0).step(0.01))
            .input("compress_level", Int::new(4).range(0, 9))
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (pixels, (w, h, c)) = batch_bytes(cx, a, "PNG")?;
        let (fps, duration) = frame_duration(a)?;
        let level = u8::try_from(a.i64("compress_level")?).ok().filter(|l| *l <= 9);
        let Some(level) = level else { return Err(NodeError::input("compress_level", "must be 0 to 9")) };
        let n = pixels.len();
        let frames = pillow_frames(pixels, w, h, c, duration);
        if frames.len() > 1 && frames.iter().any(|f| reduced(f.duration, 1000).0 > 65535) {
            // As Pillow: fcTL's delay is a 16-bit fraction of the duration in seconds.
            return Err(NodeError::input(
                "fps",
                format!("{fps} gives a {duration} ms frame delay, which APNG cannot hold (Pillow's \"cannot write duration\")"),
            ));
        }
        let chunks = comf_chunks((cx.image_texts)(w as u32, h as u32));
        save_animation(cx, a, "png", n, |f| {
            encode_apng(f, &frames, (w, h, c), level, &chunks)?;
            f.flush().map_err(|e| e.to_string())
        })
    }
}

/// The batch `[B, H, W, C]` as 8-bit frames and its (W, H, C); `format` names the file type in errors.
fn batch_bytes(cx: &Ctx, a: &Args, format: &str) -> Result<(Vec<Vec<u8>>, (usize, usize, usize)), NodeError> {
    let images = &a.image("images")?.0;
    let size = images.size();
    let [n, h, w, c] = size[..] else { return Err(NodeError::input("images", format!("expected [B, H, W, C], got {size:?}"))) };
    if c != 3 && c != 4 {
        return Err(NodeError::input("images", format!("{c} channels ({format} frames are RGB or RGBA)")));
    }
    if n == 0 || h == 0 || w == 0 {
        return Err(NodeError::input("images", format!("an empty batch or image ({size:?})")));
    }
    let mut pixels = Vec::with_capacity(n as usize);
    for i in 0..n {
        cx.check_cancel()?;
        pixels.push(to_u8(&images.f_get(i)?)?);
    }
    Ok((pixels, (w as usize, h as usize, c as usize)))
}

/// The `fps` input and ComfyUI's frame duration `int(1000.0 / fps)` in milliseconds.
fn frame_duration(a: &Args) -> Result<(f64, u64), NodeError> {
    let fps = a.float("fps")?;
    if fps.is_nan() || fps <= 0.0 {
        return Err(NodeError::input("fps", format!("{fps} is not positive")));
    }
    Ok((fps, (1000.0 / fps).trunc() as u64))
}

/// Writes `<prefix>_NNNNN_.<ext>` (the next free number, never overwriting) in the output directory
/// and reports it as ComfyUI's SavedImages does (`animated` for more than one frame).
fn save_animation(
    cx: &mut Ctx,
    a: &Args,
    ext: &str,
    frames: usize,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), String>,
) -> Result<Vec<Value>, NodeError> {
    let prefix = a.string("filename_prefix")?;
    let dir = cx.output_dir.to_path_buf();
    imageio::check_confined(cx, &dir, prefix)?;
    let path = imageio::save_numbered(&dir, prefix, ext, write)?;
    cx.messages.push(format!("wrote {}", path.display()));
    let rel = path.strip_prefix(&dir).unwrap_or(&path);
    let subfolder = rel.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let filename = rel.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    cx.ui.insert("images".to_owned(), serde_json::json!([{"filename": filename, "subfolder": subfolder, "type": "output"}]));
    if frames > 1 {
        cx.ui.insert("animated".to_owned(), serde_json::json!([true]));
    }
    Ok(vec![])
}

/// ComfyUI's WebP metadata (`_create_webp_metadata`): `prompt:{json}` in EXIF Model (0x0110) and each
/// extra_pnginfo entry (the workflow) in the tags counting down from Make (0x010f), as Pillow's EXIF bytes.
fn webp_exif(texts: Vec<(String, String)>) -> Vec<u8> {
    let mut tags = Vec::new();
    let mut next = 0x010f;
    for (k, v) in texts {
        if k == "prompt" {
            tags.push((0x0110, format!("prompt:{}", python_json(&v))));
        } else if k == "workflow" {
            tags.push((next, format!("workflow:{}", python_json(&v))));
            next -= 1;
        }
    }
    webp::exif_ascii(&tags)
}

/// ComfyUI's SaveAnimatedWEBP: the batch as one animated WebP through Pillow's libwebp calls (loop
/// forever, `int(1000/fps)` ms a frame, key frames and background as Pillow sets them), or a still WebP
/// for one image, with the run's prompt and workflow in EXIF.
pub struct SaveAnimatedWEBP;

/// ComfyUI's `COMPRESS_METHODS`: the method names and libwebp's `method` (0 fast … 6 slow).
const WEBP_METHODS: [(&str, i32); 3] = [("default", 4), ("fastest", 0), ("slowest", 6)];

impl Node for SaveAnimatedWEBP {
    fn schema(&self) -> Schema {
        Schema::new("SaveAnimatedWEBP", "image/animation")
            .describe("Saves the batch as one animated WebP (<prefix>_00001_.webp, …) in the output directory; never overwrites a file.")
            .input("images", ValueType::Image)
            .input("filename_prefix", Str::new("ComfyUI"))
            .doc("file name prefix; may contain subfolders")
            .input("fps", Float::new(6.0).range(0.01, 1000.0).step(0.01))
            .input("lossless", Bool(true))
            .input("quality", Int::new(80).range(0, 100))
            .doc("lossy: 0 smallest … 100 best; lossless: the effort")
            .input("method", Combo::of(&["default", "fastest", "slowest"]))
            .output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let (pixels, (w, h, c)) = batch_bytes(cx, a, "WebP")?;
        let (_, duration) = frame_duration(a)?;
        let quality = a.i64("quality")?;
        let method_name = a.string("method")?;
        let Some(&(_, method)) = WEBP_METHODS.iter().find(|(m, _)| *m == method_name) else {
            return Err(NodeError::input("method", format!("{method_name:?} is not one of default, fastest, slowest")));
        };
        let config = webp::FrameConfig { lossless: a.boolean("lossless")?, quality: quality as f32, method };
        let exif = webp_exif((cx.image_texts)(w as u32, h as u32));
        let n = pixels.len();
        let bytes = if n == 1 {
            // Pillow saves a single frame as a still WebP, its EXIF without the "Exif\0\0" prefix.
            webp::encode_still(&pixels[0], w, h, c, config, &exif[6..])
        } else {
            let frames = webp::Frames { pixels: &pixels, width: w, height: h, channels: c };
            webp::encode_animation(frames, duration as u32, config, &exif)
        }
        .map_err(|e| NodeError::input("images", e))?;
        save_animation(cx, a, "webp", n, |f| f.write_all(&bytes).and_then(|_| f.flush()).map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_separators_and_ascii() {
        assert_eq!(python_json(r#"{"a":[1,"x,:\"é"],"b":"😀"}"#), r#"{"a": [1, "x,:\"\u00e9"], "b": "\ud83d\ude00"}"#);
    }

    #[test]
    fn identical_frames_merge() {
        let f = |v: u8| vec![v; 2 * 2 * 3];
        let frames = pillow_frames(vec![f(1), f(1), f(2)], 2, 2, 3, 166);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].duration, 332);
        assert_eq!(frames[1].bbox, Some((0, 0, 2, 2)));
        assert_eq!(reduced(166, 1000), (83, 500));
    }
}
