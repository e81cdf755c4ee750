//! Convolutions (1-D and 2-D, strides, padding, dilation, groups including depthwise) by
//! unfolding each example's patches (im2col) and one matmul per example and group; max and
//! average pooling; global average pooling. A 1-D window is run as a 2-D one of height 1.

use super::linalg::gemm_into;
use super::util::*;
use crate::error::{Error, Result};
use crate::graph::ir::{AutoPad, Node, Tensor, Window};
use crate::scalar::pool::{buffer, with_capacity};
use crate::scalar::Scalar;

/// A window's geometry over 2-D spatial axes (1-D as height 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Examples (the leading axis).
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel height and width.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Strides.
    pub sh: usize,
    /// Stride along the width.
    pub sw: usize,
    /// Padding before (top, left).
    pub ph: usize,
    /// Padding at the left.
    pub pw: usize,
    /// Padding after (bottom, right).
    pub ph_end: usize,
    /// Padding at the right.
    pub pw_end: usize,
    /// Dilations.
    pub dh: usize,
    /// Dilation along the width.
    pub dw: usize,
    /// Output height and width.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Spatial rank of the original (1 or 2).
    pub rank: usize,
}

impl Geometry {
    /// Output positions per channel.
    pub fn l(&self) -> usize {
        self.oh * self.ow
    }

    /// The output shape (N, channels, spatial...).
    pub fn out_shape(&self, channels: usize) -> Vec<usize> {
        if self.rank == 1 {
            vec![self.n, channels, self.ow]
        } else {
            vec![self.n, channels, self.oh, self.ow]
        }
    }
}

/// Output length of a window of `k` taps, stride `s`, dilation `d` over `len` padded by
/// (`pb`, `pe`).
fn out_size(
    node: &Node,
    len: usize,
    (k, s, d): (usize, usize, usize),
    (pb, pe): (usize, usize),
    ceil: bool,
) -> Result<usize> {
    let span = d * (k - 1) + 1;
    let padded = len + pb + pe;
    if padded < span {
        return Err(Error::shape(
            format!("{} (window larger than its padded input)", node.describe()),
            format!("an input of at least {span}"),
            padded,
        ));
    }
    let num = padded - span;
    let mut o = if ceil { num.div_ceil(s) } else { num / s } + 1;
    // the last window must start inside the input or the leading padding
    if ceil && (o - 1) * s >= len + pb {
        o -= 1;
    }
    Ok(o)
}

