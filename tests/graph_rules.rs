//! The per-example rules where parameters meet the batch, on graphs built in Rust (f64): for
//! each rule — rows (with several uses of different row counts, the batch axis moved, a bias
//! paired), tokens, and the materialised rules of Gemm, MatMul (either side), Conv through a
//! parameter chain, Expand, Where, Mul, Gather/GatherND, the norms — the QoI gradients match
//! central finite differences of the QoI values, the log-likelihood gradients equal the QoI
//! gradients of the same function, the layered store holds them under every route, and the
//! Fisher diagonal is their sum of squares.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor as CTensor};
use common::*;
use deltavar::engine::GraphEngine;
use deltavar::graph::ir::*;
use deltavar::*;

/// A graph under construction: values by name.
struct B {
    g: Graph,
    ids: HashMap<String, usize>,
}

impl B {
    fn new(input: ElemType) -> Self {
        let g = Graph {
            values: vec!["x".into()],
            nodes: vec![],
            input: 0,
            input_type: input,
            input_dims: None,
            output: 0,
            consts: HashMap::new(),
            params: vec![],
            source: "test".into(),
        };
        let mut ids = HashMap::new();
        ids.insert("x".to_string(), 0);
        B { g, ids }
    }
    fn id(&mut self, name: &str) -> usize {
        if let Some(v) = self.ids.get(name) {
            return *v;
        }
        self.g.values.push(name.into());
        let v = self.g.values.len() - 1;
        self.ids.insert(name.into(), v);
        v
    }
    fn param(&mut self, name: &str, shape: &[usize], seed: u64) -> &mut Self {
        let v = self.id(name);
        let n = shape.iter().product();
        self.g.params.push(Param {
            name: name.into(),
            value: v,
            shape: shape.to_vec(),
            data: pseudo_random(n, seed)
                .into_iter()
                .map(|x| x * 0.5)
                .collect(),
        });
        self
    }
    fn ints(&mut self, name: &str, shape: &[usize], v: &[i64]) -> &mut Self {
        let id = self.id(name);
        self.g.consts.insert(
            id,
            Tensor {
                shape: shape.to_vec(),
                data: Data::I(v.to_vec()),
            },
        );
        self
    }
    fn consts(&mut self, name: &str, t: Tensor<f64>) -> &mut Self {
        let id = self.id(name);
        self.g.consts.insert(id, t);
        self
    }
    fn op(&mut self, op: Op, ins: &[&str], out: &str) -> &mut Self {
        let inputs = ins
            .iter()
            .map(|s| if s.is_empty() { None } else { Some(self.id(s)) })
            .collect();
        let o = self.id(out);
        let n = self.g.nodes.len();
        self.g.nodes.push(Node {
            name: format!("{}#{n}", op.name()),
            op,
            inputs,
            outputs: vec![Some(o)],
        });
        self
    }
    fn done(mut self, out: &str) -> Graph {
        self.g.output = self.id(out);
        self.g.validate().unwrap();
        self.g
    }
}

fn gemm(alpha: f64, beta: f64, ta: bool, tb: bool) -> Op {
    Op::Gemm {
        alpha,
        beta,
        trans_a: ta,
        trans_b: tb,
    }
}

fn t(ps: &[usize]) -> Op {
    Op::Transpose {
        perm: Some(ps.to_vec()),
    }
}

fn add() -> Op {
    Op::Binary(Binary::Add)
}

fn mul() -> Op {
    Op::Binary(Binary::Mul)
}

/// Half the sum of squares of the output, negated: the gaussian log-likelihood at y = 0.
fn half_sq() -> Qoi {
    Qoi::custom(|out| (out.sqr()? * -0.5)?.sum(1))
}

/// Queries: M examples of the input shape (floats, or ids below `vocab`).
fn queries(shape: &[usize], m: usize, vocab: Option<usize>) -> CTensor {
    let mut full = vec![m];
    full.extend_from_slice(shape);
    let n: usize = full.iter().product();
    match vocab {
        None => CTensor::from_vec(pseudo_random(n, 5), full.as_slice(), &Device::Cpu).unwrap(),
        Some(v) => CTensor::from_vec(
            (0..n).map(|i| ((i * 7 + 3) % v) as i64).collect::<Vec<_>>(),
            full.as_slice(),
            &Device::Cpu,
        )
        .unwrap(),
    }
}

