//! ControlNets and T2I-Adapters applied to conditioning (ComfyUI's `ControlBase` after
//! `set_cond_hint`): the hint image, strength and step range each application carries, the chain to
//! the one applied before it, and the residuals the chain gives the UNet at one model call.

use std::cell::RefCell;

use diffloom_core::value::Shared;
use diffloom_core::{Handle, NodeError};
use tch::{Kind, Tensor};

use crate::checkpoint::control::ControlModel;
use crate::models::unet::{Residuals, UnetConfig};
use crate::resample::common_upscale;
use crate::sampling::model_sampling::ModelSampling;

/// A CONTROL_NET value: the loaded model and the file it came from.
pub struct ControlNetValue {
    pub model: std::rc::Rc<ControlModel>,
    /// The file name, for errors.
    pub name: String,
    /// ComfyUI enables global average pooling for files named `*_shuffle` (the shuffle ControlNet).
    pub global_average_pooling: bool,
}

/// One application of a control model to conditioning entries (shared by the entries it was applied
/// to, so they batch together).
pub struct AppliedControl {
    pub model: std::rc::Rc<ControlModel>,
    pub name: String,
    pub global_average_pooling: bool,
    /// `[b, c, h, w]` in 0..1 (the IMAGE moved to channels first).
    pub hint: Shared,
    pub strength: f64,
    /// (start, end) as fractions of the sampling run.
    pub percent_range: (f64, f64),
    /// The application made before this one on the same entries.
    pub previous: Option<Handle>,
    /// The hint resized for the last latent size asked for (ControlNets), or the adapter's features
    /// for it: `(pixel height, pixel width, tensors)`.
    cache: RefCell<Option<(i64, i64, Vec<Tensor>)>>,
}

/// ComfyUI's `broadcast_image_to`: a hint batch of one is used as it is (it broadcasts); otherwise the
/// first `target / batched` items, tiled to that many, once per conditioning in the model batch.
fn broadcast_to(t: &Tensor, target: i64, batched: i64) -> Tensor {
    let n = t.size()[0];
    if n == 1 {
        return t.shallow_clone();
    }
    let per = target / batched.max(1);
    let mut t = t.narrow(0, 0, per.min(n));
    if per > t.size()[0] {
        let k = t.size()[0];
        let mut parts: Vec<Tensor> = (0..per / k).map(|_| t.shallow_clone()).collect();
        parts.push(t.narrow(0, 0, per % k));
        t = Tensor::cat(&parts, 0);
    }
    if t.size()[0] == target {
        t
    } else {
        let copies: Vec<Tensor> = (0..batched.max(1)).map(|_| t.shallow_clone()).collect();
        Tensor::cat(&copies, 0)
    }
}

impl AppliedControl {
    pub fn new(value: &ControlNetValue, hint: Tensor, strength: f64, percent_range: (f64, f64), previous: Option<Handle>) -> AppliedControl {
        AppliedControl {
            model: value.model.clone(),
            name: value.name.clone(),
            global_average_pooling: value.global_average_pooling,
            hint: Shared(hint),
            strength,
            percent_range,
            previous,
            cache: RefCell::new(None),
        }
    }

    /// The applications in this chain, the latest first.
    pub fn chain(&self) -> Vec<&AppliedControl> {
        let mut out = vec![self];
        let mut cur = self;
        while let Some(prev) = cur.previous.as_ref().and_then(|h| h.downcast::<AppliedControl>()) {
            out.push(prev);
            cur = prev;
        }
        out
    }

    /// An error naming both files when a model in the chain was made for another UNet than
    /// `unet` (the file `model_name`): text-state width, or an adapter's level widths.
    pub fn check_fits(&self, unet: &UnetConfig, model_name: &str) -> Result<(), NodeError> {
        for c in self.chain() {
            let problem = match &*c.model {
                ControlModel::ControlNet(net) if net.config.unet.context_dim != unet.context_dim => Some(format!(
                    "takes {}-wide text states, but the model {model_name} gives {}-wide ones (a ControlNet for another model family: \
                     SD 1.x uses 768, SD 2.x 1024)",
                    net.config.unet.context_dim, unet.context_dim
                )),
                ControlModel::ControlNet(net) if net.config.unet.model_channels != unet.model_channels || net.config.unet.channel_mult != unet.channel_mult => {
                    Some(format!("has another block layout than the model {model_name}"))
                }
                ControlModel::Adapter(a) => {
                    let widths: Vec<i64> = unet.channel_mult.iter().map(|m| m * unet.model_channels).collect();
                    (a.config.channels.iter().zip(&widths).any(|(x, y)| x != y) || unet.num_res_blocks != 2)
                        .then(|| format!("has levels {:?} wide, which do not fit the model {model_name} ({widths:?})", a.config.channels))
                }
                _ => None,
            };
            if let Some(p) = problem {
                return Err(NodeError::Failed(format!("the ControlNet {} {p}", c.name)));
            }
        }
        Ok(())
    }

