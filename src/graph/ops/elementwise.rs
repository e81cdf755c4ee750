//! Elementwise operators: unary functions, broadcasting arithmetic, Where, comparisons and
//! casts. Backward: the chain rule elementwise, summed back over broadcast axes.

use super::util::*;
use crate::error::{Error, Result};
use crate::graph::ir::{Binary, Data, ElemType, Logic, Node, Tensor, Unary};
use crate::scalar::pool::buffer;
use crate::scalar::Scalar;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

fn unary_value<T: Scalar>(u: Unary, x: T) -> T {
    let (zero, one) = (T::of(0.0), T::of(1.0));
    match u {
        Unary::Neg => -x,
        Unary::Sqrt => x.sqrt(),
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        Unary::Relu => {
            if x > zero {
                x
            } else {
                zero
            }
        }
        Unary::LeakyRelu(a) => {
            if x >= zero {
                x
            } else {
                T::of(a) * x
            }
        }
        Unary::Sigmoid => one / (one + (-x).exp()),
        Unary::Tanh => x.tanh(),
        Unary::Erf => x.erf(),
        Unary::Gelu { tanh: false } => x.gelu_pair().0,
        Unary::Gelu { tanh: true } => {
            let t = (T::of(SQRT_2_OVER_PI) * (x + T::of(GELU_C) * x * x * x)).tanh();
            T::of(0.5) * x * (one + t)
        }
        Unary::Softplus => {
            let m = if x > zero { x } else { zero };
            m + (one + (-x.abs()).exp()).ln()
        }
        Unary::Abs => x.abs(),
        Unary::Reciprocal => one / x,
    }
}

/// dy/dx at input x with output y.
fn unary_deriv<T: Scalar>(u: Unary, x: T, y: T) -> T {
    let (zero, one) = (T::of(0.0), T::of(1.0));
    match u {
        Unary::Neg => -one,
        Unary::Sqrt => T::of(0.5) / y,
        Unary::Exp => y,
        Unary::Log => one / x,
        Unary::Relu => {
            if x > zero {
                one
            } else {
                zero
            }
        }
        Unary::LeakyRelu(a) => {
            if x >= zero {
                one
            } else {
                T::of(a)
            }
        }
        Unary::Sigmoid => y * (one - y),
        Unary::Tanh => one - y * y,
        Unary::Erf => T::of(std::f64::consts::FRAC_2_SQRT_PI) * (-x * x).exp(),
        Unary::Gelu { tanh: false } => x.gelu_pair().1,
        Unary::Gelu { tanh: true } => {
            let s = T::of(SQRT_2_OVER_PI);
            let c = T::of(GELU_C);
            let t = (s * (x + c * x * x * x)).tanh();
            T::of(0.5) * (one + t)
                + T::of(0.5) * x * (one - t * t) * s * (one + T::of(3.0) * c * x * x)
        }
        Unary::Softplus => one / (one + (-x).exp()),
        Unary::Abs => {
            if x > zero {
                one
            } else if x < zero {
                -one
            } else {
                zero
            }
        }
        Unary::Reciprocal => -y * y,
    }
}

/// `f` of every element of `v`, in a recycled buffer.
fn map_pooled<T: Scalar>(v: &[T], f: impl Fn(T) -> T) -> Vec<T> {
    let mut o = buffer(v.len());
    o.iter_mut().zip(v).for_each(|(o, x)| *o = f(*x));
    o
}

