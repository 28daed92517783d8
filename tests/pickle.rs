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
