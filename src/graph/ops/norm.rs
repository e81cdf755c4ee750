//! Batch normalization (inference: running statistics), layer normalization, softmax and
//! log-softmax, with their backward passes.

use super::util::*;
use crate::error::{Error, Result};
use crate::graph::ir::{Data, Node, Tensor};
use crate::scalar::pool::{buffer, with_capacity};
use crate::scalar::{lane_max, lane_sum, Scalar};

/// A batch norm's dimensions (N, C, spatial size), its inputs checked (scale, B, mean and var
/// one per channel), and per channel a = scale·inv_std, shift and inv_std = 1/√(var + ε), so
/// that y = a·x + shift and x̂ = (x − mean)·inv_std.
struct BnCoeffs<T> {
    dims: (usize, usize, usize),
    a: Vec<T>,
    shift: Vec<T>,
    inv: Vec<T>,
}

fn bn_coeffs<T: Scalar>(node: &Node, ins: [&Tensor<T>; 5], eps: f64) -> Result<BnCoeffs<T>> {
    let [x, s, b, m, v] = ins;
    let dims = bn_dims(node, &x.shape)?;
    let c = dims.1;
    let (scale, bias) = (floats(node, s, "scale")?, floats(node, b, "B")?);
    let (mean, var) = (floats(node, m, "mean")?, floats(node, v, "var")?);
    if [scale.len(), bias.len(), mean.len(), var.len()]
        .iter()
        .any(|l| *l != c)
    {
        return Err(Error::shape(
            format!("{} (scale, B, mean, var per channel)", node.describe()),
            c,
            format!(
                "{}, {}, {}, {}",
                scale.len(),
                bias.len(),
                mean.len(),
                var.len()
            ),
        ));
    }
    let inv: Vec<T> = var
        .iter()
        .map(|v| T::of(1.0) / (*v + T::of(eps)).sqrt())
        .collect();
    let a: Vec<T> = scale.iter().zip(&inv).map(|(s, i)| *s * *i).collect();
    let shift: Vec<T> = (0..c).map(|k| bias[k] - a[k] * mean[k]).collect();
    Ok(BnCoeffs {
        dims,
        a,
        shift,
        inv,
    })
}

fn bn_dims(node: &Node, shape: &[usize]) -> Result<(usize, usize, usize)> {
    if shape.len() < 2 {
        return Err(Error::shape(
            format!("{} (input (N, C, ...))", node.describe()),
            "rank >= 2",
            format!("{shape:?}"),
        ));
    }
    Ok((shape[0], shape[1], shape[2..].iter().product()))
}

/// `f(k, v)` of every element of `v` (N, C, spatial), k its channel, in order.
fn per_channel<T: Scalar>(
    (n, c, sp): (usize, usize, usize),
    v: &[T],
    f: impl Fn(usize, T) -> T,
) -> Vec<T> {
    let mut out = with_capacity(v.len());
    for e in 0..n {
        for k in 0..c {
            let at = (e * c + k) * sp;
            out.extend(v[at..at + sp].iter().map(|x| f(k, *x)));
        }
    }
    out
}

/// BatchNormalization (inference).
pub fn batch_norm_forward<T: Scalar>(
    node: &Node,
    ins: [&Tensor<T>; 5],
    eps: f64,
) -> Result<Tensor<T>> {
    let BnCoeffs { dims, a, shift, .. } = bn_coeffs(node, ins, eps)?;
    let x = ins[0];
    let xv = floats(node, x, "X")?;
    Ok(ft(
        x.shape.clone(),
        per_channel(dims, xv, |k, x| a[k] * x + shift[k]),
    ))
}

/// The normalized input x̂ = (x − mean)/√(var + ε) of a batch norm.
pub fn batch_norm_xhat<T: Scalar>(node: &Node, ins: [&Tensor<T>; 5], eps: f64) -> Result<Vec<T>> {
    let BnCoeffs { dims, inv, .. } = bn_coeffs(node, ins, eps)?;
    let [x, _, _, m, _] = ins;
    let mean = floats(node, m, "mean")?;
    Ok(per_channel(dims, floats(node, x, "X")?, |k, x| {
        (x - mean[k]) * inv[k]
    }))
}

