//! MatMul (numpy semantics, broadcast batch axes) and Gemm, on faer's matmul in the run's
//! precision. A MatMul whose right operand is 2-D (a weight) is one matmul over all rows.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use super::util::*;
use crate::error::{Error, Result};
use crate::graph::ir::{Node, Tensor};
use crate::scalar::pool::buffer;
use crate::scalar::Scalar;

/// `dst (m×n) (+)= a (m×k, row-major or transposed) · b (k×n, ...)`, all row-major slices.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into<T: Scalar>(
    dst: &mut [T],
    accumulate: bool,
    a: &[T],
    a_t: bool,
    b: &[T],
    b_t: bool,
    (m, k, n): (usize, usize, usize),
    alpha: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    let am = if a_t {
        MatRef::from_row_major_slice(a, k, m).transpose()
    } else {
        MatRef::from_row_major_slice(a, m, k)
    };
    let bm = if b_t {
        MatRef::from_row_major_slice(b, n, k).transpose()
    } else {
        MatRef::from_row_major_slice(b, k, n)
    };
    let acc = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    if k == 0 {
        if !accumulate {
            dst[..m * n].iter_mut().for_each(|v| *v = T::of(0.0));
        }
        return;
    }
    matmul(
        MatMut::from_row_major_slice_mut(&mut dst[..m * n], m, n),
        acc,
        am,
        bm,
        alpha,
        Par::Seq,
    );
}

/// The shapes of a MatMul after promoting 1-D operands: (batch shape, m, k, n, output shape).
pub struct MatMulShape {
    /// Broadcast batch dims.
    pub batch: Vec<usize>,
    /// A's batch dims (promoted, aligned to `batch`).
    pub a_batch: Vec<usize>,
    /// B's batch dims.
    pub b_batch: Vec<usize>,
    /// Rows of A.
    pub m: usize,
    /// Inner size.
    pub k: usize,
    /// Columns of B.
    pub n: usize,
    /// The output's shape (1-D operands' axes removed).
    pub out: Vec<usize>,
}

/// Checks and promotes MatMul operand shapes.
pub fn matmul_shape(node: &Node, a: &[usize], b: &[usize]) -> Result<MatMulShape> {
    if a.is_empty() || b.is_empty() {
        return Err(Error::Unsupported(format!(
            "{}: MatMul of a scalar",
            node.describe()
        )));
    }
    let (a2, a1) = if a.len() == 1 {
        (vec![1, a[0]], true)
    } else {
        (a.to_vec(), false)
    };
    let (b2, b1) = if b.len() == 1 {
        (vec![b[0], 1], true)
    } else {
        (b.to_vec(), false)
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(Error::shape(
            format!("{} (inner dimensions)", node.describe()),
            format!("{a:?} · [.., {k}, n]"),
            format!("{b:?}"),
        ));
    }
    let ab = &a2[..a2.len() - 2];
    let bb = &b2[..b2.len() - 2];
    let batch = broadcast(node, ab, bb)?;
    let pad = |s: &[usize]| {
        let mut v = vec![1; batch.len() - s.len()];
        v.extend_from_slice(s);
        v
    };
    let mut out = batch.clone();
    if !a1 {
        out.push(m);
    }
    if !b1 {
        out.push(n);
    }
    Ok(MatMulShape {
        a_batch: pad(ab),
        b_batch: pad(bb),
        batch,
        m,
        k,
        n,
        out,
    })
}

/// For every batch index: (offset of A's matrix, offset of B's, offset of the output's), in
/// units of matrices.
fn batch_pairs(s: &MatMulShape) -> Vec<(usize, usize, usize)> {
    let sa = bstrides(&s.a_batch, &s.batch);
    let sb = bstrides(&s.b_batch, &s.batch);
    let so = strides(&s.batch);
    let mut v = vec![];
    for_each(&s.batch, [&so, &sa, &sb], |_, [o, a, b]| v.push((a, b, o)));
    v
}