/// Forward of a unary function: the output and, for the GELUs, the derivative (computed with
/// the value by the vectorised kernels, kept for the backward).
pub fn unary_forward<T: Scalar>(
    node: &Node,
    u: Unary,
    x: &Tensor<T>,
) -> Result<(Tensor<T>, Option<Vec<T>>)> {
    match &x.data {
        Data::F(v) => {
            let (out, deriv) = match u {
                Unary::Gelu { tanh } => {
                    let mut z = buffer(v.len());
                    z.copy_from_slice(v);
                    let mut o = buffer(v.len());
                    if tanh {
                        T::gelu_tanh_slice(&mut z, &mut o);
                    } else {
                        T::gelu_slice(&mut z, &mut o);
                    }
                    (o, Some(z))
                }
                Unary::Tanh => {
                    let mut o = buffer(v.len());
                    o.copy_from_slice(v);
                    T::tanh_slice(&mut o);
                    (o, None)
                }
                Unary::Relu => {
                    let zero = T::of(0.0);
                    (map_pooled(v, |x| if x > zero { x } else { zero }), None)
                }
                Unary::Sigmoid => {
                    let one = T::of(1.0);
                    (map_pooled(v, |x| one / (one + (-x).exp())), None)
                }
                _ => (map_pooled(v, |x| unary_value(u, x)), None),
            };
            Ok((ft(x.shape.clone(), out), deriv))
        }
        Data::I(v) if matches!(u, Unary::Neg | Unary::Abs | Unary::Relu) => Ok((
            Tensor {
                shape: x.shape.clone(),
                data: Data::I(
                    v.iter()
                        .map(|a| match u {
                            Unary::Neg => -a,
                            Unary::Abs => a.abs(),
                            _ => (*a).max(0),
                        })
                        .collect(),
                ),
            },
            None,
        )),
        _ => Err(Error::Unsupported(format!(
            "{}: input must be float, it holds {:?}",
            node.describe(),
            x.elem_type()
        ))),
    }
}

/// [`unary_forward`] on an input the caller gives up: the GELUs keep their derivative in its
/// buffer.
pub fn unary_forward_owned<T: Scalar>(
    node: &Node,
    u: Unary,
    x: Tensor<T>,
) -> Result<(Tensor<T>, Option<Vec<T>>)> {
    match (u, x.data) {
        (Unary::Gelu { tanh }, Data::F(mut z)) => {
            let mut o = buffer(z.len());
            if tanh {
                T::gelu_tanh_slice(&mut z, &mut o);
            } else {
                T::gelu_slice(&mut z, &mut o);
            }
            Ok((ft(x.shape, o), Some(z)))
        }
        // the functions whose backward reads only the output run in the input's buffer
        (Unary::Relu, Data::F(mut z)) => {
            let zero = T::of(0.0);
            z.iter_mut()
                .for_each(|x| *x = if *x > zero { *x } else { zero });
            Ok((ft(x.shape, z), None))
        }
        (Unary::Tanh, Data::F(mut z)) => {
            T::tanh_slice(&mut z);
            Ok((ft(x.shape, z), None))
        }
        (Unary::Sigmoid, Data::F(mut z)) => {
            let one = T::of(1.0);
            z.iter_mut().for_each(|x| *x = one / (one + (-*x).exp()));
            Ok((ft(x.shape, z), None))
        }
        (_, data) => unary_forward(
            node,
            u,
            &Tensor {
                shape: x.shape,
                data,
            },
        ),
    }
}

/// Backward of a unary function: g·f'(x) (f' kept by the forward when given), in a new buffer.
pub fn unary_backward<T: Scalar>(
    node: &Node,
    u: Unary,
    x: &Tensor<T>,
    y: &Tensor<T>,
    deriv: Option<&[T]>,
    g: &[T],
) -> Result<Vec<T>> {
    let mut o = buffer(g.len());
    o.copy_from_slice(g);
    unary_backward_in_place(node, u, x, y, deriv, &mut o)?;
    Ok(o)
}

/// Backward of a unary function in the output cotangent's own buffer: g ← g·f'(x) (the
/// backward pass hands a unary node's output cotangent, read by no one after it, to its input
/// this way instead of filling a new buffer per node and batch).
pub fn unary_backward_in_place<T: Scalar>(
    node: &Node,
    u: Unary,
    x: &Tensor<T>,
    y: &Tensor<T>,
    deriv: Option<&[T]>,
    g: &mut [T],
) -> Result<()> {
    let bad_len = |what: &str, n: usize| {
        Error::Unsupported(format!(
            "{}: its {what} holds {n} values, the cotangent {}",
            node.describe(),
            g.len()
        ))
    };
    if let Some(d) = deriv {
        if d.len() != g.len() {
            return Err(bad_len("saved derivative", d.len()));
        }
        g.iter_mut().zip(d).for_each(|(g, d)| *g *= *d);
        return Ok(());
    }
    let xs = floats(node, x, "X")?;
    let ys = floats(node, y, "Y")?;
    // a buffer given up to a reader (see `exec::forward`) is left empty: ReLU, tanh and the
    // sigmoid run in their input's buffer and read their output, a reshape may take the
    // output of the others
    let (has_x, has_y) = (xs.len() == g.len(), ys.len() == g.len());
    let one = T::of(1.0);
    let zero = T::of(0.0);
    let lost = |what: &str| Err(super::not_kept(node, what));
    // one loop per common function (vectorises)
    match u {
        Unary::Tanh | Unary::Sigmoid | Unary::Exp | Unary::Sqrt | Unary::Reciprocal if !has_y => {
            return lost("output")
        }
        Unary::Tanh => g.iter_mut().zip(ys).for_each(|(g, y)| *g *= one - *y * *y),
        Unary::Sigmoid => g
            .iter_mut()
            .zip(ys)
            .for_each(|(g, y)| *g = *g * *y * (one - *y)),
        Unary::Exp => g.iter_mut().zip(ys).for_each(|(g, y)| *g *= *y),
        // y > 0 exactly where x > 0
        Unary::Relu if has_y || has_x => g
            .iter_mut()
            .zip(if has_y { ys } else { xs })
            .for_each(|(g, v)| *g = if *v > zero { *g } else { zero }),
        _ if !has_x => return lost("input"),
        _ if !has_y => g
            .iter_mut()
            .zip(xs)
            .for_each(|(g, x)| *g *= unary_deriv(u, *x, zero)),
        _ => g
            .iter_mut()
            .zip(xs.iter().zip(ys))
            .for_each(|(g, (x, y))| *g *= unary_deriv(u, *x, *y)),
    }
    Ok(())
}

