//! The transformer on the graph engine (`GraphEngine::from_transformer`: the model written with
//! the graph builder) against the generic path (one candle backward per example through the
//! same model built from `deltavar::nn` layers) in f64, and the generic path against central
//! finite differences.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::*;
use deltavar::model::{Transformer, TransformerConfig};
use deltavar::sigma::*;
use deltavar::*;

fn cfg() -> TransformerConfig {
    TransformerConfig {
        vocab: 11,
        max_len: 6,
        d: 8,
        heads: 2,
        layers: 2,
        hidden: 12,
        classes: 3,
        eps: 1e-5,
    }
}

fn tokens(n: usize, t: usize, seed: u64) -> Tensor {
    token_ids(n, t, 11, seed)
}

fn eo(bs: usize) -> FactoredOptions {
    FactoredOptions {
        batch_size: bs,
        threads: 2,
    }
}

#[test]
fn the_transformer_on_the_graph_engine_matches_the_generic_path() {
    let model = Transformer::init(cfg(), DType::F64, 5).unwrap();
    let params = model.params().unwrap();
    assert_eq!(params.num_params(), cfg().num_params());
    // 5 positions of the 6 the position table holds; repeated tokens within a sequence
    let data = TensorDataset::new(tokens(9, 5, 1), random_labels(9, 3, 2)).unwrap();
    let lik = Likelihood::Categorical;
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let engine = GraphEngine::from_transformer(&model, 5).unwrap();
    let want = generic.fisher_diag().unwrap();
    for bs in [1, 4, 9] {
        let got = engine.sum_sq(&lik, &data, &eo(bs)).unwrap();
        // per tensor, norm-wise: the key bias's gradient is exactly zero (softmax ignores a
        // shift shared by all keys), so its entries are rounding noise in both
        let mut off = 0;
        for (name, shape) in cfg().param_shapes() {
            let k: usize = shape.iter().product();
            let err = norm_rel_err(&got[off..off + k], &want.sums()[off..off + k]);
            assert!(err < 1e-12, "diag, batch {bs}, {name}: {err:e}");
            off += k;
        }
    }
    let g = engine
        .per_example_gradients(&lik, &data, 1, 7, &eo(3))
        .unwrap();
    let gw = generic.per_example_gradients(1, 7).unwrap();
    assert!(mat_rel_err(&g, &gw) < 1e-10, "{}", mat_rel_err(&g, &gw));
    let q = tokens(4, 5, 3);
    let (qg, qv) = engine
        .query_gradients(&Qoi::Prob(2), &q, 1, &eo(3))
        .unwrap();
    let (qgw, qvw) = qoi_gradients(
        &params,
        &q,
        Qoi::Prob(2).of(&model),
        &GenericOptions::default(),
    )
    .unwrap();
    assert!(mat_rel_err(&qg, &qgw) < 1e-10);
    assert!(max_rel_err(&qv, &qvw) < 1e-12);
    // ΔVar through the graph engine's Fisher source, every method
    let native = GraphFisher::with_engine(engine.clone(), lik.clone(), &data, eo(4));
    for method in [FullMethod::Dense, FullMethod::Kernel, FullMethod::Cg] {
        let o = SigmaOptions {
            damping: 1e-3,
            full_method: method,
            ..Default::default()
        };
        let a = build_sigma(
            SigmaStrategy::InverseFullEmpiricalFim,
            params.num_params(),
            &o,
            Some(&native),
        )
        .unwrap();
        let b = build_sigma(
            SigmaStrategy::InverseFullEmpiricalFim,
            params.num_params(),
            &o,
            Some(&generic),
        )
        .unwrap();
        let err = max_rel_err(
            &a.quad_forms(qg.as_ref()).unwrap(),
            &b.quad_forms(qgw.as_ref()).unwrap(),
        );
        assert!(err < 1e-9, "{method:?}: {err:e}");
        let _ = &qv;
    }
}

#[test]
fn the_generic_oracle_matches_finite_differences_on_the_transformer() {
    let model = Transformer::init(cfg(), DType::F64, 6).unwrap();
    let params = model.params().unwrap();
    let data = TensorDataset::new(tokens(3, 6, 4), random_labels(3, 3, 5)).unwrap();
    let lik = Likelihood::Categorical;
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let g = generic.per_example_gradients(1, 1).unwrap();
    let (x, y) = data.get(1, 1).unwrap();
    let p = params.num_params();
    assert_matches_fd(
        &params,
        (0..p).step_by(5),
        |k| g[(k, 0)],
        || {
            lik.log_likelihood(&model.forward(&x).unwrap(), &y)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        },
        "transformer",
    );
}