/// C = A·B.
pub fn matmul_forward<T: Scalar>(node: &Node, a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
    let s = matmul_shape(node, &a.shape, &b.shape)?;
    let av = floats(node, a, "A")?;
    let bv = floats(node, b, "B")?;
    let total = numel(node, &s.out)?;
    // every output matrix is written once, replacing what the buffer held
    let mut out = buffer(total);
    let (m, k, n) = (s.m, s.k, s.n);
    if s.b_batch.iter().all(|d| *d == 1) && s.a_batch == s.batch {
        // one matmul over every row of A
        let rows = total / n.max(1);
        gemm_into(
            &mut out,
            false,
            av,
            false,
            bv,
            false,
            (rows, k, n),
            T::of(1.0),
        );
    } else {
        for (ia, ib, io) in batch_pairs(&s) {
            gemm_into(
                &mut out[io * m * n..(io + 1) * m * n],
                false,
                &av[ia * m * k..(ia + 1) * m * k],
                false,
                &bv[ib * k * n..(ib + 1) * k * n],
                false,
                (m, k, n),
                T::of(1.0),
            );
        }
    }
    Ok(ft(s.out, out))
}

/// (dA, dB) of C = A·B, each when asked.
pub fn matmul_backward<T: Scalar>(
    node: &Node,
    a: &Tensor<T>,
    b: &Tensor<T>,
    g: &[T],
    need: (bool, bool),
) -> Result<GradPair<T>> {
    let s = matmul_shape(node, &a.shape, &b.shape)?;
    let av = floats(node, a, "A")?;
    let bv = floats(node, b, "B")?;
    let (m, k, n) = (s.m, s.k, s.n);
    // one product over all rows when B is one matrix; otherwise an operand not broadcast over
    // the batch gets each of its matrices written once (a recycled buffer), and a broadcast
    // one sums several products (zeros first)
    let whole = s.b_batch.iter().all(|d| *d == 1) && s.a_batch == s.batch;
    let (a_once, b_once) = (s.a_batch == s.batch, whole || s.b_batch == s.batch);
    let fresh = |n: usize, once: bool| if once { buffer(n) } else { vec![T::of(0.0); n] };
    let mut ga = need.0.then(|| fresh(av.len(), a_once));
    let mut gb = need.1.then(|| fresh(bv.len(), b_once));
    if whole {
        let rows = g.len() / n.max(1);
        if let Some(ga) = ga.as_mut() {
            gemm_into(ga, false, g, false, bv, true, (rows, n, k), T::of(1.0));
        }
        if let Some(gb) = gb.as_mut() {
            gemm_into(gb, false, av, true, g, false, (k, rows, n), T::of(1.0));
        }
        return Ok((ga, gb));
    }
    for (ia, ib, io) in batch_pairs(&s) {
        let gs = &g[io * m * n..(io + 1) * m * n];
        if let Some(ga) = ga.as_mut() {
            gemm_into(
                &mut ga[ia * m * k..(ia + 1) * m * k],
                !a_once,
                gs,
                false,
                &bv[ib * k * n..(ib + 1) * k * n],
                true,
                (m, n, k),
                T::of(1.0),
            );
        }
        if let Some(gb) = gb.as_mut() {
            gemm_into(
                &mut gb[ib * k * n..(ib + 1) * k * n],
                !b_once,
                &av[ia * m * k..(ia + 1) * m * k],
                true,
                gs,
                false,
                (k, m, n),
                T::of(1.0),
            );
        }
    }
    Ok((ga, gb))
}

/// Gemm's shapes: (M, K, N).
pub fn gemm_shape(
    node: &Node,
    a: &[usize],
    b: &[usize],
    trans_a: bool,
    trans_b: bool,
) -> Result<(usize, usize, usize)> {
    if a.len() != 2 || b.len() != 2 {
        return Err(Error::shape(
            format!("{} (A and B 2-D)", node.describe()),
            "2-D operands",
            format!("{a:?} and {b:?}"),
        ));
    }
    let (m, k) = if trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
    let (k2, n) = if trans_b { (b[1], b[0]) } else { (b[0], b[1]) };
    if k != k2 {
        return Err(Error::shape(
            format!("{} (inner dimensions)", node.describe()),
            k,
            k2,
        ));
    }
    Ok((m, k, n))
}

