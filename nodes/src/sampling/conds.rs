//! Conditioning entries resolved against the latent being sampled, as ComfyUI's `process_conds` and
//! `get_area_and_mult` do: areas (in latent pixels or fractions), masks and their bounds, strengths
//! with feathered area edges, the copies that give the other side an entry of the same area, and the
//! extra input channels of inpainting UNets.

use diffloom_core::value::{Area, CondEntry, Shared, UnclipCond};
use diffloom_core::{Handle, NodeError};
use tch::{Kind, Tensor};

use super::model_sampling::ModelSampling;
use crate::family::FamilySpec;
use crate::resample::common_upscale;
use crate::tiles::fade_edge;

/// One entry ready for the denoiser.
pub struct Cond {
    /// The text encoder's states, `[1, tokens, dim]`.
    pub context: Tensor,
    /// `(h, w, y, x)` in latent pixels, clamped to the latent; None for the whole latent.
    pub area: Option<[i64; 4]>,
    /// GLIGENTextBoxApply's model and boxes (`GligenCond`), run as a middle patch on this entry's
    /// batch, which it shares with no other entry (ComfyUI's per-cond `patches`).
    pub gligen: Option<Handle>,
    /// Per-pixel weight of this entry's prediction over its area, `[b, c, h, w]`.
    pub mult: Tensor,
    /// The entry's strength when its weight is the same everywhere (no area, no mask): a latent that
    /// changes size while sampling (SamplerLCMUpscale) can then still be weighted.
    pub uniform: Option<f64>,
    /// The latent's (height, width) the entry was resolved for.
    pub latent_hw: (i64, i64),
    /// Inpainting UNets: mask and masked-image latent, `[b, 5, H, W]` over the whole latent.
    pub concat: Option<Tensor>,
    /// The sigmas (start, end) between which the entry applies (ConditioningSetTimestepRange through
    /// `percent_to_sigma`); None for the whole run.
    pub sigma_range: Option<(f64, f64)>,
    /// The ControlNets / T2I-Adapters applied to the entry (the latest application).
    pub control: Option<Handle>,
    /// unCLIPConditioning's image embeddings (see `adm.rs`, which turns them into `y`).
    pub unclip: Vec<UnclipCond>,
    /// The class-label (ADM) input `[1, adm_in_channels]` of a UNet that has one.
    pub y: Option<Tensor>,
}

impl Cond {
    /// A plain entry over the whole of a latent of `shape` `[b, c, h, w]` (no area, mask or
    /// inpainting input), for driving a sampler directly.
    pub fn whole(context: Tensor, shape: &[i64]) -> Cond {
        let latent_hw = (shape[2], shape[3]);
        Cond {
            context,
            area: None,
            gligen: None,
            mult: Tensor::ones(shape, (Kind::Float, tch::Device::Cpu)),
            uniform: Some(1.0),
            latent_hw,
            concat: None,
            sigma_range: None,
            control: None,
            unclip: Vec::new(),
            y: None,
        }
    }

    /// Whether the entry applies at `sigma` (ComfyUI's `get_area_and_mult` compares float32 sigmas).
    pub fn active_at(&self, sigma: f64) -> bool {
        match self.sigma_range {
            Some((start, end)) => !((sigma as f32) > (start as f32) || (sigma as f32) < (end as f32)),
            None => true,
        }
    }
}

/// What the entries are resolved against.
pub struct Target<'a> {
    /// The latent being sampled, scaled into the model's range, `[b, c, H, W]`.
    pub latent_in: &'a Tensor,
    /// The latent's noise mask at latent resolution, `[b, c, H, W]`.
    pub noise_mask: Option<&'a Tensor>,
    /// Whether the UNet takes the 5 inpainting channels.
    pub inpaint_unet: bool,
    /// Whether the UNet takes an InstructPix2Pix image latent (4 more channels).
    pub ip2p_unet: bool,
    /// The model's schedule, to turn timestep ranges into sigmas.
    pub sampling: &'a ModelSampling,
    /// The model's family (latent scale, blank inpainting latent).
    pub family: &'a FamilySpec,
}

/// An entry with its area and mask resolved to the latent's size.
#[derive(Clone)]
struct Resolved {
    entry: CondEntry,
    area: Option<[i64; 4]>,
    /// `[mb, H, W]`.
    mask: Option<Shared>,
}