fn check(name: &str, g: Graph, shape: &[usize], vocab: Option<usize>, forms: &[&str]) {
    let m = 5;
    let q = queries(shape, m, vocab);
    let engine = GraphEngine::new(g.clone(), shape, DType::F64).unwrap();
    let got: Vec<&str> = engine.parameter_forms().iter().map(|(_, f)| *f).collect();
    assert_eq!(
        got,
        forms,
        "{name}: parameter forms {:?}",
        engine.parameter_forms()
    );
    let o = FactoredOptions {
        batch_size: 2,
        threads: 2,
    };
    let qoi = Qoi::Sum;
    let (qg, _) = engine.query_gradients(&qoi, &q, 1, &o).unwrap();
    // finite differences of the QoI values, parameter entry by entry
    let p = engine.num_params();
    let mut off = 0;
    for (pi, par) in g.params.iter().enumerate() {
        for k in 0..par.numel() {
            let h = 1e-6;
            let val = |d: f64| {
                let mut g2 = g.clone();
                g2.params[pi].data[k] += d;
                let e = GraphEngine::new(g2, shape, DType::F64).unwrap();
                e.query_gradients(&qoi, &q, 1, &o).unwrap().1
            };
            let (up, dn) = (val(h), val(-h));
            for j in 0..m {
                let fd = (up[j] - dn[j]) / (2.0 * h);
                let gv = qg[(off + k, j)];
                assert!(
                    (fd - gv).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "{name}: '{}'[{k}] query {j}: finite differences {fd} vs {gv}",
                    par.name
                );
            }
        }
        off += par.numel();
    }
    assert_eq!(off, p);
    // the log-likelihood path: gaussian at y = 0 is -½Σf², the QoI half_sq
    let (want, _) = engine.query_gradients(&half_sq(), &q, 1, &o).unwrap();
    let outs: usize = engine.output_shape().iter().product();
    let y = CTensor::zeros((m, outs), DType::F64, &Device::Cpu).unwrap();
    let data = TensorDataset::new(q.clone(), y).unwrap();
    let lik = Likelihood::gaussian(1.0);
    let got = engine.per_example_gradients(&lik, &data, 0, m, &o).unwrap();
    let err = mat_rel_err(&got, &want);
    assert!(err <= 1e-12, "{name}: likelihood gradients {err:e}");
    for route in EVERY_ROUTE {
        let lg = engine
            .layered_gradients(&lik, &data, &o, route, u64::MAX)
            .unwrap();
        let err = mat_rel_err(&lg.to_dense(), &want);
        assert!(err <= 1e-12, "{name}: layered {route:?} {err:e}");
    }
    let s = engine.sum_sq(&lik, &data, &o).unwrap();
    let sq: Vec<f64> = (0..p)
        .map(|i| (0..m).map(|j| want[(i, j)].powi(2)).sum())
        .collect();
    assert!(norm_rel_err(&s, &sq) <= 1e-12, "{name}: Fisher diagonal");
}

