//! One family of entry points: `engine_delta_variances_with`, its group and covariance forms run
//! on the graph, transformer and capture engines alike, and the same model gives the same ΔVar
//! on each (f64, one Fisher source shared).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use deltavar::model::{SeqSpec, Sequential, Transformer, TransformerConfig};
use deltavar::sigma::*;
use deltavar::*;

fn eo() -> FactoredOptions {
    FactoredOptions {
        batch_size: 3,
        threads: 2,
    }
}

#[test]
fn graph_and_capture_engines_give_the_same_delta_variances() {
    let spec: SeqSpec = "seq:conv2d(1,3,3,padding=1),tanh,avgpool2d(2),flatten,linear(12,3)"
        .parse()
        .unwrap();
    let model = Sequential::init(spec, &[1, 4, 4], DType::F64, 7).unwrap();
    let params = model.params().unwrap();
    let n = 9;
    let x = Tensor::from_vec(pseudo_random(n * 16, 2), (n, 1, 4, 4), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_labels(n, 3, 3)).unwrap();
    let q = Tensor::from_vec(pseudo_random(4 * 16, 5), (4, 1, 4, 4), &Device::Cpu).unwrap();
    let lik = Likelihood::Categorical;
    let graph = GraphEngine::from_sequential(&model).unwrap();
    let capture = CaptureEngine::new(&model, &params);
    let fisher = GraphFisher::with_engine(graph.clone(), lik, &data, eo());
    for (strategy, method) in [
        (SigmaStrategy::DiagonalEmpiricalFim, FullMethod::Auto),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Kernel),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Dense),
    ] {
        let o = SigmaOptions {
            damping: 1e-3,
            full_method: method,
            ..Default::default()
        };
        let s = || match strategy {
            SigmaStrategy::DiagonalEmpiricalFim => SigmaStrategy::DiagonalEmpiricalFim,
            _ => SigmaStrategy::InverseFullEmpiricalFim,
        };
        let req = || {
            DeltaRequest::new(&q, s())
                .fisher(&fisher)
                .qoi(Qoi::Prob(1))
                .options(o.clone())
                .engine_options(eo())
        };
        let a = engine_delta_variances_with(&graph, req()).unwrap();
        let b = engine_delta_variances_with(&capture, req()).unwrap();
        let err = max_rel_err(&a.delta_variance, &b.delta_variance);
        assert!(err < 1e-10, "{method:?}: {err:e}");
        assert!(max_rel_err(&a.qoi, &b.qoi) < 1e-12);
    }
    let o = SigmaOptions {
        damping: 1e-3,
        ..Default::default()
    };
    let req = || {
        DeltaRequest::new(&q, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(&fisher)
            .options(o.clone())
            .engine_options(eo())
    };
    let ca = engine_delta_covariances_with(&graph, req()).unwrap();
    let cb = engine_delta_covariances_with(&capture, req()).unwrap();
    assert_eq!(cb.outputs[0].len(), 3);
    for (x, y) in ca.covariance.iter().zip(&cb.covariance) {
        assert!(max_rel_err(x, y) < 1e-10);
    }
    // a rollout is the graph engine's; the capture engine refuses it by name
    let e = engine_delta_variances_with(&capture, req().rollout(2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("capture engine"), "{e}");
}

#[test]
fn the_transformer_on_the_graph_and_capture_engines_gives_the_same_delta_variances() {
    let cfg = TransformerConfig {
        vocab: 7,
        max_len: 4,
        d: 4,
        heads: 2,
        layers: 1,
        hidden: 6,
        classes: 3,
        eps: 1e-5,
    };
    let model = Transformer::init(cfg, DType::F64, 2).unwrap();
    let ids = |n: usize, seed: u64| token_ids(n, 4, 7, seed);
    let data = TensorDataset::new(ids(8, 1), random_labels(8, 3, 2)).unwrap();
    let q = ids(3, 4);
    let params = model.params().unwrap();
    let native = CaptureEngine::new(&model, &params);
    let graph = GraphEngine::from_transformer(&model, 4).unwrap();
    let fisher = GraphFisher::with_engine(graph.clone(), Likelihood::Categorical, &data, eo());
    let o = SigmaOptions {
        damping: 1e-3,
        full_method: FullMethod::Kernel,
        ..Default::default()
    };
    let req = |qoi| {
        DeltaRequest::new(&q, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(&fisher)
            .qoi(qoi)
            .options(o.clone())
            .engine_options(eo())
    };
    let a = engine_delta_variances_with(&native, req(Qoi::Prob(0))).unwrap();
    let b = engine_delta_variances_with(&graph, req(Qoi::Prob(0))).unwrap();
    let err = max_rel_err(&a.delta_variance, &b.delta_variance);
    assert!(err < 1e-9, "{err:e}");
    // the covariances read every output (the request's QoI is not read)
    let c = engine_delta_covariances_with(&native, req(Qoi::Sum)).unwrap();
    assert_eq!(c.outputs[0].len(), 3);
    let diag: Vec<f64> = c.covariance.iter().map(|m| m[0]).collect();
    let d0 = engine_delta_variances_with(&native, req(Qoi::Output(0))).unwrap();
    assert!(max_rel_err(&diag, &d0.delta_variance) < 1e-9);
}

/// A diagonal Σ on the graph and capture engines takes the queries a batch at a time held
/// layer by layer (`QueryGradients::query_diag_forms`): never the P×M block, and the same ΔVar
/// as the formed gradients — convolutions (rows used at many positions), Linear layers (read
/// once), and a rollout whose layers are read at every step.
#[test]
fn a_diagonal_sigma_never_forms_the_query_gradients() {
    // ΔVar under a random diagonal Σ through the pipeline against the formed P×M block
    let check = |engine: &dyn deltavar::engine::QueryGradients,
                 reference: &GraphEngine,
                 qoi: Qoi,
                 q: &Tensor,
                 steps: usize,
                 seed: u64| {
        let p = reference.num_params();
        let d: Vec<f64> = pseudo_random(p, seed)
            .iter()
            .map(|v| v.abs() + 0.1)
            .collect();
        let (g, _) = reference.query_gradients(&qoi, q, steps, &eo()).unwrap();
        let want = delta_variances(g.as_ref(), &DiagonalSigma::new(d.clone()).unwrap()).unwrap();
        let o = SigmaOptions {
            damping: 1e-3,
            ..Default::default()
        };
        let got = engine_delta_variances_with(
            engine,
            DeltaRequest::new(q, SigmaStrategy::Diagonal(d))
                .qoi(qoi)
                .rollout(steps)
                .options(o.clone())
                .engine_options(eo()),
        )
        .unwrap();
        assert_eq!(got.path, QueryPath::DiagonalFactored);
        let err = max_rel_err(&got.delta_variance, &want);
        assert!(err < 1e-12, "{err:e}");
    };
    let spec: SeqSpec = "seq:conv2d(1,3,3,padding=1),tanh,avgpool2d(2),flatten,linear(12,3)"
        .parse()
        .unwrap();
    let model = Sequential::init(spec, &[1, 4, 4], DType::F64, 11).unwrap();
    let params = model.params().unwrap();
    let q = Tensor::from_vec(pseudo_random(7 * 16, 6), (7, 1, 4, 4), &Device::Cpu).unwrap();
    let graph = GraphEngine::from_sequential(&model).unwrap();
    let capture = CaptureEngine::new(&model, &params);
    check(&graph, &graph, Qoi::Prob(2), &q, 1, 8);
    check(&capture, &graph, Qoi::Prob(2), &q, 1, 8);
    // a rolled-out step network: its layers are read at every step
    let step: SeqSpec = "seq:linear(3,5),tanh,linear(5,3)".parse().unwrap();
    let step = Sequential::init(step, &[3], DType::F64, 12).unwrap();
    let se = GraphEngine::from_sequential(&step).unwrap();
    let z = Tensor::from_vec(pseudo_random(5 * 3, 13), (5, 3), &Device::Cpu).unwrap();
    check(&se, &se, Qoi::Output(1), &z, 3, 14);
    // the same network once per query: every weight read once, the forms straight from each
    // batch's pass (no layered store), several batches over two workers
    check(&se, &se, Qoi::Output(1), &z, 1, 15);
    check(&se, &se, Qoi::Sum, &z, 1, 16);
    // a non-finite query is refused, naming it; a query that overflows the pass gives an
    // error naming the layer or the query, or finite variances, never a NaN
    let run = |v: f64| {
        let mut z = pseudo_random(5 * 3, 17);
        z[4] = v;
        let z = Tensor::from_vec(z, (5, 3), &Device::Cpu).unwrap();
        engine_delta_variances_with(
            &se,
            DeltaRequest::new(&z, SigmaStrategy::Diagonal(vec![1.0; se.num_params()]))
                .qoi(Qoi::Output(1))
                .engine_options(eo()),
        )
    };
    let err = run(f64::NAN).expect_err("a NaN query is refused");
    assert!(err.to_string().contains("row 1"), "{err}");
    match run(1e300) {
        Ok(r) => assert!(r.delta_variance.iter().all(|v| v.is_finite())),
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("layer") || m.contains("entry 1"), "{m}")
        }
    }
}
