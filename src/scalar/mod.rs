//! The float types the native engines and the graph engine run in (the model's dtype: f32 or
//! f64), with the math their forward and backward passes need. Sums, solves and quadratic forms
//! are always f64.

pub(crate) mod fastmath;
pub mod pool;

use candle_core::DType;
use faer::{Mat, MatRef};

/// A·B into a new f64 matrix (faer's matmul on all rayon threads).
pub(crate) fn product(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(
        out.as_mut(),
        faer::Accum::Replace,
        a,
        b,
        1.0,
        faer::Par::rayon(0),
    );
    out
}

/// f32 or f64: the model's own precision for forward and backward passes. Sums, solves and
/// quadratic forms are always f64.
pub trait Scalar:
    faer::traits::RealField + Copy + Send + Sync + Default + std::fmt::Debug + pool::Pooled + 'static
{
    /// The matching candle dtype.
    const DTYPE: DType;
    /// From f64 (rounding for f32).
    fn of(v: f64) -> Self;
    /// To f64.
    fn f64(self) -> f64;
    /// Whether it is NaN.
    fn nan(self) -> bool;
    /// eˣ: branch-free (vectorising) in f32, libm's in f64.
    fn exp(self) -> Self;
    /// (GELU(z), GELU'(z)) of the exact (erf) GELU: branch-free in f32, libm's erf in f64.
    fn gelu_pair(self) -> (Self, Self);
    /// Over slices: `u = GELU(z)`, `z` replaced by GELU'(z).
    fn gelu_slice(z: &mut [Self], u: &mut [Self]) {
        for (zv, uv) in z.iter_mut().zip(u.iter_mut()) {
            let (g, d) = zv.gelu_pair();
            *uv = g;
            *zv = d;
        }
    }
    /// Over slices: `u` = the tanh-approximate GELU of `z`, `z` replaced by its derivative.
    fn gelu_tanh_slice(z: &mut [Self], u: &mut [Self]) {
        let s = Self::of(0.797_884_560_802_865_4);
        let c = Self::of(0.044_715);
        let (half, one, three) = (Self::of(0.5), Self::of(1.0), Self::of(3.0));
        for (zv, uv) in z.iter_mut().zip(u.iter_mut()) {
            let x = *zv;
            let t = (s * (x + c * x * x * x)).tanh();
            *uv = half * x * (one + t);
            *zv = half * (one + t) + half * x * (one - t * t) * s * (one + three * c * x * x);
        }
    }
    /// tanh over a slice, in place.
    fn tanh_slice(v: &mut [Self]) {
        v.iter_mut().for_each(|x| *x = x.tanh());
    }
    /// `row[k] = exp(row[k] − m)`.
    fn exp_shift(row: &mut [Self], m: Self) {
        row.iter_mut().for_each(|v| *v = (*v - m).exp());
    }
    /// `acc[k] += v_j[k]²` in f64 for the vectors v_j that `v` holds back to back (each as
    /// long as `acc`; a partial one at the end is passed over), in order of j.
    fn add_squares(acc: &mut [f64], v: &[Self]) {
        for row in v.chunks_exact(acc.len().max(1)) {
            acc.iter_mut()
                .zip(row)
                .for_each(|(a, x)| *a += (*x * *x).f64());
        }
    }
    /// ln x.
    fn ln(self) -> Self {
        Self::of(self.f64().ln())
    }
    /// √x.
    fn sqrt(self) -> Self;
    /// tanh x.
    fn tanh(self) -> Self;
    /// The error function.
    fn erf(self) -> Self;
    /// xʸ.
    fn powf(self, y: Self) -> Self;
    /// |x|.
    fn abs(self) -> Self;
    /// Whether it is finite.
    fn finite(self) -> bool;
}

/// The [`Scalar`] methods both float types take straight from std.
macro_rules! std_forwards {
    ($t:ty) => {
        #[inline]
        fn nan(self) -> bool {
            self.is_nan()
        }
        #[inline]
        fn finite(self) -> bool {
            self.is_finite()
        }
        #[inline]
        fn ln(self) -> Self {
            <$t>::ln(self)
        }
        #[inline]
        fn sqrt(self) -> Self {
            <$t>::sqrt(self)
        }
        #[inline]
        fn powf(self, y: Self) -> Self {
            <$t>::powf(self, y)
        }
        #[inline]
        fn abs(self) -> Self {
            <$t>::abs(self)
        }
    };
}

