//! Branch-free f32 `exp` and GELU for the native engines' f32 passes (they vectorise; libm's
//! scalar calls took 30% of a transformer pass). f64 passes keep libm's correctly rounded
//! functions. Accuracy (tested below against f64 libm): exp ≤ 4e-7 relative (2–3 ulp) on [−87, 88];
//! Φ(z) = ½·erfc(−z/√2) (Numerical Recipes' `erfcc`, fractional error < 1.2e-7, evaluated in f32)
//! within 1.2e-7 absolute everywhere and 1.0e-6 relative where Φ ≥ 1e-3 (the f32 rounding of
//! z²/2 inside the exponential); GELU'(z) within 1.1e-7 absolute.

/// eˣ in f32: x = n·ln2 + r with |r| ≤ ln2/2 (two-constant reduction), a degree-6 polynomial for
/// eʳ, and 2ⁿ built from the exponent bits. Inputs below −87.3 give 0, above 88.7 give +∞.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    exp_f32_with::<false>(x)
}

/// a·b + c, fused (one rounding) when `FMA` (only inside functions compiled with the `fma`
/// target feature: elsewhere `mul_add` is a libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// eˣ in f32 as [`exp_f32`], its polynomial in fused multiply-adds when `FMA`.
#[inline(always)]
fn exp_f32_with<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-87.33, 88.72);
    // round to nearest by the 1.5·2²³ trick (f32::round is a libm call without SSE4.1)
    // (its low mantissa bits then hold n as an integer: no float-to-int conversion)
    const MAGIC: f32 = 12_582_912.0;
    let shifted = madd::<FMA>(x, std::f32::consts::LOG2_E, MAGIC);
    let n = shifted - MAGIC;
    let n_int = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = madd::<FMA>(-n, 1.428_606_8e-6, madd::<FMA>(-n, 0.693_145_75, x));
    // Taylor to degree 6 on |r| ≤ 0.347: truncation < 2.4e-8 relative
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = madd::<FMA>(p, r, c);
    }
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// (GELU(z), GELU'(z)) in f32 with GELU(z) = z·Φ(z), GELU'(z) = Φ(z) + z·φ(z).
#[inline(always)]
pub(crate) fn gelu_f32(z: f32) -> (f32, f32) {
    gelu_f32_with::<false>(z)
}

/// [`gelu_f32`], its polynomials in fused multiply-adds when `FMA`.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the published coefficients, as printed
fn gelu_f32_with<const FMA: bool>(z: f32) -> (f32, f32) {
    // Φ(z) = ½ erfc(−z/√2); erfc(x) ≈ t·exp(−x² + P(t)), t = 1/(1 + |x|/2), for |x|; erfc(−x) = 2 − erfc(x)
    let x = -z * std::f32::consts::FRAC_1_SQRT_2;
    let ax = x.abs();
    let t = 1.0 / madd::<FMA>(0.5, ax, 1.0);
    let mut poly = 0.170_872_77;
    for c in [
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        poly = madd::<FMA>(poly, t, c);
    }
    let e = exp_f32_with::<FMA>(-ax * ax);
    let erfc_ax = t * e * exp_f32_with::<FMA>(poly);
    let erfc_x = if x >= 0.0 { erfc_ax } else { 2.0 - erfc_ax };
    let cdf = 0.5 * erfc_x;
    // φ(z) = exp(−z²/2)/√(2π) = e/√(2π) since x² = z²/2
    let pdf = e * 0.398_942_3;
    (z * cdf, madd::<FMA>(z, pdf, cdf))
}

/// GELU over a slice: `u[k] = GELU(z[k])` and `z[k]` replaced by GELU'(z[k]). With AVX2 + FMA
/// (detected at run time) the loop runs 8 lanes wide; otherwise the baseline build's SSE2.
pub(crate) fn gelu_slice_f32(z: &mut [f32], u: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports the feature the function is compiled for
            unsafe { gelu_slice_avx512(z, u) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for
            unsafe { gelu_slice_avx2(z, u) };
            return;
        }
    }
    gelu_slice_plain(z, u);
}

