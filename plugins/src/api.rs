//! What plugins see: engine values as Lua values, and IMAGE / MASK / LATENT as a `Tensor` userdata
//! whose operations run in libtorch (arithmetic, clamp, resize, crop, pad, per-channel scales,
//! statistics, small tables), so common work never loops over pixels in Lua.

use diffloom_core::value::{Latent, Shared};
use diffloom_core::{Value, ValueType};
use mlua::{FromLua, Lua, MetaMethod, UserData, UserDataMethods, Value as LuaValue};
use std::rc::Rc;
use tch::{Kind, Tensor};

/// A tensor handed to Lua, with the engine type it stands for (IMAGE, MASK, LATENT, or a plain
/// tensor made in Lua).
pub struct LuaTensor {
    pub tensor: Tensor,
    pub ty: Option<ValueType>,
    /// For a LATENT's samples (and tensors computed from them): its noise mask and batch indices, so a
    /// latent that passes through Lua keeps them.
    pub latent: Option<Rc<LatentExtras>>,
}

/// What a LATENT carries besides its samples.
#[derive(Default)]
pub struct LatentExtras {
    pub noise_mask: Option<Shared>,
    pub batch_index: Option<Vec<i64>>,
}

impl Clone for LuaTensor {
    fn clone(&self) -> Self {
        LuaTensor { tensor: self.tensor.shallow_clone(), ty: self.ty, latent: self.latent.clone() }
    }
}

impl FromLua for LuaTensor {
    fn from_lua(value: LuaValue, _: &Lua) -> mlua::Result<Self> {
        match value {
            LuaValue::UserData(ud) => Ok(ud.borrow::<LuaTensor>()?.clone()),
            other => Err(mlua::Error::RuntimeError(format!("expected a tensor, got a {}", other.type_name()))),
        }
    }
}

fn err(message: impl Into<String>) -> mlua::Error {
    mlua::Error::RuntimeError(message.into())
}

fn torch<T>(r: Result<T, tch::TchError>) -> mlua::Result<T> {
    r.map_err(|e| err(format!("libtorch: {e}")))
}

/// A number or a tensor, as arithmetic operands.
fn operand(v: &LuaValue) -> mlua::Result<Tensor> {
    match v {
        LuaValue::Integer(i) => Ok(Tensor::from(*i as f32)),
        LuaValue::Number(n) => Ok(Tensor::from(*n as f32)),
        LuaValue::UserData(ud) => Ok(ud.borrow::<LuaTensor>()?.tensor.shallow_clone()),
        other => Err(err(format!("expected a number or a tensor, got a {}", other.type_name()))),
    }
}

impl LuaTensor {
    /// A tensor of type `ty` (None: untyped), with no latent extras.
    pub fn new(tensor: Tensor, ty: Option<ValueType>) -> LuaTensor {
        LuaTensor { tensor, ty, latent: None }
    }

    /// A result of an operation on this tensor: the same type and latent extras.
    fn same(&self, tensor: Tensor) -> LuaTensor {
        LuaTensor { tensor, ty: self.ty, latent: self.latent.clone() }
    }

    /// NCHW view for spatial operations (IMAGE is NHWC, MASK is NHW).
    fn to_nchw(&self) -> mlua::Result<Tensor> {
        Ok(match (self.ty, self.tensor.dim()) {
            (Some(ValueType::Image), 4) => torch(self.tensor.f_permute([0, 3, 1, 2]))?,
            (Some(ValueType::Mask), 3) => torch(self.tensor.f_unsqueeze(1))?,
            (_, 4) => self.tensor.shallow_clone(),
            (_, d) => return Err(err(format!("a spatial operation needs an image, mask or latent, not a {d}-D tensor"))),
        })
    }

    fn same_from_nchw(&self, t: Tensor) -> mlua::Result<LuaTensor> {
        let t = match (self.ty, self.tensor.dim()) {
            (Some(ValueType::Image), 4) => torch(t.f_permute([0, 2, 3, 1]).and_then(|t| t.f_contiguous()))?,
            (Some(ValueType::Mask), 3) => torch(t.f_squeeze_dim(1))?,
            _ => t,
        };
        Ok(self.same(t))
    }
}

