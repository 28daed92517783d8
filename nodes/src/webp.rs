//! WebP files as Pillow writes them for ComfyUI's SaveAnimatedWEBP: libwebp's animation encoder
//! (`WebPAnimEncoder`) for two frames or more, its still encoder (`WebPEncode`) for one, and the mux
//! for the EXIF chunk, called with the options Pillow's `_webp.c` passes (Pillow 13,
//! `_anim_encoder_new`, `_anim_encoder_add`, `_anim_encoder_assemble`, `WebPEncode_wrapper`).
//!
//! libwebp is compiled from the C sources vendored by `libwebp-sys2` (its `static` feature: no system
//! library is looked for). The `webp-animation` crate wraps the same encoder, but never passes the
//! per-frame `method` (ComfyUI's "fastest"/"slowest" would be ignored), cannot set the background
//! colour (Pillow's transparent black, libwebp's default is white) and replaces libwebp's lossy defaults
//! (1 segment instead of 4); so the few calls are made here directly.
// Unsafe: FFI calls into libwebp. Each object is owned by a guard that frees it once; the pixel and
// metadata buffers outlive the calls that read them.
#![allow(unsafe_code)]

use std::os::raw::{c_char, c_int};
use std::ptr;

use libwebp_sys as sys;

/// How each frame is compressed: Pillow's `lossless`, `quality` (for lossless, the effort) and
/// `method` (0 fast … 6 slow), with its `alpha_quality` 100.
#[derive(Clone, Copy, Debug)]
pub struct FrameConfig {
    pub lossless: bool,
    pub quality: f32,
    pub method: i32,
}

/// 8-bit frames `[H, W, C]` (C = 3 for RGB, 4 for RGBA) of one size.
#[derive(Clone, Copy, Debug)]
pub struct Frames<'a> {
    pub pixels: &'a [Vec<u8>],
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

