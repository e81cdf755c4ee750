//! Every graph operator's backward against central finite differences of its forward, in f64:
//! L = Σₖ wₖ·yₖ over all outputs for random w, ∂L/∂x from `ops::backward` against
//! (L(x + h) − L(x − h)) / 2h for every entry of every differentiable input.

use deltavar::graph::ir::*;
use deltavar::graph::ops;

fn rnd(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn f(shape: &[usize], seed: u64) -> Tensor<f64> {
    let n = shape.iter().product();
    Tensor {
        shape: shape.to_vec(),
        data: Data::F(rnd(n, seed)),
    }
}

/// Entries pushed away from 0 (for kinks, logs, roots, divisors).
fn away(shape: &[usize], seed: u64, lo: f64) -> Tensor<f64> {
    let mut t = f(shape, seed);
    if let Data::F(v) = &mut t.data {
        for (k, x) in v.iter_mut().enumerate() {
            *x = (x.abs() + lo) * if k % 3 == 0 { -1.0 } else { 1.0 };
        }
    }
    t
}

fn pos(shape: &[usize], seed: u64) -> Tensor<f64> {
    let mut t = f(shape, seed);
    if let Data::F(v) = &mut t.data {
        v.iter_mut().for_each(|x| *x = x.abs() + 0.3);
    }
    t
}

fn i(shape: &[usize], v: &[i64]) -> Tensor<f64> {
    Tensor {
        shape: shape.to_vec(),
        data: Data::I(v.to_vec()),
    }
}

fn b(shape: &[usize], v: &[bool]) -> Tensor<f64> {
    Tensor {
        shape: shape.to_vec(),
        data: Data::B(v.to_vec()),
    }
}

fn node(op: Op, nin: usize, nout: usize) -> Node {
    Node {
        name: format!("test {}", op.name()),
        op,
        inputs: (0..nin).map(Some).collect(),
        outputs: (nin..nin + nout).map(Some).collect(),
    }
}

fn loss(node: &Node, ins: &[Tensor<f64>], w: &[Vec<f64>]) -> f64 {
    let refs: Vec<Option<&Tensor<f64>>> = ins.iter().map(Some).collect();
    let (outs, _) = ops::forward(node, &refs).unwrap();
    outs.iter()
        .zip(w)
        .map(|(o, w)| {
            o.floats()
                .unwrap()
                .iter()
                .zip(w)
                .map(|(a, b)| a * b)
                .sum::<f64>()
        })
        .sum()
}

/// Checks the backward of `op` at `ins` for the inputs in `diff`.
fn check(op: Op, ins: Vec<Tensor<f64>>, diff: &[usize]) {
    let nout = match &op {
        Op::Split { .. } => 3,
        _ => 1,
    };
    let n = node(op, ins.len(), nout);
    let refs: Vec<Option<&Tensor<f64>>> = ins.iter().map(Some).collect();
    let (outs, saved) = ops::forward(&n, &refs).unwrap();
    let w: Vec<Vec<f64>> = outs
        .iter()
        .enumerate()
        .map(|(k, o)| rnd(o.numel(), 77 + k as u64))
        .collect();
    let orefs: Vec<Option<&Tensor<f64>>> = outs.iter().map(Some).collect();
    let g: Vec<Option<&[f64]>> = w.iter().map(|v| Some(v.as_slice())).collect();
    let need: Vec<bool> = (0..ins.len()).map(|k| diff.contains(&k)).collect();
    let grads = ops::backward(&n, &refs, &orefs, &saved, &g, &need).unwrap();
    if !deltavar::graph::exec::output_read_by_backward(&n.op) {
        // the executor may hand such an output's buffer to its only reader: the backward must
        // give the same gradients from the output's shape alone
        let shells: Vec<Tensor<f64>> = outs
            .iter()
            .map(|o| Tensor {
                shape: o.shape.clone(),
                data: match &o.data {
                    Data::F(_) => Data::F(vec![]),
                    Data::I(_) => Data::I(vec![]),
                    Data::B(_) => Data::B(vec![]),
                },
            })
            .collect();
        let srefs: Vec<Option<&Tensor<f64>>> = shells.iter().map(Some).collect();
        let again = ops::backward(&n, &refs, &srefs, &saved, &g, &need).unwrap();
        assert_eq!(grads, again, "{}: backward read its output", n.describe());
    }
    for &k in diff {
        let gk = grads[k]
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no gradient for input {k}", n.describe()));
        let base = ins[k].floats().unwrap().to_vec();
        assert_eq!(gk.len(), base.len(), "{}: input {k}", n.describe());
        for e in 0..base.len() {
            let h = 1e-6 * (1.0 + base[e].abs());
            let mut up = ins.clone();
            let mut dn = ins.clone();
            if let (Data::F(u), Data::F(d)) = (&mut up[k].data, &mut dn[k].data) {
                u[e] += h;
                d[e] -= h;
            }
            let fd = (loss(&n, &up, &w) - loss(&n, &dn, &w)) / (2.0 * h);
            assert!(
                (fd - gk[e]).abs() <= 1e-6 * (1.0 + fd.abs()) && gk[e].is_finite(),
                "{}: input {k} entry {e}: finite differences {fd} vs backward {}",
                n.describe(),
                gk[e]
            );
        }
    }
}

fn window(kernel: Option<Vec<usize>>, strides: &[usize], pads: &[usize], dil: &[usize]) -> Window {
    Window {
        kernel,
        strides: strides.to_vec(),
        pads: pads.to_vec(),
        dilations: dil.to_vec(),
        auto_pad: AutoPad::NotSet,
        ceil_mode: false,
    }
}

#[test]
fn unary_functions() {
    for u in [
        Unary::Neg,
        Unary::Exp,
        Unary::Relu,
        Unary::LeakyRelu(0.1),
        Unary::Sigmoid,
        Unary::Tanh,
        Unary::Erf,
        Unary::Gelu { tanh: false },
        Unary::Gelu { tanh: true },
        Unary::Softplus,
        Unary::Abs,
        Unary::Reciprocal,
    ] {
        check(Op::Unary(u), vec![away(&[3, 4], 1, 0.1)], &[0]);
    }
    for u in [Unary::Sqrt, Unary::Log] {
        check(Op::Unary(u), vec![pos(&[3, 4], 2)], &[0]);
    }
}

#[test]
fn broadcasting_arithmetic_and_where() {
    check(
        Op::Binary(Binary::Add),
        vec![f(&[3, 4], 1), f(&[4], 2)],
        &[0, 1],
    );
    check(
        Op::Binary(Binary::Sub),
        vec![f(&[2, 1, 4], 1), f(&[3, 1], 2)],
        &[0, 1],
    );
    check(
        Op::Binary(Binary::Mul),
        vec![f(&[3, 4], 1), f(&[3, 1], 2)],
        &[0, 1],
    );
    check(
        Op::Binary(Binary::Div),
        vec![f(&[3, 4], 1), away(&[4], 2, 0.5)],
        &[0, 1],
    );
    check(
        Op::Binary(Binary::Pow),
        vec![pos(&[3, 4], 1), f(&[4], 2)],
        &[0, 1],
    );
    check(
        Op::Binary(Binary::Add),
        vec![f(&[], 1), f(&[2, 3], 2)],
        &[0, 1],
    );
    let cond = b(&[3, 1], &[true, false, true]);
    check(Op::Where, vec![cond, f(&[3, 4], 1), f(&[4], 2)], &[1, 2]);
}

#[test]
fn matmul_and_gemm() {
    check(Op::MatMul, vec![f(&[2, 3, 4], 1), f(&[4, 5], 2)], &[0, 1]);
    check(
        Op::MatMul,
        vec![f(&[2, 1, 3, 4], 1), f(&[5, 4, 2], 2)],
        &[0, 1],
    );
    check(Op::MatMul, vec![f(&[4], 1), f(&[4, 5], 2)], &[0, 1]);
    check(Op::MatMul, vec![f(&[3, 4], 1), f(&[4], 2)], &[0, 1]);
    check(Op::MatMul, vec![f(&[4, 3], 1), f(&[2, 3, 5], 2)], &[0, 1]);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = if ta { f(&[4, 3], 1) } else { f(&[3, 4], 1) };
        let bm = if tb { f(&[5, 4], 2) } else { f(&[4, 5], 2) };
        for c in [f(&[5], 3), f(&[3, 5], 3), f(&[3, 1], 3)] {
            check(
                Op::Gemm {
                    alpha: 0.7,
                    beta: 1.3,
                    trans_a: ta,
                    trans_b: tb,
                },
                vec![a.clone(), bm.clone(), c],
                &[0, 1, 2],
            );
        }
    }
}