#[inline(always)]
fn gelu_slice_plain(z: &mut [f32], u: &mut [f32]) {
    for (zv, uv) in z.iter_mut().zip(u.iter_mut()) {
        let (g, d) = gelu_f32(*zv);
        *uv = g;
        *zv = d;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(z: &mut [f32], u: &mut [f32]) {
    gelu_slice_fma(z, u);
}

/// The GELU kernel 16 lanes wide (AVX-512 includes FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_slice_avx512(z: &mut [f32], u: &mut [f32]) {
    gelu_slice_fma(z, u);
}

#[inline(always)]
fn gelu_slice_fma(z: &mut [f32], u: &mut [f32]) {
    for (zv, uv) in z.iter_mut().zip(u.iter_mut()) {
        let (g, d) = gelu_f32_with::<true>(*zv);
        *uv = g;
        *zv = d;
    }
}

/// `row[k] = exp(row[k] − m)` over a slice (softmax numerators), AVX2 + FMA when available.
pub(crate) fn exp_shift_f32(row: &mut [f32], m: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for
            unsafe { exp_shift_avx2(row, m) };
            return;
        }
    }
    row.iter_mut().for_each(|v| *v = exp_f32(*v - m));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_avx2(row: &mut [f32], m: f32) {
    row.iter_mut().for_each(|v| *v = exp_f32(*v - m));
}

/// eˣ in f64 for x ≤ 0 arguments of softmaxes, branch-free so that it vectorises: x = n·ln2 + r
/// (two-constant reduction, |r| ≤ ln2/2), a degree-13 Taylor polynomial for eʳ (truncation
/// < 5e-18) and 2ⁿ from the exponent bits. Within 2 ulp of libm's on [−708, 709] (tested);
/// below −708 gives 0, above 709 +∞.
#[inline(always)]
pub(crate) fn exp_f64(x0: f64) -> f64 {
    let x = x0.clamp(-708.0, 709.0);
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²
    let shifted = x * std::f64::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let n_int = (shifted.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    let r = (x - n * 0.693_147_180_369_123_8) - n * 1.908_214_929_270_587_7e-10;
    let mut p = 1.0 / 6_227_020_800.0;
    for c in [
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // 2ⁿ in two halves so that n = −1022 … 1023 and the subnormal end stay exact
    let h = n_int / 2;
    let s1 = f64::from_bits(((h + 1023) as u64) << 52);
    let s2 = f64::from_bits(((n_int - h + 1023) as u64) << 52);
    if x0 < -708.0 {
        0.0
    } else {
        p * s1 * s2
    }
}

/// `row[k] = exp(row[k] − m)` in f64 with [`exp_f64`], AVX2 + FMA when available.
pub(crate) fn exp_shift_f64(row: &mut [f64], m: f64) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for
            unsafe { exp_shift_f64_avx2(row, m) };
            return;
        }
    }
    row.iter_mut().for_each(|v| *v = exp_f64(*v - m));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shift_f64_avx2(row: &mut [f64], m: f64) {
    row.iter_mut().for_each(|v| *v = exp_f64(*v - m));
}

/// tanh in f32, branch-free: for |x| < 0.625 the odd Taylor series through x¹⁷ (truncation
/// < 6e-8 relative), above it 1 − 2/(e^{2|x|} + 1) with the fast exp (≤ 3e-7 relative).
#[inline(always)]
pub(crate) fn tanh_f32(x: f32) -> f32 {
    let ax = x.abs();
    let x2 = x * x;
    let series = x
        * (1.0
            + x2 * (-1.0 / 3.0
                + x2 * (2.0 / 15.0
                    + x2 * (-17.0 / 315.0
                        + x2 * (62.0 / 2835.0
                            + x2 * (-1382.0 / 155_925.0
                                + x2 * (21_844.0 / 6_081_075.0
                                    + x2 * (-929_569.0 / 638_512_875.0
                                        + x2 * (6_404_582.0 / 10_854_718_875.0)))))))));
    let e = exp_f32(2.0 * ax.min(20.0));
    let large = (1.0 - 2.0 / (e + 1.0)).copysign(x);
    if ax < 0.625 {
        series
    } else {
        large
    }
}

