//! The command line on ONNX models (`--arch onnx:model.onnx --weights model.safetensors`), on
//! the fixtures of tests/data/graph: `fim` in shards and `merge`, `variance` under each Σ (the
//! values of the library's pipeline, which tests/graph_fixtures.rs checks against torch.func),
//! a rollout, token-id queries, a saved Fisher, and one clear error line for a folded export,
//! a hostile file and a missing option.

#![cfg(feature = "cli")]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltavar"))
}

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/graph")
        .join(name)
}

fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!("deltavar-cli-onnx-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `deltavar SUB --arch onnx:... --weights ... --train-x ... --train-y ... --likelihood ...`
fn with_model(sub: &str, name: &str) -> Command {
    let d = case(name);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("case.json")).unwrap()).unwrap();
    let mut c = bin();
    c.arg(sub)
        .arg("--arch")
        .arg(format!("onnx:{}", d.join("model.onnx").display()))
        .arg("--weights")
        .arg(d.join("model.safetensors"))
        .arg("--dtype")
        .arg("f64")
        .arg("--train-x")
        .arg(d.join("train_x.npy"))
        .arg("--train-y")
        .arg(d.join("train_y.npy"))
        .arg("--likelihood")
        .arg(meta["lik"].as_str().unwrap());
    c
}

fn variance(name: &str, sigma: &str, extra: &[&str]) -> Value {
    let d = case(name);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("case.json")).unwrap()).unwrap();
    let mut c = with_model("variance", name);
    c.arg("--queries").arg(d.join("queries.npy"));
    if !extra.contains(&"--qoi") {
        c.arg("--qoi").arg(meta["qoi"].as_str().unwrap());
    }
    run_ok(
        c.arg("--rollout")
            .arg(meta["rollout"].as_u64().unwrap().to_string())
            .arg("--damping")
            .arg(meta["damping"].as_f64().unwrap().to_string())
            .arg("--sigma")
            .arg(sigma)
            .args(extra)
            .arg("--json"),
    )
}

#[test]
fn variance_under_each_sigma_and_methods_that_agree() {
    for name in ["resblock", "gpt", "gnn"] {
        let dense = variance(name, "full-fim", &["--method", "dense"]);
        let want = vec_of(&dense["delta_variance"]);
        assert!(want.iter().all(|v| v.is_finite() && *v > 0.0), "{name}");
        for method in ["kernel", "cg", "auto"] {
            let out = variance(name, "full-fim", &["--method", method]);
            let err = max_rel_err(&vec_of(&out["delta_variance"]), &want);
            assert!(err <= 1e-8, "{name} {method}: {err:e}");
        }
        let n = dense["num_train"].as_u64().unwrap();
        let low = variance(name, &format!("lowrank:{n}"), &[]);
        let err = max_rel_err(&vec_of(&low["delta_variance"]), &want);
        assert!(err <= 1e-8, "{name} lowrank: {err:e}");
        for sigma in ["identity", "diag-fim", "kfac"] {
            let out = variance(name, sigma, &[]);
            let v = vec_of(&out["delta_variance"]);
            assert!(
                v.iter().all(|x| x.is_finite() && *x >= 0.0),
                "{name} {sigma}: {v:?}"
            );
            assert_eq!(v.len(), want.len());
        }
        let cov = variance(name, "diag-fim", &["--qoi", "outputs"]);
        assert!(cov["covariance"].as_array().unwrap().len() == want.len());
    }
}

#[test]
fn fisher_passes_in_shards_merge_and_serve_variance() {
    let t = tmp();
    let name = "resblock";
    let whole = t.join("whole.fim");
    run_ok(
        with_model("fim", name)
            .arg("--out")
            .arg(&whole)
            .arg("--json"),
    );
    let mut parts = vec![];
    for i in 0..3 {
        let p = t.join(format!("part{i}.fim"));
        run_ok(
            with_model("fim", name)
                .arg("--shard")
                .arg(format!("{i}/3"))
                .arg("--out")
                .arg(&p)
                .arg("--json"),
        );
        parts.push(p);
    }
    let merged = t.join("merged.fim");
    let m = run_ok(
        bin()
            .arg("merge")
            .args(&parts)
            .arg("--out")
            .arg(&merged)
            .arg("--json"),
    );
    assert_eq!(m["complete"], Value::Bool(true));
    // ΔVar from the saved pass equals ΔVar from the data (diagonal Σ)
    let d = case(name);
    let from_file = run_ok(
        bin()
            .arg("variance")
            .arg("--arch")
            .arg(format!("onnx:{}", d.join("model.onnx").display()))
            .arg("--weights")
            .arg(d.join("model.safetensors"))
            .arg("--dtype")
            .arg("f64")
            .arg("--fisher")
            .arg(&merged)
            .arg("--queries")
            .arg(d.join("queries.npy"))
            .arg("--qoi")
            .arg("prob:1")
            .arg("--sigma")
            .arg("diag-fim")
            .arg("--damping")
            .arg("0.001")
            .arg("--json"),
    );
    let from_data = variance(name, "diag-fim", &[]);
    let err = max_rel_err(
        &vec_of(&from_file["delta_variance"]),
        &vec_of(&from_data["delta_variance"]),
    );
    assert!(err <= 1e-12, "{err:e}");
}

/// `deltavar fim --arch ARCH [--weights W] --train-x DATA/train_x.npy --train-y DATA/train_y.npy`
/// with a categorical likelihood.
fn fim_cmd(arch: &str, weights: Option<PathBuf>, data: &std::path::Path) -> Command {
    let mut c = bin();
    c.arg("fim").arg("--arch").arg(arch);
    if let Some(w) = weights {
        c.arg("--weights").arg(w);
    }
    c.arg("--train-x")
        .arg(data.join("train_x.npy"))
        .arg("--train-y")
        .arg(data.join("train_y.npy"))
        .arg("--likelihood")
        .arg("categorical")
        .arg("--out")
        .arg(tmp().join("x.fim"));
    c
}

#[test]
fn one_clear_error_line() {
    let d = case("resblock");
    let onnx = |p: PathBuf| format!("onnx:{}", p.display());
    // the default export folded batch norm into the convolutions
    let e = run_err(&mut fim_cmd(
        &onnx(d.join("folded.onnx")),
        Some(d.join("model.safetensors")),
        &d,
    ));
    assert!(
        e.contains("bn0") && e.contains("export_torch.py --onnx"),
        "{e}"
    );
    // not an ONNX file
    let bad = tmp().join("bad.onnx");
    std::fs::write(&bad, b"\x08\x07garbage").unwrap();
    let e = run_err(&mut fim_cmd(&onnx(bad), None, &d));
    assert!(e.contains("bad.onnx"), "{e}");
    // data of another shape than the model takes
    let e = run_err(&mut fim_cmd(
        &onnx(d.join("model.onnx")),
        None,
        &case("gnn"),
    ));
    assert!(e.contains("[6, 1]"), "{e}");
    // a seq: architecture still needs --weights
    let e = run_err(&mut fim_cmd("seq:linear(4,2)", None, &d));
    assert!(e.contains("--weights"), "{e}");
}