#[test]
fn convolutions() {
    // 2-D: stride, asymmetric padding, dilation, groups
    check(
        Op::Conv {
            window: window(None, &[2, 1], &[1, 0, 2, 1], &[2, 1]),
            group: 2,
        },
        vec![f(&[2, 4, 7, 6], 1), f(&[6, 2, 3, 2], 2), f(&[6], 3)],
        &[0, 1, 2],
    );
    // depthwise
    check(
        Op::Conv {
            window: window(Some(vec![3, 3]), &[], &[1, 1, 1, 1], &[]),
            group: 3,
        },
        vec![f(&[2, 3, 5, 5], 1), f(&[3, 1, 3, 3], 2)],
        &[0, 1],
    );
    // 1-D with stride and padding, SAME_UPPER
    let mut w = window(None, &[2], &[], &[]);
    w.auto_pad = AutoPad::SameUpper;
    check(
        Op::Conv {
            window: w,
            group: 1,
        },
        vec![f(&[3, 2, 9], 1), f(&[4, 2, 3], 2), f(&[4], 3)],
        &[0, 1, 2],
    );
    check(
        Op::Conv {
            window: window(None, &[1], &[2, 1], &[2]),
            group: 1,
        },
        vec![f(&[2, 3, 8], 1), f(&[2, 3, 3], 2)],
        &[0, 1],
    );
}