/// The geometry of `window` on an input of shape (N, C, spatial...) with kernel `kernel`.
pub fn geometry(node: &Node, x: &[usize], window: &Window, kernel: &[usize]) -> Result<Geometry> {
    let r = x.len().saturating_sub(2);
    if kernel.contains(&0) {
        return Err(Error::Unsupported(format!(
            "{}: a kernel dimension is 0 ({kernel:?})",
            node.describe()
        )));
    }
    if !(1..=2).contains(&r) || kernel.len() != r {
        return Err(Error::Unsupported(format!(
            "{}: input of shape {x:?} with a {}-D kernel; the graph engine runs 1-D and 2-D windows over (N, C, ...) inputs",
            node.describe(),
            kernel.len()
        )));
    }
    let get = |v: &[usize], i: usize, d: usize| v.get(i).copied().unwrap_or(d);
    let spatial = &x[2..];
    let strides: Vec<usize> = (0..r).map(|i| get(&window.strides, i, 1)).collect();
    let dil: Vec<usize> = (0..r).map(|i| get(&window.dilations, i, 1)).collect();
    if window.pads.len() > 2 * r {
        return Err(Error::Unsupported(format!(
            "{}: {} pads for {r} spatial axes",
            node.describe(),
            window.pads.len()
        )));
    }
    let (mut pb, mut pe): (Vec<usize>, Vec<usize>) = (
        (0..r).map(|i| get(&window.pads, i, 0)).collect(),
        (0..r).map(|i| get(&window.pads, r + i, 0)).collect(),
    );
    match window.auto_pad {
        AutoPad::NotSet => {}
        AutoPad::Valid => {
            pb = vec![0; r];
            pe = vec![0; r];
        }
        AutoPad::SameUpper | AutoPad::SameLower => {
            for i in 0..r {
                let out = spatial[i].div_ceil(strides[i]);
                let need = ((out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1)
                    .saturating_sub(spatial[i]);
                let (a, b) = if window.auto_pad == AutoPad::SameUpper {
                    (need / 2, need - need / 2)
                } else {
                    (need - need / 2, need / 2)
                };
                pb[i] = a;
                pe[i] = b;
            }
        }
    }
    let mut o = vec![0; r];
    for i in 0..r {
        o[i] = out_size(
            node,
            spatial[i],
            (kernel[i], strides[i], dil[i]),
            (pb[i], pe[i]),
            window.ceil_mode,
        )?;
    }
    let g = if r == 1 {
        Geometry {
            n: x[0],
            cin: x[1],
            h: 1,
            w: spatial[0],
            kh: 1,
            kw: kernel[0],
            sh: 1,
            sw: strides[0],
            ph: 0,
            pw: pb[0],
            ph_end: 0,
            pw_end: pe[0],
            dh: 1,
            dw: dil[0],
            oh: 1,
            ow: o[0],
            rank: 1,
        }
    } else {
        Geometry {
            n: x[0],
            cin: x[1],
            h: spatial[0],
            w: spatial[1],
            kh: kernel[0],
            kw: kernel[1],
            sh: strides[0],
            sw: strides[1],
            ph: pb[0],
            pw: pb[1],
            ph_end: pe[0],
            pw_end: pe[1],
            dh: dil[0],
            dw: dil[1],
            oh: o[0],
            ow: o[1],
            rank: 2,
        }
    };
    Ok(g)
}

/// For output position (oi, oj) and kernel tap (ki, kj): the input index (i, j), if inside.
#[inline]
fn tap(g: &Geometry, oi: usize, oj: usize, ki: usize, kj: usize) -> Option<(usize, usize)> {
    let i = (oi * g.sh + ki * g.dh).checked_sub(g.ph)?;
    let j = (oj * g.sw + kj * g.dw).checked_sub(g.pw)?;
    (i < g.h && j < g.w).then_some((i, j))
}

/// The output columns `oj` whose tap `kj` lands inside the input row: `lo..hi`, and the
/// input column of `lo`.
#[inline]
fn col_range(g: &Geometry, kj: usize) -> (usize, usize, usize) {
    let off = kj * g.dw;
    // j = oj·sw + off − pw ∈ [0, w)
    let lo = if off >= g.pw {
        0
    } else {
        (g.pw - off).div_ceil(g.sw)
    };
    let hi = if g.w + g.pw > off {
        ((g.w + g.pw - off - 1) / g.sw + 1).min(g.ow)
    } else {
        0
    };
    let lo = lo.min(hi);
    (lo, hi, (lo * g.sw + off).saturating_sub(g.pw))
}

/// im2col of `cg` channels of one example starting at channel `c0`, appended to `out`: K × L,
/// K = cg·kh·kw (every element written once, in order: no zeroing first).
fn unfold<T: Scalar>(g: &Geometry, x: &[T], c0: usize, cg: usize, out: &mut Vec<T>) {
    let zero = T::of(0.0);
    let zeros = |out: &mut Vec<T>, n: usize| out.extend(std::iter::repeat_n(zero, n));
    for c in 0..cg {
        let xc = &x[(c0 + c) * g.h * g.w..(c0 + c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let (lo, hi, j0) = col_range(g, kj);
                for oi in 0..g.oh {
                    let i = (oi * g.sh + ki * g.dh)
                        .checked_sub(g.ph)
                        .filter(|i| *i < g.h);
                    let Some(i) = i else {
                        zeros(out, g.ow);
                        continue;
                    };
                    zeros(out, lo);
                    let src = &xc[i * g.w..(i + 1) * g.w];
                    if g.sw == 1 {
                        out.extend_from_slice(&src[j0..j0 + (hi - lo)]);
                    } else {
                        out.extend((0..hi - lo).map(|t| src[j0 + t * g.sw]));
                    }
                    zeros(out, g.ow - hi);
                }
            }
        }
    }
}

/// col2im: adds the K × L patch cotangent into the example's input cotangent.
fn fold<T: Scalar>(g: &Geometry, dp: &[T], c0: usize, cg: usize, dx: &mut [T]) {
    let l = g.l();
    for c in 0..cg {
        let xc = &mut dx[(c0 + c) * g.h * g.w..(c0 + c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let row = ((c * g.kh + ki) * g.kw + kj) * l;
                let (lo, hi, j0) = col_range(g, kj);
                for oi in 0..g.oh {
                    let Some(i) = (oi * g.sh + ki * g.dh)
                        .checked_sub(g.ph)
                        .filter(|i| *i < g.h)
                    else {
                        continue;
                    };
                    let src = &dp[row + oi * g.ow + lo..row + oi * g.ow + hi];
                    let dst = &mut xc[i * g.w..(i + 1) * g.w];
                    if g.sw == 1 {
                        for (d, s) in dst[j0..j0 + (hi - lo)].iter_mut().zip(src) {
                            *d += *s;
                        }
                    } else {
                        for (t, s) in src.iter().enumerate() {
                            dst[j0 + t * g.sw] += *s;
                        }
                    }
                }
            }
        }
    }
}

/// A convolution's shapes: geometry, groups, output channels.
pub struct ConvShape {
    /// Geometry.
    pub g: Geometry,
    /// Groups.
    pub groups: usize,
    /// Output channels.
    pub cout: usize,
    /// Patch rows per group K = (cin/groups)·kh·kw.
    pub k: usize,
}

/// Checks a convolution's input and weight shapes.
pub fn conv_shape(
    node: &Node,
    x: &[usize],
    w: &[usize],
    window: &Window,
    groups: usize,
) -> Result<ConvShape> {
    if w.len() != x.len() || w.len() < 3 {
        return Err(Error::shape(
            format!("{} (weight (Cout, Cin/group, kernel...))", node.describe()),
            format!("rank {}", x.len()),
            format!("{w:?}"),
        ));
    }
    let kernel = &w[2..];
    if let Some(k) = &window.kernel {
        if k.as_slice() != kernel {
            return Err(Error::shape(
                format!("{} (kernel_shape against the weight)", node.describe()),
                format!("{k:?}"),
                format!("{kernel:?}"),
            ));
        }
    }
    let g = geometry(node, x, window, kernel)?;
    let (cout, cing) = (w[0], w[1]);
    if groups == 0 || g.cin != cing * groups || cout % groups != 0 {
        return Err(Error::shape(
            format!(
                "{} (channels: input = weight's Cin/group × group, Cout divisible by group)",
                node.describe()
            ),
            format!("{} input channels, group {groups}", cing * groups),
            format!("{} input channels, {cout} output channels", g.cin),
        ));
    }
    numel(node, &g.out_shape(cout))?;
    numel(node, &[g.n, groups, cing * g.kh * g.kw, g.l()])?;
    Ok(ConvShape {
        k: cing * g.kh * g.kw,
        g,
        groups,
        cout,
    })
}

/// Conv forward: the output and every example's patches (N × groups × K × L).
pub fn conv_forward<T: Scalar>(
    node: &Node,
    x: &Tensor<T>,
    w: &Tensor<T>,
    b: Option<&Tensor<T>>,
    window: &Window,
    groups: usize,
) -> Result<(Tensor<T>, Vec<T>)> {
    let s = conv_shape(node, &x.shape, &w.shape, window, groups)?;
    let xv = floats(node, x, "X")?;
    let wv = floats(node, w, "W")?;
    let g = &s.g;
    let (l, k, cg, og) = (g.l(), s.k, g.cin / groups, s.cout / groups);
    let per_in = g.cin * g.h * g.w;
    let mut patches: Vec<T> = with_capacity(g.n * groups * k * l);
    // every output row is written (the bias, or replaced by the product)
    let mut out = buffer(g.n * s.cout * l);
    let bias = match b {
        Some(b) => {
            let bv = floats(node, b, "B")?;
            if bv.len() != s.cout {
                return Err(Error::shape(
                    format!("{} (bias)", node.describe()),
                    s.cout,
                    bv.len(),
                ));
            }
            Some(bv)
        }
        None => None,
    };
    for e in 0..g.n {
        let xe = &xv[e * per_in..(e + 1) * per_in];
        for gr in 0..groups {
            unfold(g, xe, gr * cg, cg, &mut patches);
            let p = &patches[(e * groups + gr) * k * l..(e * groups + gr + 1) * k * l];
            let y = &mut out[(e * s.cout + gr * og) * l..(e * s.cout + (gr + 1) * og) * l];
            if let Some(bv) = bias {
                for o in 0..og {
                    y[o * l..(o + 1) * l].fill(bv[gr * og + o]);
                }
            }
            gemm_into(
                y,
                bias.is_some(),
                &wv[gr * og * k..(gr + 1) * og * k],
                false,
                p,
                false,
                (og, k, l),
                T::of(1.0),
            );
        }
    }
    Ok((ft(g.out_shape(s.cout), out), patches))
}

/// (dX, dW, dB) of a convolution, each when asked, from the saved patches.
#[allow(clippy::too_many_arguments)]
pub fn conv_backward<T: Scalar>(
    node: &Node,
    x: &Tensor<T>,
    w: &Tensor<T>,
    window: &Window,
    groups: usize,
    patches: &[T],
    gy: &[T],
    need: [bool; 3],
) -> Result<[Option<Vec<T>>; 3]> {
    let s = conv_shape(node, &x.shape, &w.shape, window, groups)?;
    let wv = floats(node, w, "W")?;
    let g = &s.g;
    let (l, k, cg, og) = (g.l(), s.k, g.cin / groups, s.cout / groups);
    let per_in = g.cin * g.h * g.w;
    let mut dx = need[0].then(|| vec![T::of(0.0); g.n * per_in]);
    let mut dw = need[1].then(|| vec![T::of(0.0); wv.len()]);
    let mut db = need[2].then(|| vec![T::of(0.0); s.cout]);
    let mut dp = vec![T::of(0.0); if need[0] { k * l } else { 0 }];
    for e in 0..g.n {
        for gr in 0..groups {
            let p = &patches[(e * groups + gr) * k * l..(e * groups + gr + 1) * k * l];
            let d = &gy[(e * s.cout + gr * og) * l..(e * s.cout + (gr + 1) * og) * l];
            if let Some(dw) = dw.as_mut() {
                gemm_into(
                    &mut dw[gr * og * k..(gr + 1) * og * k],
                    true,
                    d,
                    false,
                    p,
                    true,
                    (og, l, k),
                    T::of(1.0),
                );
            }
            if let Some(db) = db.as_mut() {
                for o in 0..og {
                    let mut acc = T::of(0.0);
                    for v in &d[o * l..(o + 1) * l] {
                        acc += *v;
                    }
                    db[gr * og + o] += acc;
                }
            }
            if let Some(dx) = dx.as_mut() {
                gemm_into(
                    &mut dp,
                    false,
                    &wv[gr * og * k..(gr + 1) * og * k],
                    true,
                    d,
                    false,
                    (k, og, l),
                    T::of(1.0),
                );
                fold(g, &dp, gr * cg, cg, &mut dx[e * per_in..(e + 1) * per_in]);
            }
        }
    }
    Ok([dx, dw, db])
}

/// Max (`avg` = None) or average pooling forward; for max pooling the index of each output's
/// first maximum in the input (usize::MAX when its window holds only padding).
pub fn pool_forward<T: Scalar>(
    node: &Node,
    x: &Tensor<T>,
    window: &Window,
    avg: Option<bool>,
) -> Result<(Tensor<T>, Vec<usize>)> {
    let kernel = window
        .kernel
        .clone()
        .ok_or_else(|| Error::Unsupported(format!("{}: no kernel_shape", node.describe())))?;
    let g = geometry(node, &x.shape, window, &kernel)?;
    let xv = floats(node, x, "X")?;
    let shape = g.out_shape(g.cin);
    let total = numel(node, &shape)?;
    let mut out = vec![T::of(0.0); total];
    let mut arg = if avg.is_none() {
        vec![usize::MAX; total]
    } else {
        vec![]
    };
    let plane = g.h * g.w;
    if avg.is_none() {
        // the taps inside the input, per output row and column, computed once
        // (outputs, kernel, stride, dilation, padding, input length) of one axis
        let taps = |o: usize, k: usize, st: usize, d: usize, p: usize, len: usize| {
            (0..o)
                .map(|oi| {
                    (0..k)
                        .filter_map(|ki| (oi * st + ki * d).checked_sub(p).filter(|i| *i < len))
                        .collect::<Vec<usize>>()
                })
                .collect::<Vec<_>>()
        };
        let rows = taps(g.oh, g.kh, g.sh, g.dh, g.ph, g.h);
        let cols = taps(g.ow, g.kw, g.sw, g.dw, g.pw, g.w);
        for nc in 0..g.n * g.cin {
            let xp = &xv[nc * plane..(nc + 1) * plane];
            for (oi, ri) in rows.iter().enumerate() {
                for (oj, cj) in cols.iter().enumerate() {
                    let o = nc * g.l() + oi * g.ow + oj;
                    let mut best = T::of(f64::NEG_INFINITY);
                    let mut at = usize::MAX;
                    for &i in ri {
                        for &j in cj {
                            let v = xp[i * g.w + j];
                            if at == usize::MAX || v > best {
                                best = v;
                                at = i * g.w + j;
                            }
                        }
                    }
                    if at != usize::MAX {
                        out[o] = best;
                        arg[o] = nc * plane + at;
                    }
                }
            }
        }
        return Ok((ft(shape, out), arg));
    }
    for nc in 0..g.n * g.cin {
        let xp = &xv[nc * plane..(nc + 1) * plane];
        for oi in 0..g.oh {
            for oj in 0..g.ow {
                let o = nc * g.l() + oi * g.ow + oj;
                match avg {
                    None => {
                        let mut best: Option<(T, usize)> = None;
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                if let Some((i, j)) = tap(&g, oi, oj, ki, kj) {
                                    let v = xp[i * g.w + j];
                                    if best.is_none_or(|(b, _)| v > b) {
                                        best = Some((v, i * g.w + j));
                                    }
                                }
                            }
                        }
                        if let Some((v, i)) = best {
                            out[o] = v;
                            arg[o] = nc * plane + i;
                        }
                    }
                    Some(include_pad) => {
                        let (mut acc, mut cnt) = (T::of(0.0), 0usize);
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                match tap(&g, oi, oj, ki, kj) {
                                    Some((i, j)) => {
                                        acc += xp[i * g.w + j];
                                        cnt += 1;
                                    }
                                    None if include_pad && in_padded(&g, oi, oj, ki, kj) => {
                                        cnt += 1
                                    }
                                    None => {}
                                }
                            }
                        }
                        out[o] = if cnt > 0 {
                            acc / T::of(cnt as f64)
                        } else {
                            T::of(0.0)
                        };
                    }
                }
            }
        }
    }
    Ok((ft(shape, out), arg))
}

