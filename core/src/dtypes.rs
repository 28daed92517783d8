//! libtorch kinds and safetensors dtypes, both ways: one table for the disk cache's entries and the
//! checkpoint reader.

use safetensors::tensor::Dtype;
use tch::Kind;

/// Each kind with its dtype (the ones safetensors and libtorch share).
const PAIRS: [(Kind, Dtype); 10] = [
    (Kind::Float, Dtype::F32),
    (Kind::Double, Dtype::F64),
    (Kind::Half, Dtype::F16),
    (Kind::BFloat16, Dtype::BF16),
    (Kind::Int64, Dtype::I64),
    (Kind::Int, Dtype::I32),
    (Kind::Int16, Dtype::I16),
    (Kind::Int8, Dtype::I8),
    (Kind::Uint8, Dtype::U8),
    (Kind::Bool, Dtype::BOOL),
];

/// The safetensors dtype of a libtorch kind.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    PAIRS.iter().find(|(k, _)| *k == kind).map(|(_, d)| *d)
}

/// The libtorch kind of a safetensors dtype.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    PAIRS.iter().find(|(_, d)| *d == dtype).map(|(k, _)| *k)
}