#[test]
fn pooling() {
    let mut w = window(Some(vec![3, 3]), &[2, 2], &[1, 1, 1, 1], &[]);
    w.ceil_mode = true;
    check(
        Op::MaxPool { window: w.clone() },
        vec![f(&[2, 3, 7, 6], 1)],
        &[0],
    );
    check(
        Op::MaxPool {
            window: window(Some(vec![2]), &[2], &[], &[2]),
        },
        vec![f(&[2, 3, 9], 1)],
        &[0],
    );
    for include in [false, true] {
        check(
            Op::AveragePool {
                window: w.clone(),
                count_include_pad: include,
            },
            vec![f(&[2, 3, 7, 6], 1)],
            &[0],
        );
    }
    check(
        Op::AveragePool {
            window: window(Some(vec![3]), &[1], &[1, 1], &[]),
            count_include_pad: false,
        },
        vec![f(&[2, 3, 6], 1)],
        &[0],
    );
    check(Op::GlobalAveragePool, vec![f(&[2, 3, 4, 5], 1)], &[0]);
}

#[test]
fn normalizations_and_softmax() {
    let bn = vec![
        f(&[2, 3, 4, 2], 1),
        pos(&[3], 2),
        f(&[3], 3),
        f(&[3], 4),
        pos(&[3], 5),
    ];
    check(Op::BatchNorm { epsilon: 1e-5 }, bn, &[0, 1, 2]);
    check(
        Op::LayerNorm {
            axis: -1,
            epsilon: 1e-5,
        },
        vec![f(&[2, 3, 5], 1), pos(&[5], 2), f(&[5], 3)],
        &[0, 1, 2],
    );
    check(
        Op::LayerNorm {
            axis: 1,
            epsilon: 1e-3,
        },
        vec![f(&[2, 3, 4], 1), pos(&[3, 4], 2)],
        &[0, 1],
    );
    for (axis, log, legacy) in [
        (1, false, false),
        (-1, true, false),
        (1, false, true),
        (0, true, true),
    ] {
        check(
            Op::Softmax { axis, log, legacy },
            vec![f(&[2, 3, 4], 1)],
            &[0],
        );
    }
}

#[test]
fn reductions() {
    check(
        Op::Reduce {
            kind: ReduceKind::Mean,
            axes: Some(vec![1]),
            keepdims: true,
            noop_with_empty_axes: false,
        },
        vec![f(&[2, 3, 4], 1)],
        &[0],
    );
    check(
        Op::Reduce {
            kind: ReduceKind::Sum,
            axes: None,
            keepdims: false,
            noop_with_empty_axes: false,
        },
        vec![f(&[2, 3, 4], 1)],
        &[0],
    );
    check(
        Op::Reduce {
            kind: ReduceKind::Max,
            axes: None,
            keepdims: false,
            noop_with_empty_axes: false,
        },
        vec![f(&[2, 3, 4], 1), i(&[2], &[0, -1])],
        &[0],
    );
    check(
        Op::Reduce {
            kind: ReduceKind::Mean,
            axes: None,
            keepdims: true,
            noop_with_empty_axes: false,
        },
        vec![f(&[2, 3, 4], 1), i(&[1], &[-2])],
        &[0],
    );
}

