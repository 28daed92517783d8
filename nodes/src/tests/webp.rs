//! Unit tests of `webp.rs`.
use super::*;

#[test]
fn exif_layout_as_pillow() {
    // Pillow 13: im.getexif() with 0x0110 = 'prompt:{"a": 1}' and 0x010f = 'workflow:{"n": []}'.
    let got = exif_ascii(&[(0x0110, r#"prompt:{"a": 1}"#.into()), (0x010f, r#"workflow:{"n": []}"#.into())]);
    let want = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x02\x01\x0f\x00\x02\x00\x00\x00\x13\x00\x00\x00&\x01\x10\x00\x02\x00\x00\x00\x10\x00\x00\x00:\x00\x00\x00\x00workflow:{\"n\": []}\x00\x00prompt:{\"a\": 1}\x00";
    assert_eq!(got, want.to_vec());
    assert_eq!(exif_ascii(&[]), b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00".to_vec());
}

#[test]
fn lossless_round_trip() {
    let (w, h) = (5, 3);
    let frames: Vec<Vec<u8>> = (0..3u8).map(|k| (0..w * h * 3).map(|i| (i as u8).wrapping_mul(37).wrapping_add(k * 50)).collect()).collect();
    let cfg = FrameConfig { lossless: true, quality: 80.0, method: 4 };
    let bytes = encode_animation(Frames { pixels: &frames, width: w, height: h, channels: 3 }, 166, cfg, b"Exif\0\0MM\0*\0\0\0\x08\0\0\0\0\0\0").unwrap();
    assert_eq!(&bytes[0..4], b"RIFF");
    assert!(bytes.windows(4).any(|c| c == b"ANMF") && bytes.windows(4).any(|c| c == b"EXIF"));
    let still = encode_still(&frames[0], w, h, 3, cfg, b"MM\0*\0\0\0\x08\0\0\0\0\0\0").unwrap();
    assert!(!still.windows(4).any(|c| c == b"ANMF") && still.windows(4).any(|c| c == b"EXIF"));
    let decoded = image::load_from_memory(&still).unwrap().to_rgb8();
    assert_eq!(decoded.as_raw(), &frames[0]);
}
