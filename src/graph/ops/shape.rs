//! Operators that move elements without arithmetic (Transpose, Reshape, Flatten, Squeeze,
//! Unsqueeze, Concat, Split, Slice, Expand, Trilu) and the shape arithmetic (Shape, Size, Range,
//! ConstantOfShape). Each moving operator is an index map from output elements to input
//! elements: the forward gathers, the backward scatter-adds (or, for a plain copy, passes the
//! cotangent through).

use super::util::*;
use crate::error::{Error, Result};
use crate::graph::ir::{Data, Node, Tensor};
use crate::scalar::Scalar;

/// The output shape of Reshape.
pub fn reshape_shape(
    node: &Node,
    input: &[usize],
    target: &[i64],
    allowzero: bool,
) -> Result<Vec<usize>> {
    let n: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err(Error::Unsupported(format!(
                        "{}: more than one -1 in the target shape {target:?}",
                        node.describe()
                    )));
                }
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                Error::Unsupported(format!(
                    "{}: a 0 in the target shape {target:?} copies a dimension the input {input:?} does not have",
                    node.describe()
                ))
            })?),
            t if t < 0 => {
                return Err(Error::Unsupported(format!(
                    "{}: negative dimension {t} in the target shape",
                    node.describe()
                )))
            }
            t => out.push(t as usize),
        }
    }
    let known = numel(node, &out)?;
    if let Some(i) = infer {
        if known == 0 || n % known != 0 {
            return Err(Error::shape(
                format!("{} (target shape {target:?})", node.describe()),
                format!("a shape with {n} elements"),
                format!("{input:?}"),
            ));
        }
        out[i] = n / known;
    } else if known != n {
        return Err(Error::shape(
            format!("{} (target shape {target:?})", node.describe()),
            format!("{n} elements (input {input:?})"),
            known,
        ));
    }
    Ok(out)
}

/// The output shape of Flatten.
pub fn flatten_shape(node: &Node, input: &[usize], axis: i64) -> Result<Vec<usize>> {
    let r = input.len() as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a > r {
        return Err(Error::Unsupported(format!(
            "{}: axis {axis} out of range for rank {r}",
            node.describe()
        )));
    }
    let a = a as usize;
    Ok(vec![
        input[..a].iter().product(),
        input[a..].iter().product(),
    ])
}

/// The output shape of Squeeze.
pub fn squeeze_shape(node: &Node, input: &[usize], axes: Option<&[i64]>) -> Result<Vec<usize>> {
    match axes {
        None => Ok(input.iter().copied().filter(|d| *d != 1).collect()),
        Some(ax) => {
            let ax: Vec<usize> = ax
                .iter()
                .map(|a| axis(node, *a, input.len()))
                .collect::<Result<_>>()?;
            for a in &ax {
                if input[*a] != 1 {
                    return Err(Error::shape(
                        format!("{} (axis {a} of {input:?})", node.describe()),
                        1,
                        input[*a],
                    ));
                }
            }
            Ok((0..input.len())
                .filter(|i| !ax.contains(i))
                .map(|i| input[i])
                .collect())
        }
    }
}

/// The output shape of Unsqueeze.
pub fn unsqueeze_shape(node: &Node, input: &[usize], axes: &[i64]) -> Result<Vec<usize>> {
    let r = input.len() + axes.len();
    let mut ax: Vec<usize> = axes
        .iter()
        .map(|a| axis(node, *a, r))
        .collect::<Result<_>>()?;
    ax.sort_unstable();
    ax.dedup();
    if ax.len() != axes.len() {
        return Err(Error::Unsupported(format!(
            "{}: repeated axes {axes:?}",
            node.describe()
        )));
    }
    let mut it = input.iter();
    Ok((0..r)
        .map(|i| {
            if ax.contains(&i) {
                1
            } else {
                *it.next().unwrap_or(&1)
            }
        })
        .collect())
}

/// The permutation of a Transpose.
pub fn transpose_perm(node: &Node, rank: usize, perm: Option<&[usize]>) -> Result<Vec<usize>> {
    let p: Vec<usize> = match perm {
        None => (0..rank).rev().collect(),
        Some(p) => p.to_vec(),
    };
    let mut seen = vec![false; rank];
    if p.len() != rank
        || p.iter()
            .any(|a| *a >= rank || std::mem::replace(&mut seen[*a], true))
    {
        return Err(Error::Unsupported(format!(
            "{}: perm {p:?} is not a permutation of {rank} axes",
            node.describe()
        )));
    }
    Ok(p)
}

