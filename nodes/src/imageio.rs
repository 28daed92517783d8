//! Reading image files into IMAGE/MASK tensors and writing PNGs that never overwrite an existing file.

use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use diffloom_core::NodeError;
use image::ImageFormat;
use tch::{Kind, Tensor};

/// A decoded image: RGB `[1, H, W, 3]` float in 0..1, and the alpha channel `[1, H, W]` if it has one.
pub struct Decoded {
    pub rgb: Tensor,
    pub alpha: Option<Tensor>,
}

/// Decodes a PNG, JPEG or WebP file (the format is read from the content, not the extension).
pub fn load(path: &Path) -> Result<Decoded, NodeError> {
    let bytes = read(path)?;
    // The format comes from the content alone: a misnamed file still loads, a non-image is named as such.
    let format = match image::guess_format(&bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        _ => return Err(NodeError::file(path, "not a PNG, JPEG or WebP image")),
    };
    let img = image::load_from_memory_with_format(&bytes, format).map_err(|e| NodeError::file(path, format!("cannot decode the image: {e}")))?;
    let has_alpha = img.color().has_alpha();
    let (w, h) = (img.width() as i64, img.height() as i64);
    let rgba = img.into_rgba32f();
    let t = Tensor::f_from_slice(rgba.as_raw())?.f_view([1, h, w, 4])?;
    let rgb = t.f_narrow(3, 0, 3)?.f_contiguous()?;
    let alpha = if has_alpha { Some(t.f_select(3, 3)?.f_contiguous()?) } else { None };
    Ok(Decoded { rgb, alpha })
}

/// Reads an input file whole, with a plain message for a directory.
pub fn read(path: &Path) -> Result<Vec<u8>, NodeError> {
    if path.is_dir() {
        return Err(NodeError::file(path, "is a directory, expected an image file"));
    }
    fs::read(path).map_err(|e| NodeError::file(path, format!("cannot read: {e}")))
}

/// Converts one image `[H, W, 3]` in 0..1 to 8-bit RGB as ComfyUI does (`clip(255 * x).astype(uint8)`,
/// which truncates), so the bytes match ComfyUI's for the same tensor.
pub fn to_rgb8(image: &Tensor) -> Result<image::RgbImage, NodeError> {
    let size = image.size();
    let (h, w) = (size[0] as u32, size[1] as u32);
    let bytes = image.f_to_kind(Kind::Float)?.f_mul_scalar(255.0)?.f_clamp(0.0, 255.0)?.f_to_kind(Kind::Uint8)?.f_contiguous()?.f_view([-1])?;
    let data = Vec::<u8>::try_from(&bytes)?;
    image::RgbImage::from_raw(w, h, data).ok_or_else(|| NodeError::Failed("image buffer has the wrong size".into()))
}

/// Checks that a file name prefix stays inside the output directory (subfolders allowed).
pub fn check_prefix(prefix: &str) -> Result<(), NodeError> {
    let p = Path::new(prefix);
    let escapes = p.components().any(|c| !matches!(c, Component::Normal(_)));
    if prefix.is_empty() || escapes || prefix.ends_with('/') {
        return Err(NodeError::input(
            "filename_prefix",
            format!("{prefix:?} must be a relative name without '..' (subfolders like \"portraits/cat\" are fine)"),
        ));
    }
    Ok(())
}

/// Over HTTP (a confined run) a prefix's subfolder must not leave the output folder through a symbolic
/// link (`..` and absolute prefixes are refused for everyone by [`check_prefix`]).
pub fn check_confined(cx: &diffloom_core::Ctx, dir: &Path, prefix: &str) -> Result<(), NodeError> {
    if !cx.files.folders.confined {
        return Ok(());
    }
    check_prefix(prefix)?;
    let folder = dir.join(prefix).parent().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf());
    let _ = fs::create_dir_all(&folder);
    if !diffloom_core::paths::inside(&folder, dir) {
        return Err(NodeError::input("filename_prefix", format!("{prefix:?} leads outside the output folder (a symbolic link?)")));
    }
    Ok(())
}

/// Writes `img` as `<dir>/<prefix>_<NNNNN>_.png` (ComfyUI's naming) with the next free number, and
/// returns the path. The PNG carries each (keyword, text) (tEXt, or iTXt when it is not Latin-1).
pub fn save_png(dir: &Path, prefix: &str, img: &image::RgbImage, texts: &[(String, String)]) -> Result<PathBuf, NodeError> {
    save_numbered(dir, prefix, "png", |file| encode_png(file, img, texts))
}

/// Writes `<dir>/<prefix>_<NNNNN>_.<ext>` with the next free number (as ComfyUI numbers saved files)
/// through `write`, and returns the path. The file is written under a temporary name and linked into
/// place only if the name is still free, so an existing file is never overwritten and no partial file
/// is left behind.
pub fn save_numbered(dir: &Path, prefix: &str, ext: &str, write: impl FnOnce(&mut fs::File) -> Result<(), String>) -> Result<PathBuf, NodeError> {
    check_prefix(prefix)?;
    let full = dir.join(prefix);
    // invariant: check_prefix rejected empty prefixes, so there is a file name component.
    let folder = full.parent().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf());
    let stem = full.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    fs::create_dir_all(&folder).map_err(|e| NodeError::file(&folder, format!("cannot create the output directory: {e}")))?;

    let mut tmp = tempfile::Builder::new()
        .prefix(".diffloom-")
        .suffix(&format!(".{ext}.tmp"))
        .tempfile_in(&folder)
        .map_err(|e| NodeError::file(&folder, format!("cannot write to the output directory: {e}")))?;
    write(tmp.as_file_mut()).map_err(|e| NodeError::file(tmp.path(), e))?;
    tmp.as_file_mut().flush().map_err(|e| NodeError::file(tmp.path(), e))?;
    // Temporary files are created private (0600); a saved file is an ordinary one.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp.as_file().set_permissions(fs::Permissions::from_mode(0o644));
    }

    let mut counter = next_counter(&folder, &stem, ext);
    loop {
        let target = folder.join(format!("{stem}_{counter:05}_.{ext}"));
        match tmp.persist_noclobber(&target) {
            Ok(_) => return Ok(target),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                tmp = e.file;
                counter += 1;
            }
            Err(e) => return Err(NodeError::file(&target, format!("cannot save: {}", e.error))),
        }
    }
}

/// One past the highest `<stem>_<N>_.<ext>` number in `folder`, as ComfyUI counts.
fn next_counter(folder: &Path, stem: &str, ext: &str) -> u64 {
    let Ok(entries) = fs::read_dir(folder) else { return 1 };
    let suffix = format!("_.{ext}");
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(stem)?.strip_prefix('_')?.strip_suffix(suffix.as_str())?;
            rest.parse::<u64>().ok()
        })
        .max()
        .map_or(1, |n| n + 1)
}

fn encode_png(out: &mut fs::File, img: &image::RgbImage, texts: &[(String, String)]) -> Result<(), String> {
    let w = std::io::BufWriter::new(out);
    let mut enc = png::Encoder::new(w, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (keyword, text) in texts {
        // As PIL's PngInfo.add_text, which ComfyUI and A1111 use: tEXt when Latin-1 holds the text.
        let latin1 = text.chars().all(|c| (c as u32) < 256 && c != '\0');
        if latin1 {
            enc.add_text_chunk(keyword.to_owned(), text.to_owned()).map_err(|e| e.to_string())?;
        } else {
            enc.add_itxt_chunk(keyword.to_owned(), text.to_owned()).map_err(|e| e.to_string())?;
        }
    }
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(img.as_raw()).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}