/// Whether a tap falls inside the padded input (the divisor of count_include_pad).
fn in_padded(g: &Geometry, oi: usize, oj: usize, ki: usize, kj: usize) -> bool {
    let i = oi * g.sh + ki * g.dh;
    let j = oj * g.sw + kj * g.dw;
    i < g.h + g.ph + g.ph_end && j < g.w + g.pw + g.pw_end
}

/// The input cotangent of a pooling.
pub fn pool_backward<T: Scalar>(
    node: &Node,
    x: &Tensor<T>,
    window: &Window,
    avg: Option<bool>,
    arg: &[usize],
    gy: &[T],
) -> Result<Vec<T>> {
    let mut dx = vec![T::of(0.0); x.numel()];
    match avg {
        None => {
            for (o, &i) in arg.iter().enumerate() {
                if i != usize::MAX {
                    dx[i] += gy[o];
                }
            }
        }
        Some(include_pad) => {
            let kernel = window.kernel.clone().unwrap_or_default();
            let g = geometry(node, &x.shape, window, &kernel)?;
            let plane = g.h * g.w;
            for nc in 0..g.n * g.cin {
                for oi in 0..g.oh {
                    for oj in 0..g.ow {
                        let o = nc * g.l() + oi * g.ow + oj;
                        let mut taps = vec![];
                        let mut cnt = 0usize;
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                match tap(&g, oi, oj, ki, kj) {
                                    Some((i, j)) => {
                                        taps.push(i * g.w + j);
                                        cnt += 1;
                                    }
                                    None if include_pad && in_padded(&g, oi, oj, ki, kj) => {
                                        cnt += 1
                                    }
                                    None => {}
                                }
                            }
                        }
                        if cnt > 0 {
                            let share = gy[o] / T::of(cnt as f64);
                            for t in taps {
                                dx[nc * plane + t] += share;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(dx)
}