/// The inverse permutation.
pub fn inverse_perm(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; p.len()];
    for (i, a) in p.iter().enumerate() {
        inv[*a] = i;
    }
    inv
}

/// Transpose of any element type.
pub fn transpose<T: Copy>(x: &Tensor<T>, perm: &[usize]) -> Tensor<T> {
    Tensor {
        shape: perm.iter().map(|p| x.shape[*p]).collect(),
        data: map_data!(&x.data, v => permute(v, &x.shape, perm)),
    }
}

/// The same elements under another shape.
pub fn reshaped<T: Clone>(x: &Tensor<T>, shape: Vec<usize>) -> Tensor<T> {
    Tensor {
        shape,
        data: x.data.clone(),
    }
}

/// Concat along `a`: the output.
pub fn concat<T: Copy>(node: &Node, xs: &[&Tensor<T>], a: i64) -> Result<Tensor<T>> {
    let first = xs
        .first()
        .ok_or_else(|| Error::Unsupported(format!("{}: no inputs", node.describe())))?;
    let r = first.shape.len();
    let a = axis(node, a, r)?;
    let mut out_shape = first.shape.clone();
    out_shape[a] = 0;
    for x in xs {
        let ok = x.shape.len() == r
            && (0..r).all(|i| i == a || x.shape[i] == first.shape[i])
            && x.elem_type() == first.elem_type();
        if !ok {
            return Err(Error::shape(
                format!("{} (inputs equal except along axis {a})", node.describe()),
                format!("{:?}", first.shape),
                format!("{:?}", x.shape),
            ));
        }
        out_shape[a] += x.shape[a];
    }
    numel(node, &out_shape)?;
    let outer: usize = first.shape[..a].iter().product();
    let inner: usize = first.shape[a + 1..].iter().product();
    let data = match &first.data {
        Data::F(_) => Data::F(concat_blocks(xs, outer, inner, a, |t| t.floats())),
        Data::I(_) => Data::I(concat_blocks(xs, outer, inner, a, |t| t.ints())),
        Data::B(_) => Data::B(concat_blocks(xs, outer, inner, a, |t| match &t.data {
            Data::B(v) => Some(v.as_slice()),
            _ => None,
        })),
    };
    Ok(Tensor {
        shape: out_shape,
        data,
    })
}

fn concat_blocks<T, E: Copy>(
    xs: &[&Tensor<T>],
    outer: usize,
    inner: usize,
    a: usize,
    get: impl Fn(&Tensor<T>) -> Option<&[E]>,
) -> Vec<E> {
    let mut out = vec![];
    for o in 0..outer {
        for x in xs {
            let w = x.shape[a] * inner;
            if let Some(v) = get(x) {
                out.extend_from_slice(&v[o * w..(o + 1) * w]);
            }
        }
    }
    out
}

/// The cotangents of Concat's inputs (sizes along `a`), from the output's.
pub fn concat_backward<T: Scalar>(g: &[T], shapes: &[Vec<usize>], a: usize) -> Vec<Vec<T>> {
    let outer: usize = shapes[0][..a].iter().product();
    let inner: usize = shapes[0][a + 1..].iter().product();
    let mut outs: Vec<Vec<T>> = shapes
        .iter()
        .map(|s| Vec::with_capacity(s.iter().product()))
        .collect();
    let mut at = 0;
    for _ in 0..outer {
        for (k, s) in shapes.iter().enumerate() {
            let w = s[a] * inner;
            outs[k].extend_from_slice(&g[at..at + w]);
            at += w;
        }
    }
    outs
}

/// Split sizes along axis `a` of `shape` into `k` outputs.
pub fn split_sizes(
    node: &Node,
    shape: &[usize],
    a: usize,
    sizes: Option<&[i64]>,
    k: usize,
) -> Result<Vec<usize>> {
    let d = shape[a];
    let s: Vec<usize> = match sizes {
        Some(s) => s
            .iter()
            .map(|v| {
                usize::try_from(*v).map_err(|_| {
                    Error::Unsupported(format!("{}: negative split size {v}", node.describe()))
                })
            })
            .collect::<Result<_>>()?,
        None => {
            if k == 0 {
                return Err(Error::Unsupported(format!(
                    "{}: no outputs",
                    node.describe()
                )));
            }
            // equal parts, the last one smaller (ONNX opset 18)
            let part = d.div_ceil(k);
            (0..k)
                .map(|i| part.min(d.saturating_sub(i * part)))
                .collect()
        }
    };
    if s.iter().sum::<usize>() != d || s.len() != k {
        return Err(Error::shape(
            format!("{} (split sizes along axis {a})", node.describe()),
            format!("{k} sizes summing to {d}"),
            format!("{s:?}"),
        ));
    }
    Ok(s)
}