/// ComfyUI's `repeat_to_batch_size`: the first `b` items of the batch tiled as often as needed.
pub fn repeat_to_batch(t: &Tensor, b: i64) -> Tensor {
    let n = t.size()[0];
    if n == b {
        t.shallow_clone()
    } else if n > b {
        t.narrow(0, 0, b)
    } else {
        let mut reps = vec![1i64; t.dim()];
        reps[0] = (b + n - 1) / n;
        t.repeat(reps.as_slice()).narrow(0, 0, b)
    }
}

/// Resolves the guider's sides (each a conditioning and the input it came from, for errors) for
/// `target`: the conds the denoiser runs, side by side in the same order.
pub fn resolve_sides(sides: &[(&str, &[CondEntry])], target: &Target) -> Result<Vec<Vec<Cond>>, NodeError> {
    let mut resolved = sides
        .iter()
        .map(|(input, entries)| entries.iter().map(|e| resolve_area(e, target, input)).collect::<Result<Vec<_>, _>>())
        .collect::<Result<Vec<_>, _>>()?;
    // Each side gets, for every area entry of another side, an entry of the same area (ComfyUI's
    // create_cond_with_same_area_if_none, in its order: side by side, entries added on the way
    // included), so the guidance compares like with like there.
    for k in 0..resolved.len() {
        let mut i = 0;
        while i < resolved[k].len() {
            for kk in 0..resolved.len() {
                if kk != k {
                    if let Some(copy) = same_area_copy(&resolved[k][i], &resolved[kk]) {
                        resolved[kk].push(copy);
                    }
                }
            }
            i += 1;
        }
    }
    control_to_uncond(&mut resolved);
    gligen_to_uncond(&mut resolved);
    resolved.into_iter().zip(sides).map(|(list, (input, _))| list.into_iter().map(|r| build_cond(r, target, input)).collect::<Result<Vec<_>, _>>()).collect()
}

/// ComfyUI's `apply_empty_x_to_equal_area` for `control`: the ControlNets the deprecated
/// ControlNetApply put on whole-image positive entries go to the whole-image entries of each other
/// side that has none of its own, in turn.
fn control_to_uncond(resolved: &mut [Vec<Resolved>]) {
    let Some((positive, others)) = resolved.split_first_mut() else { return };
    let cnets: Vec<Handle> =
        positive.iter().filter(|r| r.entry.control_apply_to_uncond && r.entry.area.is_none()).filter_map(|r| r.entry.control.clone()).collect();
    if cnets.is_empty() {
        return;
    }
    for side in others {
        let whole: Vec<usize> = (0..side.len()).filter(|i| side[*i].entry.area.is_none()).collect();
        if whole.iter().any(|i| side[*i].entry.control.is_some()) {
            continue;
        }
        let other: Vec<usize> = whole.into_iter().filter(|i| side[*i].entry.control.is_none()).collect();
        if other.is_empty() {
            continue;
        }
        for (x, c) in cnets.iter().enumerate() {
            side[other[x % other.len()]].entry.control = Some(c.clone());
        }
    }
}

/// ComfyUI's `apply_empty_x_to_equal_area` for `gligen`: the GLIGEN boxes of whole-image positive
/// entries go to the whole-image entries of each other side that has none of its own, in turn (so the
/// negative prediction is grounded by the same boxes).
fn gligen_to_uncond(resolved: &mut [Vec<Resolved>]) {
    let Some((positive, others)) = resolved.split_first_mut() else { return };
    let boxes: Vec<Handle> = positive.iter().filter(|r| r.area.is_none()).filter_map(|r| r.entry.gligen.clone()).collect();
    if boxes.is_empty() {
        return;
    }
    for side in others {
        let whole: Vec<usize> = (0..side.len()).filter(|i| side[*i].area.is_none()).collect();
        if whole.is_empty() || whole.iter().any(|i| side[*i].entry.gligen.is_some()) {
            continue;
        }
        for (x, g) in boxes.iter().enumerate() {
            side[whole[x % whole.len()]].entry.gligen = Some(g.clone());
        }
    }
}

