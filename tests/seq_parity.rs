//! `seq:` models and rollouts against the reference package deltavar 0.1.1 (cases written by
//! `scripts/make_seq_fixtures.py` into tests/data/seq): a CNN with eval BatchNorm, pooling,
//! strided conv and dropout (categorical), and a step network rolled out K = 5 times with the QoI
//! read at the end (gaussian, one-step training pairs). f64 from the f32-rounded files.
//!
//! Measured (2026-11-27): Fisher diagonal, identity and diagonal ΔVar agree to ≤ 9e-16; the full
//! inverse to 2.5e-8 (rollout) and 4.7e-8 (CNN) for the dense, kernel and CG methods alike (the
//! reference's own inverse). Tolerances are ~100× those.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{max_rel_err, vec_of};
use deltavar::model::{SeqSpec, Sequential};
use deltavar::*;
use serde_json::Value;

fn case_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/seq")
        .join(name)
}

fn check(name: &str) {
    let d = case_dir(name);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("case.json")).unwrap()).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
    let spec: SeqSpec = meta["arch"].as_str().unwrap().parse().unwrap();
    let shape: Vec<usize> = meta["input_shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let model =
        Sequential::load_safetensors(d.join("model.safetensors"), spec, &shape, DType::F64, "")
            .unwrap();
    assert_eq!(
        model.param_names(),
        vec_of_str(&expected["param_order"]),
        "{name}: flat order"
    );
    let lik: Likelihood = match meta["lik"].as_str().unwrap() {
        "gaussian" => Likelihood::gaussian(meta["sigma"].as_f64().unwrap()),
        _ => Likelihood::Categorical,
    };
    let qoi: Qoi = meta["qoi"].as_str().unwrap().parse().unwrap();
    let k = meta["rollout"].as_u64().unwrap() as usize;
    let damping = meta["damping"].as_f64().unwrap();
    let data = MmapNpyDataset::open(d.join("train_x.npy"), d.join("train_y.npy")).unwrap();
    let q = Tensor::read_npy(d.join("queries.npy"))
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let eo = FactoredOptions {
        batch_size: 7,
        threads: 2,
    };
    let fisher = GraphFisher::with_engine(
        GraphEngine::from_sequential(&model).unwrap(),
        lik,
        &data,
        eo.clone(),
    );
    let diag = fisher.fisher_diag().unwrap();
    let err = max_rel_err(&diag.mean(), &vec_of(&expected["fim_diagonal"]));
    eprintln!("{name}: fim diagonal {err:.2e}");
    assert!(err < 1e-13, "{name}: fim diagonal {err:e}");
    for (key, strategy, method, tol) in [
        ("identity", SigmaStrategy::Identity, FullMethod::Auto, 1e-13),
        (
            "diagonal_empirical_fim",
            SigmaStrategy::DiagonalEmpiricalFim,
            FullMethod::Auto,
            1e-13,
        ),
        (
            "inverse_full_empirical_fim",
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Dense,
            5e-6,
        ),
        (
            "inverse_full_empirical_fim",
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Kernel,
            5e-6,
        ),
        (
            "inverse_full_empirical_fim",
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Cg,
            5e-6,
        ),
    ] {
        let opts = SigmaOptions {
            damping,
            full_method: method,
            ..Default::default()
        };
        let out = engine_delta_variances_with(
            &GraphEngine::from_sequential(&model).unwrap(),
            DeltaRequest::new(&q, strategy)
                .fisher(&fisher)
                .qoi(qoi.clone())
                .rollout(k)
                .options(opts.clone())
                .engine_options(eo.clone()),
        )
        .unwrap();
        let err = max_rel_err(&out.delta_variance, &vec_of(&expected[key]));
        eprintln!("{name}: {key} {method:?}: {err:.2e}");
        assert!(err < tol, "{name}: {key} {method:?}: {err:e}");
        let err = max_rel_err(&out.qoi, &vec_of(&expected["qoi_value"]));
        assert!(err < 1e-12, "{name}: qoi {err:e}");
    }
}

fn vec_of_str(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_cnn_with_batch_norm_and_pooling_matches_deltavar() {
    check("cnn-bn-pool-1x8x8");
}

#[test]
fn a_rollout_of_five_steps_matches_deltavar() {
    check("rollout-4-16-4-tanh-k5");
}
