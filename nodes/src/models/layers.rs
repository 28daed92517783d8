//! The few layer types the SD models are made of, holding their tensors under checkpoint key names and
//! applying them with libtorch's functional ops.

use tch::Tensor;

use crate::checkpoint::WPath;

/// `weight` `[out, in]`, optional `bias` `[out]`.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

pub fn linear(p: &WPath, c_in: i64, c_out: i64) -> Linear {
    Linear { weight: p.get("weight", &[c_out, c_in]), bias: Some(p.get("bias", &[c_out])) }
}

pub fn linear_no_bias(p: &WPath, c_in: i64, c_out: i64) -> Linear {
    Linear { weight: p.get("weight", &[c_out, c_in]), bias: None }
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// A 2-D convolution with `weight` `[out, in, k, k]` and `bias` `[out]`.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: i64,
    pub padding: i64,
}

pub fn conv2d(p: &WPath, c_in: i64, c_out: i64, kernel: i64, stride: i64, padding: i64) -> Conv2d {
    Conv2d { weight: p.get("weight", &[c_out, c_in, kernel, kernel]), bias: p.get("bias", &[c_out]), stride, padding }
}

/// 3×3, padding 1: the convolution nearly every SD block uses.
pub fn conv3x3(p: &WPath, c_in: i64, c_out: i64) -> Conv2d {
    conv2d(p, c_in, c_out, 3, 1, 1)
}

pub fn conv1x1(p: &WPath, c_in: i64, c_out: i64) -> Conv2d {
    conv2d(p, c_in, c_out, 1, 1, 0)
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.weight, Some(&self.bias), [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }
}

/// Group normalisation with affine `weight` and `bias` `[channels]`.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

/// LDM's `GroupNorm32(32, channels)` (eps 1e-5) in the UNet; `Normalize` (eps 1e-6) in the VAE and the
/// UNet's spatial transformers.
pub fn group_norm(p: &WPath, channels: i64, eps: f64) -> GroupNorm {
    GroupNorm { weight: p.get("weight", &[channels]), bias: p.get("bias", &[channels]), groups: 32, eps }
}

impl GroupNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Layer normalisation over the last dimension.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

pub fn layer_norm(p: &WPath, dim: i64, eps: f64) -> LayerNorm {
    LayerNorm { weight: p.get("weight", &[dim]), bias: p.get("bias", &[dim]), eps }
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *self.weight.size().last().unwrap_or(&1);
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}
