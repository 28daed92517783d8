//! PyTorch pickle checkpoints (issue 13): every tensor read bit-identical to
//! `torch.load(weights_only=True)` on files torch.save wrote (zip and legacy formats, every dtype,
//! strided and shared views, lightning/Real-ESRGAN/textual-inversion layouts); calls refused by name;
//! hostile bytes never panic.

use diffloom_nodes::checkpoint::pickle::read;
use diffloom_nodes::checkpoint::safetensors::SafetensorsFile;

use crate::parity::run_reference;
use crate::util::Dir;

#[test]
fn tensors_match_torch_load_weights_only() {
    let d = Dir::new();
    run_reference("pickle_reference.py", &[d.path()]);
    let mut checked = 0;
    for case in ["dtypes", "views", "lightning", "esrgan", "embedding", "ordered"] {
        for fmt in ["zip", "legacy"] {
            let got = read(&d.join(&format!("{case}.{fmt}.pt"))).unwrap_or_else(|e| panic!("{case}.{fmt}: {e}"));
            let want = SafetensorsFile::open(&d.join(&format!("{case}.{fmt}.expected.safetensors"))).unwrap();
            let mut names: Vec<&String> = want.tensors().keys().collect();
            names.sort();
            let mut got_names: Vec<&String> = got.iter().map(|(n, _)| n).collect();
            got_names.sort();
            assert_eq!(got_names, names, "{case}.{fmt}");
            for (name, t) in &got {
                let w = want.load(name, tch::Device::Cpu, None).unwrap();
                assert_eq!((t.kind(), t.size()), (w.kind(), w.size()), "{case}.{fmt}: {name}");
                // Bit-identical: compare the raw bytes.
                let bytes = |x: &tch::Tensor| {
                    let x = x.contiguous();
                    let n = x.numel() * x.kind().elt_size_in_bytes();
                    let mut v = vec![0u8; n];
                    x.copy_data_u8(&mut v, x.numel());
                    v
                };
                assert_eq!(bytes(t), bytes(&w), "{case}.{fmt}: {name}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 50, "{checked} tensors checked");
    // A pickle that would call os.system is refused, naming the call; a plain pickle is not a checkpoint.
    let e = read(&d.join("refused.pt")).unwrap_err().to_string();
    assert!(e.contains("posix.system") || e.contains("os.system"), "{e}");
    assert!(e.contains("refused.pt"), "{e}");
    let e = read(&d.join("not_torch.pkl")).unwrap_err().to_string();
    assert!(e.contains("not one torch.save wrote"), "{e}");
    // Opened as a checkpoint file, a pickle gives the same tensors (the loaders' path).
    let f = SafetensorsFile::open(&d.join("lightning.zip.pt")).unwrap();
    assert!(f.info("model.diffusion_model.w").is_some());
}

#[test]
fn hostile_bytes_are_errors_never_panics() {
    let d = Dir::new();
    run_reference("pickle_reference.py", &[d.path()]);
    for name in ["views.zip.pt", "views.legacy.pt", "embedding.legacy.pt"] {
        let good = std::fs::read(d.join(name)).unwrap();
        let mut rng = 0x9e3779b97f4a7c15u64;
        for i in 0..300 {
            let mut bytes = good.clone();
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            match i % 3 {
                0 => bytes.truncate((rng as usize) % bytes.len()),
                1 => {
                    let at = (rng as usize) % bytes.len();
                    bytes[at] ^= (rng >> 32) as u8 | 1;
                }
                _ => {
                    for k in 0..8 {
                        let at = ((rng >> k) as usize) % bytes.len();
                        bytes[at] = (rng >> (8 * k)) as u8;
                    }
                }
            }
            let path = d.write("mutated.pt", &bytes);
            let result = std::panic::catch_unwind(|| read(&path).map(|t| t.len()));
            assert!(result.is_ok(), "{name} mutation {i} panicked");
        }
    }
}

/// Pickles built to crash a reader: a million nested lists (dropping the tree would recurse once per
/// level), a million nested tuples built without marks, and a list that contains itself used where a
/// storage type goes (printing it would recurse forever). Each is an error or a result, never a crash.
#[test]
fn nesting_and_cycles_do_not_crash_the_reader() {
    let d = Dir::new();
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 1_000_000));
    deep.extend(std::iter::repeat_n(b'a', 999_999));
    deep.push(b'.');
    let path = d.write("deep.pt", &deep);
    assert!(read(&path).is_err(), "a list of lists is no checkpoint");
    let mut tuples = vec![0x80, 2, b')'];
    tuples.extend(std::iter::repeat_n(0x85, 1_000_000));
    tuples.push(b'.');
    let path = d.write("tuples.pt", &tuples);
    assert!(read(&path).is_err());
    // In the legacy format (magic number, protocol and system-info pickles first): ']' q0 h0 a, a list
    // appended to itself, then ('storage', that list, …) as a persistent id.
    let mut cyclic = vec![0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.'];
    cyclic.extend_from_slice(&[0x80, 2, b'M', 0xe9, 0x03, b'.', 0x80, 2, b'}', b'.']);
    cyclic.extend_from_slice(&[0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'q', 1]);
    cyclic.extend_from_slice(b"(X\x07\x00\x00\x00storageh\x01X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ.");
    let path = d.write("cyclic.pt", &cyclic);
    let e = read(&path).unwrap_err().to_string();
    assert!(e.contains("the storage type is a list"), "{e}");
}
