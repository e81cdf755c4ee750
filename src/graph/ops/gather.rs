//! Gather, GatherND, ScatterND and ScatterElements as index maps: a gather reads
//! `data[map[i]]` for each output element (backward: scatter-add), a scatter writes (or adds)
//! update u at `target[u]` (backward: the update's cotangent is `g[target[u]]`; replaced data
//! entries get none).

use super::util::*;
use crate::error::{Error, Result};
use crate::graph::ir::{Node, Tensor};

fn ints<'a, T>(node: &Node, t: &'a Tensor<T>, what: &str) -> Result<&'a [i64]> {
    t.ints().ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: {what} must be an integer tensor",
            node.describe()
        ))
    })
}

/// Gather along `axis`: (output shape, the data offset of each output element).
pub fn gather_map<T>(
    node: &Node,
    data: &[usize],
    indices: &Tensor<T>,
    axis_attr: i64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let a = axis(node, axis_attr, data.len())?;
    let idx = ints(node, indices, "indices")?;
    let mut out: Vec<usize> = data[..a].to_vec();
    out.extend_from_slice(&indices.shape);
    out.extend_from_slice(&data[a + 1..]);
    let n = numel(node, &out)?;
    let outer: usize = data[..a].iter().product();
    let inner: usize = data[a + 1..].iter().product();
    let da = data[a];
    let rows: Vec<usize> = idx
        .iter()
        .map(|i| index(node, *i, da))
        .collect::<Result<_>>()?;
    let mut map = Vec::with_capacity(n);
    for o in 0..outer {
        for r in &rows {
            let base = (o * da + r) * inner;
            map.extend(base..base + inner);
        }
    }
    Ok((out, map))
}

/// GatherND: (output shape, the data offset of each output element).
pub fn gather_nd_map<T>(
    node: &Node,
    data: &[usize],
    indices: &Tensor<T>,
    b: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let idx = ints(node, indices, "indices")?;
    let is = &indices.shape;
    let q = *is.last().ok_or_else(|| {
        Error::Unsupported(format!("{}: indices must have rank >= 1", node.describe()))
    })?;
    let r = data.len();
    if b >= is.len() || b + q > r || is[..b] != data[..b] {
        return Err(Error::shape(
            format!("{} (indices against data, batch_dims {b})", node.describe()),
            format!("indices (..., <= {}) over data {data:?}", r - b.min(r)),
            format!("{is:?}"),
        ));
    }
    let mut out: Vec<usize> = is[..is.len() - 1].to_vec();
    out.extend_from_slice(&data[b + q..]);
    let n = numel(node, &out)?;
    let ds = strides(data);
    let inner: usize = data[b + q..].iter().product();
    let per_batch: usize = is[b..is.len() - 1].iter().product();
    let batch_size: usize = data[b..].iter().product();
    let tuples = idx.len() / q.max(1);
    let mut map = Vec::with_capacity(n);
    for p in 0..tuples {
        let mut off = (p / per_batch.max(1)) * batch_size;
        for j in 0..q {
            off += index(node, idx[p * q + j], data[b + j])? * ds[b + j];
        }
        map.extend(off..off + inner);
    }
    if q == 0 {
        // every tuple selects a whole batch entry
        map.clear();
        for p in 0..is[..is.len() - 1].iter().product::<usize>() {
            let off = (p / per_batch.max(1)) * batch_size;
            map.extend(off..off + inner);
        }
    }
    Ok((out, map))
}

/// ScatterND: the target offset in data of each update element (updates must have shape
/// indices.shape[..-1] + data.shape[q..]).
pub fn scatter_nd_map<T>(
    node: &Node,
    data: &[usize],
    indices: &Tensor<T>,
    updates: &[usize],
) -> Result<Vec<usize>> {
    let idx = ints(node, indices, "indices")?;
    let is = &indices.shape;
    let q = *is.last().ok_or_else(|| {
        Error::Unsupported(format!("{}: indices must have rank >= 1", node.describe()))
    })?;
    let mut want: Vec<usize> = is[..is.len() - 1].to_vec();
    if q > data.len() {
        return Err(Error::shape(
            format!("{} (index tuples)", node.describe()),
            format!("at most {} entries", data.len()),
            q,
        ));
    }
    want.extend_from_slice(&data[q..]);
    if want != updates {
        return Err(Error::shape(
            format!("{} (updates)", node.describe()),
            format!("{want:?}"),
            format!("{updates:?}"),
        ));
    }
    let ds = strides(data);
    let inner: usize = data[q..].iter().product();
    let tuples: usize = is[..is.len() - 1].iter().product();
    let mut map = Vec::with_capacity(tuples * inner);
    for p in 0..tuples {
        let mut off = 0;
        for j in 0..q {
            off += index(node, idx[p * q + j], data[j])? * ds[j];
        }
        map.extend(off..off + inner);
    }
    Ok(map)
}

/// ScatterElements: the target offset in data of each update element.
pub fn scatter_elements_map<T>(
    node: &Node,
    data: &[usize],
    indices: &Tensor<T>,
    updates: &[usize],
    axis_attr: i64,
) -> Result<Vec<usize>> {
    let idx = ints(node, indices, "indices")?;
    let r = data.len();
    let a = axis(node, axis_attr, r)?;
    if indices.shape != updates
        || updates.len() != r
        || (0..r).any(|i| updates[i] > data[i] && i != a)
    {
        return Err(Error::shape(
            format!("{} (indices and updates)", node.describe()),
            format!("equal shapes of rank {r} within {data:?}"),
            format!("{:?} and {updates:?}", indices.shape),
        ));
    }
    let ds = strides(data);
    let us = strides(updates);
    let mut map = Vec::with_capacity(idx.len());
    for (u, &iv) in idx.iter().enumerate() {
        let mut off = 0;
        let mut rem = u;
        for i in 0..r {
            let c = rem / us[i];
            rem %= us[i];
            let c = if i == a { index(node, iv, data[a])? } else { c };
            off += c * ds[i];
        }
        map.push(off);
    }
    Ok(map)
}
