//! Noise seeded as ComfyUI seeds it, so seeds carry over: the initial latent noise is
//! `torch.manual_seed(seed); torch.randn(shape)` on the CPU (`comfy.sample.prepare_noise`), and the
//! per-step noise of ancestral samplers comes from a generator seeded with the same seed
//! (`default_noise_sampler`). libtorch's CPU generator reproduces PyTorch's numbers exactly.

use tch::{Device, Kind, Tensor};

/// The seed as libtorch takes it: the u64 bit pattern (ComfyUI seeds go up to 2^64 − 1).
pub fn seed_bits(seed: i128) -> i64 {
    seed as u64 as i64
}

/// ComfyUI's initial noise for a latent of `shape`. With `batch_index` (latents taken from a batch),
/// noise is drawn per index up to the largest and picked, so a latent keeps its noise when split off.
pub fn initial_noise(seed: i128, shape: &[i64], batch_index: Option<&[i64]>) -> Tensor {
    tch::manual_seed(seed_bits(seed));
    match batch_index {
        None => Tensor::randn(shape, (Kind::Float, Device::Cpu)),
        Some(inds) => {
            let mut one = shape.to_vec();
            one[0] = 1;
            let max = inds.iter().copied().max().unwrap_or(0);
            let draws: Vec<Tensor> = (0..=max).map(|_| Tensor::randn(one.as_slice(), (Kind::Float, Device::Cpu))).collect();
            Tensor::cat(&inds.iter().map(|i| draws[*i as usize].shallow_clone()).collect::<Vec<_>>(), 0)
        }
    }
}

/// Per-step noise: ComfyUI gives each sampling run a private generator seeded with the seed. Nothing
/// else draws random numbers while a sampler runs, so re-seeding the default generator yields the same
/// sequence. Always drawn on the CPU (ComfyUI draws on the latent's device, which differs on CUDA).
pub fn step_noise(seed: i128) -> impl FnMut(&Tensor) -> Tensor {
    tch::manual_seed(seed_bits(seed));
    |x: &Tensor| Tensor::randn(x.size().as_slice(), (Kind::Float, Device::Cpu)).to_device(x.device())
}
