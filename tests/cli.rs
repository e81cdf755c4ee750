//! The `deltavar` command line, run as a built binary: parity with the reference package through
//! `variance --json`, Fisher passes in shards merged back, and one clear error line per bad input.

#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use deltavar::data::{write_npy, RowsRef};
use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltavar"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deltavar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn arch(case: &Case) -> String {
    let sizes: Vec<String> = case.meta["sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.to_string())
        .collect();
    format!(
        "mlp:{}:{}",
        sizes.join(","),
        case.meta["act"].as_str().unwrap()
    )
}

fn likelihood(case: &Case) -> String {
    match case.meta["lik"].as_str().unwrap() {
        "gaussian" => format!("gaussian:{}", case.meta["sigma"].as_f64().unwrap()),
        _ => "categorical".into(),
    }
}

fn variance(case: &Case, sigma: &str) -> Command {
    let d = &case.dir;
    let mut c = bin();
    c.args(["variance", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", &arch(case), "--queries"])
        .arg(d.join("queries.npy"));
    c.args([
        "--qoi",
        case.meta["qoi"].as_str().unwrap(),
        "--sigma",
        sigma,
    ]);
    c.args([
        "--damping",
        &case.damping().to_string(),
        "--dtype",
        "f64",
        "--json",
    ]);
    c
}

#[test]
fn parity_fixtures_through_the_cli() {
    for name in CASES {
        let case = Case::load(name);
        for (sigma, key) in [
            ("identity", "identity"),
            ("diag-fim", "diagonal_empirical_fim"),
            ("full-fim", "inverse_full_empirical_fim"),
        ] {
            let mut c = variance(&case, sigma);
            if sigma != "identity" {
                c.arg("--train-x").arg(case.dir.join("train_x.npy"));
                c.arg("--train-y").arg(case.dir.join("train_y.npy"));
                c.args(["--likelihood", &likelihood(&case)]);
            }
            let v = run_ok(&mut c);
            let err = max_rel_err(&vec_of(&v["delta_variance"]), &case.vec(key));
            eprintln!("PARITY cli {name} {sigma}: {err:.1e}");
            assert!(
                err < parity_tol(name, key, "direct"),
                "{name} {sigma}: {err:e}"
            );
            assert!(
                norm_rel_err(&vec_of(&v["qoi"]), &case.vec("qoi_value"))
                    < parity_tol(name, "qoi_value", "direct")
            );
            assert_eq!(
                v["num_params"].as_u64(),
                case.expected["num_params"].as_u64()
            );
            assert!(v["seconds"].as_f64().unwrap() >= 0.0);
            if sigma == "full-fim" {
                assert!(
                    v["method"].is_string() && v["method_reason"].is_string(),
                    "{v}"
                );
            }
        }
        // each full method by name
        for method in ["dense", "kernel", "kernel-cg", "cg"] {
            let mut c = variance(&case, "full-fim");
            c.arg("--train-x").arg(case.dir.join("train_x.npy"));
            c.arg("--train-y").arg(case.dir.join("train_y.npy"));
            c.args(["--likelihood", &likelihood(&case), "--method", method]);
            let v = run_ok(&mut c);
            assert_eq!(v["method"].as_str(), Some(method));
            let err = max_rel_err(
                &vec_of(&v["delta_variance"]),
                &case.vec("inverse_full_empirical_fim"),
            );
            eprintln!("PARITY cli {name} {method}: {err:.1e}");
            let m = match method {
                "dense" => "direct",
                // the kernel's Woodbury cancellation, whatever solves its system
                "kernel-cg" => "kernel",
                m => m,
            };
            assert!(
                err < parity_tol(name, "inverse_full_empirical_fim", m),
                "{name} {method}: {err:e}"
            );
        }
    }
}

fn fim(case: &Case, out: &Path, extra: &[&str]) -> Value {
    let d = &case.dir;
    let mut c = bin();
    c.args(["fim", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", &arch(case), "--train-x"])
        .arg(d.join("train_x.npy"));
    c.arg("--train-y").arg(d.join("train_y.npy"));
    c.args([
        "--likelihood",
        &likelihood(case),
        "--dtype",
        "f64",
        "--batch-size",
        "16",
        "--json",
        "--out",
    ])
    .arg(out);
    c.args(extra);
    run_ok(&mut c)
}

#[test]
fn sharded_fisher_passes_merge_to_the_one_pass_result() {
    let case = Case::load("cls-6-12-4-tanh");
    let whole = tmp("whole.safetensors");
    let v = fim(&case, &whole, &[]);
    assert_eq!(v["num_train"].as_u64(), Some(300));
    let shards: Vec<PathBuf> = (0..3)
        .map(|i| tmp(&format!("shard{i}.safetensors")))
        .collect();
    for (i, s) in shards.iter().enumerate() {
        fim(&case, s, &["--shard", &format!("{i}/3")]);
    }
    let merged = tmp("merged.safetensors");
    let mut c = bin();
    c.arg("merge")
        .args(&shards)
        .arg("--out")
        .arg(&merged)
        .arg("--json");
    let m = run_ok(&mut c);
    assert_eq!(m["num_train"].as_u64(), Some(300));
    assert_eq!(m["complete"].as_bool(), Some(true));
    let a = deltavar::FisherArtifact::load(&whole).unwrap();
    let b = deltavar::FisherArtifact::load(&merged).unwrap();
    assert!(max_rel_err(b.diag.sums(), a.diag.sums()) < 1e-13);
    assert_eq!(b.meta.num_examples, a.meta.num_examples);
    // the same shard twice is refused
    let mut c = bin();
    c.arg("merge")
        .arg(&shards[0])
        .arg(&shards[0])
        .arg("--out")
        .arg(tmp("twice.safetensors"));
    assert!(run_err(&mut c).contains("overlaps"));
    // variance from the saved pass equals variance from the data
    let mut c = variance(&case, "diag-fim");
    c.arg("--fisher").arg(&merged);
    let v = run_ok(&mut c);
    let err = max_rel_err(
        &vec_of(&v["delta_variance"]),
        &case.vec("diagonal_empirical_fim"),
    );
    assert!(
        err < parity_tol("cls-6-12-4-tanh", "diagonal_empirical_fim", "direct"),
        "{err:e}"
    );
    // a dense pass serves full-fim
    let dense = tmp("dense.safetensors");
    fim(&case, &dense, &["--kind", "dense"]);
    let mut c = variance(&case, "full-fim");
    c.arg("--fisher").arg(&dense);
    let v = run_ok(&mut c);
    assert!(
        max_rel_err(
            &vec_of(&v["delta_variance"]),
            &case.vec("inverse_full_empirical_fim")
        ) < parity_tol("cls-6-12-4-tanh", "inverse_full_empirical_fim", "direct")
    );
    // a diag pass cannot serve full-fim
    let mut c = variance(&case, "full-fim");
    c.arg("--fisher").arg(&whole);
    assert!(run_err(&mut c).contains("diagonal only"));
    // a Fisher file of other weights is refused
    let other = Case::load("tanh-4-16-16-3");
    let mut c = variance(&other, "diag-fim");
    c.arg("--fisher").arg(&whole);
    assert!(run_err(&mut c).contains("Fisher file"));
}

#[test]
fn bad_inputs_give_one_clear_error_line() {
    let case = Case::load("tanh-4-16-16-3");
    let d = &case.dir;
    // missing file
    let mut c = bin();
    c.args([
        "variance",
        "--weights",
        "/nonexistent/model.safetensors",
        "--arch",
        &arch(&case),
        "--queries",
    ]);
    c.arg(d.join("queries.npy"));
    assert!(run_err(&mut c).contains("/nonexistent/model.safetensors"));
    let mut c = bin();
    c.args(["variance", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", &arch(&case), "--queries", "/nonexistent/q.npy"]);
    assert!(run_err(&mut c).contains("/nonexistent/q.npy"));
    // wrong arch for the weights
    let mut c = bin();
    c.args(["variance", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", "mlp:4,8,3:tanh", "--queries"])
        .arg(d.join("queries.npy"));
    let e = run_err(&mut c);
    assert!(e.contains("--arch") && e.contains("[4, 16, 16, 3]"), "{e}");
    // a bad arch string
    let mut c = bin();
    c.args(["variance", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", "cnn:4,3", "--queries"])
        .arg(d.join("queries.npy"));
    assert!(run_err(&mut c).contains("mlp:IN"));
    // wrong query width
    let q = tmp("q3.npy");
    write_npy(&q, &[2, 3], RowsRef::F32(&[0.0; 6])).unwrap();
    let mut c = bin();
    c.args(["variance", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", &arch(&case), "--queries"]).arg(&q);
    let e = run_err(&mut c);
    assert!(e.contains("(M, 4)") && e.contains("q3.npy"), "{e}");
    // non-finite values in the training data
    let x = tmp("xnan.npy");
    let mut xv = vec![0.5f32; 200 * 4];
    xv[37 * 4 + 2] = f32::INFINITY;
    write_npy(&x, &[200, 4], RowsRef::F32(&xv)).unwrap();
    let mut c = variance(&case, "diag-fim");
    c.arg("--train-x")
        .arg(&x)
        .arg("--train-y")
        .arg(d.join("train_y.npy"));
    c.args(["--likelihood", &likelihood(&case)]);
    let e = run_err(&mut c);
    assert!(e.contains("row 37") && e.contains("inf"), "{e}");
    // FIM strategy without data
    let mut c = variance(&case, "diag-fim");
    assert!(run_err(&mut c).contains("training data"));
    // bad QoI and likelihood strings
    let mut c = bin();
    c.args(["variance", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", &arch(&case), "--qoi", "max", "--queries"])
        .arg(d.join("queries.npy"));
    assert!(run_err(&mut c).contains("output:K"));
    let mut c = variance(&case, "diag-fim");
    c.arg("--train-x")
        .arg(d.join("train_x.npy"))
        .arg("--train-y")
        .arg(d.join("train_y.npy"));
    c.args(["--likelihood", "poisson"]);
    assert!(run_err(&mut c).contains("categorical"));
    // a bad shard
    let mut c = bin();
    c.args(["fim", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", &arch(&case), "--train-x"])
        .arg(d.join("train_x.npy"));
    c.arg("--train-y").arg(d.join("train_y.npy"));
    c.args(["--likelihood", "gaussian", "--shard", "3/3", "--out"])
        .arg(tmp("bad.safetensors"));
    assert!(run_err(&mut c).contains("I/N"));
    // text output without --json is a table
    let mut c = bin();
    c.args(["variance", "--weights"])
        .arg(d.join("model.safetensors"));
    c.args(["--arch", &arch(&case), "--queries"])
        .arg(d.join("queries.npy"))
        .args(["--sigma", "identity"]);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("delta_var") && text.lines().count() == 2 + 8,
        "{text}"
    );
}

/// Issue 8, defect 3: `variance --fisher` refuses one shard of three (naming the missing
/// examples) unless `--allow-partial`, which prints one warning line with the fraction covered.
#[test]
fn a_partial_fisher_file_is_refused_unless_allowed() {
    let case = Case::load("cls-6-12-4-tanh");
    let shard = tmp("partial-shard1.safetensors");
    fim(&case, &shard, &["--shard", "1/3"]);
    let mut c = variance(&case, "diag-fim");
    c.arg("--fisher").arg(&shard);
    let e = run_err(&mut c);
    assert!(
        e.contains("100 of 300") && e.contains("0..100") && e.contains("200..300"),
        "{e}"
    );
    assert!(
        e.contains("partial-shard1.safetensors"),
        "the error names the file: {e}"
    );
    let mut c = variance(&case, "diag-fim");
    c.arg("--fisher").arg(&shard).arg("--allow-partial");
    let out = c.output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("warning") && err.contains("33.3%") && err.contains("partial-shard1"),
        "{err}"
    );
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["num_train"].as_u64(), Some(100));
}

/// Issue 8, defect 2: with `--posterior-scale` the CG report still reaches the JSON, and the
/// values are the unscaled ones divided by N.
/// Issue 21: an iterative solve shows how far it got on stderr, one plain line per stage and
/// per iteration when stderr is not a terminal (a batch job's log); `--quiet` silences it; the
/// JSON carries the solve's report.
#[test]
fn the_kernel_cg_solve_reports_its_progress() {
    let case = Case::load("tanh-4-16-16-3");
    let cmd = |quiet: bool| {
        let mut c = variance(&case, "full-fim");
        c.arg("--train-x").arg(case.dir.join("train_x.npy"));
        c.arg("--train-y").arg(case.dir.join("train_y.npy"));
        c.args(["--likelihood", &likelihood(&case), "--method", "kernel-cg"]);
        if quiet {
            c.arg("--quiet");
        }
        c.output().unwrap()
    };
    let out = cmd(false);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("deltavar: kernel-cg: Gram matrix"), "{err}");
    assert!(err.contains("preconditioner of rank"), "{err}");
    assert!(err.contains("deltavar: cg iteration 1:"), "{err}");
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["method"].as_str(), Some("kernel-cg"));
    assert!(v["cg"]["converged"].as_bool().unwrap(), "{v}");
    assert!(
        v["cg"]["preconditioner"]
            .as_str()
            .unwrap()
            .contains("pivoted cholesky"),
        "{v}"
    );
    let quiet = cmd(true);
    assert!(quiet.status.success());
    assert!(
        quiet.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&quiet.stderr)
    );
    assert!(!quiet.stdout.is_empty());
}

#[test]
fn posterior_scale_keeps_the_cg_report() {
    let case = Case::load("tanh-4-16-16-3");
    let run = |scale: bool| {
        let mut c = variance(&case, "full-fim");
        c.arg("--train-x").arg(case.dir.join("train_x.npy"));
        c.arg("--train-y").arg(case.dir.join("train_y.npy"));
        c.args(["--likelihood", &likelihood(&case), "--method", "cg"]);
        if scale {
            c.arg("--posterior-scale");
        }
        run_ok(&mut c)
    };
    let (plain, scaled) = (run(false), run(true));
    assert!(scaled["cg"]["converged"].as_bool().unwrap(), "{scaled}");
    assert!(scaled["cg"]["iterations"].as_u64().unwrap() > 0);
    let n = scaled["num_train"].as_f64().unwrap();
    let want: Vec<f64> = vec_of(&plain["delta_variance"])
        .iter()
        .map(|v| v / n)
        .collect();
    assert!(max_rel_err(&vec_of(&scaled["delta_variance"]), &want) < 1e-12);
}

/// Issue 11: `--sigma lowrank:K` through the binary. With K ≥ N = rank F and no diagonal it is
/// the exact inverse (the fixture's full-inverse values); with the diagonal and a small K it
/// reports its eigenpairs and residuals.
#[test]
fn lowrank_sigma_through_the_cli() {
    let case = Case::load("tanh-4-16-16-3");
    let run = |sigma: &str| {
        let mut c = variance(&case, sigma);
        c.arg("--train-x").arg(case.dir.join("train_x.npy"));
        c.arg("--train-y").arg(case.dir.join("train_y.npy"));
        c.args(["--likelihood", &likelihood(&case)]);
        run_ok(&mut c)
    };
    let v = run("lowrank:1000:nodiag");
    assert_eq!(v["sigma"].as_str(), Some("lowrank_empirical_fim"));
    let err = max_rel_err(
        &vec_of(&v["delta_variance"]),
        &case.vec("inverse_full_empirical_fim"),
    );
    assert!(
        err < parity_tol("tanh-4-16-16-3", "inverse_full_empirical_fim", "kernel"),
        "{err:e}"
    );
    let v = run("lowrank:8");
    let r = &v["lowrank"];
    assert_eq!(r["rank"].as_u64(), Some(8), "{v}");
    assert_eq!(r["diagonal"].as_bool(), Some(true));
    let ev = vec_of(&r["eigenvalues"]);
    assert!(ev.windows(2).all(|w| w[0] >= w[1]) && ev[7] > 0.0, "{ev:?}");
    assert!(vec_of(&r["relative_residuals"]).iter().all(|x| *x < 1e-8));
    let e = run_err(
        variance(&case, "lowrank:0")
            .arg("--train-x")
            .arg(case.dir.join("train_x.npy"))
            .arg("--train-y")
            .arg(case.dir.join("train_y.npy"))
            .args(["--likelihood", &likelihood(&case)]),
    );
    assert!(e.contains("K ≥ 1"), "{e}");
}

/// A NaN weight is an error naming the file and the tensor, for an `mlp:` and for a `seq:`
/// model alike.
#[test]
fn a_nan_weight_names_its_file_and_tensor() {
    let dev = candle_core::Device::Cpu;
    let mut w = std::collections::HashMap::new();
    w.insert(
        "0.weight".to_string(),
        candle_core::Tensor::ones((3, 2), candle_core::DType::F32, &dev).unwrap(),
    );
    w.insert(
        "0.bias".to_string(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap(),
    );
    w.insert(
        "2.weight".to_string(),
        candle_core::Tensor::new(&[[1.0f32, f32::NAN, 1.0]], &dev).unwrap(),
    );
    w.insert(
        "2.bias".to_string(),
        candle_core::Tensor::zeros(1, candle_core::DType::F32, &dev).unwrap(),
    );
    let weights = tmp("nan-weight.safetensors");
    candle_core::safetensors::save(&w, &weights).unwrap();
    let queries = tmp("nan-weight-queries.npy");
    deltavar::data::write_npy(&queries, &[2, 2], deltavar::data::RowsRef::F32(&[0.0; 4])).unwrap();
    for arch in ["mlp:2,3,1:tanh", "seq:linear(2,3),tanh,linear(3,1)"] {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"));
        c.args(["variance", "--arch", arch, "--weights"])
            .arg(&weights);
        c.arg("--queries")
            .arg(&queries)
            .args(["--sigma", "identity"]);
        let e = run_err(&mut c);
        assert!(
            e.contains("'2.weight'")
                && e.contains("nan-weight.safetensors")
                && e.contains("element 1"),
            "{arch}: {e}"
        );
    }
}
