//! The Brownian-tree noise of the SDE samplers, reproducing torchsde's `BrownianTree` (0.2.6, as
//! ComfyUI's `BrownianTreeNoiseSampler` builds it: tol 1e-6, pool size 24, halfway tree, no Lévy area)
//! so that dpmpp_sde / dpmpp_2m_sde / dpmpp_3m_sde seeds carry over from ComfyUI.
//!
//! Every node of the tree draws its Gaussian from a generator seeded by numpy's `SeedSequence` hash of
//! (seed, node key, depth); the increment over [s, e] is split at the midpoint by a Brownian bridge.

use std::collections::HashMap;

use diffloom_aten::Generator;
use diffloom_core::NodeError;
use tch::{Device, Kind, Tensor};

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 24;

/// numpy's `_coerce_to_uint32_array` for a non-negative integer: little-endian 32-bit words, [0] for 0.
fn words(mut n: u128) -> Vec<u32> {
    if n == 0 {
        return vec![0];
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(n as u32);
        n >>= 32;
    }
    out
}

/// `numpy.random.SeedSequence(entropy, spawn_key, pool_size=24).generate_state(n_words)`.
pub fn seed_sequence_state(entropy: u64, spawn_key: &[u64], n_words: usize) -> Vec<u32> {
    let mut run = words(entropy as u128);
    let spawn: Vec<u32> = spawn_key.iter().flat_map(|k| words(*k as u128)).collect();
    if !spawn.is_empty() && run.len() < POOL_SIZE {
        run.resize(POOL_SIZE, 0);
    }
    let entropy: Vec<u32> = run.into_iter().chain(spawn).collect();
    let mut hash_const = INIT_A;
    let mut hashmix = |v: u32| {
        let mut v = v ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        v = v.wrapping_mul(hash_const);
        v ^ (v >> XSHIFT)
    };
    let mix = |x: u32, y: u32| {
        let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> XSHIFT)
    };
    let mut pool: Vec<u32> = (0..POOL_SIZE).map(|i| hashmix(entropy.get(i).copied().unwrap_or(0))).collect();
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                let h = hashmix(pool[src]);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for e in entropy.iter().skip(POOL_SIZE) {
        for dst in 0..POOL_SIZE {
            let h = hashmix(*e);
            pool[dst] = mix(pool[dst], h);
        }
    }
    let mut hash_const = INIT_B;
    (0..n_words)
        .map(|i| {
            let mut v = pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> XSHIFT)
        })
        .collect()
}

/// Python's `round(x, 6)`: the double nearest to x's correctly rounded 6-decimal form.
fn round6(x: f64) -> f64 {
    format!("{x:.6}").parse().unwrap_or(x)
}

/// `torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(seed))`, as torchsde
/// draws each node (`_brownian/brownian_interval.py::_randn`).
fn randn_seeded(shape: &[i64], seed: u32, device: Device) -> Result<Tensor, NodeError> {
    let draw = Generator::new(device, u64::from(seed)).and_then(|mut g| g.randn(shape, Kind::Float));
    draw.map_err(|e| NodeError::Failed(format!("drawing Brownian noise on {device:?}: {e}")))
}

/// A Brownian motion on [t0, t1] with W(t0) = 0, queried for increments.
pub struct BrownianTree {
    shape: Vec<i64>,
    device: Device,
    entropy: u64,
    start: f64,
    end: f64,
    root: Tensor,
    /// Increments of visited nodes by (key, depth).
    cache: HashMap<(u64, u64), Tensor>,
}

impl BrownianTree {
    /// A tree whose noise is drawn on `device` (ComfyUI's `cpu=True` trees: the CPU).
    pub fn new(shape: &[i64], t0: f64, t1: f64, entropy: u64, device: Device) -> Result<BrownianTree, NodeError> {
        let state = seed_sequence_state(entropy, &[], 3);
        let root = randn_seeded(shape, state[0], device)? * (t1 - t0).sqrt();
        Ok(BrownianTree { shape: shape.to_vec(), device, entropy, start: round6(t0), end: round6(t1), root, cache: HashMap::new() })
    }