fn resolve_area(e: &CondEntry, target: &Target, input: &str) -> Result<Resolved, NodeError> {
    let s = target.latent_in.size();
    let (lh, lw) = (s[2], s[3]);
    let round = |v: f64| v.round_ties_even() as i64;
    let mut area = e.area.map(|a| match a {
        Area::Latent { h, w, y, x } => [h, w, y, x],
        Area::Fraction { h, w, y, x } => [round(h * lh as f64).max(1), round(w * lw as f64).max(1), round(y * lh as f64), round(x * lw as f64)],
    });
    let mask = match &e.mask {
        None => None,
        Some(m) => {
            let m = match m.dim() {
                2 => m.to_kind(Kind::Float).unsqueeze(0),
                3 => m.to_kind(Kind::Float),
                _ => return Err(NodeError::input(input, format!("a conditioning mask of shape {:?}; a MASK is [h, w] or [b, h, w]", m.size()))),
            };
            let ms = m.size();
            let m = if (ms[1], ms[2]) != (lh, lw) { common_upscale(&m.unsqueeze(1), lw, lh, "bilinear", "disabled")?.squeeze_dim(1) } else { m };
            if e.area_from_mask {
                // The bounding box of the mask's nonzero pixels over the batch, at least 8×8.
                let any = m.abs().amax([0], false).gt(0.0);
                let rows = any.any_dim(1, false).nonzero();
                let cols = any.any_dim(0, false).nonzero();
                area = Some(if rows.size()[0] == 0 {
                    [8, 8, 0, 0]
                } else {
                    let (y0, y1) = (rows.min().int64_value(&[]), rows.max().int64_value(&[]));
                    let (x0, x1) = (cols.min().int64_value(&[]), cols.max().int64_value(&[]));
                    [(y1 - y0 + 1).max(8), (x1 - x0 + 1).max(8), y0, x0]
                });
            }
            Some(Shared(m))
        }
    };
    if let Some([h, w, y, x]) = area {
        if y >= lh || x >= lw || h <= 0 || w <= 0 || y < 0 || x < 0 {
            return Err(NodeError::input(
                input,
                format!("a conditioning area ({}×{} at x {}, y {} in pixels) lies outside the {}×{} image", w * 8, h * 8, x * 8, y * 8, lw * 8, lh * 8),
            ));
        }
    }
    Ok(Resolved { entry: e.clone(), area, mask })
}

/// The entry the other side needs for `c`'s area: a copy of `c` with the text states (and inpainting
/// inputs) of the smallest entry of `others` containing that area, unless that one has the very area.
fn same_area_copy(c: &Resolved, others: &[Resolved]) -> Option<Resolved> {
    let a = c.area?;
    let inside = |b: [i64; 4]| a[2] >= b[2] && a[3] >= b[3] && a[0] + a[2] <= b[0] + b[2] && a[1] + a[3] <= b[1] + b[3];
    let mut smallest: Option<&Resolved> = None;
    for o in others {
        match (o.area, smallest.and_then(|s| s.area)) {
            (Some(b), _) if !inside(b) => {}
            (Some(b), Some(sb)) if sb[0] * sb[1] <= b[0] * b[1] => {}
            (Some(_), _) => smallest = Some(o),
            (None, _) if smallest.is_none() => smallest = Some(o),
            (None, _) => {}
        }
    }
    let s = smallest?;
    if s.area == Some(a) {
        return None;
    }
    let mut copy = c.clone();
    copy.entry.cross_attn = s.entry.cross_attn.clone();
    copy.entry.concat_latent = s.entry.concat_latent.clone();
    copy.entry.concat_mask = s.entry.concat_mask.clone();
    copy.entry.unclip = s.entry.unclip.clone();
    Some(copy)
}

fn build_cond(r: Resolved, target: &Target, input: &str) -> Result<Cond, NodeError> {
    let s = target.latent_in.size();
    let (b, c, lh, lw) = (s[0], s[1], s[2], s[3]);
    let area = r.area.map(|[h, w, y, x]| [h.min(lh - y), w.min(lw - x), y, x]);
    let (ah, aw, ay, ax) = area.map_or((lh, lw, 0, 0), |[h, w, y, x]| (h, w, y, x));
    let mult = match &r.mask {
        Some(m) => {
            let m = m.narrow(1, ay, ah).narrow(2, ax, aw) * r.entry.mask_strength;
            repeat_to_batch(&m.unsqueeze(1), b).repeat([1, c, 1, 1])
        }
        None => Tensor::ones([b, c, ah, aw], (Kind::Float, tch::Device::Cpu)),
    } * r.entry.strength;
    if r.mask.is_none() && area.is_some() {
        // Areas fade in over up to 8 latent pixels on edges inside the latent.
        for (dim, start, len, full) in [(2, ay, ah, lh), (3, ax, aw, lw)] {
            let rr = (len / 4).min(8);
            if start != 0 {
                fade_edge(&mult, dim, rr, false)?;
            }
            if start + len < full {
                fade_edge(&mult, dim, rr, true)?;
            }
        }
    }
    let concat = if target.inpaint_unet {
        Some(inpaint_channels(&r.entry, target, input)?)
    } else if target.ip2p_unet {
        Some(ip2p_channels(&r.entry, target, input)?)
    } else {
        None
    };
    let sigma_range = r.entry.timestep_range.map(|(start, end)| (target.sampling.percent_to_sigma(start), target.sampling.percent_to_sigma(end)));
    let uniform = (r.mask.is_none() && area.is_none()).then_some(r.entry.strength);
    Ok(Cond {
        context: r.entry.cross_attn.to_kind(Kind::Float),
        area,
        mult,
        uniform,
        latent_hw: (lh, lw),
        concat,
        sigma_range,
        control: r.entry.control,
        gligen: r.entry.gligen,
        unclip: r.entry.unclip,
        y: None,
    })
}

