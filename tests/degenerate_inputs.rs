//! Issue 8, defect 6: every public constructor and entry point called with empty, zero-size or
//! degenerate inputs returns a value or an `Error`, never a panic. Where a value is returned it
//! is checked.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use deltavar::data::{write_npy, NpyArray, RowsRef};
use deltavar::engine::{DenseGradients, GradientMatrix};
use deltavar::seed::*;
use deltavar::sigma::solver::{
    conjugate_gradient, CgSettings, IdentityPreconditioner, JacobiPreconditioner, LinOp,
    NystromPreconditioner,
};
use deltavar::sigma::*;
use deltavar::*;
use faer::{Mat, MatRef};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("deltavar-degenerate-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn datasets_empty_and_degenerate() {
    // an empty batch list: length 0, reads are errors (it has no shape), not a panic
    let bl = BatchList::new(vec![]).unwrap();
    assert_eq!(bl.len(), 0);
    assert!(bl.is_empty());
    assert!(bl.get(0, 0).is_err());
    assert!(bl.get(0, 1).is_err());
    // batches of zero rows
    let z = |r| Tensor::zeros((r, 2), DType::F64, &Device::Cpu).unwrap();
    let bl = BatchList::new(vec![(z(0), z(0)), (z(3), z(3))]).unwrap();
    assert_eq!(bl.len(), 3);
    assert_eq!(bl.get(1, 2).unwrap().0.dims(), &[2, 2]);
    assert_eq!(bl.get(3, 0).unwrap().0.dims(), &[0, 2]);
    // ranges
    let td = TensorDataset::new(z(0), z(0)).unwrap();
    assert_eq!(td.len(), 0);
    assert!(DatasetRange::new(&td, 0, 1).is_err());
    assert!(DatasetRange::new(&td, usize::MAX, 2).is_err());
    assert_eq!(DatasetRange::new(&td, 0, 0).unwrap().len(), 0);
    // scalars are refused, mismatched rows too
    let s = Tensor::new(1.0f64, &Device::Cpu).unwrap();
    assert!(TensorDataset::new(s.clone(), s).is_err());
    assert!(TensorDataset::new(z(2), z(3)).is_err());
    // npy: zero rows, a scalar, empty shapes
    let p = tmp("empty.npy");
    write_npy(&p, &[0, 3], RowsRef::F32(&[])).unwrap();
    let a = NpyArray::open(&p).unwrap();
    assert_eq!((a.rows(), a.row_len()), (0, 3));
    assert!(a.rows_ref(0, 1).is_err());
    a.release_rows(0, 10);
    let y = tmp("empty_y.npy");
    write_npy(&y, &[0], RowsRef::I64(&[])).unwrap();
    let ds = MmapNpyDataset::open(&p, &y).unwrap();
    assert_eq!(ds.len(), 0);
    let sc = tmp("scalar.npy");
    write_npy(&sc, &[], RowsRef::F64(&[2.5])).unwrap();
    let a = NpyArray::open(&sc).unwrap();
    assert_eq!((a.rows(), a.row_len()), (1, 1));
    assert!(MmapNpyDataset::open(&sc, &sc).is_err());
    assert!(write_npy(tmp("bad.npy"), &[2, 2], RowsRef::F32(&[1.0])).is_err());
    assert!(write_npy(tmp("bad.npy"), &[usize::MAX, 2], RowsRef::F32(&[1.0])).is_err());
}

#[test]
fn params_empty_and_degenerate() {
    let p = Params::from_vars(vec![]).unwrap();
    assert_eq!(p.num_params(), 0);
    assert_eq!(p.flat_values().unwrap(), Vec::<f64>::new());
    assert!(p.unflatten(&[]).unwrap().is_empty());
    assert!(p.unflatten(&[1.0]).is_err());
    assert!(p.set_flat_values(&[1.0]).is_err());
    assert_eq!(p.dtype(), None);
    let vm = VarMap::new();
    let e = Params::from_varmap(&vm, ParamOrder::Explicit(vec!["x".into()])).unwrap_err();
    assert!(e.to_string().contains("'x'"), "{e}");
    assert_eq!(
        Params::from_varmap(&vm, ParamOrder::Natural)
            .unwrap()
            .num_params(),
        0
    );
    // a zero-size parameter
    let w = Var::from_tensor(&Tensor::zeros((0, 3), DType::F64, &Device::Cpu).unwrap()).unwrap();
    let p = Params::from_vars(vec![("w".into(), w)]).unwrap();
    assert_eq!(p.num_params(), 0);
    // duplicates
    let v = Var::from_tensor(&Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap()).unwrap();
    assert!(Params::from_vars(vec![("a".into(), v.clone()), ("a".into(), v)]).is_err());
}

