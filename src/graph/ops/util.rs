//! Shapes, strides, broadcasting and strided iteration shared by the operators.

use crate::error::{Error, Result};
use crate::graph::ir::{Data, Node, Tensor};
use crate::scalar::Scalar;

/// The cotangents of a binary operator's two inputs, each when asked.
pub type GradPair<T> = (Option<Vec<T>>, Option<Vec<T>>);

/// The most elements one value may have (2³¹): a file claiming more is refused before anything
/// is allocated.
pub const MAX_ELEMENTS: usize = 1 << 31;

/// The element count of `shape`, refused above [`MAX_ELEMENTS`] or on overflow.
pub fn numel(node: &Node, shape: &[usize]) -> Result<usize> {
    let mut n: usize = 1;
    for &d in shape {
        n = n.checked_mul(d).filter(|n| *n <= MAX_ELEMENTS).ok_or_else(|| {
            Error::Unsupported(format!(
                "{} would produce a tensor of shape {shape:?}, over the {MAX_ELEMENTS} elements one value may hold",
                node.describe()
            ))
        })?;
    }
    Ok(n)
}

/// Row-major strides.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// An axis attribute (possibly negative) as an index into `rank` axes.
pub fn axis(node: &Node, a: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let v = if a < 0 { a + r } else { a };
    if v < 0 || v >= r.max(1) {
        return Err(Error::Unsupported(format!(
            "{}: axis {a} is out of range for rank {rank}",
            node.describe()
        )));
    }
    Ok(v as usize)
}

/// The numpy broadcast of two shapes, or `None` when they do not broadcast.
pub fn broadcast_dims(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        if i + s.len() >= r {
            s[i + s.len() - r]
        } else {
            1
        }
    };
    (0..r)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// The numpy broadcast of two shapes (an error naming `node` when they do not broadcast).
pub fn broadcast(node: &Node, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    broadcast_dims(a, b).ok_or_else(|| {
        Error::shape(
            format!("{} (broadcasting)", node.describe()),
            format!("{a:?} and a compatible shape"),
            format!("{b:?}"),
        )
    })
}

/// Strides of `shape` seen inside `out` (aligned right; 0 on broadcast axes).
pub fn bstrides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = strides(shape);
    let r = out.len();
    (0..r)
        .map(|i| {
            if i + shape.len() < r {
                0
            } else {
                let j = i + shape.len() - r;
                if shape[j] == 1 && out[i] != 1 {
                    0
                } else {
                    s[j]
                }
            }
        })
        .collect()
}

/// Calls `f(out_index, offsets)` for every index of `shape` in row-major order, with the offset
/// of each operand given its strides (`strides[k]` for operand k).
pub fn for_each<const K: usize>(
    shape: &[usize],
    strides: [&[usize]; K],
    mut f: impl FnMut(usize, [usize; K]),
) {
    let n: usize = shape.iter().product();
    if n == 0 {
        return;
    }
    let r = shape.len();
    if r == 0 {
        f(0, [0; K]);
        return;
    }
    let last = shape[r - 1];
    let inner: [usize; K] = std::array::from_fn(|k| strides[k][r - 1]);
    let mut idx = vec![0usize; r];
    let mut base = [0usize; K];
    let mut o = 0;
    loop {
        let mut off = base;
        for _ in 0..last {
            f(o, off);
            o += 1;
            for k in 0..K {
                off[k] += inner[k];
            }
        }
        // advance the outer odometer
        let mut ax = r - 1;
        loop {
            if ax == 0 {
                return;
            }
            ax -= 1;
            idx[ax] += 1;
            for k in 0..K {
                base[k] += strides[k][ax];
            }
            if idx[ax] < shape[ax] {
                break;
            }
            for k in 0..K {
                base[k] -= strides[k][ax] * shape[ax];
            }
            idx[ax] = 0;
        }
    }
}

/// Sums `g` (shaped `out`) into a tensor of shape `target` that was broadcast to `out`.
pub fn reduce_to<T: Scalar>(g: &[T], out: &[usize], target: &[usize]) -> Vec<T> {
    let n: usize = target.iter().product();
    if out == target {
        return g.to_vec();
    }
    if let Some(acc) = sum_trailing(g, out, target) {
        return acc;
    }
    let mut acc = vec![T::of(0.0); n];
    let ts = bstrides(target, out);
    let os = strides(out);
    for_each(out, [&os, &ts], |_, [io, it]| acc[it] += g[io]);
    acc
}

/// [`reduce_to`] taking `g` by value: the buffer itself when nothing is summed.
pub fn reduce_owned<T: Scalar>(g: Vec<T>, out: &[usize], target: &[usize]) -> Vec<T> {
    if out == target {
        return g;
    }
    reduce_to(&g, out, target)
}

/// When `target` is `out`'s trailing axes (after leading ones: a bias, a norm's scale), the sum
/// of `g`'s rows of that size, added in the same order as the general reduction.
pub fn sum_trailing<T: Scalar>(g: &[T], out: &[usize], target: &[usize]) -> Option<Vec<T>> {
    let n: usize = target.iter().product();
    let t: Vec<usize> = target.iter().copied().skip_while(|d| *d == 1).collect();
    if n == 0 || target.len() > out.len() || !out.ends_with(&t) || g.len() % n != 0 {
        return None;
    }
    let mut acc = vec![T::of(0.0); n];
    for row in g.chunks_exact(n) {
        acc.iter_mut().zip(row).for_each(|(a, x)| *a += *x);
    }
    Some(acc)
}

