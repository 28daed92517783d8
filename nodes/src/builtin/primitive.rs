//! ComfyUI's `utils/primitive` and `utils/string` nodes: constants to link into several inputs, string
//! building, and PreviewAny to look at any value.

use diffloom_core::{Args, Bool, Ctx, Float, Int, Node, NodeError, Schema, Str, Value, ValueType};

/// PrimitiveInt/Float/String/StringMultiline/Boolean: one `value` widget, passed through.
pub struct Primitive {
    name: &'static str,
    ty: ValueType,
}

pub const PRIMITIVE_INT: Primitive = Primitive { name: "PrimitiveInt", ty: ValueType::Int };
pub const PRIMITIVE_FLOAT: Primitive = Primitive { name: "PrimitiveFloat", ty: ValueType::Float };
pub const PRIMITIVE_STRING: Primitive = Primitive { name: "PrimitiveString", ty: ValueType::String };
pub const PRIMITIVE_STRING_MULTILINE: Primitive = Primitive { name: "PrimitiveStringMultiline", ty: ValueType::String };
pub const PRIMITIVE_BOOLEAN: Primitive = Primitive { name: "PrimitiveBoolean", ty: ValueType::Boolean };

impl Node for Primitive {
    fn schema(&self) -> Schema {
        let s = Schema::new(self.name, "utils/primitive");
        let s = match (self.ty, self.name) {
            // ComfyUI bounds these by sys.maxsize.
            (ValueType::Int, _) => s.input("value", Int::new(0).range(-(i64::MAX as i128), i64::MAX as i128)),
            (ValueType::Float, _) => s.input("value", Float::new(0.0).range(-(i64::MAX as f64), i64::MAX as f64).step(0.1)),
            (ValueType::Boolean, _) => s.input("value", Bool(false)),
            (_, "PrimitiveStringMultiline") => s.input("value", Str::new("").multiline()),
            _ => s.input("value", Str::new("")),
        };
        s.output(self.ty.name(), self.ty)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        Ok(vec![a.any("value")?.clone()])
    }
}

pub struct StringConcatenate;
impl Node for StringConcatenate {
    fn schema(&self) -> Schema {
        Schema::new("StringConcatenate", "utils/string")
            .input("string_a", Str::new("").multiline())
            .input("string_b", Str::new("").multiline())
            .input("delimiter", Str::new(""))
            .output("STRING", ValueType::String)
    }
    fn execute(&self, _cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        let s = [a.string("string_a")?, a.string("string_b")?].join(a.string("delimiter")?);
        Ok(vec![Value::String(s)])
    }
}

pub struct PreviewAny;
impl Node for PreviewAny {
    fn schema(&self) -> Schema {
        Schema::new("PreviewAny", "utils").describe("Shows any value in the run report.").input("source", ValueType::Any).output_node()
    }
    fn execute(&self, cx: &mut Ctx, a: &Args) -> Result<Vec<Value>, NodeError> {
        cx.messages.push(a.any("source")?.describe());
        Ok(vec![])
    }
}