impl UserData for LuaTensor {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("shape", |_, t, ()| Ok(t.tensor.size()));
        m.add_method("kind", |_, t, ()| Ok(t.ty.map(|k| k.name().to_owned())));
        m.add_method("dtype", |_, t, ()| Ok(format!("{:?}", t.tensor.kind())));
        m.add_method("device", |_, t, ()| Ok(format!("{:?}", t.tensor.device())));
        m.add_method("clamp", |_, t, (lo, hi): (f64, f64)| Ok(t.same(torch(t.tensor.f_clamp(lo, hi))?)));
        m.add_method("pow", |_, t, p: f64| Ok(t.same(torch(t.tensor.f_pow_tensor_scalar(p))?)));
        m.add_method("abs", |_, t, ()| Ok(t.same(torch(t.tensor.f_abs())?)));
        m.add_method("sqrt", |_, t, ()| Ok(t.same(torch(t.tensor.f_sqrt())?)));
        m.add_method("exp", |_, t, ()| Ok(t.same(torch(t.tensor.f_exp())?)));
        m.add_method("log", |_, t, ()| Ok(t.same(torch(t.tensor.f_log())?)));
        m.add_method("mean", |_, t, ()| torch(t.tensor.f_mean(Kind::Float)).map(|v| v.double_value(&[])));
        m.add_method("std", |_, t, ()| torch(t.tensor.f_std(true)).map(|v| v.double_value(&[])));
        m.add_method("min", |_, t, ()| torch(t.tensor.f_min()).map(|v| v.double_value(&[])));
        m.add_method("max", |_, t, ()| torch(t.tensor.f_max()).map(|v| v.double_value(&[])));
        m.add_method("sum", |_, t, ()| torch(t.tensor.f_sum(Kind::Float)).map(|v| v.double_value(&[])));
        // Linear interpolation towards `other` by `w` (a number or a tensor of weights).
        m.add_method("lerp", |_, t, (other, w): (LuaTensor, LuaValue)| {
            let w = operand(&w)?;
            Ok(t.same(torch(t.tensor.f_lerp_tensor(&other.tensor, &w))?))
        });
        // Elementwise choice: where `cond` is non-zero take self, else `other`.
        m.add_method("where", |_, t, (cond, other): (LuaTensor, LuaValue)| {
            let other = operand(&other)?;
            let c = torch(cond.tensor.f_ne(0.0))?;
            Ok(t.same(torch(t.tensor.f_where_self(&c, &other))?))
        });
        // Scales and offsets per channel (the last dimension of an IMAGE, the second of a LATENT).
        m.add_method("channels", |_, t, (scale, offset): (Vec<f64>, Option<Vec<f64>>)| {
            let dim = if t.ty == Some(ValueType::Image) { t.tensor.dim() as i64 - 1 } else { 1 };
            let n = t.tensor.size()[dim as usize] as usize;
            if scale.len() != n || offset.as_ref().is_some_and(|o| o.len() != n) {
                return Err(err(format!("channels: expected {n} values per list")));
            }
            let mut shape = vec![1i64; t.tensor.dim()];
            shape[dim as usize] = n as i64;
            let s = torch(Tensor::f_from_slice(&scale.iter().map(|x| *x as f32).collect::<Vec<_>>()).and_then(|s| s.f_view(shape.as_slice())))?;
            let mut out = torch(t.tensor.f_mul(&s))?;
            if let Some(o) = offset {
                let o = torch(Tensor::f_from_slice(&o.iter().map(|x| *x as f32).collect::<Vec<_>>()).and_then(|o| o.f_view(shape.as_slice())))?;
                out = torch(out.f_add(&o))?;
            }
            Ok(t.same(out))
        });
        // Comparisons give 1 where true and 0 where false (a MASK for a MASK, and so on).
        for (name, op) in [("le", 0), ("lt", 1), ("ge", 2), ("gt", 3)] {
            m.add_method(name, move |_, t, x: LuaValue| {
                let y = operand(&x)?;
                let r = match op {
                    0 => t.tensor.f_le_tensor(&y),
                    1 => t.tensor.f_lt_tensor(&y),
                    2 => t.tensor.f_ge_tensor(&y),
                    _ => t.tensor.f_gt_tensor(&y),
                };
                Ok(t.same(torch(r.and_then(|b| b.f_to_kind(Kind::Float)))?))
            });
        }
        // Grayscale (Rec. 601 luma) of an IMAGE, replicated over its three channels.
        m.add_method("gray", |_, t, ()| {
            let w = torch(Tensor::f_from_slice(&[0.299f32, 0.587, 0.114]))?;
            let luma = torch(t.tensor.f_mul(&w).and_then(|x| x.f_sum_dim_intlist(-1, true, Kind::Float)))?;
            Ok(t.same(torch(luma.f_expand_as(&t.tensor).and_then(|x| x.f_contiguous()))?))
        });
        // The largest value over the channels of an IMAGE, as a MASK.
        m.add_method("channel_max", |_, t, ()| Ok(LuaTensor::new(torch(t.tensor.f_amax([-1], false))?, Some(ValueType::Mask))));
        // A MASK as a grayscale IMAGE.
        m.add_method("to_image", |_, t, ()| {
            let x = torch(t.tensor.f_unsqueeze(-1))?;
            let s = x.size();
            Ok(LuaTensor::new(torch(x.f_expand([s[0], s[1], s[2], 3], false).and_then(|x| x.f_contiguous()))?, Some(ValueType::Image)))
        });
        // One channel of an IMAGE as a MASK-shaped tensor.
        m.add_method("channel", |_, t, i: i64| {
            let dim = t.tensor.dim() as i64 - 1;
            Ok(LuaTensor::new(torch(t.tensor.f_select(dim, i))?, Some(ValueType::Mask)))
        });
        m.add_method("resize", |_, t, (w, h, method): (i64, i64, Option<String>)| {
            let x = t.to_nchw()?;
            let out = match method.as_deref().unwrap_or("bilinear") {
                "nearest" => torch(x.f_upsample_nearest2d([h, w], None, None))?,
                "bilinear" => torch(x.f_upsample_bilinear2d([h, w], false, None, None))?,
                "bicubic" => torch(x.f_upsample_bicubic2d([h, w], false, None, None))?,
                "area" => torch(x.f_adaptive_avg_pool2d([h, w]))?,
                other => return Err(err(format!("resize: unknown method {other:?} (nearest, bilinear, bicubic, area)"))),
            };
            t.same_from_nchw(out)
        });
        m.add_method("crop", |_, t, (x, y, w, h): (i64, i64, i64, i64)| {
            let n = t.to_nchw()?;
            let s = n.size();
            if x < 0 || y < 0 || w < 1 || h < 1 || x + w > s[3] || y + h > s[2] {
                return Err(err(format!("crop: {w}×{h} at ({x}, {y}) does not fit {}×{}", s[3], s[2])));
            }
            t.same_from_nchw(torch(n.f_narrow(2, y, h).and_then(|v| v.f_narrow(3, x, w)))?)
        });
        m.add_method("pad", |_, t, (left, right, top, bottom, value): (i64, i64, i64, i64, Option<f64>)| {
            let n = t.to_nchw()?;
            t.same_from_nchw(torch(n.f_pad([left, right, top, bottom], "constant", value.unwrap_or(0.0)))?)
        });
        // Small tensors to Lua tables (flattened), for inspection; large ones are refused.
        m.add_method("to_table", |_, t, ()| {
            if t.tensor.numel() > 65_536 {
                return Err(err(format!("to_table: {} elements is too many (at most 65536); use tensor operations", t.tensor.numel())));
            }
            torch(Vec::<f32>::try_from(&torch(t.tensor.f_flatten(0, -1))?.to_kind(Kind::Float)))
        });
        for (meta, op) in [(MetaMethod::Add, 0), (MetaMethod::Sub, 1), (MetaMethod::Mul, 2), (MetaMethod::Div, 3)] {
            m.add_meta_function(meta, move |_, (a, b): (LuaValue, LuaValue)| {
                let ty = [&a, &b].iter().find_map(|v| match v {
                    LuaValue::UserData(ud) => ud.borrow::<LuaTensor>().ok().and_then(|t| t.ty),
                    _ => None,
                });
                let latent = [&a, &b].iter().find_map(|v| match v {
                    LuaValue::UserData(ud) => ud.borrow::<LuaTensor>().ok().and_then(|t| t.latent.clone()),
                    _ => None,
                });
                let (x, y) = (operand(&a)?, operand(&b)?);
                let r = match op {
                    0 => x.f_add(&y),
                    1 => x.f_sub(&y),
                    2 => x.f_mul(&y),
                    _ => x.f_div(&y),
                };
                Ok(LuaTensor { tensor: torch(r)?, ty, latent })
            });
        }
        m.add_meta_method(MetaMethod::Unm, |_, t, ()| Ok(t.same(torch(t.tensor.f_neg())?)));
        m.add_meta_method(MetaMethod::ToString, |_, t, ()| {
            Ok(format!("Tensor({}{:?})", t.ty.map(|k| format!("{} ", k.name())).unwrap_or_default(), t.tensor.size()))
        });
    }
}

