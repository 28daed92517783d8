//! Every key rename, in one place: diffusers names to the LDM names the models use, so a diffusers
//! folder loads into the same models as a single file (after ComfyUI's `unet_to_diffusers` and
//! diffusers' own `convert_ldm_*` functions, read in the other direction), and RRDBNet's two older
//! layouts to Real-ESRGAN's, with the inverse the test-file writer uses.

/// The LDM UNet name of diffusers UNet key `k`. `nrb` is layers_per_block; `up_has_attn[i]` whether
/// up block `i` has attentions (its upsampler then sits at index 2 of the LDM block, else 1).
pub fn unet_key(k: &str, nrb: usize, up_has_attn: &[bool]) -> Option<String> {
    let simple = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (from, to) in simple {
        if let Some(rest) = k.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    let parts: Vec<&str> = k.split('.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let tail = |from: usize| parts[from..].join(".");
    match parts.first().copied()? {
        "down_blocks" => {
            let i = num(1)?;
            match (parts.get(2).copied()?, num(3)?) {
                ("resnets", j) => Some(format!("input_blocks.{}.0.{}", 1 + i * (nrb + 1) + j, resnet(&tail(4))?)),
                ("attentions", j) => Some(format!("input_blocks.{}.1.{}", 1 + i * (nrb + 1) + j, tail(4))),
                ("downsamplers", 0) if parts.get(4) == Some(&"conv") => Some(format!("input_blocks.{}.0.op.{}", (i + 1) * (nrb + 1), tail(5))),
                _ => None,
            }
        }
        "mid_block" => match (parts.get(1).copied()?, num(2)?) {
            ("resnets", 0) => Some(format!("middle_block.0.{}", resnet(&tail(3))?)),
            ("attentions", 0) => Some(format!("middle_block.1.{}", tail(3))),
            ("resnets", 1) => Some(format!("middle_block.2.{}", resnet(&tail(3))?)),
            _ => None,
        },
        "up_blocks" => {
            let i = num(1)?;
            match (parts.get(2).copied()?, num(3)?) {
                ("resnets", j) => Some(format!("output_blocks.{}.0.{}", i * (nrb + 1) + j, resnet(&tail(4))?)),
                ("attentions", j) => Some(format!("output_blocks.{}.1.{}", i * (nrb + 1) + j, tail(4))),
                ("upsamplers", 0) if parts.get(4) == Some(&"conv") => {
                    let slot = if *up_has_attn.get(i)? { 2 } else { 1 };
                    Some(format!("output_blocks.{}.{slot}.conv.{}", i * (nrb + 1) + nrb, tail(5)))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The LDM (`cldm`) name of diffusers ControlNet key `k` (ComfyUI's `load_controlnet_state_dict`
/// table): the UNet half as in [`unet_key`], then the hint embedding and the zero convolutions.
pub fn controlnet_key(k: &str, nrb: usize, hint_blocks: usize) -> Option<String> {
    let parts: Vec<&str> = k.splitn(3, '.').collect();
    let rest = |n: usize| parts.get(n).copied();
    match parts.first().copied()? {
        "controlnet_mid_block" => Some(format!("middle_block_out.0.{}", k.strip_prefix("controlnet_mid_block.")?)),
        "controlnet_down_blocks" => Some(format!("zero_convs.{}.0.{}", rest(1)?.parse::<usize>().ok()?, rest(2)?)),
        "controlnet_cond_embedding" => {
            let tail = k.strip_prefix("controlnet_cond_embedding.")?;
            let (layer, param) = tail.split_once('.')?;
            let index = match layer {
                "conv_in" => 0,
                "conv_out" => 2 * (hint_blocks + 1),
                "blocks" => {
                    let (n, param) = param.split_once('.')?;
                    return Some(format!("input_hint_block.{}.{param}", 2 * (n.parse::<usize>().ok()? + 1)));
                }
                _ => return None,
            };
            Some(format!("input_hint_block.{index}.{param}"))
        }
        _ => unet_key(k, nrb, &[]),
    }
}

/// The original name of a diffusers T2I-Adapter key (`adapter.` prefix). Full adapters: level i's
/// residual block j is `body.{i * nums_rb + j}`, its input convolution on the level's first block (as
/// ComfyUI's table); light adapters: `body.i.body.j`.
pub fn t2i_adapter_key(k: &str, light: bool, nums_rb: usize) -> Option<String> {
    let k = k.strip_prefix("adapter.")?;
    let Some(rest) = k.strip_prefix("body.") else { return Some(k.to_owned()) };
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    match rest.strip_prefix("resnets.") {
        Some(r) => {
            let (j, param) = r.split_once('.')?;
            let j: usize = j.parse().ok()?;
            Some(if light { format!("body.{i}.body.{j}.{param}") } else { format!("body.{}.{param}", i * nums_rb + j) })
        }
        None if light => Some(format!("body.{i}.{rest}")),
        None => Some(format!("body.{}.{rest}", i * nums_rb)),
    }
}

/// A UNet resnet's inner names.
fn resnet(rest: &str) -> Option<String> {
    let (layer, param) = rest.split_once('.')?;
    let ldm = match layer {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{ldm}.{param}"))
}

/// The LDM VAE name of diffusers VAE key `k`; `levels` is the number of resolution levels (the
/// decoder's up blocks count from the deepest level in diffusers, from the shallowest in LDM).
pub fn vae_key(k: &str, levels: usize) -> Option<String> {
    for same in ["quant_conv.", "post_quant_conv.", "encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out."] {
        if k.starts_with(same) {
            return Some(k.to_owned());
        }
    }
    let (side, rest) = k.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    if let Some(p) = rest.strip_prefix("conv_norm_out.") {
        return Some(format!("{side}.norm_out.{p}"));
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let tail = |from: usize| parts[from..].join(".");
    match parts.first().copied()? {
        "down_blocks" | "up_blocks" => {
            let i = num(1)?;
            let (level_name, level) = if parts[0] == "down_blocks" { ("down", i) } else { ("up", levels.checked_sub(1 + i)?) };
            match parts.get(2).copied()? {
                "resnets" => Some(format!("{side}.{level_name}.{level}.block.{}.{}", num(3)?, vae_resnet(&tail(4)))),
                "downsamplers" => Some(format!("{side}.down.{level}.downsample.{}", tail(4))),
                "upsamplers" => Some(format!("{side}.up.{level}.upsample.{}", tail(4))),
                _ => None,
            }
        }
        "mid_block" => match (parts.get(1).copied()?, num(2)?) {
            ("resnets", j) => Some(format!("{side}.mid.block_{}.{}", j + 1, vae_resnet(&tail(3)))),
            ("attentions", 0) => {
                let (layer, param) = tail(3).split_once('.').map(|(a, b)| (a.to_owned(), b.to_owned()))?;
                let (layer, param) = if layer == "to_out" { ("to_out", param.strip_prefix("0.")?.to_owned()) } else { (layer.as_str(), param) };
                let ldm = match layer {
                    "group_norm" => "norm",
                    "to_q" | "query" => "q",
                    "to_k" | "key" => "k",
                    "to_v" | "value" => "v",
                    "to_out" | "proj_attn" => "proj_out",
                    _ => return None,
                };
                Some(format!("{side}.mid.attn_1.{ldm}.{param}"))
            }
            _ => None,
        },
        _ => None,
    }
}

fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("conv_shortcut.") {
        Some(p) => format!("nin_shortcut.{p}"),
        None => rest.to_owned(),
    }
}

/// The Real-ESRGAN-layout name of an original-ESRGAN key, given the index of the last layer
/// (`model.{last}`): `model.0` is the first conv, `model.1.sub.{i}` the RRDBs and (at `nb`) the trunk
/// conv, then per upsampling stage an Upsample, a conv and a LeakyReLU (`model.3`, `model.6`, …),
/// then the HR conv and, after a LeakyReLU, the last conv.
pub fn rrdbnet_old_layout_key(k: &str, nb: usize, last: usize) -> Option<String> {
    let rest = k.strip_prefix("model.")?;
    let (index, tail) = rest.split_once('.')?;
    let index: usize = index.parse().ok()?;
    let upsamples = (last.checked_sub(4)?) / 3;
    match index {
        0 => Some(format!("conv_first.{tail}")),
        1 => {
            let sub = tail.strip_prefix("sub.")?;
            let (i, inner) = sub.split_once('.')?;
            let i: usize = i.parse().ok()?;
            if i == nb {
                return Some(format!("conv_body.{inner}"));
            }
            // RDB1.conv1.0.weight: the ".0" is the conv inside its (conv, LeakyReLU) Sequential.
            let (rdb, inner) = inner.split_once('.')?;
            let (conv, param) = inner.split_once(".0.")?;
            Some(format!("body.{i}.{}.{conv}.{param}", rdb.to_lowercase()))
        }
        i if i == last => Some(format!("conv_last.{tail}")),
        i if i == last - 2 => Some(format!("conv_hr.{tail}")),
        i if i % 3 == 0 && i / 3 <= upsamples => Some(format!("conv_up{}.{tail}", i / 3)),
        _ => None,
    }
}

/// The Real-ESRGAN-layout name of a key in ESRGAN's second layout (`RRDB_trunk.N.RDBR.convC`,
/// `trunk_conv`, `upconvK`, `HRconv`), or the key itself.
pub fn rrdbnet_trunk_layout_key(k: &str) -> String {
    if let Some(rest) = k.strip_prefix("RRDB_trunk.") {
        // N.RDBR.convC.param
        let mut parts: Vec<String> = rest.split('.').map(str::to_owned).collect();
        if let Some(rdb) = parts.get_mut(1) {
            *rdb = rdb.to_lowercase();
        }
        return format!("body.{}", parts.join("."));
    }
    for (from, to) in [("trunk_conv.", "conv_body."), ("HRconv.", "conv_hr."), ("upconv", "conv_up")] {
        if let Some(rest) = k.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    k.to_owned()
}

/// The original ESRGAN name (`model.N…`) of a Real-ESRGAN-layout RRDBNet key: the inverse of
/// [`rrdbnet_old_layout_key`], for writing test files in the layout community models have.
pub fn rrdbnet_original_key(k: &str, config: &crate::models::rrdbnet::RrdbConfig) -> String {
    let (layer, param) = k.rsplit_once('.').unwrap_or((k, ""));
    let up = config.upsamples as usize;
    let old = match layer {
        "conv_first" => "model.0".to_owned(),
        "conv_body" => format!("model.1.sub.{}", config.nb),
        "conv_hr" => format!("model.{}", 3 * up + 2),
        "conv_last" => format!("model.{}", 3 * up + 4),
        l if l.starts_with("conv_up") => format!("model.{}", 3 * l["conv_up".len()..].parse::<usize>().unwrap_or(0)),
        // body.I.rdbR.convC → model.1.sub.I.RDBR.convC.0
        l => {
            let parts: Vec<&str> = l.split('.').collect();
            match parts.as_slice() {
                [_, i, rdb, conv] => format!("model.1.sub.{i}.{}.{conv}.0", rdb.to_uppercase()),
                _ => l.to_owned(),
            }
        }
    };
    format!("{old}.{param}")
}

/// A diffusers `AutoencoderTiny` decoder key (`decoder.layers.N.rest`) as the released TAESD decoder
/// names it (`N+1.rest`: the Sequential there starts with the clamp, which diffusers applies in forward).
pub fn taesd_diffusers_key(k: &str) -> Option<String> {
    let rest = k.strip_prefix("decoder.layers.")?;
    let (n, tail) = rest.split_once('.')?;
    Some(format!("{}.{tail}", n.parse::<usize>().ok()? + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_the_ldm_block_numbering() {
        // SD 1.5: 2 res blocks per level, attention in up blocks 1..3 (diffusers order).
        let up = [false, true, true, true];
        let k = |s: &str| unet_key(s, 2, &up);
        assert_eq!(k("conv_in.weight").as_deref(), Some("input_blocks.0.0.weight"));
        assert_eq!(k("down_blocks.1.resnets.0.time_emb_proj.bias").as_deref(), Some("input_blocks.4.0.emb_layers.1.bias"));
        assert_eq!(k("down_blocks.1.attentions.1.proj_in.weight").as_deref(), Some("input_blocks.5.1.proj_in.weight"));
        assert_eq!(k("down_blocks.2.downsamplers.0.conv.weight").as_deref(), Some("input_blocks.9.0.op.weight"));
        assert_eq!(k("mid_block.resnets.1.conv_shortcut.weight").as_deref(), Some("middle_block.2.skip_connection.weight"));
        assert_eq!(k("up_blocks.0.upsamplers.0.conv.weight").as_deref(), Some("output_blocks.2.1.conv.weight"));
        assert_eq!(k("up_blocks.1.upsamplers.0.conv.weight").as_deref(), Some("output_blocks.5.2.conv.weight"));
        assert_eq!(
            k("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight").as_deref(),
            Some("output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight")
        );
        assert_eq!(k("time_embedding.linear_2.weight").as_deref(), Some("time_embed.2.weight"));
        assert_eq!(k("some.unknown.key"), None);
    }

    #[test]
    fn vae_names_reverse_the_decoder_levels() {
        assert_eq!(vae_key("decoder.up_blocks.0.resnets.2.conv1.weight", 4).as_deref(), Some("decoder.up.3.block.2.conv1.weight"));
        assert_eq!(vae_key("decoder.up_blocks.1.upsamplers.0.conv.bias", 4).as_deref(), Some("decoder.up.2.upsample.conv.bias"));
        assert_eq!(vae_key("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", 4).as_deref(), Some("encoder.down.1.block.0.nin_shortcut.weight"));
        assert_eq!(vae_key("encoder.mid_block.attentions.0.to_out.0.weight", 4).as_deref(), Some("encoder.mid.attn_1.proj_out.weight"));
        assert_eq!(vae_key("decoder.mid_block.attentions.0.group_norm.bias", 4).as_deref(), Some("decoder.mid.attn_1.norm.bias"));
        assert_eq!(vae_key("encoder.conv_norm_out.weight", 4).as_deref(), Some("encoder.norm_out.weight"));
    }
}