/// libwebp's encoder version as `major.minor.revision`.
pub fn encoder_version() -> String {
    // SAFETY: a pure query without arguments.
    let v = unsafe { sys::WebPGetEncoderVersion() };
    format!("{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
}

/// Pillow's `WebPConfigInit` and the three fields it sets, validated.
fn config(frame: FrameConfig) -> Result<sys::WebPConfig, String> {
    // SAFETY: WebPConfigInit fills the whole struct; zeroed is a valid starting value for it.
    let mut config: sys::WebPConfig = unsafe { std::mem::zeroed() };
    if unsafe { sys::WebPConfigInit(&mut config) } == 0 {
        return Err("libwebp: cannot initialise the encoder configuration (library version mismatch)".into());
    }
    config.lossless = frame.lossless as c_int;
    config.quality = frame.quality;
    config.alpha_quality = 100;
    config.method = frame.method;
    // SAFETY: config is initialised.
    if unsafe { sys::WebPValidateConfig(&config) } == 0 {
        return Err(format!("libwebp: invalid configuration (quality {}, method {})", frame.quality, frame.method));
    }
    Ok(config)
}

/// A `WebPPicture` with its ARGB plane, freed on drop.
struct Picture(sys::WebPPicture);

impl Picture {
    /// Pillow's `import_frame_libwebp`: ARGB words, alpha 255 for RGB.
    fn new(pixels: &[u8], w: usize, h: usize, c: usize) -> Result<Picture, String> {
        // SAFETY: WebPPictureInit fills the struct; zeroed is a valid starting value for it.
        let mut pic: sys::WebPPicture = unsafe { std::mem::zeroed() };
        if unsafe { sys::WebPPictureInit(&mut pic) } == 0 {
            return Err("libwebp: cannot initialise a picture (library version mismatch)".into());
        }
        pic.width = c_int::try_from(w).map_err(|_| format!("width {w} is too large"))?;
        pic.height = c_int::try_from(h).map_err(|_| format!("height {h} is too large"))?;
        pic.use_argb = 1;
        // SAFETY: pic is initialised with its size; on failure nothing was allocated.
        if unsafe { sys::WebPPictureAlloc(&mut pic) } == 0 {
            return Err(format!("libwebp: cannot allocate a {w}x{h} picture (WebP is limited to 16383 pixels a side)"));
        }
        let pic = Picture(pic);
        let stride = pic.0.argb_stride as usize;
        // SAFETY: WebPPictureAlloc made argb an array of argb_stride * height words.
        let argb = unsafe { std::slice::from_raw_parts_mut(pic.0.argb, stride * h) };
        for y in 0..h {
            for x in 0..w {
                let p = &pixels[(y * w + x) * c..(y * w + x + 1) * c];
                let a = if c == 4 { p[3] } else { 255 };
                argb[y * stride + x] = (a as u32) << 24 | (p[0] as u32) << 16 | (p[1] as u32) << 8 | p[2] as u32;
            }
        }
        Ok(pic)
    }
}

impl Drop for Picture {
    fn drop(&mut self) {
        // SAFETY: the picture was initialised and allocated by WebPPictureAlloc.
        unsafe { sys::WebPPictureFree(&mut self.0) };
    }
}

/// Bytes owned by libwebp (`WebPData`), freed on drop.
struct Data(sys::WebPData);

impl Data {
    fn new() -> Data {
        Data(sys::WebPData { bytes: ptr::null(), size: 0 })
    }
    fn to_vec(&self) -> Vec<u8> {
        if self.0.bytes.is_null() {
            return Vec::new();
        }
        // SAFETY: libwebp set bytes to an allocation of size bytes.
        unsafe { std::slice::from_raw_parts(self.0.bytes, self.0.size) }.to_vec()
    }
}

impl Drop for Data {
    fn drop(&mut self) {
        // SAFETY: bytes is null or libwebp's allocation (WebPDataClear frees with WebPFree).
        unsafe { sys::WebPDataClear(&mut self.0) };
    }
}

/// A `WebPMux`, deleted on drop.
struct Mux(*mut sys::WebPMux);

impl Drop for Mux {
    fn drop(&mut self) {
        // SAFETY: created by WebPMuxNew/WebPMuxCreate and deleted once.
        unsafe { sys::WebPMuxDelete(self.0) };
    }
}

fn mux_error(what: &str, err: sys::WebPMuxError) -> String {
    format!("libwebp: cannot {what} (mux error {err})")
}

/// Sets the EXIF chunk (copied) and assembles the file, as Pillow's re-mux.
fn with_exif(mux: Mux, exif: &[u8]) -> Result<Vec<u8>, String> {
    let chunk = sys::WebPData { bytes: exif.as_ptr(), size: exif.len() };
    // SAFETY: mux is valid, the fourcc is 4 bytes, the chunk is copied (copy_data 1).
    let err = unsafe { sys::WebPMuxSetChunk(mux.0, c"EXIF".as_ptr() as *const c_char, &chunk, 1) };
    if err != sys::WEBP_MUX_OK {
        return Err(mux_error("set the EXIF chunk", err));
    }
    let mut out = Data::new();
    // SAFETY: mux is valid; out receives a new allocation.
    let err = unsafe { sys::WebPMuxAssemble(mux.0, &mut out.0) };
    if err != sys::WEBP_MUX_OK {
        return Err(mux_error("assemble the file", err));
    }
    Ok(out.to_vec())
}

/// A `WebPAnimEncoder`, deleted on drop.
struct AnimEncoder(*mut sys::WebPAnimEncoder);

impl AnimEncoder {
    fn error(&self) -> String {
        // SAFETY: the encoder is valid; the message is a NUL-terminated string it owns.
        let msg = unsafe { sys::WebPAnimEncoderGetError(self.0) };
        if msg.is_null() {
            return "libwebp: the animation encoder failed".into();
        }
        format!("libwebp: {}", unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy())
    }
}

impl Drop for AnimEncoder {
    fn drop(&mut self) {
        // SAFETY: created by WebPAnimEncoderNew and deleted once.
        unsafe { sys::WebPAnimEncoderDelete(self.0) };
    }
}

/// Pillow's `_save_all` for two frames or more: loop 0 (forever), transparent black background, no
/// size minimisation, key frames every 9–17 frames lossless or 3–5 lossy (its gif2webp defaults), no
/// mixed mode; frame k at `k * duration_ms` and the last frame lasting `duration_ms`; then the EXIF
/// chunk (kept as given: Pillow's animated path leaves its `Exif\0\0` prefix on).
pub fn encode_animation(frames: Frames, duration_ms: u32, frame: FrameConfig, exif: &[u8]) -> Result<Vec<u8>, String> {
    let Frames { pixels, width: w, height: h, channels: c } = frames;
    let config = config(frame)?;
    // SAFETY: WebPAnimEncoderOptionsInit fills the struct; zeroed is a valid starting value for it.
    let mut options: sys::WebPAnimEncoderOptions = unsafe { std::mem::zeroed() };
    if unsafe { sys::WebPAnimEncoderOptionsInit(&mut options) } == 0 {
        return Err("libwebp: cannot initialise the animation options (library version mismatch)".into());
    }
    options.anim_params.bgcolor = 0;
    options.anim_params.loop_count = 0;
    options.minimize_size = 0;
    (options.kmin, options.kmax) = if frame.lossless { (9, 17) } else { (3, 5) };
    options.allow_mixed = 0;
    options.verbose = 0;
    let (cw, ch) = (c_int::try_from(w).map_err(|_| "too wide")?, c_int::try_from(h).map_err(|_| "too tall")?);
    // SAFETY: options are initialised; a null result is checked.
    let enc = unsafe { sys::WebPAnimEncoderNew(cw, ch, &options) };
    if enc.is_null() {
        return Err(format!("libwebp: cannot create an animation encoder for {w}x{h} (WebP is limited to 16383 pixels a side)"));
    }
    let enc = AnimEncoder(enc);
    let timestamp = |k: usize| -> Result<c_int, String> {
        (k as u64)
            .checked_mul(duration_ms as u64)
            .and_then(|t| c_int::try_from(t).ok())
            .ok_or_else(|| format!("{k} frames of {duration_ms} ms run past the WebP encoder's 2^31 ms timestamps"))
    };
    for (k, px) in pixels.iter().enumerate() {
        let mut pic = Picture::new(px, w, h, c)?;
        // SAFETY: encoder, picture and config are valid for the call.
        if unsafe { sys::WebPAnimEncoderAdd(enc.0, &mut pic.0, timestamp(k)?, &config) } == 0 {
            return Err(enc.error());
        }
    }
    // The end of the last frame (a null picture), as Pillow's flush.
    // SAFETY: a null frame and config are what libwebp expects here.
    if unsafe { sys::WebPAnimEncoderAdd(enc.0, ptr::null_mut(), timestamp(pixels.len())?, ptr::null()) } == 0 {
        return Err(enc.error());
    }
    let mut data = Data::new();
    // SAFETY: the encoder is valid; data receives a new allocation.
    if unsafe { sys::WebPAnimEncoderAssemble(enc.0, &mut data.0) } == 0 {
        return Err(enc.error());
    }
    if exif.is_empty() {
        return Ok(data.to_vec());
    }
    // SAFETY: data holds a complete WebP file; the mux copies it (copy_data 1).
    let mux = unsafe { sys::WebPMuxCreate(&data.0, 1) };
    if mux.is_null() {
        return Err("libwebp: cannot re-mux the animation to add metadata".into());
    }
    with_exif(Mux(mux), exif)
}

extern "C" fn memory_write(data: *const u8, size: usize, picture: *const sys::WebPPicture) -> c_int {
    // SAFETY: called by WebPEncode with the picture whose custom_ptr is our WebPMemoryWriter.
    unsafe { sys::WebPMemoryWrite(data, size, picture) }
}

/// A `WebPMemoryWriter`, cleared on drop.
struct Writer(sys::WebPMemoryWriter);

impl Drop for Writer {
    fn drop(&mut self) {
        // SAFETY: initialised by WebPMemoryWriterInit; clearing frees its buffer once.
        unsafe { sys::WebPMemoryWriterClear(&mut self.0) };
    }
}

/// Pillow's `_save` (what `_save_all` does for a single frame): a still WebP by `WebPEncode` (exact 0),
/// then the EXIF chunk (Pillow strips its `Exif\0\0` prefix here; pass it stripped).
pub fn encode_still(pixels: &[u8], w: usize, h: usize, c: usize, frame: FrameConfig, exif: &[u8]) -> Result<Vec<u8>, String> {
    let config = config(frame)?;
    let mut pic = Picture::new(pixels, w, h, c)?;
    // SAFETY: WebPMemoryWriterInit fills the struct.
    let mut writer = Writer(unsafe { std::mem::zeroed() });
    unsafe { sys::WebPMemoryWriterInit(&mut writer.0) };
    pic.0.writer = Some(memory_write);
    pic.0.custom_ptr = &mut writer.0 as *mut sys::WebPMemoryWriter as *mut std::ffi::c_void;
    // SAFETY: config and picture are valid; the writer outlives the call.
    if unsafe { sys::WebPEncode(&config, &mut pic.0) } == 0 {
        return Err(format!("libwebp: encoding error {}", pic.0.error_code));
    }
    // SAFETY: WebPMuxNew has no preconditions; a null result is checked.
    let mux = unsafe { sys::WebPMuxNew() };
    if mux.is_null() {
        return Err("libwebp: cannot create a mux".into());
    }
    let mux = Mux(mux);
    let image = sys::WebPData { bytes: writer.0.mem, size: writer.0.size };
    // SAFETY: the bitstream is copied into the mux (copy_data 1).
    let err = unsafe { sys::WebPMuxSetImage(mux.0, &image, 1) };
    if err != sys::WEBP_MUX_OK {
        return Err(mux_error("set the image", err));
    }
    if exif.is_empty() {
        let mut out = Data::new();
        // SAFETY: mux is valid; out receives a new allocation.
        let err = unsafe { sys::WebPMuxAssemble(mux.0, &mut out.0) };
        if err != sys::WEBP_MUX_OK {
            return Err(mux_error("assemble the file", err));
        }
        return Ok(out.to_vec());
    }
    with_exif(mux, exif)
}

/// Pillow's `Exif.tobytes()` for ASCII tags: `Exif\0\0`, a big-endian TIFF header and one IFD with
/// the entries sorted by tag, each value NUL-terminated (non-ASCII bytes as `?`, Python's
/// `encode("ascii", "replace")` on text that is ASCII anyway once `json.dumps` escaped it), values over 4
/// bytes after the IFD, each padded to an even length.
pub fn exif_ascii(tags: &[(u16, String)]) -> Vec<u8> {
    let mut tags: Vec<(u16, Vec<u8>)> = tags
        .iter()
        .map(|(t, v)| {
            let mut b: Vec<u8> = v.chars().map(|ch| if ch.is_ascii() { ch as u8 } else { b'?' }).collect();
            b.push(0);
            (*t, b)
        })
        .collect();
    tags.sort_by_key(|(t, _)| *t);
    tags.dedup_by_key(|(t, _)| *t);
    let mut ifd = Vec::new();
    let mut data = Vec::new();
    ifd.extend_from_slice(&(tags.len() as u16).to_be_bytes());
    let mut offset = 8 + 2 + 12 * tags.len() + 4;
    for (tag, value) in &tags {
        ifd.extend_from_slice(&tag.to_be_bytes());
        ifd.extend_from_slice(&2u16.to_be_bytes());
        ifd.extend_from_slice(&(value.len() as u32).to_be_bytes());
        if value.len() <= 4 {
            let mut inline = value.clone();
            inline.resize(4, 0);
            ifd.extend_from_slice(&inline);
        } else {
            ifd.extend_from_slice(&(offset as u32).to_be_bytes());
            data.extend_from_slice(value);
            if value.len() % 2 == 1 {
                data.push(0);
            }
            offset += value.len().div_ceil(2) * 2;
        }
    }
    ifd.extend_from_slice(&[0; 4]);
    let mut out = b"Exif\0\0MM\0*\0\0\0\x08".to_vec();
    out.extend_from_slice(&ifd);
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
#[path = "tests/webp.rs"]
mod tests;