/// (dX, dscale, dB) of a batch norm, each when asked. The running statistics take no gradient.
pub fn batch_norm_backward<T: Scalar>(
    node: &Node,
    ins: [&Tensor<T>; 5],
    eps: f64,
    g: &[T],
    need: [bool; 3],
) -> Result<[Option<Vec<T>>; 3]> {
    let BnCoeffs { dims, a, .. } = bn_coeffs(node, ins, eps)?;
    let (n, c, sp) = dims;
    let dx = need[0].then(|| per_channel(dims, g, |k, gv| gv * a[k]));
    let (mut ds, mut db) = (None, None);
    if need[1] || need[2] {
        let xh = batch_norm_xhat(node, ins, eps)?;
        let mut s1 = vec![T::of(0.0); c];
        let mut s2 = vec![T::of(0.0); c];
        for e in 0..n {
            for k in 0..c {
                let at = (e * c + k) * sp;
                for i in at..at + sp {
                    s1[k] += g[i] * xh[i];
                    s2[k] += g[i];
                }
            }
        }
        ds = need[1].then_some(s1);
        db = need[2].then_some(s2);
    }
    Ok([dx, ds, db])
}

/// (rows, D) of a layer norm over the axes from `axis` on.
pub fn layer_norm_dims(node: &Node, shape: &[usize], axis: i64) -> Result<(usize, usize, usize)> {
    let a = super::util::axis(node, axis, shape.len())?;
    let d: usize = shape[a..].iter().product();
    Ok((shape[..a].iter().product(), d, a))
}

/// LayerNormalization forward: y, x̂ and 1/σ per row.
pub fn layer_norm_forward<T: Scalar>(
    node: &Node,
    x: &Tensor<T>,
    scale: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    axis: i64,
    eps: f64,
) -> Result<(Tensor<T>, Vec<T>, Vec<T>)> {
    let (rows, d, a) = layer_norm_dims(node, &x.shape, axis)?;
    let norm_shape = &x.shape[a..];
    let expand = |t: Option<&Tensor<T>>, what: &str, fill: T| -> Result<Vec<T>> {
        match t {
            None => Ok(vec![fill; d]),
            Some(t) => {
                let v = floats(node, t, what)?;
                if broadcast(node, &t.shape, norm_shape)? != norm_shape {
                    return Err(Error::shape(
                        format!("{} ({what})", node.describe()),
                        format!("{norm_shape:?}"),
                        format!("{:?}", t.shape),
                    ));
                }
                let st = bstrides(&t.shape, norm_shape);
                let so = strides(norm_shape);
                let mut o = Vec::with_capacity(d);
                for_each(norm_shape, [&so, &st], |_, [_, i]| o.push(v[i]));
                Ok(o)
            }
        }
    };
    let sc = expand(scale, "scale", T::of(1.0))?;
    let bi = expand(bias, "B", T::of(0.0))?;
    let xv = floats(node, x, "X")?;
    // every element is written below
    let mut xh = buffer(xv.len());
    let mut inv = buffer(rows);
    let mut y = buffer(xv.len());
    let df = T::of(d as f64);
    for r in 0..rows {
        let xr = &xv[r * d..(r + 1) * d];
        let mean = lane_sum(d, |i| xr[i]) / df;
        let var = lane_sum(d, |i| {
            let c = xr[i] - mean;
            c * c
        }) / df;
        let iv = T::of(1.0) / (var + T::of(eps)).sqrt();
        inv[r] = iv;
        let (hr, yr) = (&mut xh[r * d..(r + 1) * d], &mut y[r * d..(r + 1) * d]);
        for ((((h, yv), x), s), b) in hr.iter_mut().zip(yr).zip(xr).zip(&sc).zip(&bi) {
            let hv = (*x - mean) * iv;
            *h = hv;
            *yv = hv * *s + *b;
        }
    }
    Ok((ft(x.shape.clone(), y), xh, inv))
}