/// An engine value as a Lua value.
pub fn to_lua(lua: &Lua, v: &Value) -> mlua::Result<LuaValue> {
    Ok(match v {
        // Seeds above 2^63 − 1 reach Lua as their two's complement (Lua integers are i64); an unsigned
        // INT input takes them back exactly (see `from_lua_input`).
        Value::Int(i) => match i64::try_from(*i) {
            Ok(i) => LuaValue::Integer(i),
            Err(_) if (0..=u64::MAX as i128).contains(i) => LuaValue::Integer(*i as u64 as i64),
            Err(_) => LuaValue::Number(*i as f64),
        },
        Value::Float(f) => LuaValue::Number(*f),
        Value::String(s) => LuaValue::String(lua.create_string(s)?),
        Value::Boolean(b) => LuaValue::Boolean(*b),
        Value::Image(t) => tensor(lua, t.0.shallow_clone(), ValueType::Image)?,
        Value::Mask(t) => tensor(lua, t.0.shallow_clone(), ValueType::Mask)?,
        Value::Latent(l) => {
            let extras = LatentExtras { noise_mask: l.noise_mask.clone(), batch_index: l.batch_index.clone() };
            let t = LuaTensor { tensor: l.samples.0.shallow_clone(), ty: Some(ValueType::Latent), latent: Some(Rc::new(extras)) };
            LuaValue::UserData(lua.create_userdata(t)?)
        }
        Value::Conditioning(entries) => LuaValue::UserData(lua.create_userdata(LuaConditioning(entries.clone()))?),
        // A list output (RebatchLatents through diffloom.call) is a Lua sequence of its items.
        Value::List(items) => LuaValue::Table(lua.create_sequence_from(items.iter().map(|v| to_lua(lua, v)).collect::<mlua::Result<Vec<_>>>()?)?),
        other => {
            // Handles (models, conditioning, …) pass through Lua untouched, for diffloom.call.
            let ud = lua.create_any_userdata(Opaque(other.clone()))?;
            LuaValue::UserData(ud)
        }
    })
}