#[test]
fn bad_tokens_and_files_are_errors() {
    let model = Transformer::init(cfg(), DType::F64, 5).unwrap();
    let engine = GraphEngine::from_transformer(&model, 3).unwrap();
    let lik = Likelihood::Categorical;
    // a token outside the vocabulary, sequences of another length, longer than the position table
    let x = Tensor::new(&[[1i64, 2, 11]], &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_labels(1, 3, 1)).unwrap();
    let e = engine.sum_sq(&lik, &data, &eo(4)).unwrap_err().to_string();
    assert!(e.contains("11") && e.contains("emb.weight"), "{e}");
    let data = TensorDataset::new(tokens(2, 4, 1), random_labels(2, 3, 1)).unwrap();
    assert!(engine.sum_sq(&lik, &data, &eo(4)).is_err());
    let e = GraphEngine::from_transformer(&model, 7)
        .unwrap_err()
        .to_string();
    assert!(e.contains("pos.weight") || e.contains('6'), "{e}");
    // a state dict with a wrong shape, a missing and an extra tensor
    let mut named: std::collections::HashMap<String, Tensor> =
        model.named_tensors().into_iter().collect();
    named.insert(
        "blocks.1.fc2.weight".into(),
        Tensor::zeros((8, 13), DType::F64, &Device::Cpu).unwrap(),
    );
    let e = Transformer::from_tensors(&named, 2, "", DType::F64, "m")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocks.1.fc2.weight") && e.contains("[8, 13]") && e.contains("[8, 12]"),
        "{e}"
    );
    named.insert(
        "blocks.1.fc2.weight".into(),
        Tensor::zeros((8, 12), DType::F64, &Device::Cpu).unwrap(),
    );
    named.insert(
        "extra".into(),
        Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap(),
    );
    let e = Transformer::from_tensors(&named, 2, "", DType::F64, "m")
        .unwrap_err()
        .to_string();
    assert!(e.contains("extra"), "{e}");
    named.remove("extra");
    assert!(Transformer::from_tensors(&named, 3, "", DType::F64, "m").is_err()); // 3 ∤ 8
    named.remove("ln_f.bias");
    let e = Transformer::from_tensors(&named, 2, "", DType::F64, "m")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ln_f.bias"), "{e}");
}

#[test]
fn offline_passes_of_a_transformer_and_memory_mapped_tokens() {
    let model = Transformer::init(cfg(), DType::F32, 8).unwrap();
    let lik = Likelihood::Categorical;
    // token ids from an int64 .npy, memory-mapped
    let dir = std::env::temp_dir().join(format!("dv-transformer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = 21;
    let x = tokens(n, 6, 9);
    let ids: Vec<i64> = x.flatten_all().unwrap().to_vec1().unwrap();
    deltavar::data::write_npy(
        dir.join("x.npy"),
        &[n, 6],
        deltavar::data::RowsRef::I64(&ids),
    )
    .unwrap();
    let labels: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
    deltavar::data::write_npy(
        dir.join("y.npy"),
        &[n],
        deltavar::data::RowsRef::I64(&labels),
    )
    .unwrap();
    let mapped = MmapNpyDataset::open(dir.join("x.npy"), dir.join("y.npy")).unwrap();
    let memory = TensorDataset::new(x, Tensor::from_vec(labels, n, &Device::Cpu).unwrap()).unwrap();
    let engine = GraphEngine::from_transformer(&model, 6).unwrap();
    let a = engine.sum_sq(&lik, &mapped, &eo(4)).unwrap();
    let b = engine.sum_sq(&lik, &memory, &eo(5)).unwrap();
    assert!(norm_rel_err(&a, &b) < 1e-6, "{}", norm_rel_err(&a, &b));
    // shards merge to the whole; the artifact names the state-dict parameters
    let opts = PassOptions {
        engine: eo(4),
        ..Default::default()
    };
    let whole = fisher_pass(
        &engine,
        lik.clone(),
        "categorical",
        &mapped,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(whole.meta.param_names, model.param_names());
    let parts: Vec<FisherArtifact> = (0..2)
        .map(|i| {
            let o = PassOptions {
                shard: Some((i, 2)),
                ..opts.clone()
            };
            fisher_pass(
                &engine,
                lik.clone(),
                "categorical",
                &mapped,
                &o,
                &mut |_, _| {},
            )
            .unwrap()
        })
        .collect();
    let merged = FisherArtifact::merge(&parts).unwrap();
    // an f32 model: the shards' batches group other examples, so the f32 matmuls round
    // differently (1e-7 per entry); the sums themselves are f64
    assert!(norm_rel_err(merged.diag.sums(), whole.diag.sums()) < 1e-5);
    // the capture engine on the same model agrees (f32 model, so to single precision)
    let params = model.params().unwrap();
    let cap = CaptureEngine::new(&model, &params)
        .sum_sq(&lik, &memory, &CaptureOptions::default())
        .unwrap();
    assert!(norm_rel_err(&cap, &b) < 1e-4, "{}", norm_rel_err(&cap, &b));
}