/// (dX, dscale, dB) of a layer norm from x̂ and 1/σ, each when asked (scale and bias summed
/// back to their own shapes).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<T: Scalar>(
    node: &Node,
    x: &Tensor<T>,
    scale: Option<&Tensor<T>>,
    bias: Option<&Tensor<T>>,
    axis: i64,
    xh: &[T],
    inv: &[T],
    g: &[T],
    need: [bool; 3],
) -> Result<[Option<Vec<T>>; 3]> {
    let (rows, d, a) = layer_norm_dims(node, &x.shape, axis)?;
    let norm_shape = x.shape[a..].to_vec();
    let sc: Vec<T> = match scale {
        None => vec![T::of(1.0); d],
        Some(t) => {
            let v = floats(node, t, "scale")?;
            let st = bstrides(&t.shape, &norm_shape);
            let so = strides(&norm_shape);
            let mut o = Vec::with_capacity(d);
            for_each(&norm_shape, [&so, &st], |_, [_, i]| o.push(v[i]));
            o
        }
    };
    let df = T::of(d as f64);
    let dx = need[0].then(|| {
        let mut dx = buffer(g.len());
        let mut gh = vec![T::of(0.0); d];
        for r in 0..rows {
            let (xr, gr) = (&xh[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            for ((h, gv), s) in gh.iter_mut().zip(gr).zip(&sc) {
                *h = *gv * *s;
            }
            let m1 = lane_sum(d, |i| gh[i]) / df;
            let m2 = lane_sum(d, |i| gh[i] * xr[i]) / df;
            let ir = inv[r];
            for ((o, h), x) in dx[r * d..(r + 1) * d].iter_mut().zip(&gh).zip(xr) {
                *o = ir * (*h - m1 - *x * m2);
            }
        }
        dx
    });
    let sum_rows = |f: &dyn Fn(usize) -> T| {
        let mut acc = vec![T::of(0.0); d];
        for r in 0..rows {
            for (i, a) in acc.iter_mut().enumerate() {
                *a += f(r * d + i);
            }
        }
        acc
    };
    let ds = match (need[1], scale) {
        (true, Some(t)) => Some(reduce_owned(
            sum_rows(&|i| g[i] * xh[i]),
            &norm_shape,
            &t.shape,
        )),
        _ => None,
    };
    let db = match (need[2], bias) {
        (true, Some(t)) => Some(reduce_owned(sum_rows(&|i| g[i]), &norm_shape, &t.shape)),
        _ => None,
    };
    Ok([dx, ds, db])
}

/// (outer, n, inner): a softmax runs over `n` entries `inner` apart, `outer` times.
pub fn softmax_dims(
    node: &Node,
    shape: &[usize],
    axis: i64,
    legacy: bool,
) -> Result<(usize, usize, usize)> {
    if shape.is_empty() {
        return Ok((1, 1, 1));
    }
    let a = super::util::axis(node, axis, shape.len())?;
    if legacy {
        return Ok((shape[..a].iter().product(), shape[a..].iter().product(), 1));
    }
    Ok((
        shape[..a].iter().product(),
        shape[a],
        shape[a + 1..].iter().product(),
    ))
}

/// Softmax or log-softmax.
pub fn softmax_forward<T: Scalar>(
    node: &Node,
    x: &Tensor<T>,
    axis: i64,
    log: bool,
    legacy: bool,
) -> Result<Tensor<T>> {
    let (outer, n, inner) = softmax_dims(node, &x.shape, axis, legacy)?;
    let xv = floats(node, x, "input")?;
    if inner == 1 && n > 0 {
        // rows are contiguous: the vectorised exp
        let mut y = buffer(xv.len());
        y.copy_from_slice(xv);
        softmax_rows(&mut y, n, log);
        return Ok(ft(x.shape.clone(), y));
    }
    let mut y = buffer(xv.len());
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let mut m = T::of(f64::NEG_INFINITY);
            for k in 0..n {
                if xv[at(k)] > m {
                    m = xv[at(k)];
                }
            }
            if !m.finite() {
                // a row of −∞ (fully masked): zeros
                m = T::of(0.0);
            }
            let mut s = T::of(0.0);
            for k in 0..n {
                let e = (xv[at(k)] - m).exp();
                y[at(k)] = e;
                s += e;
            }
            if log {
                let ls = s.ln() + m;
                for k in 0..n {
                    y[at(k)] = xv[at(k)] - ls;
                }
            } else {
                for k in 0..n {
                    y[at(k)] /= s;
                }
            }
        }
    }
    Ok(ft(x.shape.clone(), y))
}

