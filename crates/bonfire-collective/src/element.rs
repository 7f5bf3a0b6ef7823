//! Element types that the collectives move and reduce.

use half::{bf16, f16};

/// How the values of all ranks are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// The element-wise sum.
    Sum,
    /// The sum divided by the world size.
    Mean,
    /// The element-wise maximum.
    Max,
    /// The element-wise minimum.
    Min,
}

/// The element type of a buffer, checked between ranks before any data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
}

/// A floating-point element a collective can carry: f32, f16 or bf16.
///
/// Half-precision values are combined in f32 and rounded once per pairwise
/// combination, as NCCL does.
pub trait Element: bytemuck::Pod + Send + Sync + PartialOrd + 'static {
    /// Which [`DType`] this is.
    const DTYPE: DType;
    /// Widens (or keeps) to f32.
    fn to_f32(self) -> f32;
    /// Rounds from f32.
    fn from_f32(v: f32) -> Self;

    /// `acc[i] = acc[i] op src[i]` for Sum/Mean (Mean sums here and scales
    /// later), Max and Min.
    #[inline]
    fn combine(acc: &mut [Self], src: &[Self], op: ReduceOp) {
        debug_assert_eq!(acc.len(), src.len());
        match op {
            ReduceOp::Sum | ReduceOp::Mean => {
                for (a, s) in acc.iter_mut().zip(src) {
                    *a = Self::from_f32(a.to_f32() + s.to_f32());
                }
            }
            ReduceOp::Max => {
                for (a, s) in acc.iter_mut().zip(src) {
                    if *s > *a {
                        *a = *s;
                    }
                }
            }
            ReduceOp::Min => {
                for (a, s) in acc.iter_mut().zip(src) {
                    if *s < *a {
                        *a = *s;
                    }
                }
            }
        }
    }

    /// Multiplies every value by `factor` (finishes a Mean).
    #[inline]
    fn scale(values: &mut [Self], factor: f32) {
        for v in values {
            *v = Self::from_f32(v.to_f32() * factor);
        }
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// A mutable host buffer of any supported element type.
///
/// The `Communicator` trait takes this enum instead of a generic slice so that
/// it stays object-safe: the trainer picks in-process, TCP or NCCL at run time.
pub enum BufMut<'a> {
    /// f32 values.
    F32(&'a mut [f32]),
    /// f16 values.
    F16(&'a mut [f16]),
    /// bf16 values.
    BF16(&'a mut [bf16]),
}

/// A shared host buffer of any supported element type.
pub enum BufRef<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 values.
    F16(&'a [f16]),
    /// bf16 values.
    BF16(&'a [bf16]),
}

impl BufMut<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufMut::F32(s) => s.len(),
            BufMut::F16(s) => s.len(),
            BufMut::BF16(s) => s.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same buffer, read-only.
    pub fn as_buf_ref(&self) -> BufRef<'_> {
        match self {
            BufMut::F32(s) => BufRef::F32(s),
            BufMut::F16(s) => BufRef::F16(s),
            BufMut::BF16(s) => BufRef::BF16(s),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            BufMut::F32(_) => DType::F32,
            BufMut::F16(_) => DType::F16,
            BufMut::BF16(_) => DType::BF16,
        }
    }
}

impl BufRef<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            BufRef::F32(s) => s.len(),
            BufRef::F16(s) => s.len(),
            BufRef::BF16(s) => s.len(),
        }
    }

    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            BufRef::F32(_) => DType::F32,
            BufRef::F16(_) => DType::F16,
            BufRef::BF16(_) => DType::BF16,
        }
    }
}

impl<'a> From<&'a mut [f32]> for BufMut<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        BufMut::F32(s)
    }
}
impl<'a> From<&'a mut [f16]> for BufMut<'a> {
    fn from(s: &'a mut [f16]) -> Self {
        BufMut::F16(s)
    }
}
impl<'a> From<&'a mut [bf16]> for BufMut<'a> {
    fn from(s: &'a mut [bf16]) -> Self {
        BufMut::BF16(s)
    }
}
impl<'a> From<&'a [f32]> for BufRef<'a> {
    fn from(s: &'a [f32]) -> Self {
        BufRef::F32(s)
    }
}
impl<'a> From<&'a [f16]> for BufRef<'a> {
    fn from(s: &'a [f16]) -> Self {
        BufRef::F16(s)
    }
}
impl<'a> From<&'a [bf16]> for BufRef<'a> {
    fn from(s: &'a [bf16]) -> Self {
        BufRef::BF16(s)
    }
}

/// Calls `$body` with `$s` bound to the typed slice inside a `BufMut`/`BufRef`.
macro_rules! with_slice {
    ($buf:expr, $enum:ident, |$s:ident| $body:expr) => {
        match $buf {
            $enum::F32($s) => $body,
            $enum::F16($s) => $body,
            $enum::BF16($s) => $body,
        }
    };
}
pub(crate) use with_slice;

/// Calls `$body` with `$a` and `$b` bound to a `BufRef` and `BufMut` of the
/// same element type, or fails with a clear error if they differ.
macro_rules! with_pair {
    ($op:expr, $input:expr, $output:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($input, $output) {
            (BufRef::F32($a), BufMut::F32($b)) => $body,
            (BufRef::F16($a), BufMut::F16($b)) => $body,
            (BufRef::BF16($a), BufMut::BF16($b)) => $body,
            (i, o) => {
                Err($crate::CommError::invalid($op, format!("input is {:?} but output is {:?}", i.dtype(), o.dtype())))
            }
        }
    };
}
pub(crate) use with_pair;