/// The mask and masked-image latent an inpainting UNet takes (ComfyUI's `BaseModel.concat_cond`): the
/// entry's own (InpaintModelConditioning) or else the latent's noise mask and the latent itself;
/// without any mask, all ones and the latent of a blank image.
fn inpaint_channels(e: &CondEntry, target: &Target, input: &str) -> Result<Tensor, NodeError> {
    let s = target.latent_in.size();
    let (b, lh, lw) = (s[0], s[2], s[3]);
    let mask = match (&e.concat_mask, target.noise_mask) {
        (Some(m), _) => Some(m.to_kind(Kind::Float)),
        (None, Some(m)) => Some(m.narrow(1, 0, 1)),
        (None, None) => None,
    };
    let Some(mask) = mask else {
        // "Zero" in pixel space, encoded (model_base.blank_inpaint_image_like).
        let blank = Tensor::from_slice(&target.family.blank_inpaint_latent).view([1, 4, 1, 1]).expand([b, 4, lh, lw], false);
        return Ok(Tensor::cat(&[Tensor::ones([b, 1, lh, lw], (Kind::Float, tch::Device::Cpu)), blank], 1));
    };
    let ms = mask.size();
    let mask = mask.reshape([-1, 1, ms[ms.len() - 2], ms[ms.len() - 1]]);
    let mask = if (mask.size()[2], mask.size()[3]) != (lh, lw) { common_upscale(&mask, lw, lh, "bilinear", "center")? } else { mask };
    let mask = resize_to_batch(&mask.round(), b);
    let image = match &e.concat_latent {
        Some(l) => {
            let l = l.to_kind(Kind::Float) * target.family.latent_scale;
            if l.size()[1] != s[1] {
                return Err(NodeError::input(input, format!("the inpainting latent has {} channels, the model's have {}", l.size()[1], s[1])));
            }
            let l = if (l.size()[2], l.size()[3]) != (lh, lw) { common_upscale(&l, lw, lh, "bilinear", "center")? } else { l };
            resize_to_batch(&l, b)
        }
        None => target.latent_in.shallow_clone(),
    };
    Ok(Tensor::cat(&[mask, image], 1))
}

/// The image latent an InstructPix2Pix UNet takes (ComfyUI's `IP2P.concat_cond`): the entry's
/// (InstructPixToPixConditioning's encoding, unscaled), resized to the latent if it differs, or zeros.
fn ip2p_channels(e: &CondEntry, target: &Target, input: &str) -> Result<Tensor, NodeError> {
    let s = target.latent_in.size();
    let (b, c, lh, lw) = (s[0], s[1], s[2], s[3]);
    let Some(l) = &e.concat_latent else { return Ok(target.latent_in.zeros_like()) };
    let l = l.to_kind(Kind::Float);
    let l = if l.size()[1..] != s[1..] { common_upscale(&l, lw, lh, "bilinear", "center")? } else { l };
    if l.size()[1] != c {
        return Err(NodeError::input(input, format!("the InstructPix2Pix image latent has {} channels, the model's have {c}", l.size()[1])));
    }
    Ok(resize_to_batch(&l, b))
}

/// ComfyUI's `resize_to_batch_size`: items picked by nearest index when the batch sizes differ.
fn resize_to_batch(t: &Tensor, b: i64) -> Tensor {
    let n = t.size()[0];
    if n == b {
        return t.shallow_clone();
    }
    if b <= 1 {
        return t.narrow(0, 0, b.max(0));
    }
    let index: Vec<i64> = if b < n {
        (0..b).map(|i| ((i as f64 * (n - 1) as f64 / (b - 1) as f64).round_ties_even() as i64).min(n - 1)).collect()
    } else {
        (0..b).map(|i| (((i as f64 + 0.5) * n as f64 / b as f64).floor() as i64).min(n - 1)).collect()
    };
    t.index_select(0, &Tensor::from_slice(&index))
}
