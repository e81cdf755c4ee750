//! Reductions over axes (mean, sum, max) and global average pooling.

use super::util::*;
use crate::error::{Error, Result};
use crate::graph::ir::{Data, Node, ReduceKind, Tensor};
use crate::scalar::Scalar;

/// The reduced axes (sorted, unique) and the output shape.
pub fn reduce_axes(
    node: &Node,
    shape: &[usize],
    axes: Option<&[i64]>,
    keepdims: bool,
    noop_with_empty_axes: bool,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let r = shape.len();
    let mut ax: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a.iter().map(|v| axis(node, *v, r)).collect::<Result<_>>()?,
        _ if noop_with_empty_axes => vec![],
        _ => (0..r).collect(),
    };
    ax.sort_unstable();
    ax.dedup();
    let out = (0..r)
        .filter_map(|i| {
            if ax.contains(&i) {
                keepdims.then_some(1)
            } else {
                Some(shape[i])
            }
        })
        .collect();
    Ok((ax, out))
}

/// Strides of the output seen over the input's index space (0 on reduced axes).
fn out_strides(shape: &[usize], ax: &[usize]) -> Vec<usize> {
    let kept: Vec<usize> = (0..shape.len())
        .map(|i| if ax.contains(&i) { 1 } else { shape[i] })
        .collect();
    let s = strides(&kept);
    (0..shape.len())
        .map(|i| if ax.contains(&i) { 0 } else { s[i] })
        .collect()
}

/// Forward: the reduced tensor and, for max, the input index of each output's maximum.
pub fn reduce_forward<T: Scalar>(
    node: &Node,
    kind: ReduceKind,
    x: &Tensor<T>,
    ax: &[usize],
    out_shape: Vec<usize>,
) -> Result<(Tensor<T>, Vec<usize>)> {
    let n_out = numel(node, &out_shape)?;
    let so = out_strides(&x.shape, ax);
    let si = strides(&x.shape);
    match &x.data {
        Data::F(v) => {
            let mut out = vec![T::of(0.0); n_out];
            let mut arg = vec![];
            match kind {
                ReduceKind::Mean | ReduceKind::Sum => {
                    for_each(&x.shape, [&si, &so], |_, [i, o]| out[o] += v[i]);
                    if kind == ReduceKind::Mean {
                        let cnt: usize = ax.iter().map(|a| x.shape[*a]).product();
                        let c = T::of(cnt.max(1) as f64);
                        out.iter_mut().for_each(|o| *o /= c);
                    }
                }
                ReduceKind::Max => {
                    arg = vec![usize::MAX; n_out];
                    for_each(&x.shape, [&si, &so], |_, [i, o]| {
                        if arg[o] == usize::MAX || v[i] > out[o] {
                            out[o] = v[i];
                            arg[o] = i;
                        }
                    });
                }
            }
            Ok((ft(out_shape, out), arg))
        }
        Data::I(v) => {
            let mut out = vec![if kind == ReduceKind::Max { i64::MIN } else { 0 }; n_out];
            for_each(&x.shape, [&si, &so], |_, [i, o]| match kind {
                ReduceKind::Max => out[o] = out[o].max(v[i]),
                _ => out[o] += v[i],
            });
            if kind == ReduceKind::Mean {
                let cnt: i64 = ax.iter().map(|a| x.shape[*a] as i64).product();
                out.iter_mut().for_each(|o| *o /= cnt.max(1));
            }
            Ok((
                Tensor {
                    shape: out_shape,
                    data: Data::I(out),
                },
                vec![],
            ))
        }
        Data::B(_) => Err(Error::Unsupported(format!(
            "{}: cannot reduce booleans",
            node.describe()
        ))),
    }
}

/// dX of a reduction.
pub fn reduce_backward<T: Scalar>(
    kind: ReduceKind,
    x_shape: &[usize],
    ax: &[usize],
    arg: &[usize],
    g: &[T],
) -> Vec<T> {
    let n: usize = x_shape.iter().product();
    let mut dx = vec![T::of(0.0); n];
    match kind {
        ReduceKind::Max => {
            for (o, &i) in arg.iter().enumerate() {
                if i != usize::MAX {
                    dx[i] += g[o];
                }
            }
        }
        _ => {
            let so = out_strides(x_shape, ax);
            let si = strides(x_shape);
            let c = if kind == ReduceKind::Mean {
                T::of(1.0) / T::of(ax.iter().map(|a| x_shape[*a]).product::<usize>().max(1) as f64)
            } else {
                T::of(1.0)
            };
            for_each(x_shape, [&si, &so], |_, [i, o]| dx[i] = g[o] * c);
        }
    }
    dx
}