#[test]
fn moving_elements() {
    check(
        Op::Transpose {
            perm: Some(vec![2, 0, 1]),
        },
        vec![f(&[2, 3, 4], 1)],
        &[0],
    );
    check(
        Op::Reshape { allowzero: false },
        vec![f(&[2, 3, 4], 1), i(&[3], &[0, -1, 2])],
        &[0],
    );
    check(Op::Flatten { axis: 2 }, vec![f(&[2, 3, 4], 1)], &[0]);
    check(
        Op::Squeeze { axes: None },
        vec![f(&[2, 1, 4], 1), i(&[1], &[1])],
        &[0],
    );
    check(
        Op::Unsqueeze { axes: None },
        vec![f(&[2, 4], 1), i(&[2], &[0, -1])],
        &[0],
    );
    check(
        Op::Split {
            axis: 1,
            split: None,
        },
        vec![f(&[2, 6, 3], 1), i(&[3], &[1, 2, 3])],
        &[0],
    );
    check(
        Op::Concat { axis: 1 },
        vec![f(&[2, 1, 3], 1), f(&[2, 2, 3], 2), f(&[2, 3, 3], 3)],
        &[0, 1, 2],
    );
    check(
        Op::Slice { attrs: None },
        vec![
            f(&[4, 5, 3], 1),
            i(&[2], &[-1, 1]),
            i(&[2], &[0, 5]),
            i(&[2], &[0, 1]),
            i(&[2], &[-2, 2]),
        ],
        &[0],
    );
    check(Op::Expand, vec![f(&[3, 1], 1), i(&[3], &[2, 3, 4])], &[0]);
    check(Op::Identity, vec![f(&[3], 1)], &[0]);
    check(
        Op::Cast {
            to: ElemType::Float,
        },
        vec![f(&[3], 1)],
        &[0],
    );
    check(
        Op::Trilu { upper: true },
        vec![f(&[2, 3, 4], 1), i(&[], &[1])],
        &[0],
    );
    check(Op::Trilu { upper: false }, vec![f(&[3, 3], 1)], &[0]);
}

#[test]
fn gathers_and_scatters() {
    check(
        Op::Gather { axis: 1 },
        vec![f(&[3, 4, 2], 1), i(&[2, 2], &[0, -1, 2, 0])],
        &[0],
    );
    check(
        Op::Gather { axis: 0 },
        vec![f(&[5, 3], 1), i(&[3], &[4, 4, 1])],
        &[0],
    );
    check(
        Op::GatherNd { batch_dims: 0 },
        vec![f(&[4, 3, 2], 1), i(&[3, 2], &[0, 1, 3, 2, 0, 1])],
        &[0],
    );
    check(
        Op::GatherNd { batch_dims: 1 },
        vec![f(&[2, 4, 3], 1), i(&[2, 3, 1], &[0, 3, 3, 1, 2, 1])],
        &[0],
    );
    for add in [false, true] {
        check(
            Op::ScatterNd { add },
            vec![f(&[5, 3], 1), i(&[3, 1], &[0, 4, 1]), f(&[3, 3], 2)],
            &[0, 2],
        );
    }
    // repeated targets with add (index_add)
    check(
        Op::ScatterNd { add: true },
        vec![
            f(&[4, 2, 3], 1),
            i(&[4, 1], &[0, 0, 3, 0]),
            f(&[4, 2, 3], 2),
        ],
        &[0, 2],
    );
    check(
        Op::ScatterElements { axis: 1, add: true },
        vec![
            f(&[3, 4], 1),
            i(&[3, 2], &[0, 0, 3, 1, 2, 2]),
            f(&[3, 2], 2),
        ],
        &[0, 2],
    );
}