/// Split: the outputs.
pub fn split<T: Copy>(x: &Tensor<T>, a: usize, sizes: &[usize]) -> Vec<Tensor<T>> {
    let outer: usize = x.shape[..a].iter().product();
    let inner: usize = x.shape[a + 1..].iter().product();
    let d = x.shape[a];
    let mut start = 0;
    sizes
        .iter()
        .map(|&s| {
            let mut shape = x.shape.clone();
            shape[a] = s;
            let data = map_data!(&x.data, v => take_block(v, outer, d, start, s, inner));
            start += s;
            Tensor { shape, data }
        })
        .collect()
}

fn take_block<E: Copy>(
    v: &[E],
    outer: usize,
    d: usize,
    start: usize,
    s: usize,
    inner: usize,
) -> Vec<E> {
    let mut o = Vec::with_capacity(outer * s * inner);
    for b in 0..outer {
        let base = (b * d + start) * inner;
        o.extend_from_slice(&v[base..base + s * inner]);
    }
    o
}

/// Per axis (start, step, count) of a Slice.
pub fn slice_plan(
    node: &Node,
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> Result<Vec<(i64, i64, usize)>> {
    let r = shape.len();
    let mut plan: Vec<(i64, i64, usize)> = shape.iter().map(|d| (0, 1, *d)).collect();
    if starts.len() != ends.len() {
        return Err(Error::Unsupported(format!(
            "{}: {} starts and {} ends",
            node.describe(),
            starts.len(),
            ends.len()
        )));
    }
    for i in 0..starts.len() {
        let a = match axes {
            Some(ax) => axis(
                node,
                *ax.get(i).ok_or_else(|| {
                    Error::Unsupported(format!("{}: fewer axes than starts", node.describe()))
                })?,
                r,
            )?,
            None => i,
        };
        if a >= r {
            return Err(Error::Unsupported(format!(
                "{}: slices {} axes of a rank-{r} input",
                node.describe(),
                starts.len()
            )));
        }
        let step = steps.and_then(|s| s.get(i).copied()).unwrap_or(1);
        if step == 0 {
            return Err(Error::Unsupported(format!("{}: step 0", node.describe())));
        }
        let d = shape[a] as i64;
        let clampi = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
        let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (s, e) = (norm(starts[i]), norm(ends[i]));
        let (s, count) = if step > 0 {
            let s = clampi(s, 0, d);
            let e = clampi(e, 0, d);
            (s, if e > s { (e - s + step - 1) / step } else { 0 })
        } else {
            let s = clampi(s, -1, d - 1);
            let e = clampi(e, -1, d - 1);
            (
                s,
                if s > e {
                    (s - e + (-step) - 1) / (-step)
                } else {
                    0
                },
            )
        };
        plan[a] = (s, step, count as usize);
    }
    Ok(plan)
}

/// The input offset of each output element of a slice.
pub fn slice_map(shape: &[usize], plan: &[(i64, i64, usize)]) -> Vec<usize> {
    let s = strides(shape);
    let out: Vec<usize> = plan.iter().map(|p| p.2).collect();
    let n: usize = out.iter().product();
    let mut map = Vec::with_capacity(n);
    if n == 0 {
        return map;
    }
    let r = shape.len();
    let mut idx = vec![0usize; r];
    for _ in 0..n {
        let mut off: i64 = 0;
        for a in 0..r {
            off += (plan[a].0 + idx[a] as i64 * plan[a].1) * s[a] as i64;
        }
        map.push(off as usize);
        for a in (0..r).rev() {
            idx[a] += 1;
            if idx[a] < out[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    map
}

/// The input offset of each element of `x` broadcast to `out`.
pub fn expand_map(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let si = bstrides(shape, out);
    let so = strides(out);
    let mut map = Vec::with_capacity(out.iter().product());
    for_each(out, [&so, &si], |_, [_, i]| map.push(i));
    map
}

/// The target shape of Expand (numpy broadcast of the input and the shape input).
pub fn expand_shape(node: &Node, input: &[usize], target: &[i64]) -> Result<Vec<usize>> {
    let t: Vec<usize> = target
        .iter()
        .map(|v| {
            usize::try_from(*v).map_err(|_| {
                Error::Unsupported(format!(
                    "{}: negative dimension {v} in the shape",
                    node.describe()
                ))
            })
        })
        .collect::<Result<_>>()?;
    let out = broadcast(node, input, &t)?;
    numel(node, &out)?;
    Ok(out)
}

/// Keeps the upper (j − i ≥ k) or lower (j − i ≤ k) triangle of the last two axes.
pub fn trilu_mask(shape: &[usize], k: i64, upper: bool) -> Vec<bool> {
    let r = shape.len();
    let (n, m) = (shape[r - 2], shape[r - 1]);
    let outer: usize = shape[..r - 2].iter().product();
    let mut mask = Vec::with_capacity(outer * n * m);
    for _ in 0..outer {
        for i in 0..n {
            for j in 0..m {
                let d = j as i64 - i as i64;
                mask.push(if upper { d >= k } else { d <= k });
            }
        }
    }
    mask
}

/// Trilu on any element type.
pub fn trilu<T: Scalar>(node: &Node, x: &Tensor<T>, k: i64, upper: bool) -> Result<Tensor<T>> {
    if x.shape.len() < 2 {
        return Err(Error::Unsupported(format!(
            "{}: input must have rank >= 2",
            node.describe()
        )));
    }
    let mask = trilu_mask(&x.shape, k, upper);
    let data = match &x.data {
        Data::F(v) => Data::F(
            v.iter()
                .zip(&mask)
                .map(|(a, m)| if *m { *a } else { T::of(0.0) })
                .collect(),
        ),
        Data::I(v) => Data::I(
            v.iter()
                .zip(&mask)
                .map(|(a, m)| if *m { *a } else { 0 })
                .collect(),
        ),
        Data::B(v) => Data::B(v.iter().zip(&mask).map(|(a, m)| *a && *m).collect()),
    };
    Ok(Tensor {
        shape: x.shape.clone(),
        data,
    })
}

/// A scalar (one element) input as f64.
pub fn scalar_of<T: Scalar>(node: &Node, t: &Tensor<T>, what: &str) -> Result<f64> {
    if t.numel() != 1 {
        return Err(Error::Unsupported(format!(
            "{}: {what} must be a scalar, it has shape {:?}",
            node.describe(),
            t.shape
        )));
    }
    Ok(match &t.data {
        Data::F(v) => v[0].f64(),
        Data::I(v) => v[0] as f64,
        Data::B(v) => v[0] as u8 as f64,
    })
}

/// Range(start, limit, delta).
pub fn range<T: Scalar>(
    node: &Node,
    start: &Tensor<T>,
    limit: &Tensor<T>,
    delta: &Tensor<T>,
) -> Result<Tensor<T>> {
    let (s, l, d) = (
        scalar_of(node, start, "start")?,
        scalar_of(node, limit, "limit")?,
        scalar_of(node, delta, "delta")?,
    );
    if d == 0.0 || !(s.is_finite() && l.is_finite() && d.is_finite()) {
        return Err(Error::Unsupported(format!(
            "{}: range({s}, {l}, {d}) is not finite",
            node.describe()
        )));
    }
    let count = ((l - s) / d).ceil().max(0.0);
    if count > MAX_ELEMENTS as f64 {
        return Err(Error::Unsupported(format!(
            "{}: range of {count} elements, over the limit",
            node.describe()
        )));
    }
    let count = count as usize;
    let data = match &start.data {
        Data::I(_) => Data::I((0..count).map(|i| s as i64 + i as i64 * d as i64).collect()),
        _ => Data::F((0..count).map(|i| T::of(s + i as f64 * d)).collect()),
    };
    Ok(Tensor {
        shape: vec![count],
        data,
    })
}

/// A shape from an integer input, checked.
pub fn shape_from(node: &Node, v: &[i64]) -> Result<Vec<usize>> {
    let s: Vec<usize> = v
        .iter()
        .map(|d| {
            usize::try_from(*d).map_err(|_| {
                Error::Unsupported(format!("{}: negative dimension {d}", node.describe()))
            })
        })
        .collect::<Result<_>>()?;
    numel(node, &s)?;
    Ok(s)
}