    /// The chain's residuals for one model call: `x_in` the UNet's (scaled) input without extra
    /// channels `[n * b, 4, h, w]`, `t` its timesteps, `context` its text states, `batched` how many
    /// conditionings share the call (n), at noise level `sigma`. None when no control is active.
    pub fn residuals(
        &self,
        x_in: &Tensor,
        t: &Tensor,
        context: &Tensor,
        batched: i64,
        sigma: f64,
        sampling: &ModelSampling,
    ) -> Result<Option<Residuals>, NodeError> {
        let previous = match self.previous.as_ref().and_then(|h| h.downcast::<AppliedControl>()) {
            Some(p) => p.residuals(x_in, t, context, batched, sigma, sampling)?,
            None => None,
        };
        let (start, end) = (sampling.percent_to_sigma(self.percent_range.0), sampling.percent_to_sigma(self.percent_range.1));
        // ComfyUI compares the float32 sigma.
        if (sigma as f32) > (start as f32) || (sigma as f32) < (end as f32) {
            return Ok(previous);
        }
        let s = x_in.size();
        let (target, ph, pw) = (s[0], s[2] * 8, s[3] * 8);
        let device = x_in.device();
        let mut cache = self.cache.borrow_mut();
        if !matches!(&*cache, Some((h, w, _)) if (*h, *w) == (ph, pw)) {
            let hint = common_upscale(&self.hint.to_kind(Kind::Float), pw, ph, "nearest-exact", "center")?;
            let tensors = match &*self.model {
                ControlModel::ControlNet(_) => vec![hint.to_device(device)],
                ControlModel::Adapter(a) => {
                    let hint = if a.config.hint_channels() == 1 && hint.size()[1] > 1 { hint.mean_dim(1, true, Kind::Float) } else { hint };
                    check_channels(&hint, a.config.hint_channels(), &self.name)?;
                    // The features of each hint item once per size; batch items map to features as
                    // they would to hints.
                    a.forward(&hint.to_device(device))
                }
            };
            *cache = Some((ph, pw, tensors));
        }
        let Some((_, _, tensors)) = &*cache else { return Ok(previous) };
        let mut r = match &*self.model {
            ControlModel::ControlNet(net) => {
                let hint = broadcast_to(&tensors[0], target, batched);
                check_channels(&hint, net.config.hint_channels, &self.name)?;
                net.forward(x_in, &hint, t, context)
            }
            ControlModel::Adapter(_) => {
                // ComfyUI's adapter list: features at input blocks 2, 5, 8 and 11 (SD's 12 input blocks).
                let mut input: Vec<Option<Tensor>> = (0..3 * tensors.len()).map(|_| None).collect();
                for (i, f) in tensors.iter().enumerate() {
                    input[3 * i + 2] = Some(broadcast_to(f, target, batched));
                }
                Residuals { input, ..Default::default() }
            }
        };
        let scale = |x: Tensor| {
            let x = if self.global_average_pooling {
                let sz = x.size();
                x.mean_dim(&[2i64, 3][..], true, None).repeat([1, 1, sz[2], sz[3]])
            } else {
                x
            };
            x * self.strength
        };
        let scale_all = |v: Vec<Option<Tensor>>| v.into_iter().map(|x| x.map(scale)).collect::<Vec<_>>();
        r.input = scale_all(r.input);
        r.output = scale_all(r.output);
        r.middle = r.middle.map(scale);
        Ok(Some(match previous {
            Some(p) => merge(r, p),
            None => r,
        }))
    }
}

fn check_channels(hint: &Tensor, want: i64, name: &str) -> Result<(), NodeError> {
    let got = hint.size()[1];
    if got != want {
        return Err(NodeError::input("image", format!("{name} takes a {want}-channel hint image, the image has {got} channels")));
    }
    Ok(())
}

/// ComfyUI's `control_merge` with the previous application's residuals: summed where both have one.
fn merge(mut r: Residuals, prev: Residuals) -> Residuals {
    let add = |cur: &mut Vec<Option<Tensor>>, prev: Vec<Option<Tensor>>| {
        for (i, p) in prev.into_iter().enumerate() {
            if i >= cur.len() {
                cur.push(p);
            } else if let Some(p) = p {
                cur[i] = Some(match cur[i].take() {
                    Some(c) => p + c,
                    None => p,
                });
            }
        }
    };
    add(&mut r.input, prev.input);
    add(&mut r.output, prev.output);
    r.middle = match (r.middle.take(), prev.middle) {
        (Some(c), Some(p)) => Some(p + c),
        (c, p) => c.or(p),
    };
    r
}