/// A value Lua cannot look into (MODEL, CLIP, …), carried for `diffloom.call`.
pub struct Opaque(pub Value);

/// CONDITIONING in Lua: its entries' text-encoder states as tensors (`cond:tensors()`, each
/// `[1, tokens, dim]`), and `diffloom.conditioning{t1, …}` to build one from (edited) tensors.
#[derive(Clone)]
pub struct LuaConditioning(pub Vec<diffloom_core::value::CondEntry>);

impl UserData for LuaConditioning {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("tensors", |_, c, ()| Ok(c.0.iter().map(|e| LuaTensor::new(e.cross_attn.0.shallow_clone(), None)).collect::<Vec<_>>()));
        m.add_method("len", |_, c, ()| Ok(c.0.len()));
        m.add_meta_method(MetaMethod::ToString, |_, c, ()| Ok(format!("Conditioning({} entries)", c.0.len())));
    }
}

/// CONDITIONING from a list of `[1, tokens, dim]` tensors.
pub fn conditioning(parts: Vec<LuaTensor>) -> mlua::Result<LuaConditioning> {
    parts
        .into_iter()
        .map(|p| {
            if p.tensor.dim() != 3 {
                return Err(err(format!("diffloom.conditioning: expected [1, tokens, dim] tensors, got {:?}", p.tensor.size())));
            }
            Ok(diffloom_core::value::CondEntry::new(p.tensor.to_kind(Kind::Float)))
        })
        .collect::<mlua::Result<Vec<_>>>()
        .map(LuaConditioning)
}

fn tensor(lua: &Lua, t: Tensor, ty: ValueType) -> mlua::Result<LuaValue> {
    Ok(LuaValue::UserData(lua.create_userdata(LuaTensor::new(t, Some(ty)))?))
}

/// A Lua value for an input declared as `kind`: as [`from_lua`], and a negative integer for an INT
/// whose range lies above 2^63 − 1 (a seed) is the two's complement Lua holds it as.
pub fn from_lua_input(v: LuaValue, kind: &diffloom_core::InputKind) -> Result<Value, String> {
    match (from_lua(v, kind.value_type())?, kind) {
        (Value::Int(i), diffloom_core::InputKind::Int { min, max, .. }) if i < 0 && *min >= 0 && *max > i64::MAX as i128 => {
            Ok(Value::Int(i as i64 as u64 as i128))
        }
        (v, _) => Ok(v),
    }
}