/// Σ aᵢ·bᵢ over eight partial sums (so the loop vectorises).
pub fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::of(0.0); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut s = T::of(0.0);
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    for l in lanes {
        s += l;
    }
    s
}

/// Σ aᵢ over eight partial sums.
pub fn sum<T: Scalar>(a: &[T]) -> T {
    let mut lanes = [T::of(0.0); 8];
    let c = a.chunks_exact(8);
    let r = c.remainder();
    for x in c {
        for k in 0..8 {
            lanes[k] += x[k];
        }
    }
    let mut s = T::of(0.0);
    for x in r {
        s += *x;
    }
    for l in lanes {
        s += l;
    }
    s
}

/// The elements of `src` (row-major `shape`) with axes permuted (`perm[i]` = input axis of
/// output axis i). The output is written row by row: a run of the input when the last axis
/// stays, a tile of the last two output axes when the second-to-last is the input's contiguous
/// one (a transpose of the trailing axes), strided reads otherwise.
pub fn permute<E: Copy>(src: &[E], shape: &[usize], perm: &[usize]) -> Vec<E> {
    let r = shape.len();
    let mut out = Vec::with_capacity(src.len());
    if r == 0 || src.is_empty() || perm.len() != r {
        out.extend_from_slice(src);
        return out;
    }
    let s = strides(shape);
    let out_shape: Vec<usize> = perm.iter().map(|p| shape[*p]).collect();
    let ps: Vec<usize> = perm.iter().map(|p| s[*p]).collect();
    let (last, step) = (out_shape[r - 1], ps[r - 1]);
    let tile = r >= 2 && step != 1 && ps[r - 2] == 1 && out_shape[r - 2] > 1;
    // the output axes walked by the odometer, the rest written per visit
    let outer = if tile { r - 2 } else { r - 1 };
    let mut idx = vec![0usize; outer];
    let mut base = 0usize;
    loop {
        if tile {
            // out[i][j] = src[base + i + j·step]: read input runs, write the tile's columns
            let a = out_shape[r - 2];
            let at = out.len();
            out.resize(at + a * last, src[base]);
            let blk = &mut out[at..];
            for j in 0..last {
                let run = &src[base + j * step..base + j * step + a];
                for (i, v) in run.iter().enumerate() {
                    blk[i * last + j] = *v;
                }
            }
        } else if step == 1 {
            out.extend_from_slice(&src[base..base + last]);
        } else {
            out.extend((0..last).map(|j| src[base + j * step]));
        }
        let mut ax = outer;
        loop {
            if ax == 0 {
                return out;
            }
            ax -= 1;
            idx[ax] += 1;
            base += ps[ax];
            if idx[ax] < out_shape[ax] {
                break;
            }
            base -= ps[ax] * out_shape[ax];
            idx[ax] = 0;
        }
    }
}

/// The float data of input `i`, or an error naming the node.
pub fn floats<'a, T>(node: &Node, t: &'a Tensor<T>, what: &str) -> Result<&'a [T]> {
    t.floats().ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: input {what} must be a float tensor, it holds {:?}",
            node.describe(),
            t.elem_type()
        ))
    })
}

/// Input `i`, or an error naming the node.
pub fn input<'a, T>(node: &Node, ins: &[Option<&'a Tensor<T>>], i: usize) -> Result<&'a Tensor<T>> {
    ins.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| Error::Unsupported(format!("{}: input {i} is missing", node.describe())))
}

/// A constant integer list from input `i` (axes, shapes, sizes), or `None` when absent.
pub fn int_list<T>(node: &Node, ins: &[Option<&Tensor<T>>], i: usize) -> Result<Option<Vec<i64>>> {
    match ins.get(i).copied().flatten() {
        None => Ok(None),
        Some(t) => match &t.data {
            Data::I(v) => Ok(Some(v.clone())),
            _ => Err(Error::Unsupported(format!(
                "{}: input {i} must be an integer tensor",
                node.describe()
            ))),
        },
    }
}

/// A float tensor.
pub fn ft<T>(shape: Vec<usize>, v: Vec<T>) -> Tensor<T> {
    Tensor {
        shape,
        data: Data::F(v),
    }
}

/// Applies `f` to the elements whatever their type (same type out).
#[macro_export]
#[doc(hidden)]
macro_rules! map_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::graph::ir::Data::F($v) => $crate::graph::ir::Data::F($body),
            $crate::graph::ir::Data::I($v) => $crate::graph::ir::Data::I($body),
            $crate::graph::ir::Data::B($v) => $crate::graph::ir::Data::B($body),
        }
    };
}
pub use map_data;

/// Gathers `src[map[i]]` for every i, whatever the element type.
pub fn gather_data<T: Copy>(data: &Data<T>, map: &[usize]) -> Data<T> {
    map_data!(data, v => map.iter().map(|i| v[*i]).collect())
}

/// Scatter-adds `g[i]` into `out[map[i]]` (the backward of a gather).
pub fn scatter_add<T: Scalar>(g: &[T], map: &[usize], n: usize) -> Vec<T> {
    let mut out = vec![T::of(0.0); n];
    for (gi, &m) in g.iter().zip(map) {
        out[m] += *gi;
    }
    out
}

/// Normalises a (possibly negative) index into 0..dim, or an error naming the node.
pub fn index(node: &Node, i: i64, dim: usize) -> Result<usize> {
    let d = dim as i64;
    let v = if i < 0 { i + d } else { i };
    if v < 0 || v >= d {
        return Err(Error::Unsupported(format!(
            "{}: index {i} is out of range for a dimension of size {dim}",
            node.describe()
        )));
    }
    Ok(v as usize)
}