/// tanh over a slice, in place, AVX2 + FMA when available.
pub(crate) fn tanh_slice_f32(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for
            unsafe { tanh_slice_avx2(v) };
            return;
        }
    }
    v.iter_mut().for_each(|x| *x = tanh_f32(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tanh_slice_avx2(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = tanh_f32(*x));
}

/// (GELU(z), GELU'(z)) of the tanh approximation 0.5·z·(1 + tanh(√(2/π)(z + 0.044715 z³))).
#[inline(always)]
pub(crate) fn gelu_tanh_f32(z: f32) -> (f32, f32) {
    const S: f32 = 0.797_884_6;
    const C: f32 = 0.044_715;
    let t = tanh_f32(S * (z + C * z * z * z));
    (
        0.5 * z * (1.0 + t),
        0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * S * (1.0 + 3.0 * C * z * z),
    )
}

/// [`gelu_tanh_f32`] over a slice: `u[k]` the value, `z[k]` replaced by the derivative.
pub(crate) fn gelu_tanh_slice_f32(z: &mut [f32], u: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for
            unsafe { gelu_tanh_slice_avx2(z, u) };
            return;
        }
    }
    gelu_tanh_slice_plain(z, u);
}

#[inline(always)]
fn gelu_tanh_slice_plain(z: &mut [f32], u: &mut [f32]) {
    for (zv, uv) in z.iter_mut().zip(u.iter_mut()) {
        let (g, d) = gelu_tanh_f32(*zv);
        *uv = g;
        *zv = d;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_tanh_slice_avx2(z: &mut [f32], u: &mut [f32]) {
    gelu_tanh_slice_plain(z, u);
}

/// `acc[k] += v_j[k]²` in f64 for the vectors v_j that `v` holds back to back (each as long as
/// `acc`), in order of j: four at a time, so that `acc` is read and written once per four (the
/// sums are those of one vector at a time, bit for bit). AVX2 when available.
pub(crate) fn add_squares_f32(acc: &mut [f64], v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports the feature the function is compiled for
            unsafe { add_squares_avx2(acc, v) };
            return;
        }
    }
    add_squares_rows(acc, v);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn add_squares_avx2(acc: &mut [f64], v: &[f32]) {
    add_squares_rows(acc, v);
}

#[inline(always)]
fn add_squares_rows(acc: &mut [f64], v: &[f32]) {
    let n = acc.len();
    if n == 0 {
        return;
    }
    let sq = |x: &f32| (*x * *x) as f64;
    let mut quads = v.chunks_exact(4 * n);
    for q in &mut quads {
        let (r0, rest) = q.split_at(n);
        let (r1, rest) = rest.split_at(n);
        let (r2, r3) = rest.split_at(n);
        for ((((a, x0), x1), x2), x3) in acc.iter_mut().zip(r0).zip(r1).zip(r2).zip(r3) {
            *a = (((*a + sq(x0)) + sq(x1)) + sq(x2)) + sq(x3);
        }
    }
    for r in quads.remainder().chunks_exact(n) {
        acc.iter_mut().zip(r).for_each(|(a, x)| *a += sq(x));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_single_precision() {
        let mut worst = 0.0f64;
        let mut x = -87.0f64;
        while x < 88.0 {
            let want = x.exp();
            let got = exp_f32(x as f32) as f64;
            // compare against e^(x rounded to f32), the best an f32 exp can do
            let want_r = ((x as f32) as f64).exp();
            worst = worst.max(((got - want_r) / want_r).abs());
            assert!(want > 0.0);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "{worst:e}");
        assert!(exp_f32(-200.0) < 2e-38);
        assert!(exp_f32(100.0).is_infinite() || exp_f32(100.0) > 1e38);
    }

    #[test]
    fn gelu_and_its_derivative_match_libm() {
        let (mut wc, mut wd, mut wa) = (0.0f64, 0.0f64, 0.0f64);
        // the scalar function and the slice kernel (fused multiply-adds where the CPU has them)
        let zs: Vec<f32> = (0..3284)
            .map(|i| (-12.0 + 0.00731 * i as f64) as f32)
            .collect();
        let (mut dz, mut gz) = (zs.clone(), vec![0.0f32; zs.len()]);
        gelu_slice_f32(&mut dz, &mut gz);
        let pairs = zs
            .iter()
            .map(|z| gelu_f32(*z))
            .chain(gz.into_iter().zip(dz));
        for (zf, (g, d)) in zs.iter().chain(&zs).map(|z| *z as f64).zip(pairs) {
            // erfc, not 1 + erf: no cancellation for negative z
            let cdf = 0.5 * libm::erfc(-zf * std::f64::consts::FRAC_1_SQRT_2);
            let pdf = (-0.5 * zf * zf).exp() / (2.0 * std::f64::consts::PI).sqrt();
            if zf.abs() > 1e-3 {
                let got = g as f64 / zf;
                wa = wa.max((got - cdf).abs());
                if cdf >= 1e-3 {
                    wc = wc.max((got - cdf).abs() / cdf);
                }
            }
            wd = wd.max((d as f64 - (cdf + zf * pdf)).abs());
        }
        eprintln!("Φ relative (Φ ≥ 1e-3) {wc:.2e}, absolute {wa:.2e}; GELU' absolute {wd:.2e}");
        assert!(wc < 2e-6, "Φ: {wc:e}");
        assert!(wa < 3e-7, "Φ absolute: {wa:e}");
        assert!(wd < 3e-7, "GELU': {wd:e}");
    }

    #[test]
    fn f64_exp_is_within_two_ulp_of_libm() {
        let mut worst = 0.0f64;
        let mut x = -708.0f64;
        while x < 709.0 {
            let (want, got) = (x.exp(), exp_f64(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.01371;
        }
        assert!(worst < 4.5e-16, "{worst:e}");
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(-800.0), 0.0);
        let mut row: Vec<f64> = (0..37).map(|i| -(i as f64) * 0.7).collect();
        let want: Vec<f64> = row.iter().map(|v| exp_f64(*v - 0.25)).collect();
        exp_shift_f64(&mut row, 0.25);
        assert_eq!(row, want);
    }

    #[test]
    fn tanh_and_the_tanh_gelu_match_libm() {
        let (mut wt, mut wg, mut wd) = (0.0f64, 0.0f64, 0.0f64);
        let mut x = -12.0f64;
        while x < 12.0 {
            let xf = (x as f32) as f64;
            let want = xf.tanh();
            let got = tanh_f32(xf as f32) as f64;
            wt = wt.max((got - want).abs() / want.abs().max(1e-30));
            let s = 0.797_884_560_802_865_4;
            let t = (s * (xf + 0.044_715 * xf.powi(3))).tanh();
            let g = 0.5 * xf * (1.0 + t);
            let d =
                0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * s * (1.0 + 3.0 * 0.044_715 * xf * xf);
            let (gg, dd) = gelu_tanh_f32(xf as f32);
            wg = wg.max((gg as f64 - g).abs() / (1.0 + g.abs()));
            wd = wd.max((dd as f64 - d).abs());
            x += 0.00377;
        }
        assert!(wt < 5e-7, "tanh: {wt:e}");
        assert!(wg < 5e-7, "GELU (tanh): {wg:e}");
        assert!(wd < 1e-6, "GELU' (tanh): {wd:e}");
        assert_eq!(tanh_f32(0.0), 0.0);
        assert_eq!(tanh_f32(30.0), 1.0);
        assert_eq!(tanh_f32(-30.0), -1.0);
        let mut v: Vec<f32> = (0..67).map(|i| (i as f32 - 33.0) * 0.1).collect();
        let w = v.clone();
        tanh_slice_f32(&mut v);
        for (a, b) in v.iter().zip(&w) {
            assert_eq!(*a, tanh_f32(*b));
        }
    }

    #[test]
    fn slice_kernels_equal_the_scalar_functions() {
        let z0: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.07).collect();
        let (mut z, mut u) = (z0.clone(), vec![0.0f32; z0.len()]);
        gelu_slice_f32(&mut z, &mut u);
        for k in 0..z0.len() {
            let (g, d) = gelu_f32(z0[k]);
            assert!((u[k] - g).abs() <= 1e-6 * (1.0 + g.abs()), "{k}");
            assert!((z[k] - d).abs() <= 1e-6, "{k}");
        }
        let mut row = z0.clone();
        exp_shift_f32(&mut row, 0.5);
        for k in 0..z0.len() {
            let want = exp_f32(z0[k] - 0.5);
            assert!((row[k] - want).abs() <= 1e-6 * want, "{k}");
        }
        // one vector, and several back to back: the same sums as one at a time, bit for bit
        for count in [1usize, 3, 4, 6, 9] {
            let n = 37;
            let v: Vec<f32> = (0..count * n)
                .map(|i| (i as f32 * 0.37).sin() * 3.1)
                .collect();
            let mut acc: Vec<f64> = (0..n).map(|i| i as f64 * 0.01).collect();
            let mut want = acc.clone();
            for row in v.chunks(n) {
                for (w, x) in want.iter_mut().zip(row) {
                    *w += (*x * *x) as f64;
                }
            }
            add_squares_f32(&mut acc, &v);
            assert_eq!(acc, want, "{count} vectors");
        }
    }
}
