//! The UNet's residual block (LDM `ResBlock`): keys `<prefix>.{in_layers.0, in_layers.2, emb_layers.1,
//! out_layers.0, out_layers.3, skip_connection}`.

use tch::Tensor;

use super::layers::{conv1x1, conv3x3, group_norm, linear, Conv2d, GroupNorm, Linear};
use crate::checkpoint::WPath;

pub struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb_proj: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    pub fn new(p: &WPath, c_in: i64, c_out: i64, c_emb: i64) -> Self {
        // LDM keeps these in nn.Sequential: in_layers = [GroupNorm, SiLU, conv], emb_layers = [SiLU,
        // Linear], out_layers = [GroupNorm, SiLU, Dropout, conv]; the indices are the key segments.
        ResBlock {
            in_norm: group_norm(&p.pp("in_layers").pp(0), c_in, 1e-5),
            in_conv: conv3x3(&p.pp("in_layers").pp(2), c_in, c_out),
            emb_proj: linear(&p.pp("emb_layers").pp(1), c_emb, c_out),
            out_norm: group_norm(&p.pp("out_layers").pp(0), c_out, 1e-5),
            out_conv: conv3x3(&p.pp("out_layers").pp(3), c_out, c_out),
            skip: (c_in != c_out).then(|| conv1x1(&p.pp("skip_connection"), c_in, c_out)),
        }
    }

    /// `x` `[b, c_in, h, w]`, `emb` the timestep embedding `[b, c_emb]`.
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Tensor {
        let h = self.in_conv.forward(&self.in_norm.forward(x).silu());
        let h = h + self.emb_proj.forward(&emb.silu()).unsqueeze(-1).unsqueeze(-1);
        let h = self.out_conv.forward(&self.out_norm.forward(&h).silu());
        match &self.skip {
            Some(skip) => skip.forward(x) + h,
            None => x + h,
        }
    }
}