/// Element types of a broadcast's output and where their buffer comes from: floats from the
/// thread's pool ([`buffer`]), the rest zero-filled.
trait OutElem: Copy + Default {
    fn out_buffer(n: usize) -> Vec<Self> {
        vec![Self::default(); n]
    }
}
impl OutElem for bool {}
impl OutElem for i64 {}
impl<T: Scalar> OutElem for T {
    fn out_buffer(n: usize) -> Vec<Self> {
        buffer(n)
    }
}

/// `o[r·n + j] = f(full[r·n + j], small[j])` for every row r (n = small.len() > 0).
#[inline(always)]
fn rows_apply<X: Copy, Y: Copy, O>(o: &mut [O], full: &[X], small: &[Y], f: impl Fn(X, Y) -> O) {
    for (orow, row) in o.chunks_mut(small.len()).zip(full.chunks(small.len())) {
        orow.iter_mut()
            .zip(row.iter().zip(small))
            .for_each(|(o, (x, y))| *o = f(*x, *y));
    }
}

/// The combined operation of a broadcasting binary op on two slices: `out[i] = f(a[ia], b[ib])`.
fn broadcast_apply<A: Copy, B: Copy, O: OutElem>(
    a: &[A],
    ashape: &[usize],
    b: &[B],
    bshape: &[usize],
    out: &[usize],
    f: impl Fn(A, B) -> O,
) -> Vec<O> {
    // every element is written below
    let mut o = O::out_buffer(out.iter().product());
    if ashape == out && bshape == out {
        o.iter_mut()
            .zip(a.iter().zip(b))
            .for_each(|(o, (x, y))| *o = f(*x, *y));
        return o;
    }
    if ashape == out && b.len() == 1 {
        o.iter_mut().zip(a).for_each(|(o, x)| *o = f(*x, b[0]));
        return o;
    }
    if bshape == out && a.len() == 1 {
        o.iter_mut().zip(b).for_each(|(o, y)| *o = f(a[0], *y));
        return o;
    }
    // b broadcast over leading axes only (a bias on the trailing axes)
    let trailing = |s: &[usize]| {
        let t: Vec<usize> = s.iter().copied().skip_while(|d| *d == 1).collect();
        !t.is_empty() && out.ends_with(&t)
    };
    if ashape == out && !b.is_empty() && trailing(bshape) {
        rows_apply(&mut o, a, b, &f);
        return o;
    }
    if bshape == out && !a.is_empty() && trailing(ashape) {
        rows_apply(&mut o, b, a, |y, x| f(x, y));
        return o;
    }
    let sa = bstrides(ashape, out);
    let sb = bstrides(bshape, out);
    let so = strides(out);
    for_each(out, [&so, &sa, &sb], |io, [_, ia, ib]| {
        o[io] = f(a[ia], b[ib])
    });
    o
}

