use super::*;

#[test]
fn same_seed_same_numbers_whatever_else_draws() {
    let mut a = Generator::cpu(42);
    let first = a.randn_f32(&[2, 4, 8, 8]);
    // Draws from the process-wide generator and from another private one do not disturb a second
    // generator with the same seed.
    tch::manual_seed(7);
    let _ = Tensor::randn([1000], (Kind::Float, Device::Cpu));
    let mut other = Generator::cpu(42);
    let _ = other.randn_f32(&[333]);
    let mut b = Generator::cpu(42);
    assert!(b.randn_f32(&[2, 4, 8, 8]).equal(&first));
    assert!(!Generator::cpu(43).randn_f32(&[2, 4, 8, 8]).equal(&first));
}

#[test]
fn a_generator_continues_its_sequence() {
    let mut g = Generator::cpu(1);
    let x = g.randn_f32(&[64]);
    let y = g.randn_f32(&[64]);
    assert!(!x.equal(&y), "the second draw repeats the first");
    let mut h = Generator::cpu(1);
    let _ = h.randn_f32(&[64]);
    assert!(h.randn_f32(&[64]).equal(&y));
}

#[test]
fn cpu_seeds_keep_their_low_32_bits_as_pytorchs_do() {
    // PyTorch's CPU generator seeds its mt19937 with the seed's low 32 bits: 2^64 − 1, 2^63 − 1 and
    // 2^32 − 1 draw the same numbers there (checked against torch.randn in tests/noise.rs).
    let top = Generator::cpu(u64::MAX).randn_f32(&[16]);
    assert!(Generator::cpu(u64::MAX >> 1).randn_f32(&[16]).equal(&top));
    assert!(Generator::cpu(u64::from(u32::MAX)).randn_f32(&[16]).equal(&top));
    assert!(!Generator::cpu(u64::from(u32::MAX) - 1).randn_f32(&[16]).equal(&top));
}

#[test]
fn uniform_draws_and_dtypes() {
    let u = Generator::cpu(3).rand(&[1000], Kind::Float).unwrap();
    assert!(u.min().double_value(&[]) >= 0.0 && u.max().double_value(&[]) < 1.0);
    let h = Generator::cpu(3).randn(&[8], Kind::BFloat16).unwrap();
    assert_eq!(h.kind(), Kind::BFloat16);
    let e = Generator::cpu(3).randn(&[8], Kind::Int64).unwrap_err();
    assert!(e.0.contains("floating point"), "{e}");
}

#[test]
fn cuda_generator_without_a_gpu_is_an_error_not_an_abort() {
    if tch::Cuda::is_available() {
        let mut g = Generator::new(Device::Cuda(0), 5).unwrap();
        assert_eq!(g.randn_f32_on_device_check(), Device::Cuda(0));
        return;
    }
    let e = Generator::new(Device::Cuda(0), 5).err().expect("no GPU here");
    assert!(!e.0.is_empty());
}

#[test]
fn build_facts() {
    assert_eq!(torch_version(), "2.13.0");
    assert!(!cpu_capability().is_empty());
}

impl Generator {
    fn randn_f32_on_device_check(&mut self) -> Device {
        self.randn(&[4], Kind::Float).unwrap().device()
    }
}

#[test]
fn cuda_free_memory_is_known_on_a_gpu_and_an_error_without() {
    if tch::Cuda::is_available() {
        let (free, total) = cuda_free_memory(0).unwrap();
        assert!(free > 0 && free <= total, "{free} of {total}");
        let n = tch::Cuda::device_count() as usize;
        assert!(cuda_free_memory(n).unwrap_err().0.contains(&format!("no CUDA device {n}")));
        return;
    }
    // The CUDA backend is linked here (build/rpath.rs) but sees no device: an error, not an abort.
    let e = cuda_free_memory(0).unwrap_err();
    assert!(e.0.contains("no CUDA device 0"), "{e}");
}
