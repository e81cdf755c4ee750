//! The graph engine on ONNX files exported from PyTorch (written with torch.func references by
//! `scripts/make_graph_fixtures.py` into tests/data/graph; no torch here): a ResNet block with
//! eval batch norm, a causal GPT with a tied head, a GNN step with gather and index_add, a
//! depthwise CNN, a 1-D CNN whose convolution is used twice, an MLP of elementwise operators
//! whose Linear is used twice. In f64 from the f32-rounded files:
//!
//! - per-example log-likelihood gradients and QoI gradients against torch.func (≤ 1e-10);
//! - the Fisher diagonal, and ΔVar under identity, diagonal, full inverse (dense, kernel under
//!   every layer route, CG) and low-rank Σ against a dense f64 reference built from the
//!   torch.func gradients (≤ 1e-8);
//! - shards of an offline pass merged give the whole pass;
//! - the GNN rolled out 3 steps against deltavar 0.1.1's own ΔVar (identity, diagonal, full).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use deltavar::engine::{GraphEngine, LayerRoute};
use deltavar::graph::Graph;
use deltavar::sigma::{FullMethod, LowRankOptions};
use deltavar::*;
use faer::prelude::Solve;
use faer::Mat;
use serde_json::Value;

const CASES: [&str; 6] = [
    "resblock",
    "gpt",
    "gnn",
    "depthwise",
    "conv1d-twice",
    "ops-mlp",
];

struct Case {
    dir: PathBuf,
    meta: Value,
    engine: GraphEngine,
    data: MmapNpyDataset,
    queries: Tensor,
    /// N × P per-example gradients (torch.func), in the engine's flat order.
    g: Mat<f64>,
    /// M × P query gradients.
    q: Mat<f64>,
    qoi: Vec<f64>,
}

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/graph")
        .join(name)
}

fn flat(
    rows: usize,
    named: &[(String, Tensor)],
    refs: &HashMap<String, Tensor>,
    pre: &str,
) -> Mat<f64> {
    let p: usize = named.iter().map(|(_, t)| t.elem_count()).sum();
    let mut m = Mat::<f64>::zeros(rows, p);
    let mut off = 0;
    for (name, t) in named {
        let k = t.elem_count();
        let r = refs
            .get(&format!("{pre}.{name}"))
            .unwrap_or_else(|| panic!("no reference for {name}"))
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert_eq!(r.len(), rows * k, "{name}");
        for i in 0..rows {
            for j in 0..k {
                m[(i, off + j)] = r[i * k + j];
            }
        }
        off += k;
    }
    m
}