/// Add (either operand) or Sub (the minuend) with the float operand in slot `slot`, shaped
/// like the output, updated in place: the same values as [`binary_forward`] without a new
/// buffer.
pub fn binary_in_place<T: Scalar>(
    node: &Node,
    op: Binary,
    acc: Tensor<T>,
    slot: usize,
    other: &Tensor<T>,
) -> Result<Tensor<T>> {
    let out = broadcast(node, &acc.shape, &other.shape)?;
    let (Data::F(mut a), Some(b)) = (acc.data, other.floats()) else {
        return Err(Error::Unsupported(format!(
            "{}: in-place update needs float operands",
            node.describe()
        )));
    };
    if out != acc.shape || a.len() != out.iter().product::<usize>() {
        return Err(Error::shape(
            format!("{} (in-place operand)", node.describe()),
            format!("{out:?}"),
            format!("{:?}", acc.shape),
        ));
    }
    match (op, slot) {
        (Binary::Add, _) => update(&mut a, &out, b, &other.shape, |x, y| x + y),
        (Binary::Sub, 0) => update(&mut a, &out, b, &other.shape, |x, y| x - y),
        _ => {
            return Err(Error::Unsupported(format!(
                "{}: no in-place form for input {slot}",
                node.describe()
            )))
        }
    }
    Ok(Tensor {
        shape: out,
        data: Data::F(a),
    })
}

/// `a[i] = f(a[i], b[i broadcast])` over `out` (a's shape).
fn update<T: Scalar>(a: &mut [T], out: &[usize], b: &[T], bshape: &[usize], f: impl Fn(T, T) -> T) {
    if a.is_empty() || b.is_empty() {
        // an empty output (a zero-sized axis): nothing to update
        return;
    }
    let trailing = {
        let t: Vec<usize> = bshape.iter().copied().skip_while(|d| *d == 1).collect();
        !t.is_empty() && out.ends_with(&t)
    };
    if b.len() == 1 {
        a.iter_mut().for_each(|x| *x = f(*x, b[0]));
    } else if bshape == out || trailing {
        for row in a.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(x, y)| *x = f(*x, *y));
        }
    } else {
        let sb = bstrides(bshape, out);
        let so = strides(out);
        for_each(out, [&so, &sb], |io, [_, ib]| a[io] = f(a[io], b[ib]));
    }
}

/// Forward of Add, Sub, Mul, Div, Pow (floats; integers for shape arithmetic).
pub fn binary_forward<T: Scalar>(
    node: &Node,
    op: Binary,
    a: &Tensor<T>,
    b: &Tensor<T>,
) -> Result<Tensor<T>> {
    let out = broadcast(node, &a.shape, &b.shape)?;
    numel(node, &out)?;
    let data = match (&a.data, &b.data) {
        (Data::F(x), Data::F(y)) => {
            // one loop per operator (a match inside the loop would not vectorise)
            let (sa, sb) = (&a.shape, &b.shape);
            Data::F(match op {
                Binary::Add => broadcast_apply(x, sa, y, sb, &out, |p, q| p + q),
                Binary::Sub => broadcast_apply(x, sa, y, sb, &out, |p, q| p - q),
                Binary::Mul => broadcast_apply(x, sa, y, sb, &out, |p, q| p * q),
                Binary::Div => broadcast_apply(x, sa, y, sb, &out, |p, q| p / q),
                Binary::Pow => broadcast_apply(x, sa, y, sb, &out, |p, q| p.powf(q)),
            })
        }
        (Data::I(x), Data::I(y)) => {
            if op == Binary::Div && y.contains(&0) {
                return Err(Error::Unsupported(format!(
                    "{}: integer division by zero",
                    node.describe()
                )));
            }
            Data::I(broadcast_apply(
                x,
                &a.shape,
                y,
                &b.shape,
                &out,
                |p, q| match op {
                    Binary::Add => p.wrapping_add(q),
                    Binary::Sub => p.wrapping_sub(q),
                    Binary::Mul => p.wrapping_mul(q),
                    Binary::Div => p.checked_div(q).unwrap_or(0),
                    Binary::Pow => p.wrapping_pow(q.clamp(0, 63) as u32),
                },
            ))
        }
        (Data::F(x), Data::I(y)) if op == Binary::Pow => {
            let y: Vec<T> = y.iter().map(|v| T::of(*v as f64)).collect();
            Data::F(broadcast_apply(x, &a.shape, &y, &b.shape, &out, |p, q| {
                p.powf(q)
            }))
        }
        _ => {
            return Err(Error::Unsupported(format!(
                "{}: inputs of types {:?} and {:?}",
                node.describe(),
                a.elem_type(),
                b.elem_type()
            )))
        }
    };
    Ok(Tensor { shape: out, data })
}