/// A Lua value as an engine value of type `want`, or a message saying what came instead.
pub fn from_lua(v: LuaValue, want: ValueType) -> Result<Value, String> {
    let got = v.type_name().to_owned();
    let tensor_of = |v: &LuaValue| match v {
        LuaValue::UserData(ud) => ud.borrow::<LuaTensor>().ok().map(|t| t.tensor.shallow_clone()),
        _ => None,
    };
    let extras_of = |v: &LuaValue| match v {
        LuaValue::UserData(ud) => ud.borrow::<LuaTensor>().ok().and_then(|t| t.latent.clone()),
        _ => None,
    };
    let opaque = |v: &LuaValue| match v {
        LuaValue::UserData(ud) => {
            ud.borrow::<Opaque>().ok().map(|o| o.0.clone()).or_else(|| ud.borrow::<LuaConditioning>().ok().map(|c| Value::Conditioning(c.0.clone())))
        }
        _ => None,
    };
    let shape_err = |t: &Tensor, need: &str| format!("expected {want} ({need}), got a tensor of shape {:?}", t.size());
    match (want, &v) {
        (ValueType::Int, LuaValue::Integer(i)) => Ok(Value::Int(*i as i128)),
        (ValueType::Int, LuaValue::Number(n)) if n.fract() == 0.0 => Ok(Value::Int(*n as i128)),
        (ValueType::Float, LuaValue::Integer(i)) => Ok(Value::Float(*i as f64)),
        (ValueType::Float, LuaValue::Number(n)) => Ok(Value::Float(*n)),
        (ValueType::String, LuaValue::String(s)) => Ok(Value::String(s.to_string_lossy().to_string())),
        (ValueType::Boolean, LuaValue::Boolean(b)) => Ok(Value::Boolean(*b)),
        (ValueType::Image, _) if tensor_of(&v).is_some() => {
            let t = tensor_of(&v).unwrap_or_default();
            if t.dim() != 4 || t.size()[3] != 3 {
                return Err(shape_err(&t, "[batch, height, width, 3]"));
            }
            Ok(Value::Image(Shared(t.to_kind(Kind::Float))))
        }
        (ValueType::Mask, _) if tensor_of(&v).is_some() => {
            let t = tensor_of(&v).unwrap_or_default();
            if t.dim() != 3 {
                return Err(shape_err(&t, "[batch, height, width]"));
            }
            Ok(Value::Mask(Shared(t.to_kind(Kind::Float))))
        }
        (ValueType::Latent, _) if tensor_of(&v).is_some() => {
            let t = tensor_of(&v).unwrap_or_default();
            if t.dim() != 4 {
                return Err(shape_err(&t, "[batch, channels, h, w]"));
            }
            // The samples' latent keeps its noise mask, and its batch indices while the batch is the
            // same size (a new batch has no indices into the old one).
            let extras = extras_of(&v).unwrap_or_default();
            let batch_index = extras.batch_index.clone().filter(|b| b.len() as i64 == t.size()[0]);
            Ok(Value::Latent(Latent { samples: Shared(t.to_kind(Kind::Float)), noise_mask: extras.noise_mask.clone(), batch_index }))
        }
        (_, _) if opaque(&v).is_some_and(|o| o.value_type().feeds(want)) => Ok(opaque(&v).unwrap_or(Value::Boolean(false))),
        (ValueType::Any, _) => match &v {
            LuaValue::Integer(i) => Ok(Value::Int(*i as i128)),
            LuaValue::Number(n) => Ok(Value::Float(*n)),
            LuaValue::String(s) => Ok(Value::String(s.to_string_lossy().to_string())),
            LuaValue::Boolean(b) => Ok(Value::Boolean(*b)),
            _ => Err(format!("a {got} cannot be passed on")),
        },
        _ => Err(format!("expected {want}, got a Lua {got}")),
    }
}

/// A table of numbers as a float tensor of `shape` (`diffloom.tensor`).
pub fn tensor_from_table(values: Vec<f64>, shape: Vec<i64>) -> mlua::Result<Tensor> {
    let n: i64 = shape.iter().product();
    if n != values.len() as i64 {
        return Err(err(format!("diffloom.tensor: {} values do not fill shape {shape:?}", values.len())));
    }
    let v: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
    torch(Tensor::f_from_slice(&v).and_then(|t| t.f_view(shape.as_slice())))
}
