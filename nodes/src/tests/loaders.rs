//! Unit tests of `builtin/loaders.rs`.

/// In a long-lived process (`watch`, `serve`, a worker) a model file rewritten in place with its
/// size and modification time kept is a new version, and its digest is computed again.
#[test]
fn a_file_rewritten_in_place_with_its_size_and_time_kept_is_a_new_version() {
    let dir = std::env::temp_dir().join(format!("diffloom-stamp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    std::fs::write(&path, b"weights-1").unwrap();
    let before = std::fs::metadata(&path).unwrap();
    let (version, digest) = (super::version(&before), super::digest(&path, &before).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&path, b"weights-2").unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(before.modified().unwrap()).unwrap();
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!((after.len(), after.modified().unwrap()), (before.len(), before.modified().unwrap()));
    assert_ne!(super::version(&after), version);
    assert_ne!(super::digest(&path, &after).unwrap(), digest);
    assert_eq!(super::digest(&path, &after).unwrap(), blake3::hash(b"weights-2").to_hex().to_string());
    let _ = std::fs::remove_dir_all(&dir);
}
