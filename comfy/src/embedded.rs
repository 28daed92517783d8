//! Text that images carry: PNG `tEXt`/`zTXt`/`iTXt` chunks (ComfyUI's `prompt` and `workflow`,
//! diffloom's `diffloom`, A1111's `parameters`) and the EXIF of ComfyUI's WebP files, where `Make`
//! holds `workflow:{…}` and `Model` holds `prompt:{…}`.

use std::io::Read;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
/// More text than any workflow has; a hostile file stops here.
const MAX_TEXT: usize = 64 << 20;

/// Whether the bytes are a PNG or a WebP image.
pub fn is_image(bytes: &[u8]) -> bool {
    bytes.starts_with(PNG_SIGNATURE) || (bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP")
}

/// The (keyword, text) pairs an image carries, in file order.
pub fn texts(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    if bytes.starts_with(PNG_SIGNATURE) {
        png_texts(bytes)
    } else if is_image(bytes) {
        webp_texts(bytes)
    } else {
        Err("not a PNG or WebP image".into())
    }
}

fn png_texts(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut at = PNG_SIGNATURE.len();
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize; // invariant: the loop condition keeps at + 8 within the bytes.
        let kind = &bytes[at + 4..at + 8];
        let end = at.checked_add(8 + len).filter(|e| *e + 4 <= bytes.len()).ok_or("a PNG chunk runs past the end of the file")?;
        let data = &bytes[at + 8..end];
        match kind {
            b"tEXt" => {
                if let Some((k, t)) = split_nul(data) {
                    out.push((latin1(k), latin1(t)));
                }
            }
            b"zTXt" => {
                if let Some((k, rest)) = split_nul(data) {
                    let text = inflate(rest.get(1..).unwrap_or_default())?;
                    out.push((latin1(k), latin1(&text)));
                }
            }
            b"iTXt" => {
                if let Some((k, rest)) = split_nul(data) {
                    let (compressed, rest) = (rest.first() == Some(&1), rest.get(2..).unwrap_or_default());
                    let (_, rest) = split_nul(rest).unwrap_or_default();
                    let (_, text) = split_nul(rest).unwrap_or_default();
                    let text = if compressed { inflate(text)? } else { text.to_vec() };
                    out.push((latin1(k), String::from_utf8_lossy(&text).into_owned()));
                }
            }
            b"IEND" => break,
            _ => {}
        }
        at = end + 4;
    }
    Ok(out)
}

fn split_nul(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = data.iter().position(|b| *b == 0)?;
    Some((&data[..i], &data[i + 1..]))
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| c as char).collect()
}

fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data).take(MAX_TEXT as u64 + 1).read_to_end(&mut out).map_err(|e| format!("a compressed PNG text chunk is broken: {e}"))?;
    if out.len() > MAX_TEXT {
        return Err("a PNG text chunk is larger than 64 MiB".into());
    }
    Ok(out)
}

fn webp_texts(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let kind = &bytes[at..at + 4];
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes")) as usize; // invariant: the loop condition keeps at + 8 within the bytes.
        let end = (at + 8).checked_add(len).filter(|e| *e <= bytes.len()).ok_or("a WebP chunk runs past the end of the file")?;
        if kind == b"EXIF" {
            return Ok(exif_texts(&bytes[at + 8..end]));
        }
        at = end + (len & 1);
    }
    Ok(Vec::new())
}

/// IFD0's ASCII entries written as `key:value` (ComfyUI's WebP metadata), as (key, value).
fn exif_texts(exif: &[u8]) -> Vec<(String, String)> {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let little = tiff.starts_with(b"II");
    let u16_at = |i: usize| tiff.get(i..i + 2).map(|b| if little { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) });
    let u32_at =
        |i: usize| tiff.get(i..i + 4).map(|b| if little { u32::from_le_bytes([b[0], b[1], b[2], b[3]]) } else { u32::from_be_bytes([b[0], b[1], b[2], b[3]]) });
    let mut out = Vec::new();
    let Some(ifd) = u32_at(4).map(|o| o as usize) else { return out };
    let count = u16_at(ifd).unwrap_or(0) as usize;
    for e in 0..count {
        let entry = ifd + 2 + 12 * e;
        let (Some(ty), Some(n)) = (u16_at(entry + 2), u32_at(entry + 4)) else { break };
        if ty != 2 {
            continue; // not ASCII
        }
        let n = n as usize;
        let start = if n <= 4 { entry + 8 } else { u32_at(entry + 8).unwrap_or(0) as usize };
        let Some(raw) = tiff.get(start..start.saturating_add(n)) else { continue };
        let text = String::from_utf8_lossy(raw.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        if let Some((k, v)) = text.split_once(':') {
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    out
}