/// [`softmax_forward`] on an input the caller gives up: the rows are normalized in its buffer
/// when they are contiguous.
pub fn softmax_forward_owned<T: Scalar>(
    node: &Node,
    x: Tensor<T>,
    axis: i64,
    log: bool,
    legacy: bool,
) -> Result<Tensor<T>> {
    let (_, n, inner) = softmax_dims(node, &x.shape, axis, legacy)?;
    match x.data {
        Data::F(mut y) if inner == 1 && n > 0 && y.len() % n == 0 => {
            softmax_rows(&mut y, n, log);
            Ok(ft(x.shape, y))
        }
        data => softmax_forward(
            node,
            &Tensor {
                shape: x.shape,
                data,
            },
            axis,
            log,
            legacy,
        ),
    }
}

/// Softmax (or log-softmax) of every contiguous row of `n` entries of `y`, in place.
fn softmax_rows<T: Scalar>(y: &mut [T], n: usize, log: bool) {
    for row in y.chunks_mut(n) {
        let mut m = lane_max(row);
        if !m.finite() {
            m = T::of(0.0);
        }
        let orig: Vec<T> = if log { row.to_vec() } else { vec![] };
        T::exp_shift(row, m);
        let s = lane_sum(row.len(), |k| row[k]);
        if log {
            let ls = s.ln() + m;
            for (v, o) in row.iter_mut().zip(&orig) {
                *v = *o - ls;
            }
        } else {
            let inv = T::of(1.0) / s;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// dX of softmax (y·(g − Σg·y)) or log-softmax (g − softmax·Σg).
pub fn softmax_backward<T: Scalar>(
    node: &Node,
    y: &Tensor<T>,
    axis: i64,
    log: bool,
    legacy: bool,
    g: &[T],
) -> Result<Vec<T>> {
    let (outer, n, inner) = softmax_dims(node, &y.shape, axis, legacy)?;
    let yv = floats(node, y, "output")?;
    let mut dx = buffer(yv.len());
    if inner == 1 && n > 0 {
        for ((d, yr), gr) in dx.chunks_mut(n).zip(yv.chunks(n)).zip(g.chunks(n)) {
            if log {
                let s = lane_sum(n, |k| gr[k]);
                for ((dv, yv), gv) in d.iter_mut().zip(yr).zip(gr) {
                    *dv = *gv - yv.exp() * s;
                }
            } else {
                let s = lane_sum(n, |k| gr[k] * yr[k]);
                for ((dv, yv), gv) in d.iter_mut().zip(yr).zip(gr) {
                    *dv = *yv * (*gv - s);
                }
            }
        }
        return Ok(dx);
    }
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * n + k) * inner + i;
            let mut s = T::of(0.0);
            for k in 0..n {
                s += if log { g[at(k)] } else { g[at(k)] * yv[at(k)] };
            }
            for k in 0..n {
                let j = at(k);
                dx[j] = if log {
                    g[j] - yv[j].exp() * s
                } else {
                    yv[j] * (g[j] - s)
                };
            }
        }
    }
    Ok(dx)
}