#[test]
fn models_and_engines_on_empty_inputs() {
    assert!(Mlp::new(
        VarBuilder::from_varmap(&VarMap::new(), DType::F64, &Device::Cpu),
        &[3],
        Activation::Tanh,
        None
    )
    .is_err());
    assert!(Mlp::new(
        VarBuilder::from_varmap(&VarMap::new(), DType::F64, &Device::Cpu),
        &[3, 0, 2],
        Activation::Tanh,
        None
    )
    .is_err());
    assert!(Mlp::load_safetensors(
        tmp("missing.safetensors"),
        Activation::Relu,
        DType::F32,
        &Device::Cpu,
        "",
        None
    )
    .is_err());
    let (mlp, vm, params) = random_mlp(&[3, 4, 2], Activation::Tanh, 1);
    let engine = mlp_engine(&mlp);
    let p = engine.num_params();
    let empty = TensorDataset::new(
        Tensor::zeros((0, 3), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros((0, 2), DType::F64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let lik: Likelihood = Likelihood::gaussian(1.0);
    let opts = FactoredOptions::default();
    // the graph engine on no data
    let d = engine.sum_sq(&lik, &empty, &opts).unwrap();
    assert_eq!(d.len(), p);
    assert!(d.iter().all(|v| *v == 0.0));
    let f = engine
        .layered_gradients(&lik, &empty, &opts, LayerRoute::Factor, u64::MAX)
        .unwrap();
    assert_eq!(f.num_examples(), 0);
    assert_eq!(f.gram().unwrap().nrows(), 0);
    assert_eq!(f.to_dense().ncols(), 0);
    assert!(f.diag_sums().unwrap().iter().all(|v| *v == 0.0));
    assert!(f.quad_forms_diag(&vec![1.0; p]).unwrap().is_empty());
    assert!(f.quad_forms_diag(&vec![1.0; p + 1]).is_err());
    assert_eq!(f.jv(Mat::zeros(p, 2).as_ref()).unwrap().nrows(), 0);
    assert!(f.jv(Mat::zeros(p + 1, 2).as_ref()).is_err());
    assert!(f.jtu(Mat::zeros(1, 2).as_ref()).is_err());
    assert!(f.quad_forms_diag(&[1.0]).is_err());
    // zero queries, queries of the wrong shape
    let q0 = Tensor::zeros((0, 3), DType::F64, &Device::Cpu).unwrap();
    let (qf, qf_values) = engine
        .query_layered_gradients(&Qoi::Sum, &q0, 1, &opts, LayerRoute::Factor)
        .unwrap();
    assert!(&qf_values[..].is_empty());
    assert!(query_delta_variances(&qf, &IdentitySigma::new(p))
        .unwrap()
        .is_empty());
    for bad in [
        Tensor::zeros((2, 5), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros((2, 3, 1), DType::F64, &Device::Cpu).unwrap(),
        Tensor::new(1.0f64, &Device::Cpu).unwrap(),
    ] {
        assert!(
            engine
                .query_layered_gradients(&Qoi::Sum, &bad, 1, &opts, LayerRoute::Factor)
                .is_err(),
            "{:?}",
            bad.dims()
        );
    }
    assert!(engine
        .query_layered_gradients(
            &Qoi::Prob(7),
            &random_tensor(2, 3, 1),
            1,
            &FactoredOptions::default(),
            LayerRoute::Factor
        )
        .is_err());
    assert!(engine
        .sum_sq(
            &lik,
            &empty,
            &FactoredOptions {
                batch_size: 0,
                threads: 0
            }
        )
        .is_err());
    // every Σ strategy on an empty training set: F = 0, so the inverses are I/λ
    let z = random_tensor(2, 3, 2);
    for strategy in [
        SigmaStrategy::Identity,
        SigmaStrategy::DiagonalEmpiricalFim,
        SigmaStrategy::InverseFullEmpiricalFim,
    ] {
        let name = strategy.name();
        let opts = SigmaOptions {
            damping: 0.5,
            ..Default::default()
        };
        let out = mlp_delta_variances(
            &mlp,
            Qoi::Sum,
            &z,
            strategy,
            &opts,
            Some((&empty, lik.clone())),
            &FactoredOptions::default(),
        )
        .unwrap();
        let id = mlp_delta_variances(
            &mlp,
            Qoi::Sum,
            &z,
            SigmaStrategy::Identity,
            &SigmaOptions::default(),
            None,
            &FactoredOptions::default(),
        )
        .unwrap();
        let scale = if name == "identity" { 1.0 } else { 2.0 };
        let want: Vec<f64> = id.delta_variance.iter().map(|v| v * scale).collect();
        assert!(max_rel_err(&out.delta_variance, &want) < 1e-12, "{name}");
    }
    // posterior scale on an empty set is an error (no N)
    assert!(mlp_delta_variances(
        &mlp,
        Qoi::Sum,
        &z,
        SigmaStrategy::DiagonalEmpiricalFim,
        &SigmaOptions {
            posterior_scale: true,
            ..Default::default()
        },
        Some((&empty, lik.clone())),
        &FactoredOptions::default(),
    )
    .is_err());
    // generic engine on no data and no queries
    let ll = Likelihood::gaussian(1.0);
    let gf = GenericFisher::new(&params, ll.of(&mlp), &empty, GenericOptions::default());
    assert_eq!(gf.fisher_diag().unwrap().num_examples(), 0);
    assert_eq!(
        gf.fisher_dense(DEFAULT_MEMORY_BUDGET)
            .unwrap()
            .sum()
            .nrows(),
        p
    );
    assert_eq!(gf.per_example_gradients(0, 0).unwrap().ncols(), 0);
    assert!(gf.per_example_gradients(0, 1).is_err());
    let (g, v) =
        qoi_gradients(&params, &q0, Qoi::Sum.of(&mlp), &GenericOptions::default()).unwrap();
    assert_eq!((g.nrows(), g.ncols(), v.len()), (p, 0, 0));
    let scalar = Tensor::new(1.0f64, &Device::Cpu).unwrap();
    assert!(qoi_gradients(
        &params,
        &scalar,
        Qoi::Sum.of(&mlp),
        &GenericOptions::default()
    )
    .is_err());
    assert!(GenericFisher::new(
        &params,
        ll.of(&mlp),
        &empty,
        GenericOptions {
            batch_size: 0,
            threads: 0
        }
    )
    .fisher_diag()
    .is_err());
    drop(vm);
}

struct Zero(usize);
impl LinOp for Zero {
    fn dim(&self) -> usize {
        self.0
    }
    fn apply(&self, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
        Ok(Mat::zeros(x.nrows(), x.ncols()))
    }
}

#[test]
fn sigma_kinds_on_empty_and_degenerate_inputs() {
    // P = 0
    assert_eq!(apply_identity_sigma(&[]).unwrap(), 0.0);
    assert_eq!(apply_diagonal_sigma(&[], &[]).unwrap(), 0.0);
    assert_eq!(
        apply_full_sigma(&[], Mat::<f64>::zeros(0, 0).as_ref()).unwrap(),
        0.0
    );
    assert!(apply_diagonal_sigma(&[1.0], &[]).is_err());
    assert!(DenseSigma::new(Mat::zeros(2, 3)).is_err());
    // a dense Σ that is not a covariance: a negative diagonal entry, or an indefinite matrix
    // whose quadratic form goes below zero, is an error and not a negative variance
    let e =
        DenseSigma::new(Mat::from_fn(2, 2, |i, j| if i == j { -1.0 } else { 0.0 })).unwrap_err();
    assert!(e.to_string().contains("(0, 0)"), "{e}");
    let indefinite =
        DenseSigma::new(Mat::from_fn(2, 2, |i, j| if i == j { 1.0 } else { 3.0 })).unwrap();
    // columns (1, 1) and (1, -1)
    let g = Mat::from_fn(2, 2, |i, j| if j == 1 && i == 1 { -1.0 } else { 1.0 });
    let e = indefinite.quad_forms(g.as_ref()).unwrap_err();
    assert!(
        e.to_string().contains("positive semi-definite") && e.to_string().contains("query 1"),
        "{e}"
    );
    // a positive semi-definite one (rank 1) with a zero form passes
    let psd = DenseSigma::new(Mat::from_fn(2, 2, |_, _| 1.0)).unwrap();
    let f = psd.quad_forms(g.as_ref()).unwrap();
    assert_eq!(f, vec![4.0, 0.0]);
    assert!(DiagonalSigma::new(vec![f64::NAN]).is_err());
    assert!(InverseDiagonalFisher::new(&[], 1e-3)
        .unwrap()
        .diag()
        .is_empty());
    assert!(InverseDiagonalFisher::new(&[1.0], -1.0).is_err());
    let full = InverseFullFisher::new(Mat::<f64>::zeros(0, 0).as_ref(), 1e-3).unwrap();
    assert_eq!(full.to_dense().nrows(), 0);
    assert!(InverseFullFisher::new(Mat::<f64>::zeros(2, 3).as_ref(), 1e-3).is_err());
    assert!(InverseFullFisher::new(Mat::<f64>::zeros(2, 2).as_ref(), 0.0).is_err());
    assert!(ScaledSigma::new(IdentitySigma::new(2), 0.0).is_err());
    assert!(ScaledSigma::new(IdentitySigma::new(2), f64::INFINITY).is_err());
    // zero queries
    let id = IdentitySigma::new(3);
    assert!(id
        .quad_forms(Mat::<f64>::zeros(3, 0).as_ref())
        .unwrap()
        .is_empty());
    assert!(id.quad_forms(Mat::<f64>::zeros(2, 1).as_ref()).is_err());
    // kernel and CG with N = 0 examples, and with P = 0
    for (p, n) in [(4, 0), (0, 3), (0, 0)] {
        let g: Arc<dyn GradientMatrix> = Arc::new(DenseGradients::new(Mat::zeros(p, n)));
        let q = Mat::from_fn(p, 2, |i, j| (i + j) as f64 + 1.0);
        let k = KernelInverseFisher::new(g.clone(), 0.5).unwrap();
        let v = k.quad_forms(q.as_ref()).unwrap();
        let want: Vec<f64> = (0..2)
            .map(|j| (0..p).map(|i| q[(i, j)] * q[(i, j)] / 0.5).sum())
            .collect();
        assert!(max_rel_err(&v, &want) < 1e-14, "kernel p={p} n={n}");
        for pre in [
            CgPreconditioner::Identity,
            CgPreconditioner::Jacobi,
            CgPreconditioner::Nystrom { rank: 0 },
            CgPreconditioner::Nystrom { rank: 5 },
        ] {
            let cg = CgInverseFisher::new(
                g.clone(),
                0.5,
                CgOptions {
                    preconditioner: pre,
                    ..Default::default()
                },
            )
            .unwrap();
            let v = cg.quad_forms(q.as_ref()).unwrap();
            assert!(max_rel_err(&v, &want) < 1e-12, "cg {pre:?} p={p} n={n}");
        }
    }
    // the solver pieces on their own
    assert!(JacobiPreconditioner::new(&[1.0, 0.0]).is_err());
    assert!(NystromPreconditioner::new(&Zero(3), 2, 0.0).is_err());
    assert_eq!(
        NystromPreconditioner::new(&Zero(3), 2, 1.0).unwrap().rank(),
        0
    );
    assert_eq!(
        NystromPreconditioner::new(&Zero(0), 2, 1.0).unwrap().rank(),
        0
    );
    let settings = CgSettings {
        tol: 1e-10,
        max_iter: 10,
        progress: Default::default(),
    };
    let (x, r) = conjugate_gradient(
        &Zero(3),
        &IdentityPreconditioner,
        Mat::<f64>::zeros(3, 0).as_ref(),
        &settings,
    )
    .unwrap();
    assert_eq!((x.ncols(), r.iterations, r.converged), (0, 0, true));
    // a zero operator with a nonzero right-hand side is not positive definite
    assert!(matches!(
        conjugate_gradient(
            &Zero(3),
            &IdentityPreconditioner,
            Mat::from_fn(3, 1, |_, _| 1.0).as_ref(),
            &settings
        ),
        Err(Error::NotPositiveDefinite { .. })
    ));
    assert!(conjugate_gradient(
        &Zero(3),
        &IdentityPreconditioner,
        Mat::<f64>::zeros(2, 1).as_ref(),
        &settings
    )
    .is_err());
    // the method choice with nothing to choose from
    assert!(choose_full_method(FullMethod::Auto, 0, 0, 0, 0, 0, 0).is_ok());
    assert!(choose_full_method(FullMethod::Auto, 1 << 20, 1 << 20, 1 << 20, 0, 1, 1).is_err());
}

#[test]
fn fisher_results_and_artifacts_degenerate() {
    assert!(FisherDiag::from_sums(vec![], 0).unwrap().mean().is_empty());
    assert!(FisherDiag::from_sums(vec![-1.0], 1).is_err());
    assert!(FisherDiag::from_sums(vec![f64::NAN], 1).is_err());
    let mut a = FisherDiag::from_sums(vec![1.0], 1).unwrap();
    assert!(a.merge(&FisherDiag::from_sums(vec![], 0).unwrap()).is_err());
    assert_eq!(
        FisherDense::from_lower_sum(Mat::zeros(0, 0), 0)
            .unwrap()
            .mean()
            .nrows(),
        0
    );
    assert!(FisherDense::from_lower_sum(Mat::zeros(2, 3), 0).is_err());
    assert!(FisherArtifact::merge(&[]).is_err());
    assert!(deltavar::fisher::shard_range(0, 0, 10).is_err());
    assert!(deltavar::fisher::shard_range(3, 3, 10).is_err());
    assert_eq!(deltavar::fisher::shard_range(0, 1, 0).unwrap(), (0, 0));
    assert_eq!(
        deltavar::fisher::shard_range(2, 3, usize::MAX).unwrap().1,
        usize::MAX
    );
    // hostile artifact files
    let p = tmp("notsafetensors.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\xffgarbage").unwrap();
    assert!(matches!(
        FisherArtifact::load(&p),
        Err(Error::BadFile { .. })
    ));
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(
        FisherArtifact::load(&p),
        Err(Error::BadFile { .. })
    ));
    // metadata whose shapes overflow, or whose ranges do not fit the dataset
    for meta in [
        r#"{"format_version":1,"num_examples":1,"convention":"sum","kind":"diag","likelihood":"x","param_names":["a","b"],"param_shapes":[[4611686018427387904,4],[1]],"weights_fingerprint":"0","ranges":[[0,1]],"dataset_len":1}"#,
        r#"{"format_version":1,"num_examples":5,"convention":"sum","kind":"diag","likelihood":"x","param_names":["a"],"param_shapes":[[1]],"weights_fingerprint":"0","ranges":[[0,5]],"dataset_len":1}"#,
        r#"{"format_version":1,"num_examples":1,"convention":"sum","kind":"diag","likelihood":"x","param_names":["a","b"],"param_shapes":[[1]],"weights_fingerprint":"0","ranges":[[0,1]],"dataset_len":1}"#,
    ] {
        let data = 1.0f64.to_le_bytes();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![1], &data).unwrap();
        let info = std::collections::HashMap::from([("deltavar".to_string(), meta.to_string())]);
        safetensors::serialize_to_file(vec![("diag_sum", view)], Some(info), &p).unwrap();
        let e = FisherArtifact::load(&p).unwrap_err();
        assert!(matches!(e, Error::BadFile { .. }), "{e}");
    }
}

/// The layered gradient operator on no data and on no queries: empty results and Σ = I/λ from
/// the kernel method, never a panic; a query batch of the wrong shape names the expected one.
#[test]
fn layered_gradients_on_empty_inputs() {
    use deltavar::engine::LayerRoute;
    use deltavar::model::{SeqSpec, Sequential};
    let spec: SeqSpec = "seq:conv2d(1,2,3,padding=1),relu,flatten,linear(32,3)"
        .parse()
        .unwrap();
    let model = Sequential::init(spec, &[1, 4, 4], DType::F64, 5).unwrap();
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let empty = TensorDataset::new(
        Tensor::zeros((0, 1, 4, 4), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros(0, DType::I64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let opts = FactoredOptions::default();
    let lg = engine
        .layered_gradients(
            &Likelihood::Categorical,
            &empty,
            &opts,
            LayerRoute::Auto,
            1 << 30,
        )
        .unwrap();
    assert_eq!(lg.num_examples(), 0);
    assert_eq!(lg.gram().unwrap().nrows(), 0);
    assert!(lg.diag_sums().unwrap().iter().all(|v| *v == 0.0));
    // no data: F = 0 and Σ = I/λ
    let p = engine.num_params();
    let k = deltavar::sigma::KernelInverseFisher::new(std::sync::Arc::new(lg), 1e-3).unwrap();
    let v = faer::Mat::from_fn(p, 1, |i, _| (i % 7) as f64 - 3.0);
    let want: f64 = (0..p).map(|i| v[(i, 0)] * v[(i, 0)]).sum::<f64>() / 1e-3;
    let got = k.quad_forms(v.as_ref()).unwrap()[0];
    assert!((got - want).abs() <= 1e-12 * want);
    // no queries: empty values
    let none = Tensor::zeros((0, 1, 4, 4), DType::F64, &Device::Cpu).unwrap();
    let (ql, v) = engine
        .query_layered_gradients(&Qoi::Sum, &none, 1, &opts, LayerRoute::Auto)
        .unwrap();
    assert!(v.is_empty());
    assert!(ql.sq_norms().is_empty());
    // queries of the wrong shape
    let bad = Tensor::zeros((2, 1, 5, 4), DType::F64, &Device::Cpu).unwrap();
    let err = engine
        .query_layered_gradients(&Qoi::Sum, &bad, 1, &opts, LayerRoute::Auto)
        .err()
        .unwrap();
    assert!(err.to_string().contains("(M, [1, 4, 4])"), "{err}");
}

/// The entry points the tests above leave out: the transformer, graph and capture engines, the
/// offline passes of every engine, K-FAC and the low-rank Σ, on an empty dataset, zero queries,
/// a zero batch size and rank 0.
#[test]
fn every_other_engine_and_pass_on_empty_inputs() {
    use deltavar::model::{SeqSpec, Sequential, Transformer, TransformerConfig};
    let lik = Likelihood::Categorical;
    let o = FactoredOptions {
        batch_size: 4,
        threads: 2,
    };
    let zero_batch = FactoredOptions {
        batch_size: 0,
        threads: 2,
    };
    // the transformer on the graph engine
    let cfg = TransformerConfig {
        vocab: 5,
        max_len: 3,
        d: 4,
        heads: 2,
        layers: 1,
        hidden: 6,
        classes: 2,
        eps: 1e-5,
    };
    let tr = Transformer::init(cfg, DType::F64, 1).unwrap();
    let no_tokens = TensorDataset::new(
        Tensor::zeros((0, 3), DType::I64, &Device::Cpu).unwrap(),
        Tensor::zeros(0, DType::I64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let zq = Tensor::zeros((0, 3), DType::I64, &Device::Cpu).unwrap();
    let graph = GraphEngine::from_transformer(&tr, 3).unwrap();
    let p = graph.num_params();
    assert_eq!(graph.sum_sq(&lik, &no_tokens, &o).unwrap(), vec![0.0; p]);
    assert!(graph.sum_sq(&lik, &no_tokens, &zero_batch).is_err());
    let (g, v) = graph.query_gradients(&Qoi::Prob(0), &zq, 1, &o).unwrap();
    assert_eq!((g.nrows(), g.ncols(), v.len()), (p, 0, 0));
    // offline passes over nothing: an artifact of N = 0 with zero sums
    let po = PassOptions {
        engine: o.clone(),
        ..Default::default()
    };
    let cat = "categorical";
    let art = fisher_pass(&graph, lik.clone(), cat, &no_tokens, &po, &mut |_, _| {});
    let art = art.unwrap();
    assert_eq!(art.meta.num_examples, 0);
    assert!(art.diag.sums().iter().all(|v| *v == 0.0));
    // a seq: model on the graph engine: K-FAC over nothing, and the capture engine
    let spec: SeqSpec = "seq:linear(3,4),tanh,linear(4,2)".parse().unwrap();
    let seq = Sequential::init(spec, &[3], DType::F64, 2).unwrap();
    let empty = TensorDataset::new(
        Tensor::zeros((0, 3), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros(0, DType::I64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let ge = GraphEngine::from_sequential(&seq).unwrap();
    match ge.kfac_factors(&lik, &empty, &o) {
        Ok(f) => {
            // no examples: the factors are zero, and a damped Σ is λ⁻¹ I
            let s = KfacSigma::new(&f, 0.5).unwrap();
            let e = Mat::<f64>::identity(ge.num_params(), 1);
            let got = s.apply(e.as_ref()).unwrap();
            assert!((got[(0, 0)] - 2.0).abs() < 1e-12, "{}", got[(0, 0)]);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    // K-FAC through the one entry point over nothing: λ⁻¹ gᵀg, or an error naming N = 0 with
    // the posterior scale
    let z = Tensor::ones((2, 3), DType::F64, &Device::Cpu).unwrap();
    let fisher = GraphFisher::with_engine(ge.clone(), lik.clone(), &empty, o.clone());
    let req = |posterior_scale| {
        DeltaRequest::new(&z, SigmaStrategy::KfacEmpiricalFim)
            .fisher(&fisher)
            .options(SigmaOptions {
                damping: 0.5,
                posterior_scale,
                ..Default::default()
            })
            .engine_options(o.clone())
    };
    let out = engine_delta_variances_with(&ge, req(false)).unwrap();
    let id = engine_delta_variances_with(
        &ge,
        DeltaRequest::new(&z, SigmaStrategy::Identity).engine_options(o.clone()),
    )
    .unwrap();
    for (k, i) in out.delta_variance.iter().zip(&id.delta_variance) {
        assert!((k - i / 0.5).abs() <= 1e-12 * i.abs(), "{k} {i}");
    }
    let e = engine_delta_variances_with(&ge, req(true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    let params = seq.params().unwrap();
    let cap = CaptureEngine::new(&seq, &params);
    assert_eq!(
        cap.sum_sq(&lik, &empty, &CaptureOptions::default())
            .unwrap(),
        vec![0.0; params.num_params()]
    );
    let art = fisher_pass(
        &CaptureEngine::new(&seq, &params),
        lik.clone(),
        "categorical",
        &empty,
        &po,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(art.meta.num_examples, 0);
    assert!(art.diag.sums().iter().all(|v| *v == 0.0));
    // the low-rank Σ: rank 0 is an error, and a Fisher of no examples has no eigenpairs to find
    let fisher = GraphFisher::with_engine(ge.clone(), lik.clone(), &empty, o.clone());
    assert!(LowRankInverseFisher::from_fisher(&fisher, 1e-3, &LowRankOptions::rank(0)).is_err());
    match LowRankInverseFisher::from_fisher(&fisher, 1e-3, &LowRankOptions::rank(2)) {
        Ok(s) => {
            let e = Mat::<f64>::identity(ge.num_params(), 1);
            let q = s.quad_forms(e.as_ref()).unwrap();
            assert!(q[0].is_finite() && q[0] > 0.0, "{q:?}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A batch size as large as `usize` (a hostile `--batch-size`) gives one chunk, not an
/// overflowed chunk size: the streamed operator's products equal the block's, and its byte
/// count saturates.
#[test]
fn a_huge_batch_size_streams_in_one_chunk() {
    use deltavar::engine::{GradientMatrix, StreamedGradients};
    let spec: SeqSpec = "seq:linear(3,4),tanh,linear(4,2)".parse().unwrap();
    let seq = Sequential::init(spec, &[3], DType::F64, 2).unwrap();
    let x = Tensor::randn(0f64, 1., (5, 3), &Device::Cpu).unwrap();
    let y = Tensor::randn(0f64, 1., (5, 2), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, y).unwrap();
    let lik = Likelihood::gaussian(1.0);
    let engine = GraphEngine::from_sequential(&seq).unwrap();
    // 2^63 examples per batch on 2 workers: 2^64, which wraps to 0 unless saturated
    let o = FactoredOptions {
        batch_size: 1usize << (usize::BITS - 1),
        threads: 2,
    };
    let g = engine
        .per_example_gradients(&lik, &data, 0, 5, &FactoredOptions::default())
        .unwrap();
    let s = StreamedGradients::from_engine(&engine, &lik, &data, o);
    assert_eq!(s.bytes(), u64::MAX);
    let v = Mat::from_fn(engine.num_params(), 2, |i, j| (i + 3 * j) as f64 * 0.1);
    let got = s.jv(v.as_ref()).unwrap();
    let want = g.transpose() * &v;
    assert!(mat_rel_err(&got, &want) < 1e-12);
}