#[test]
fn in_place_add_and_sub_equal_the_forward() {
    use deltavar::graph::ops::elementwise::{binary_forward, binary_in_place};
    let n = node(Op::Binary(Binary::Add), 2, 1);
    let cases: [(&[usize], &[usize]); 5] = [
        (&[3, 4], &[3, 4]),
        (&[2, 3, 4], &[4]),
        (&[2, 3, 4], &[3, 4]),
        (&[2, 3, 4], &[1, 3, 1]),
        (&[2, 3, 4], &[]),
    ];
    for (k, (big, small)) in cases.iter().enumerate() {
        let a = f(big, 10 + k as u64);
        let c = f(small, 20 + k as u64);
        for (op, slot) in [(Binary::Add, 0), (Binary::Add, 1), (Binary::Sub, 0)] {
            let (x, y) = if slot == 0 { (&a, &c) } else { (&c, &a) };
            let want = binary_forward(&n, op, x, y).unwrap();
            let got = binary_in_place(&n, op, a.clone(), slot, &c).unwrap();
            assert_eq!(
                got.shape, want.shape,
                "{big:?} {op:?} {small:?} slot {slot}"
            );
            assert_eq!(
                got.floats(),
                want.floats(),
                "{big:?} {op:?} {small:?} slot {slot}"
            );
        }
        // a zero-sized axis: an empty result, not a panic
        let e = f(&[0, 4], 30);
        let got = binary_in_place(&n, Binary::Add, e.clone(), 0, &f(&[4], 31)).unwrap();
        assert_eq!((got.shape.clone(), got.numel()), (vec![0, 4], 0));
        let got = binary_in_place(&n, Binary::Add, e.clone(), 0, &e).unwrap();
        assert_eq!(got.numel(), 0);
        // an operand smaller than the output cannot be updated in place
        assert!(binary_in_place(&n, Binary::Add, c.clone(), 0, &a).is_err() || small == big);
        // nor a subtrahend
        assert!(binary_in_place(&n, Binary::Sub, a.clone(), 1, &c).is_err());
    }
}

#[test]
fn permute_matches_the_index_formula_for_every_axis_order() {
    use deltavar::graph::ops::util::permute;
    let shape = [2usize, 3, 4, 5];
    let src: Vec<usize> = (0..120).collect();
    let mut perms = vec![];
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let p = [a, b, c, d];
                    if (0..4).all(|k| p.contains(&k)) {
                        perms.push(p);
                    }
                }
            }
        }
    }
    assert_eq!(perms.len(), 24);
    let st = [60usize, 20, 5, 1];
    for p in perms {
        let out = permute(&src, &shape, &p);
        let os: Vec<usize> = p.iter().map(|k| shape[*k]).collect();
        let mut want = vec![];
        for i0 in 0..os[0] {
            for i1 in 0..os[1] {
                for i2 in 0..os[2] {
                    for i3 in 0..os[3] {
                        let ix = [i0, i1, i2, i3];
                        want.push((0..4).map(|k| ix[k] * st[p[k]]).sum::<usize>());
                    }
                }
            }
        }
        assert_eq!(out, want, "perm {p:?}");
    }
}

#[test]
fn in_place_forwards_equal_the_copying_ones() {
    // softmax over the last axis (in place) and over another axis (falls back to a copy),
    // log-softmax, both GELUs (the derivative kept in the input's buffer), and an op without
    // an in-place form
    let cases = [
        (
            Op::Softmax {
                axis: -1,
                log: false,
                legacy: false,
            },
            vec![3, 5],
        ),
        (
            Op::Softmax {
                axis: 0,
                log: false,
                legacy: false,
            },
            vec![3, 5],
        ),
        (
            Op::Softmax {
                axis: -1,
                log: true,
                legacy: false,
            },
            vec![2, 3, 4],
        ),
        (Op::Unary(Unary::Gelu { tanh: false }), vec![4, 6]),
        (Op::Unary(Unary::Gelu { tanh: true }), vec![4, 6]),
        (Op::Unary(Unary::Tanh), vec![7]),
    ];
    for (k, (op, shape)) in cases.into_iter().enumerate() {
        let n = node(op, 1, 1);
        let x = f(&shape, 40 + k as u64);
        let (want, ws) = ops::forward(&n, &[Some(&x)]).unwrap();
        let (got, gs) = ops::forward_owned(&n, x.clone(), &[Some(&x)]).unwrap();
        assert_eq!(got.len(), want.len(), "{}", n.describe());
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(a.shape, b.shape, "{}", n.describe());
            assert_eq!(a.floats(), b.floats(), "{}", n.describe());
        }
        match (gs, ws) {
            (ops::Saved::Deriv(a), ops::Saved::Deriv(b)) => assert_eq!(a, b, "{}", n.describe()),
            (ops::Saved::None, ops::Saved::None) => {}
            (a, b) => panic!("{}: kept {a:?}, the copying forward {b:?}", n.describe()),
        }
    }
}
