//! Schedulers: functions from a step count to a decreasing list of sigmas ending at 0, with ComfyUI's
//! names and arithmetic (float32 tensors where ComfyUI uses them, so the lists match to the bit).

use tch::{Device, Kind, Tensor};

use super::model_sampling::ModelSampling;

/// ComfyUI's scheduler names, in its order (`comfy.samplers.SCHEDULER_NAMES`).
pub const SCHEDULER_NAMES: &[&str] = &["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"];

fn f32s(t: &Tensor) -> Vec<f64> {
    // The schedules are 1-D float tensors built here, which always convert (an empty schedule from a
    // failed conversion would make the sampler return its input unchanged).
    let v = Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view([-1])).expect("a 1-D float schedule"); // invariant: see above
    v.into_iter().map(f64::from).collect()
}

fn append_zero(mut v: Vec<f64>) -> Vec<f64> {
    v.push(0.0);
    v
}

/// Karras et al. (2022): `(σmax^(1/ρ) + ramp·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ`, then 0 (k-diffusion's
/// `get_sigmas_karras`).
pub fn karras(n: i64, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let ramp = Tensor::linspace(0.0, 1.0, n, (Kind::Float, Device::Cpu));
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    append_zero(f32s(&(ramp * (min_inv - max_inv) + max_inv).pow_tensor_scalar(rho)))
}

/// Evenly spaced in log sigma, then 0 (`get_sigmas_exponential`).
pub fn exponential(n: i64, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    append_zero(f32s(&Tensor::linspace(sigma_max.ln(), sigma_min.ln(), n, (Kind::Float, Device::Cpu)).exp()))
}

/// Sabour et al.'s KL-optimal schedule: evenly spaced in atan(σ) (`kl_optimal_scheduler`).
pub fn kl_optimal(n: i64, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    let adj = Tensor::arange(n, (Kind::Float, Device::Cpu)) / (n - 1).max(1) as f64;
    let s = (&adj * sigma_min.atan() + (adj.neg() + 1.0) * sigma_max.atan()).tan();
    append_zero(f32s(&s))
}

/// Every (1000/steps)-th training sigma from the top (`simple_scheduler`).
pub fn simple(ms: &ModelSampling, steps: i64) -> Vec<f64> {
    let sigmas = f32s(&ms.sigmas);
    let ss = sigmas.len() as f64 / steps as f64;
    append_zero((0..steps).map(|x| sigmas[sigmas.len() - 1 - (x as f64 * ss) as usize]).collect())
}

/// Timesteps evenly spaced from σmax's to σmin's; `sgm` drops the last one as SGM's uniform does
/// (`normal_scheduler`).
pub fn normal(ms: &ModelSampling, steps: i64, sgm: bool) -> Vec<f64> {
    let start = ms.timestep(&Tensor::from(ms.sigma_max() as f32)).double_value(&[]);
    let end = ms.timestep(&Tensor::from(ms.sigma_min() as f32)).double_value(&[]);
    let (timesteps, append) = if sgm {
        let t = f32s(&Tensor::linspace(start, end, steps + 1, (Kind::Float, Device::Cpu)));
        (t[..t.len() - 1].to_vec(), true)
    } else if ms.sigma(end).abs() < 1e-5 {
        (f32s(&Tensor::linspace(start, end, steps + 1, (Kind::Float, Device::Cpu))), false)
    } else {
        (f32s(&Tensor::linspace(start, end, steps, (Kind::Float, Device::Cpu))), true)
    };
    let sigs: Vec<f64> = timesteps.iter().map(|t| ms.sigma(*t)).collect();
    if append {
        append_zero(sigs)
    } else {
        sigs
    }
}

/// DDIM's uniform timestep spacing (`ddim_scheduler`).
pub fn ddim_uniform(ms: &ModelSampling, steps: i64) -> Vec<f64> {
    let sigmas = f32s(&ms.sigmas);
    let mut x = 1;
    let mut steps = steps as usize;
    let mut sigs = if sigmas[x].abs() < 1e-5 {
        steps += 1;
        vec![]
    } else {
        vec![0.0]
    };
    let ss = (sigmas.len() / steps).max(1);
    while x < sigmas.len() {
        sigs.push(sigmas[x]);
        x += ss;
    }
    sigs.reverse();
    sigs
}