/// The output-shaped cotangent of input `which` (0 = a, 1 = b) of a binary op, before the sum
/// over broadcast axes: the backward reduces it to the input's shape, the per-example rule
/// per example.
pub fn binary_contribution<T: Scalar>(
    node: &Node,
    op: Binary,
    a: &Tensor<T>,
    b: &Tensor<T>,
    y: &Tensor<T>,
    g: &[T],
    which: usize,
) -> Result<Vec<T>> {
    let out = &y.shape;
    Ok(match (op, which) {
        (Binary::Add, _) | (Binary::Sub, 0) => g.to_vec(),
        (Binary::Sub, _) => g.iter().map(|v| -*v).collect(),
        (Binary::Mul, w) => {
            let other = if w == 0 { b } else { a };
            let o = floats(node, other, "B")?;
            broadcast_apply(g, out, o, &other.shape, out, |p, q| p * q)
        }
        (Binary::Div, 0) => {
            broadcast_apply(g, out, floats(node, b, "B")?, &b.shape, out, |p, q| p / q)
        }
        (Binary::Div, _) => {
            // −g·y/b
            let ys = floats(node, y, "Y")?;
            let gy: Vec<T> = g.iter().zip(ys).map(|(p, q)| *p * *q).collect();
            broadcast_apply(&gy, out, floats(node, b, "B")?, &b.shape, out, |p, q| {
                -(p / q)
            })
        }
        (Binary::Pow, 0) => {
            // g·b·a^(b−1)
            let av = floats(node, a, "A")?;
            let bv: Vec<T> = match &b.data {
                Data::F(v) => v.clone(),
                Data::I(v) => v.iter().map(|x| T::of(*x as f64)).collect(),
                _ => vec![],
            };
            let ab = broadcast_apply(av, &a.shape, &bv, &b.shape, out, |p, q| {
                q * p.powf(q - T::of(1.0))
            });
            ab.iter().zip(g).map(|(d, gv)| *d * *gv).collect()
        }
        (Binary::Pow, _) => {
            // g·y·ln a
            let ys = floats(node, y, "Y")?;
            let la: Vec<T> = floats(node, a, "A")?.iter().map(|v| v.ln()).collect();
            let ly = broadcast_apply(&la, &a.shape, ys, out, out, |p, q| p * q);
            ly.iter().zip(g).map(|(d, gv)| *d * *gv).collect()
        }
    })
}

fn as_bool<T: Scalar>(node: &Node, t: &Tensor<T>) -> Result<Vec<bool>> {
    Ok(match &t.data {
        Data::B(v) => v.clone(),
        Data::I(v) => v.iter().map(|x| *x != 0).collect(),
        Data::F(_) => {
            return Err(Error::Unsupported(format!(
                "{}: a condition must be boolean",
                node.describe()
            )))
        }
    })
}

/// Comparisons and logic.
pub fn logic_forward<T: Scalar>(
    node: &Node,
    op: Logic,
    a: &Tensor<T>,
    b: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    if op == Logic::Not {
        let v = as_bool(node, a)?;
        return Ok(Tensor {
            shape: a.shape.clone(),
            data: Data::B(v.iter().map(|x| !x).collect()),
        });
    }
    let b =
        b.ok_or_else(|| Error::Unsupported(format!("{}: needs two inputs", node.describe())))?;
    let out = broadcast(node, &a.shape, &b.shape)?;
    numel(node, &out)?;
    let cmp = |o: std::cmp::Ordering| match op {
        Logic::Equal => o.is_eq(),
        Logic::Less => o.is_lt(),
        Logic::Greater => o.is_gt(),
        Logic::LessOrEqual => o.is_le(),
        Logic::GreaterOrEqual => o.is_ge(),
        _ => false,
    };
    let data = match op {
        Logic::And | Logic::Or => {
            let (x, y) = (as_bool(node, a)?, as_bool(node, b)?);
            broadcast_apply(&x, &a.shape, &y, &b.shape, &out, |p, q| {
                if op == Logic::And {
                    p && q
                } else {
                    p || q
                }
            })
        }
        _ => match (&a.data, &b.data) {
            (Data::F(x), Data::F(y)) => broadcast_apply(x, &a.shape, y, &b.shape, &out, |p, q| {
                p.partial_cmp(&q).is_some_and(cmp)
            }),
            (Data::I(x), Data::I(y)) => {
                broadcast_apply(x, &a.shape, y, &b.shape, &out, |p, q| cmp(p.cmp(&q)))
            }
            (Data::B(x), Data::B(y)) if op == Logic::Equal => {
                broadcast_apply(x, &a.shape, y, &b.shape, &out, |p, q| p == q)
            }
            _ => {
                return Err(Error::Unsupported(format!(
                    "{}: inputs of types {:?} and {:?}",
                    node.describe(),
                    a.elem_type(),
                    b.elem_type()
                )))
            }
        },
    };
    Ok(Tensor {
        shape: out,
        data: Data::B(data),
    })
}