impl Scalar for f32 {
    std_forwards!(f32);
    const DTYPE: DType = DType::F32;
    #[inline]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        fastmath::exp_f32(self)
    }
    #[inline(always)]
    fn gelu_pair(self) -> (Self, Self) {
        fastmath::gelu_f32(self)
    }
    fn gelu_slice(z: &mut [Self], u: &mut [Self]) {
        fastmath::gelu_slice_f32(z, u)
    }
    fn gelu_tanh_slice(z: &mut [Self], u: &mut [Self]) {
        fastmath::gelu_tanh_slice_f32(z, u)
    }
    fn tanh_slice(v: &mut [Self]) {
        fastmath::tanh_slice_f32(v)
    }
    fn exp_shift(row: &mut [Self], m: Self) {
        fastmath::exp_shift_f32(row, m)
    }
    fn add_squares(acc: &mut [f64], v: &[Self]) {
        fastmath::add_squares_f32(acc, v)
    }
    #[inline]
    fn tanh(self) -> Self {
        fastmath::tanh_f32(self)
    }
    #[inline]
    fn erf(self) -> Self {
        libm::erff(self)
    }
}

impl Scalar for f64 {
    std_forwards!(f64);
    const DTYPE: DType = DType::F64;
    #[inline]
    fn of(v: f64) -> Self {
        v
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
    #[inline]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline]
    fn gelu_pair(self) -> (Self, Self) {
        let cdf = 0.5 * (1.0 + libm::erf(self * std::f64::consts::FRAC_1_SQRT_2));
        let pdf = (-0.5 * self * self).exp() / (2.0 * std::f64::consts::PI).sqrt();
        (self * cdf, cdf + self * pdf)
    }
    #[inline]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline]
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

/// The first non-finite entry, found cheaply: Σ x·0 over 8 independent lanes (so it vectorises)
/// is NaN exactly when some x is NaN or ±Inf; only then is the slice searched.
pub(crate) fn first_non_finite<F: Copy>(v: &[F], to: impl Fn(F) -> f64) -> Option<(usize, f64)> {
    if !nan_probe(v, &to).is_nan() {
        return None;
    }
    v.iter()
        .position(|x| !to(*x).is_finite())
        .map(|k| (k, to(v[k])))
}

fn nan_probe<F: Copy>(v: &[F], to: impl Fn(F) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += to(*x) * 0.0;
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|x| to(*x) * 0.0).sum::<f64>()
}

/// Σₖ f(k) for k < n in eight interleaved partial sums (combined pairwise), so that the loop
/// vectorises: a plain running sum is one chain of dependent adds (a 64-wide layer-norm row
/// waits on 64 add latencies). The order of the additions differs from a running sum's: equal
/// to float rounding.
#[inline(always)]
pub(crate) fn lane_sum<T: Scalar>(n: usize, f: impl Fn(usize) -> T) -> T {
    let mut acc = [T::of(0.0); 8];
    let full = n - n % 8;
    for base in (0..full).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(base + l);
        }
    }
    let mut tail = T::of(0.0);
    for k in full..n {
        tail += f(k);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The largest of `v` (−∞ for none; NaN entries are passed over), in eight interleaved lanes
/// (see [`lane_sum`]).
#[inline(always)]
pub(crate) fn lane_max<T: Scalar>(v: &[T]) -> T {
    let ninf = T::of(f64::NEG_INFINITY);
    let mut acc = [ninf; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            if *x > *a {
                *a = *x;
            }
        }
    }
    let mut m = ninf;
    for x in acc.iter().chain(chunks.remainder()) {
        if *x > m {
            m = *x;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::{lane_max, lane_sum};

    #[test]
    fn lane_reductions_equal_plain_ones() {
        for n in [0usize, 1, 7, 8, 9, 31, 64, 67] {
            let v: Vec<f64> = (0..n).map(|i| ((i * 37) % 11) as f64 - 4.5).collect();
            // small integers and halves: every order of addition is exact
            assert_eq!(lane_sum(n, |k| v[k]), v.iter().sum::<f64>(), "n = {n}");
            let want = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(lane_max(&v), want, "n = {n}");
        }
        let with_nan = [
            1.0f32,
            f32::NAN,
            3.0,
            -2.0,
            f32::NAN,
            0.5,
            2.0,
            1.0,
            9.0,
            f32::NAN,
        ];
        assert_eq!(lane_max(&with_nan), 9.0);
        assert_eq!(lane_max(&[f32::NAN; 3]), f32::NEG_INFINITY);
    }
}