/// Lee et al.'s beta schedule: training timesteps at the quantiles of Beta(α, β), duplicates dropped
/// (`beta_scheduler`, α = β = 0.6).
pub fn beta(ms: &ModelSampling, steps: i64, alpha: f64, beta: f64) -> Vec<f64> {
    let sigmas = f32s(&ms.sigmas);
    let total = (sigmas.len() - 1) as f64;
    let mut out = Vec::new();
    let mut last = -1.0;
    for i in 0..steps {
        // numpy: 1 - linspace(0, 1, steps, endpoint=False)
        let q = 1.0 - i as f64 / steps as f64;
        let t = (beta_ppf(q, alpha, beta) * total).round_ties_even();
        if t != last {
            out.push(sigmas[t as usize]);
        }
        last = t;
    }
    append_zero(out)
}

/// Linear then quadratic in 1 − σ/σmax, from the Mochi/LTX papers (`linear_quadratic_schedule`,
/// threshold 0.025, half the steps linear).
pub fn linear_quadratic(ms: &ModelSampling, steps: i64, threshold_noise: f64) -> Vec<f64> {
    let schedule: Vec<f64> = if steps == 1 {
        vec![1.0, 0.0]
    } else {
        let linear_steps = steps / 2;
        let mut s: Vec<f64> = (0..linear_steps).map(|i| i as f64 * threshold_noise / linear_steps as f64).collect();
        let diff = linear_steps as f64 - threshold_noise * steps as f64;
        let quadratic_steps = (steps - linear_steps) as f64;
        let qc = diff / (linear_steps as f64 * quadratic_steps * quadratic_steps);
        let lc = threshold_noise / linear_steps as f64 - 2.0 * diff / (quadratic_steps * quadratic_steps);
        let c = qc * (linear_steps * linear_steps) as f64;
        s.extend((linear_steps..steps).map(|i| qc * (i * i) as f64 + lc * i as f64 + c));
        s.push(1.0);
        s.into_iter().map(|x| 1.0 - x).collect()
    };
    let sigma_max = ms.sigma_max() as f32;
    schedule.into_iter().map(|x| ((x as f32) * sigma_max) as f64).collect()
}

/// The sigmas of scheduler `name` for `steps` steps.
pub fn calculate_sigmas(ms: &ModelSampling, name: &str, steps: i64) -> Option<Vec<f64>> {
    let (lo, hi) = (ms.sigma_min(), ms.sigma_max());
    Some(match name {
        "simple" => simple(ms, steps),
        "sgm_uniform" => normal(ms, steps, true),
        "karras" => karras(steps, lo, hi, 7.0),
        "exponential" => exponential(steps, lo, hi),
        "ddim_uniform" => ddim_uniform(ms, steps),
        "beta" => beta(ms, steps, 0.6, 0.6),
        "normal" => normal(ms, steps, false),
        "linear_quadratic" => linear_quadratic(ms, steps, 0.025),
        "kl_optimal" => kl_optimal(steps, lo, hi),
        _ => return None,
    })
}

