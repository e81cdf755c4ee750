//! A graph written node by node in the IR against the same CNN written as an `nn.Sequential`
//! string and built by the graph builder (`GraphEngine::from_sequential`, itself checked against
//! the generic path in `tests/sequential.rs`): the same weights give the same per-example
//! gradients, Fisher diagonal, QoI gradients and ΔVar (f64, ≤ 1e-10).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor as CTensor};
use common::*;
use deltavar::engine::GraphEngine;
use deltavar::graph::ir::*;
use deltavar::model::{SeqSpec, Sequential};
use deltavar::*;

const SPEC: &str =
    "seq:conv2d(1,4,3,padding=1),relu,maxpool2d(2),conv2d(4,6,3,stride=2),tanh,flatten,linear(6,3)";

/// The Sequential as a graph: Conv → Relu → MaxPool → Conv → Tanh → Flatten → Gemm.
fn as_graph(model: &Sequential) -> Graph {
    let names = [
        "x", "0.weight", "0.bias", "c1", "r1", "p1", "3.weight", "3.bias", "c2", "t2", "f",
        "6.weight", "6.bias", "y",
    ];
    let id = |n: &str| names.iter().position(|m| *m == n).unwrap();
    let window = |k: Option<Vec<usize>>, s: usize, p: usize| Window {
        kernel: k,
        strides: vec![s, s],
        pads: vec![p; 4],
        dilations: vec![],
        auto_pad: AutoPad::NotSet,
        ceil_mode: false,
    };
    let node = |name: &str, op: Op, ins: &[&str], out: &str| Node {
        name: name.into(),
        op,
        inputs: ins.iter().map(|i| Some(id(i))).collect(),
        outputs: vec![Some(id(out))],
    };
    let nodes = vec![
        node(
            "conv1",
            Op::Conv {
                window: window(None, 1, 1),
                group: 1,
            },
            &["x", "0.weight", "0.bias"],
            "c1",
        ),
        node("relu", Op::Unary(Unary::Relu), &["c1"], "r1"),
        node(
            "pool",
            Op::MaxPool {
                window: window(Some(vec![2, 2]), 2, 0),
            },
            &["r1"],
            "p1",
        ),
        node(
            "conv2",
            Op::Conv {
                window: window(None, 2, 0),
                group: 1,
            },
            &["p1", "3.weight", "3.bias"],
            "c2",
        ),
        node("tanh", Op::Unary(Unary::Tanh), &["c2"], "t2"),
        node("flatten", Op::Flatten { axis: 1 }, &["t2"], "f"),
        node(
            "head",
            Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            },
            &["f", "6.weight", "6.bias"],
            "y",
        ),
    ];
    let tensors: HashMap<String, CTensor> = model.named_tensors().into_iter().collect();
    let params = model
        .param_names()
        .into_iter()
        .map(|n| {
            let t = &tensors[&n];
            Param {
                name: n.clone(),
                value: id(&n),
                shape: t.dims().to_vec(),
                data: t
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            }
        })
        .collect();
    let mut g = Graph {
        values: names.iter().map(|s| s.to_string()).collect(),
        nodes,
        input: id("x"),
        input_type: ElemType::Float,
        input_dims: Some(vec![Some(1), Some(8), Some(8)]),
        output: id("y"),
        consts: HashMap::new(),
        params,
        source: "test".into(),
    };
    g.validate().unwrap();
    g
}

#[test]
fn a_cnn_as_a_graph_equals_the_sequential_engine() {
    let spec: SeqSpec = SPEC.parse().unwrap();
    let model = Sequential::init(spec, &[1, 8, 8], DType::F64, 3).unwrap();
    let graph = GraphEngine::new(as_graph(&model), &[1, 8, 8], DType::F64).unwrap();
    let native = GraphEngine::from_sequential(&model).unwrap();
    assert_eq!(graph.num_params(), native.num_params());
    let n = 23;
    let x = CTensor::from_vec(pseudo_random(n * 64, 7), (n, 1, 8, 8), &Device::Cpu).unwrap();
    let y = CTensor::from_vec(
        (0..n as i64).map(|i| i % 3).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    let data = TensorDataset::new(x.clone(), y).unwrap();
    let lik = Likelihood::Categorical;
    let o = FactoredOptions {
        batch_size: 5,
        threads: 2,
    };
    let a = graph.per_example_gradients(&lik, &data, 0, n, &o).unwrap();
    let b = native.per_example_gradients(&lik, &data, 0, n, &o).unwrap();
    assert!(mat_rel_err(&a, &b) <= 1e-10, "per-example gradients");
    let sa = graph.sum_sq(&lik, &data, &o).unwrap();
    let sb = native.sum_sq(&lik, &data, &o).unwrap();
    assert!(norm_rel_err(&sa, &sb) <= 1e-10, "Fisher diagonal");
    let (qa, va) = graph.query_gradients(&Qoi::Prob(1), &x, 1, &o).unwrap();
    let (qb, vb) = native.query_gradients(&Qoi::Prob(1), &x, 1, &o).unwrap();
    assert!(mat_rel_err(&qa, &qb) <= 1e-10, "query gradients");
    assert!(max_rel_err(&va, &vb) <= 1e-12, "QoI values");
    // the whole pipeline, full inverse by the kernel method
    let gf = GraphFisher::with_engine(graph.clone(), lik.clone(), &data, o.clone());
    let sf = GraphFisher::with_engine(
        GraphEngine::from_sequential(&model).unwrap(),
        lik,
        &data,
        o.clone(),
    );
    let opts = SigmaOptions {
        damping: 1e-3,
        full_method: deltavar::sigma::FullMethod::Kernel,
        ..Default::default()
    };
    let req = |fisher| {
        DeltaRequest::new(&x, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(fisher)
            .qoi(Qoi::Prob(1))
            .options(opts.clone())
            .engine_options(o.clone())
    };
    let da = engine_delta_variances_with(&graph, req(&gf)).unwrap();
    let seq = GraphEngine::from_sequential(&model).unwrap();
    let db = engine_delta_variances_with(&seq, req(&sf)).unwrap();
    assert!(
        max_rel_err(&da.delta_variance, &db.delta_variance) <= 1e-9,
        "ΔVar"
    );
}