fn load(name: &str) -> Case {
    let d = dir(name);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("case.json")).unwrap()).unwrap();
    let g = Graph::from_onnx(d.join("model.onnx"), Some(&d.join("model.safetensors"))).unwrap();
    let data = MmapNpyDataset::open(d.join("train_x.npy"), d.join("train_y.npy")).unwrap();
    let shape = data.x().shape()[1..].to_vec();
    let engine = GraphEngine::new(g, &shape, DType::F64).unwrap();
    let names: Vec<String> = engine
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let want: Vec<String> = meta["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut sorted_names = names.clone();
    sorted_names.sort();
    let mut sorted_want = want.clone();
    sorted_want.sort();
    assert_eq!(
        sorted_names, sorted_want,
        "{name}: the parameters are the model's named_parameters"
    );
    let qa = deltavar::data::NpyArray::open(d.join("queries.npy")).unwrap();
    let queries = match qa.rows_ref(0, qa.rows()).unwrap() {
        deltavar::data::RowsRef::I64(v) => Tensor::from_slice(v, qa.shape(), &Device::Cpu).unwrap(),
        deltavar::data::RowsRef::F32(v) => Tensor::from_slice(v, qa.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
        deltavar::data::RowsRef::F64(v) => Tensor::from_slice(v, qa.shape(), &Device::Cpu).unwrap(),
    };
    let refs = candle_core::safetensors::load(d.join("ref.safetensors"), &Device::Cpu).unwrap();
    let named = engine.named_tensors().unwrap();
    let n = data.len();
    let m = queries.dim(0).unwrap();
    let g = flat(n, &named, &refs, "g");
    let q = flat(m, &named, &refs, "q");
    let qoi = refs["qoi"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    Case {
        dir: d,
        meta,
        engine,
        data,
        queries,
        g,
        q,
        qoi,
    }
}

impl Case {
    fn lik(&self) -> Likelihood {
        self.meta["lik"].as_str().unwrap().parse().unwrap()
    }
    fn qoi_kind(&self) -> Qoi {
        self.meta["qoi"].as_str().unwrap().parse().unwrap()
    }
    fn rollout(&self) -> usize {
        self.meta["rollout"].as_u64().unwrap() as usize
    }
    fn damping(&self) -> f64 {
        self.meta["damping"].as_f64().unwrap()
    }
    /// Dense reference ΔVar of every query under Σ = (F + λI)⁻¹ (F the mean EF from `g`).
    fn full_reference(&self) -> Vec<f64> {
        let (n, p) = (self.g.nrows(), self.g.ncols());
        let mut f = Mat::<f64>::zeros(p, p);
        faer::linalg::matmul::matmul(
            f.as_mut(),
            faer::Accum::Replace,
            self.g.transpose(),
            self.g.as_ref(),
            1.0 / n as f64,
            faer::Par::Seq,
        );
        for i in 0..p {
            f[(i, i)] += self.damping();
        }
        let llt = f.llt(faer::Side::Lower).unwrap();
        let qt = self.q.transpose().to_owned();
        let x = llt.solve(qt.as_ref());
        (0..self.q.nrows())
            .map(|j| (0..p).map(|i| self.q[(j, i)] * x[(i, j)]).sum())
            .collect()
    }
    fn diag(&self) -> Vec<f64> {
        let n = self.g.nrows() as f64;
        (0..self.g.ncols())
            .map(|i| {
                (0..self.g.nrows())
                    .map(|r| self.g[(r, i)].powi(2))
                    .sum::<f64>()
                    / n
            })
            .collect()
    }
}

fn opts(bs: usize) -> FactoredOptions {
    FactoredOptions {
        batch_size: bs,
        threads: 2,
    }
}

fn mat_rows(m: &Mat<f64>) -> Vec<f64> {
    to_rows(m.as_ref()).concat()
}

#[test]
fn per_example_and_query_gradients_match_torch_func() {
    for name in CASES {
        let c = load(name);
        let lik = c.lik();
        for bs in [3, 64] {
            let got = c
                .engine
                .per_example_gradients(&lik, &c.data, 0, c.data.len(), &opts(bs))
                .unwrap();
            let err = norm_rel_err(&mat_rows(&got.transpose().to_owned()), &mat_rows(&c.g));
            assert!(
                err <= 1e-10,
                "{name} (batch {bs}): per-example gradients {err:e}"
            );
        }
        let (qg, values) = c
            .engine
            .query_gradients(&c.qoi_kind(), &c.queries, c.rollout(), &opts(2))
            .unwrap();
        let err = norm_rel_err(&mat_rows(&qg.transpose().to_owned()), &mat_rows(&c.q));
        assert!(err <= 1e-10, "{name}: query gradients {err:e}");
        let err = max_rel_err(&values, &c.qoi);
        assert!(err <= 1e-10, "{name}: QoI values {err:e}");
        // the Fisher diagonal
        let s = c.engine.sum_sq(&lik, &c.data, &opts(5)).unwrap();
        let n = c.data.len() as f64;
        let mean: Vec<f64> = s.iter().map(|v| v / n).collect();
        let err = norm_rel_err(&mean, &c.diag());
        assert!(err <= 1e-10, "{name}: Fisher diagonal {err:e}");
    }
}

#[test]
fn layered_gradients_hold_every_example_under_every_route() {
    for name in CASES {
        let c = load(name);
        for route in EVERY_ROUTE {
            let lg = c
                .engine
                .layered_gradients(&c.lik(), &c.data, &opts(4), route, u64::MAX)
                .unwrap();
            let got = lg.to_dense();
            let err = norm_rel_err(&mat_rows(&got.transpose().to_owned()), &mat_rows(&c.g));
            assert!(err <= 1e-10, "{name} {route:?}: layered gradients {err:e}");
        }
    }
}

#[test]
fn delta_variances_under_every_sigma_match_the_dense_reference() {
    for name in CASES {
        let c = load(name);
        let lam = c.damping();
        let full = c.full_reference();
        let ident: Vec<f64> = (0..c.q.nrows())
            .map(|j| (0..c.q.ncols()).map(|i| c.q[(j, i)].powi(2)).sum())
            .collect();
        let d = c.diag();
        let diag: Vec<f64> = (0..c.q.nrows())
            .map(|j| {
                (0..c.q.ncols())
                    .map(|i| c.q[(j, i)].powi(2) / (d[i] + lam))
                    .sum()
            })
            .collect();
        let run = |strategy: SigmaStrategy, method: FullMethod, route: LayerRoute| {
            let fisher = GraphFisher::with_engine(c.engine.clone(), c.lik(), &c.data, opts(4))
                .with_layer_route(route);
            engine_delta_variances_with(
                &c.engine,
                DeltaRequest::new(&c.queries, strategy)
                    .fisher(&fisher)
                    .qoi(c.qoi_kind())
                    .rollout(c.rollout())
                    .options(SigmaOptions {
                        damping: lam,
                        full_method: method,
                        ..Default::default()
                    })
                    .engine_options(opts(2)),
            )
            .unwrap()
        };
        let a = LayerRoute::Auto;
        let out = run(SigmaStrategy::Identity, FullMethod::Auto, a);
        assert!(
            max_rel_err(&out.delta_variance, &ident) <= 1e-10,
            "{name}: identity"
        );
        assert!(max_rel_err(&out.qoi, &c.qoi) <= 1e-10, "{name}: QoI values");
        let out = run(SigmaStrategy::DiagonalEmpiricalFim, FullMethod::Auto, a);
        let err = max_rel_err(&out.delta_variance, &diag);
        assert!(err <= 1e-10, "{name}: diagonal {err:e}");
        for method in [FullMethod::Dense, FullMethod::Kernel, FullMethod::Cg] {
            let routes: &[LayerRoute] = if method == FullMethod::Kernel {
                &EVERY_ROUTE
            } else {
                &[LayerRoute::Auto]
            };
            for &route in routes {
                let out = run(SigmaStrategy::InverseFullEmpiricalFim, method, route);
                let err = max_rel_err(&out.delta_variance, &full);
                assert!(
                    err <= 1e-8,
                    "{name}: full inverse by {method:?} ({route:?}) {err:e}"
                );
            }
        }
        // the low-rank Σ with every eigenpair of F (rank ≤ N) is the full inverse
        let out = run(
            SigmaStrategy::LowRankEmpiricalFim(LowRankOptions::rank(c.data.len())),
            FullMethod::Auto,
            a,
        );
        let err = max_rel_err(&out.delta_variance, &full);
        assert!(err <= 1e-8, "{name}: low rank k = N {err:e}");
    }
}

#[test]
fn kfac_runs_on_every_graph_and_gives_positive_finite_variances() {
    for name in CASES {
        let c = load(name);
        let f = c.engine.kfac_factors(&c.lik(), &c.data, &opts(4)).unwrap();
        assert!(!f.layers.is_empty(), "{name}: no Kronecker-factored layer");
        let s = deltavar::sigma::KfacSigma::new(&f, 1e-2).unwrap();
        let dv = deltavar::sigma::SigmaOp::quad_forms(&s, c.q.transpose()).unwrap();
        assert!(
            dv.iter().all(|v| v.is_finite() && *v > 0.0),
            "{name}: K-FAC ΔVar {dv:?}"
        );
    }
}

#[test]
fn shards_of_an_offline_pass_merge_to_the_whole() {
    for name in ["resblock", "gpt"] {
        let c = load(name);
        let lik_name = c.meta["lik"].as_str().unwrap();
        let pass = |shard| {
            fisher_pass(
                &c.engine,
                c.lik(),
                lik_name,
                &c.data,
                &PassOptions {
                    shard,
                    engine: opts(3),
                    ..Default::default()
                },
                &mut |_, _| {},
            )
            .unwrap()
        };
        let whole = pass(None);
        let merged = FisherArtifact::merge(&[pass(Some((0, 2))), pass(Some((1, 2)))]).unwrap();
        assert!(merged.is_complete());
        let err = norm_rel_err(merged.diag.sums(), whole.diag.sums());
        assert!(err <= 1e-12, "{name}: merged shards {err:e}");
        let n = c.data.len() as f64;
        let mean: Vec<f64> = whole.diag.sums().iter().map(|v| v / n).collect();
        assert!(norm_rel_err(&mean, &c.diag()) <= 1e-10, "{name}");
        whole
            .check_tensors(&c.engine.named_tensors().unwrap())
            .unwrap();
    }
}

#[test]
fn gnn_rollout_matches_deltavar_0_1_1() {
    let c = load("gnn");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("expected.json")).unwrap())
            .unwrap();
    let v = |k: &str| -> Vec<f64> {
        expected[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let fisher = GraphFisher::with_engine(c.engine.clone(), c.lik(), &c.data, opts(4));
    for (strategy, key, tol) in [
        (SigmaStrategy::Identity, "identity", 1e-12),
        (
            SigmaStrategy::DiagonalEmpiricalFim,
            "diagonal_empirical_fim",
            1e-10,
        ),
        (
            SigmaStrategy::InverseFullEmpiricalFim,
            "inverse_full_empirical_fim",
            1e-7,
        ),
    ] {
        let out = engine_delta_variances_with(
            &c.engine,
            DeltaRequest::new(&c.queries, strategy)
                .fisher(&fisher)
                .qoi(c.qoi_kind())
                .rollout(3)
                .options(SigmaOptions {
                    damping: c.damping(),
                    ..Default::default()
                })
                .engine_options(opts(2)),
        )
        .unwrap();
        let err = max_rel_err(&out.delta_variance, &v(key));
        assert!(err <= tol, "gnn rollout {key}: {err:e}");
        assert!(max_rel_err(&out.qoi, &v("qoi_value")) <= 1e-12);
    }
}

#[test]
fn without_weights_the_initializers_are_the_parameters() {
    for name in CASES {
        let d = dir(name);
        let with =
            Graph::from_onnx(d.join("model.onnx"), Some(&d.join("model.safetensors"))).unwrap();
        let without = Graph::from_onnx(d.join("model.onnx"), None::<&Path>).unwrap();
        let names = |g: &Graph| g.params.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&with), names(&without), "{name}");
    }
}

#[test]
fn default_exports_that_change_the_parameters_are_refused_naming_the_tensor() {
    // batch norm folded into the convolutions
    let d = dir("resblock");
    let e = Graph::from_onnx(d.join("folded.onnx"), Some(&d.join("model.safetensors")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'bn0.") && e.contains("export_torch.py --onnx"),
        "{e}"
    );
    // the tied head copied, Linear weights transposed into anonymous constants
    let d = dir("gpt");
    let e = Graph::from_onnx(d.join("default.onnx"), Some(&d.join("model.safetensors")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not read by the graph") && e.contains("export_torch.py --onnx"),
        "{e}"
    );
}