#[test]
fn rows_with_several_uses_a_moved_batch_axis_and_a_paired_bias() {
    // x (B, 3, 4): the same Linear on every row, then on the mean row (two uses, T = 3 + 1)
    let mut b = B::new(ElemType::Float);
    b.param("W", &[2, 4], 1)
        .param("c", &[2], 2)
        .ints("ax", &[1], &[1]);
    b.op(t(&[1, 0]), &["W"], "Wt")
        .op(Op::MatMul, &["x", "Wt"], "h")
        .op(add(), &["h", "c"], "y1")
        .op(
            Op::Reduce {
                kind: ReduceKind::Mean,
                axes: None,
                keepdims: false,
                noop_with_empty_axes: false,
            },
            &["x", "ax"],
            "xm",
        )
        .op(Op::MatMul, &["xm", "Wt"], "h2")
        .op(add(), &["h2", "c"], "y2")
        .op(Op::Unary(Unary::Tanh), &["y1"], "t1")
        .op(
            Op::Reduce {
                kind: ReduceKind::Sum,
                axes: None,
                keepdims: false,
                noop_with_empty_axes: false,
            },
            &["t1", "ax"],
            "s1",
        )
        .op(mul(), &["s1", "y2"], "y");
    check(
        "two uses",
        b.done("y"),
        &[3, 4],
        None,
        &["rows", "rows (bias)"],
    );

    // the batch axis moved to 1 (a GNN's layout): (3, B, 4) · Wᵀ, strided rows
    let mut b = B::new(ElemType::Float);
    b.param("W", &[2, 4], 3).param("c", &[2], 4);
    b.op(t(&[1, 0, 2]), &["x"], "xt")
        .op(t(&[1, 0]), &["W"], "Wt")
        .op(Op::MatMul, &["xt", "Wt"], "h")
        .op(add(), &["h", "c"], "hb")
        .op(Op::Unary(Unary::Sigmoid), &["hb"], "s")
        .op(t(&[1, 0, 2]), &["s"], "y");
    check(
        "moved axis",
        b.done("y"),
        &[3, 4],
        None,
        &["rows", "rows (bias)"],
    );

    // the batch axis in the middle of three row axes: rows copied example-major
    let mut b = B::new(ElemType::Float);
    b.param("W", &[3, 4], 5).ints("sh", &[4], &[0, 2, 2, 4]);
    b.op(Op::Reshape { allowzero: false }, &["x", "sh"], "x4")
        .op(t(&[1, 0, 2, 3]), &["x4"], "xt")
        .op(t(&[1, 0]), &["W"], "Wt")
        .op(Op::MatMul, &["xt", "Wt"], "h")
        .op(Op::Unary(Unary::Tanh), &["h"], "y0")
        .op(t(&[1, 0, 2, 3]), &["y0"], "y");
    check("middle axis", b.done("y"), &[4, 4], None, &["rows"]);

    // W · x with the weight on the left: the columns of x are the rows
    let mut b = B::new(ElemType::Float);
    b.param("W", &[2, 3], 6);
    b.op(Op::MatMul, &["W", "x"], "h")
        .op(Op::Unary(Unary::Tanh), &["h"], "y");
    check("left weight", b.done("y"), &[3, 4], None, &["rows"]);
}

#[test]
fn an_mlp_read_once_per_example_takes_the_contiguous_fast_paths() {
    // Gemm(x, W, b, transB) → tanh → Gemm: every weight read once per example from one
    // contiguous block (the factors copied whole, the diagonal pass's one product per layer)
    let mut b = B::new(ElemType::Float);
    b.param("W1", &[5, 3], 1)
        .param("b1", &[5], 2)
        .param("W2", &[2, 5], 3)
        .param("b2", &[2], 4);
    b.op(gemm(1.0, 1.0, false, true), &["x", "W1", "b1"], "h")
        .op(Op::Unary(Unary::Tanh), &["h"], "t")
        .op(gemm(1.0, 1.0, false, true), &["t", "W2", "b2"], "y");
    check(
        "mlp",
        b.done("y"),
        &[3],
        None,
        &["rows", "rows (bias)", "rows", "rows (bias)"],
    );
    // ReLU and the sigmoid run in their input's buffer (read once, by them) and their
    // backward reads their output instead
    let mut b = B::new(ElemType::Float);
    b.param("W1", &[5, 3], 5)
        .param("b1", &[5], 6)
        .param("W2", &[4, 5], 7)
        .param("W3", &[2, 4], 8);
    b.op(gemm(1.0, 1.0, false, true), &["x", "W1", "b1"], "h")
        .op(Op::Unary(Unary::Relu), &["h"], "r")
        .op(gemm(1.0, 1.0, false, true), &["r", "W2"], "h2")
        .op(Op::Unary(Unary::Sigmoid), &["h2"], "s")
        .op(gemm(1.0, 1.0, false, true), &["s", "W3"], "y");
    check(
        "mlp relu sigmoid",
        b.done("y"),
        &[3],
        None,
        &["rows", "rows (bias)", "rows", "rows"],
    );
}