/// Y = α·op(A)·op(B) + β·C.
#[allow(clippy::too_many_arguments)]
pub fn gemm_forward<T: Scalar>(
    node: &Node,
    a: &Tensor<T>,
    b: &Tensor<T>,
    c: Option<&Tensor<T>>,
    alpha: f64,
    beta: f64,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor<T>> {
    let (m, k, n) = gemm_shape(node, &a.shape, &b.shape, trans_a, trans_b)?;
    let out_shape = vec![m, n];
    numel(node, &out_shape)?;
    // every element is written: by C below, or by the product (which replaces without C)
    let mut out = buffer(m * n);
    if let Some(c) = c {
        let cv = floats(node, c, "C")?;
        if broadcast(node, &c.shape, &out_shape)? != out_shape {
            return Err(Error::shape(
                format!("{} (C broadcast to the output)", node.describe()),
                format!("{out_shape:?}"),
                format!("{:?}", c.shape),
            ));
        }
        let bt = T::of(beta);
        if cv.len() == n && n > 0 && c.shape.last() == Some(&n) {
            // a bias row (shape (n) or (1, n)), the common case: copied row by row
            for row in out.chunks_exact_mut(n) {
                if beta == 1.0 {
                    row.copy_from_slice(cv);
                } else {
                    row.iter_mut().zip(cv).for_each(|(o, c)| *o = bt * *c);
                }
            }
        } else {
            let sc = bstrides(&c.shape, &out_shape);
            let so = strides(&out_shape);
            for_each(&out_shape, [&so, &sc], |io, [_, ic]| out[io] = bt * cv[ic]);
        }
    }
    gemm_into(
        &mut out,
        c.is_some(),
        floats(node, a, "A")?,
        trans_a,
        floats(node, b, "B")?,
        trans_b,
        (m, k, n),
        T::of(alpha),
    );
    Ok(ft(out_shape, out))
}

/// (dA, dB, dC) of Gemm, each when asked.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn gemm_backward<T: Scalar>(
    node: &Node,
    a: &Tensor<T>,
    b: &Tensor<T>,
    c: Option<&Tensor<T>>,
    (alpha, beta, trans_a, trans_b): (f64, f64, bool, bool),
    g: &[T],
    need: [bool; 3],
) -> Result<[Option<Vec<T>>; 3]> {
    let (m, k, n) = gemm_shape(node, &a.shape, &b.shape, trans_a, trans_b)?;
    let av = floats(node, a, "A")?;
    let bv = floats(node, b, "B")?;
    let al = T::of(alpha);
    // the products replace every element of their (recycled) buffers
    let ga = need[0].then(|| {
        let mut d = buffer(m * k);
        if trans_a {
            // dA (k×m) = α·op(B)·gᵀ
            gemm_into(&mut d, false, bv, trans_b, g, true, (k, n, m), al);
        } else {
            gemm_into(&mut d, false, g, false, bv, !trans_b, (m, n, k), al);
        }
        d
    });
    let gb = need[1].then(|| {
        let mut d = buffer(k * n);
        if trans_b {
            // dB (n×k) = α·gᵀ·op(A)
            gemm_into(&mut d, false, g, true, av, trans_a, (n, m, k), al);
        } else {
            gemm_into(&mut d, false, av, !trans_a, g, false, (k, m, n), al);
        }
        d
    });
    let gc = match (need[2], c) {
        (true, Some(c)) => {
            let r = reduce_to(g, &[m, n], &c.shape);
            Some(r.into_iter().map(|v| v * T::of(beta)).collect())
        }
        _ => None,
    };
    Ok([ga, gb, gc])
}