/// The inverse of the regularized incomplete beta function I_x(a, b) (statrs's `beta_reg`): the x with
/// I_x = q (scipy.stats.beta.ppf), by bisection to full double precision.
pub fn beta_ppf(q: f64, a: f64, b: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if statrs::function::beta::beta_reg(a, b, mid) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// A polynomial ramp in log sigma, then 0 (k-diffusion's `get_sigmas_polyexponential`; ρ = 1 is
/// exponential).
pub fn polyexponential(n: i64, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let ramp = Tensor::linspace(1.0, 0.0, n, (Kind::Float, Device::Cpu)).pow_tensor_scalar(rho);
    let (lmin, lmax) = (sigma_min.ln(), sigma_max.ln());
    append_zero(f32s(&(ramp * (lmax - lmin) + lmin).exp()))
}

/// The continuous VP schedule, then 0 (k-diffusion's `get_sigmas_vp`).
pub fn vp(n: i64, beta_d: f64, beta_min: f64, eps_s: f64) -> Vec<f64> {
    let t = Tensor::linspace(1.0, eps_s, n, (Kind::Float, Device::Cpu));
    let sigmas = (t.square() * (beta_d / 2.0) + &t * beta_min).special_expm1().sqrt();
    append_zero(f32s(&sigmas))
}

/// Tiankai et al.'s (2024) Laplace schedule, clamped to [σmin, σmax], without a final 0 (ComfyUI's
/// `get_sigmas_laplace`).
pub fn laplace(n: i64, sigma_min: f64, sigma_max: f64, mu: f64, beta: f64) -> Vec<f64> {
    let x = Tensor::linspace(0.0, 1.0, n, (Kind::Float, Device::Cpu));
    let half = x.neg() + 0.5;
    let lmb = (half.sign() * ((half.abs() * -2.0 + 1.0 + 1e-5).log() * beta)).neg() + mu;
    f32s(&lmb.exp().clamp_min(sigma_min).clamp_max(sigma_max))
}

/// SDTurboScheduler: SD-Turbo's timesteps 999, 899, …, 99, from the one denoise picks, then 0.
pub fn sd_turbo(ms: &ModelSampling, steps: i64, denoise: f64) -> Vec<f64> {
    let start = (10 - (10.0 * denoise) as i64).clamp(0, 10) as usize;
    let timesteps: Vec<i64> = (1..=10).rev().map(|k| k * 100 - 1).collect();
    let end = (start + steps.max(0) as usize).min(timesteps.len());
    append_zero(timesteps[start..end].iter().map(|t| ms.sigma(*t as f64)).collect())
}

/// numpy's `interp` of a log-decreasing list to `num` points, as ComfyUI's `loglinear_interp`.
pub fn loglinear_interp(t_steps: &[f64], num: usize) -> Vec<f64> {
    let ys: Vec<f64> = t_steps.iter().rev().map(|v| v.ln()).collect();
    let m = ys.len();
    let at = |x: f64| {
        let pos = x * (m - 1) as f64;
        let i = (pos.floor() as usize).min(m - 2);
        ys[i] + (ys[i + 1] - ys[i]) * (pos - i as f64)
    };
    let mut out: Vec<f64> = (0..num).map(|k| at(if num == 1 { 0.0 } else { k as f64 / (num - 1) as f64 }).exp()).collect();
    out.reverse();
    out
}

/// The noise levels Align Your Steps found for SD 1.x, SDXL and SVD (NVIDIA's how-to, as ComfyUI's
/// AlignYourStepsScheduler has them), 10 steps each.
pub const AYS_NOISE_LEVELS: &[(&str, [f64; 11])] = &[
    (
        "SD1",
        [
            14.6146412293,
            6.4745760956,
            3.8636745985,
            2.6946151520,
            1.8841921177,
            1.3943805092,
            0.9642583904,
            0.6523686016,
            0.3977456272,
            0.1515232662,
            0.0291671582,
        ],
    ),
    (
        "SDXL",
        [
            14.6146412293,
            6.3184485287,
            3.7681790315,
            2.1811480769,
            1.3405244945,
            0.8620721141,
            0.5550693289,
            0.3798540708,
            0.2332364134,
            0.1114188177,
            0.0291671582,
        ],
    ),
    ("SVD", [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]),
];

/// The last `round(steps·denoise) + 1` levels of a table schedule for `steps`, the final one set to 0
/// (AlignYourStepsScheduler and GITSScheduler).
fn table_tail(levels: Vec<f64>, steps: i64, denoise: f64) -> Vec<f64> {
    if denoise <= 0.0 {
        return vec![];
    }
    let total = if denoise < 1.0 { (steps as f64 * denoise).round_ties_even() as usize } else { steps as usize };
    let mut s = levels[levels.len().saturating_sub(total + 1)..].to_vec();
    if let Some(last) = s.last_mut() {
        *last = 0.0;
    }
    s
}

/// AlignYourStepsScheduler for `model_type` (SD1, SDXL, SVD).
pub fn align_your_steps(model_type: &str, steps: i64, denoise: f64) -> Option<Vec<f64>> {
    let levels = AYS_NOISE_LEVELS.iter().find(|(m, _)| *m == model_type)?.1;
    let levels = if (steps + 1) as usize != levels.len() { loglinear_interp(&levels, steps as usize + 1) } else { levels.to_vec() };
    Some(table_tail(levels, steps, denoise))
}

/// GITSScheduler: the table's schedule for `steps` (2–20) at `coeff` (0.80–1.50 in 0.05 steps), or
/// its 20-step one interpolated for more steps.
pub fn gits(coeff: f64, steps: i64, denoise: f64) -> Option<Vec<f64>> {
    let key = (coeff * 100.0).round() / 100.0;
    let table = super::gits::GITS_NOISE_LEVELS.iter().find(|(c, _)| (*c - key).abs() < 1e-9)?.1;
    let levels = if steps <= 20 { table.get(steps.checked_sub(2)? as usize)?.to_vec() } else { loglinear_interp(table.last()?, steps as usize + 1) };
    Some(table_tail(levels, steps, denoise))
}