#[test]
fn materialised_gemm_matmul_and_a_conv_through_a_chain() {
    // Gemm with α, β ≠ 1 and an in×out weight: materialised
    let mut b = B::new(ElemType::Float);
    b.param("W", &[4, 3], 1).param("C", &[3], 2);
    b.op(gemm(0.5, 2.0, false, false), &["x", "W", "C"], "h")
        .op(Op::Unary(Unary::Tanh), &["h"], "y");
    check("gemm", b.done("y"), &[4], None, &["dense", "dense"]);

    // x · W with an in×out parameter, and the transposed input of a Gemm
    let mut b = B::new(ElemType::Float);
    b.param("W", &[4, 2], 3).param("V", &[2, 4], 4);
    b.op(Op::MatMul, &["x", "W"], "h")
        .op(Op::Unary(Unary::Tanh), &["h"], "hh")
        .op(t(&[1, 0]), &["x"], "xt")
        .op(gemm(1.0, 1.0, true, true), &["xt", "V"], "k")
        .op(add(), &["hh", "k"], "y");
    check("matmul in×out", b.done("y"), &[4], None, &["dense", "rows"]);

    // a convolution weight read through a chain (scaled), with a bias: materialised
    let mut b = B::new(ElemType::Float);
    b.param("K", &[2, 1, 3], 5).param("kb", &[2], 6).consts(
        "two",
        Tensor {
            shape: vec![],
            data: Data::F(vec![2.0]),
        },
    );
    b.op(mul(), &["K", "two"], "K2")
        .op(
            Op::Conv {
                window: Window {
                    kernel: None,
                    strides: vec![2],
                    pads: vec![1, 1],
                    dilations: vec![],
                    auto_pad: AutoPad::NotSet,
                    ceil_mode: false,
                },
                group: 1,
            },
            &["x", "K2", "kb"],
            "h",
        )
        .op(Op::Unary(Unary::Tanh), &["h"], "y");
    check(
        "conv chain",
        b.done("y"),
        &[1, 7],
        None,
        &["dense", "dense"],
    );
}

#[test]
fn materialised_elementwise_expand_where_and_norms() {
    let mut b = B::new(ElemType::Float);
    b.param("s", &[1, 4], 1)
        .param("u", &[4], 2)
        .param("g", &[4], 3)
        .ints("shape", &[2], &[3, 4])
        .consts(
            "cond",
            Tensor {
                shape: vec![3, 1],
                data: Data::B(vec![true, false, true]),
            },
        );
    b.op(Op::Expand, &["s", "shape"], "se")
        .op(mul(), &["x", "se"], "h")
        .op(Op::Where, &["cond", "h", "u"], "w")
        .op(
            Op::LayerNorm {
                axis: -1,
                epsilon: 1e-5,
            },
            &["w", "g"],
            "ln",
        )
        .op(Op::Binary(Binary::Div), &["ln", "g"], "y");
    check(
        "elementwise",
        b.done("y"),
        &[3, 4],
        None,
        &["dense", "dense", "dense"],
    );

    let mut b = B::new(ElemType::Float);
    b.param("scale", &[2], 1)
        .param("bias", &[2], 2)
        .consts(
            "mean",
            Tensor {
                shape: vec![2],
                data: Data::F(vec![0.1, -0.2]),
            },
        )
        .consts(
            "var",
            Tensor {
                shape: vec![2],
                data: Data::F(vec![1.5, 0.5]),
            },
        );
    b.op(
        Op::BatchNorm { epsilon: 1e-5 },
        &["x", "scale", "bias", "mean", "var"],
        "bn",
    )
    .op(Op::Unary(Unary::Softplus), &["bn"], "y");
    check(
        "batch norm",
        b.done("y"),
        &[2, 3],
        None,
        &["dense", "dense"],
    );
}

#[test]
fn tokens_and_tables_read_twice() {
    // an embedding read only by id: tokens
    let mut b = B::new(ElemType::Int);
    b.param("E", &[7, 3], 1).param("W", &[2, 3], 2);
    b.op(Op::Gather { axis: 0 }, &["E", "x"], "e")
        .op(t(&[1, 0]), &["W"], "Wt")
        .op(Op::MatMul, &["e", "Wt"], "y");
    check("tokens", b.done("y"), &[4], Some(7), &["tokens", "rows"]);

    // a tied table (Gather and Transpose → MatMul) and GatherND of position rows
    let mut b = B::new(ElemType::Int);
    b.param("E", &[7, 3], 3)
        .param("P", &[4, 3], 4)
        .ints("pos", &[4, 1], &[0, 1, 2, 3]);
    b.op(Op::Gather { axis: 0 }, &["E", "x"], "e")
        .op(Op::GatherNd { batch_dims: 0 }, &["P", "pos"], "p")
        .op(add(), &["e", "p"], "h")
        .op(Op::Unary(Unary::Tanh), &["h"], "hh")
        .op(t(&[1, 0]), &["E"], "Et")
        .op(Op::MatMul, &["hh", "Et"], "y");
    check("tied", b.done("y"), &[4], Some(7), &["dense", "dense"]);
}