/// Where(cond, x, y).
pub fn where_forward<T: Scalar>(
    node: &Node,
    c: &Tensor<T>,
    x: &Tensor<T>,
    y: &Tensor<T>,
) -> Result<Tensor<T>> {
    let cond = as_bool(node, c)?;
    let s1 = broadcast(node, &c.shape, &x.shape)?;
    let out = broadcast(node, &s1, &y.shape)?;
    let n = numel(node, &out)?;
    let sc = bstrides(&c.shape, &out);
    let sx = bstrides(&x.shape, &out);
    let sy = bstrides(&y.shape, &out);
    let so = strides(&out);
    fn select<E: Copy>(
        out: &[usize],
        st: [&[usize]; 4],
        cond: &[bool],
        a: &[E],
        b: &[E],
        n: usize,
    ) -> Vec<E> {
        let mut o = Vec::with_capacity(n);
        for_each(out, st, |_, [_, ic, ix, iy]| {
            o.push(if cond[ic] { a[ix] } else { b[iy] })
        });
        o
    }
    let st = [so.as_slice(), &sc, &sx, &sy];
    let data = match (&x.data, &y.data) {
        (Data::F(a), Data::F(b)) => Data::F(select(&out, st, &cond, a, b, n)),
        (Data::I(a), Data::I(b)) => Data::I(select(&out, st, &cond, a, b, n)),
        (Data::B(a), Data::B(b)) => Data::B(select(&out, st, &cond, a, b, n)),
        _ => {
            return Err(Error::Unsupported(format!(
                "{}: X and Y must have the same type",
                node.describe()
            )))
        }
    };
    Ok(Tensor { shape: out, data })
}

/// The output-shaped contributions of Where's x (`which` = 1) or y (2): g where the condition
/// selects it, 0 elsewhere.
pub fn where_contribution<T: Scalar>(
    node: &Node,
    c: &Tensor<T>,
    g: &[T],
    out: &[usize],
    which: usize,
) -> Result<Vec<T>> {
    let cond = as_bool(node, c)?;
    let sc = bstrides(&c.shape, out);
    let so = strides(out);
    let mut o = Vec::with_capacity(g.len());
    for_each(out, [&so, &sc], |io, [_, ic]| {
        o.push(if cond[ic] == (which == 1) {
            g[io]
        } else {
            T::of(0.0)
        })
    });
    Ok(o)
}

/// Cast to an element type.
pub fn cast<T: Scalar>(node: &Node, x: &Tensor<T>, to: ElemType) -> Result<Tensor<T>> {
    let data = match (&x.data, to) {
        (Data::F(v), ElemType::Float) => Data::F(v.clone()),
        (Data::F(v), ElemType::Int) => Data::I(v.iter().map(|x| x.f64() as i64).collect()),
        (Data::F(v), ElemType::Bool) => Data::B(v.iter().map(|x| *x != T::of(0.0)).collect()),
        (Data::I(v), ElemType::Float) => Data::F(v.iter().map(|x| T::of(*x as f64)).collect()),
        (Data::I(v), ElemType::Int) => Data::I(v.clone()),
        (Data::I(v), ElemType::Bool) => Data::B(v.iter().map(|x| *x != 0).collect()),
        (Data::B(v), ElemType::Float) => {
            Data::F(v.iter().map(|x| T::of(*x as u8 as f64)).collect())
        }
        (Data::B(v), ElemType::Int) => Data::I(v.iter().map(|x| *x as i64).collect()),
        (Data::B(v), ElemType::Bool) => Data::B(v.clone()),
    };
    let _ = node;
    Ok(Tensor {
        shape: x.shape.clone(),
        data,
    })
}