    /// The increment of the node reached by `path` (true = left) from the root.
    fn node(&mut self, path: &[bool]) -> Result<Tensor, NodeError> {
        let (mut s, mut e) = (self.start, self.end);
        let (mut key, mut depth) = (0u64, 0u64);
        let mut w = self.root.shallow_clone();
        for &left in path {
            let child = (2 * key + u64::from(!left), depth + 1);
            let mid = round6(0.5 * (e + s));
            if let Some(cached) = self.cache.get(&child) {
                w = cached.shallow_clone();
            } else {
                let h_rec = 1.0 / (e - s);
                let (ld, rd) = (mid - s, e - mid);
                let seed = seed_sequence_state(self.entropy, &[key, depth], 4)[0];
                let noise = randn_seeded(&self.shape, seed, self.device)?;
                let left_w = &w * ld * h_rec + noise * (ld * rd * h_rec).sqrt();
                w = if left { left_w } else { &w - left_w };
                self.cache.insert(child, w.shallow_clone());
            }
            (key, depth) = child;
            (s, e) = if left { (s, mid) } else { (mid, e) };
        }
        Ok(w)
    }

    /// W(tb) − W(ta) for ta < tb, as torchsde composes it from the tree's dyadic pieces.
    pub fn increment(&mut self, ta: f64, tb: f64) -> Result<Tensor, NodeError> {
        let ta = round6(ta.clamp(self.start, self.end));
        let tb = round6(tb.clamp(self.start, self.end));
        let (shape, device) = (self.shape.clone(), self.device);
        let zeros = move || Tensor::zeros(shape.as_slice(), (Kind::Float, device));
        if ta == tb {
            return Ok(zeros());
        }
        let mut paths = Vec::new();
        self.decompose(self.start, self.end, &mut Vec::new(), ta, tb, &mut paths);
        let mut total: Option<Tensor> = None;
        for p in paths {
            let w = self.node(&p)?;
            total = Some(match total {
                None => w,
                Some(t) => t + w,
            });
        }
        Ok(total.unwrap_or_else(zeros))
    }

    fn decompose(&self, s: f64, e: f64, path: &mut Vec<bool>, ta: f64, tb: f64, out: &mut Vec<Vec<bool>>) {
        if ta == s && tb == e {
            out.push(path.clone());
            return;
        }
        let mid = round6(0.5 * (e + s));
        if tb <= mid {
            path.push(true);
            self.decompose(s, mid, path, ta, tb, out);
            path.pop();
        } else if ta >= mid {
            path.push(false);
            self.decompose(mid, e, path, ta, tb, out);
            path.pop();
        } else {
            path.push(true);
            self.decompose(s, mid, path, ta, mid, out);
            path.pop();
            path.push(false);
            self.decompose(mid, e, path, mid, tb, out);
            path.pop();
        }
    }
}

/// ComfyUI's `BrownianTreeNoiseSampler`: unit-variance noise for a step from σ to σ_next,
/// `(W(σ_next) − W(σ)) / √|σ_next − σ|`, over a tree spanning the run's smallest positive and largest
/// sigma, drawn on the CPU (`cpu=True`, the plain SDE samplers) or on the model's device (the `_gpu`
/// ones, `cpu=False`).
pub struct BrownianNoise {
    tree: BrownianTree,
}

impl BrownianNoise {
    pub fn new(shape: &[i64], sigmas: &[f64], seed: i128, device: Device) -> Result<BrownianNoise, NodeError> {
        let lo = sigmas.iter().copied().filter(|s| *s > 0.0).fold(f64::INFINITY, f64::min);
        let hi = sigmas.iter().copied().fold(0.0, f64::max);
        // Sigmas are float32 in ComfyUI; the tree takes their float64 values.
        Ok(BrownianNoise { tree: BrownianTree::new(shape, lo as f32 as f64, hi as f32 as f64, seed as u64, device)? })
    }

    /// The noise for a step from `sigma` to `sigma_next`, on the tree's device.
    pub fn noise(&mut self, sigma: f64, sigma_next: f64) -> Result<Tensor, NodeError> {
        let (a, b) = (sigma as f32 as f64, sigma_next as f32 as f64);
        let (lo, hi, sign) = if a < b { (a, b, 1.0) } else { (b, a, -1.0) };
        let w = self.tree.increment(lo, hi)? * sign;
        Ok(w / ((b as f32 - a as f32).abs().sqrt() as f64))
    }
}
