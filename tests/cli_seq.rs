//! The command line on `seq:` architectures (an nn.Sequential CNN from safetensors + N-d .npy,
//! rollouts of a step network): values against the library's generic path in f64, offline passes
//! in shards, and one clear error line per mismatch.

#![cfg(feature = "cli")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;
use deltavar::data::{write_npy, RowsRef};
use deltavar::model::{SeqSpec, Sequential};
use deltavar::*;
use serde_json::Value;

const CNN: &str = "seq:conv2d(1,4,3,padding=1),batchnorm2d(4),relu,maxpool2d(2),\
conv2d(4,6,3,stride=2),tanh,flatten,dropout,linear(6,3)";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltavar"))
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("deltavar-cli-seq-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A state dict for `spec` with PyTorch's names (BatchNorm statistics included).
fn state_dict(spec: &SeqSpec, seed: u64) -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    for (i, l) in spec.layers.iter().enumerate() {
        for (k, (part, shape)) in l
            .param_shapes()
            .into_iter()
            .chain(l.buffer_shapes())
            .enumerate()
        {
            let n: usize = shape.iter().product();
            let mut v = pseudo_random(n, seed + 10 * i as u64 + k as u64);
            if part == "running_var" {
                v.iter_mut().for_each(|x| *x = 0.5 + x.abs());
            }
            if part == "weight" {
                v.iter_mut().for_each(|x| *x *= 0.8);
            }
            t.insert(
                format!("{i}.{part}"),
                Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
            );
        }
    }
    for (i, l) in spec.layers.iter().enumerate() {
        if !l.buffer_shapes().is_empty() {
            t.insert(
                format!("{i}.num_batches_tracked"),
                Tensor::new(&[7i64], &Device::Cpu)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
    }
    t
}

fn save_npy(path: &Path, shape: &[usize], v: &[f64]) {
    write_npy(path, shape, RowsRef::F64(v)).unwrap();
}

struct Cnn {
    d: PathBuf,
    model: Sequential,
    data: TensorDataset,
    q: Tensor,
}

/// The CNN case written into its own folder per test (tests run in parallel threads).
fn cnn(test: &str) -> Cnn {
    let d = dir().join(test);
    std::fs::create_dir_all(&d).unwrap();
    let spec: SeqSpec = CNN.parse().unwrap();
    let sd = state_dict(&spec, 40);
    let f32s: HashMap<String, Tensor> = sd
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.to_dtype(if v.dtype() == DType::I64 {
                    DType::I64
                } else {
                    DType::F32
                })
                .unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&sd, d.join("model.safetensors")).unwrap();
    candle_core::safetensors::save(&f32s, d.join("model32.safetensors")).unwrap();
    let n = 30;
    let x = pseudo_random(n * 64, 1);
    save_npy(&d.join("x.npy"), &[n, 1, 8, 8], &x);
    let labels: Vec<i64> = (0..n).map(|i| ((i * 7) % 3) as i64).collect();
    write_npy(d.join("y.npy"), &[n], RowsRef::I64(&labels)).unwrap();
    let q = pseudo_random(5 * 64, 2);
    save_npy(&d.join("q.npy"), &[5, 1, 8, 8], &q);
    let model = Sequential::from_tensors(spec, &[1, 8, 8], &sd, "", DType::F64, "sd").unwrap();
    let xt = Tensor::from_vec(x, (n, 1, 8, 8), &Device::Cpu).unwrap();
    let yt = Tensor::from_vec(labels, n, &Device::Cpu).unwrap();
    Cnn {
        d,
        model,
        data: TensorDataset::new(xt, yt).unwrap(),
        q: Tensor::from_vec(q, (5, 1, 8, 8), &Device::Cpu).unwrap(),
    }
}

fn variance(c: &Cnn, sigma: &str, extra: &[&str]) -> Command {
    variance_of(c, CNN, "q.npy", sigma, extra)
}

fn variance_of(c: &Cnn, arch: &str, queries: &str, sigma: &str, extra: &[&str]) -> Command {
    let mut cmd = bin();
    cmd.args(["variance", "--weights"])
        .arg(c.d.join("model.safetensors"))
        .args(["--arch", arch, "--queries"])
        .arg(c.d.join(queries))
        .args(["--qoi", "prob:1", "--sigma", sigma, "--damping", "1e-3"])
        .args(["--dtype", "f64", "--batch-size", "7", "--json"])
        .args(extra);
    cmd
}

fn with_data(cmd: &mut Command, c: &Cnn) {
    cmd.arg("--train-x")
        .arg(c.d.join("x.npy"))
        .arg("--train-y")
        .arg(c.d.join("y.npy"))
        .args(["--likelihood", "categorical"]);
}

/// The library's generic path (one candle backward per example): ΔVar under `strategy`.
fn reference(c: &Cnn, strategy: SigmaStrategy, method: FullMethod) -> Vec<f64> {
    let params = c.model.params().unwrap();
    let lik = Likelihood::Categorical;
    let fisher = GenericFisher::new(
        &params,
        lik.of(&c.model),
        &c.data,
        GenericOptions::default(),
    );
    let (qg, _) = qoi_gradients(
        &params,
        &c.q,
        Qoi::Prob(1).of(&c.model),
        &GenericOptions::default(),
    )
    .unwrap();
    let o = SigmaOptions {
        damping: 1e-3,
        full_method: method,
        ..Default::default()
    };
    let sigma = build_sigma(strategy, params.num_params(), &o, Some(&fisher)).unwrap();
    let v = sigma.quad_forms(qg.as_ref()).unwrap();
    v
}

#[test]
fn a_cnn_from_safetensors_matches_the_generic_path() {
    let c = cnn("cnn-generic");
    for (sigma, method, strategy, m) in [
        (
            "diag-fim",
            "auto",
            SigmaStrategy::DiagonalEmpiricalFim,
            FullMethod::Auto,
        ),
        (
            "full-fim",
            "kernel",
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Kernel,
        ),
        (
            "full-fim",
            "dense",
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Dense,
        ),
        (
            "full-fim",
            "cg",
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Cg,
        ),
    ] {
        let mut cmd = variance(&c, sigma, &["--method", method]);
        with_data(&mut cmd, &c);
        let v = run_ok(&mut cmd);
        let got = vec_of(&v["delta_variance"]);
        let want = reference(&c, strategy, m);
        let err = max_rel_err(&got, &want);
        assert!(err < 1e-9, "{sigma} {method}: {err:e}");
        assert_eq!(v["num_params"].as_u64(), Some(c.model.num_params() as u64));
    }
    // identity needs no data
    let v = run_ok(&mut variance(&c, "identity", &[]));
    let want = reference(&c, SigmaStrategy::Identity, FullMethod::Auto);
    assert!(max_rel_err(&vec_of(&v["delta_variance"]), &want) < 1e-10);
    // f32 weights in the file, f32 run: close to the f64 answer
    let mut cmd = bin();
    cmd.args(["variance", "--weights"])
        .arg(c.d.join("model32.safetensors"))
        .args(["--arch", CNN, "--queries"])
        .arg(c.d.join("q.npy"))
        .args([
            "--qoi",
            "prob:1",
            "--sigma",
            "diag-fim",
            "--damping",
            "1e-3",
            "--json",
        ]);
    with_data(&mut cmd, &c);
    let v = run_ok(&mut cmd);
    let want = reference(&c, SigmaStrategy::DiagonalEmpiricalFim, FullMethod::Auto);
    assert!(max_rel_err(&vec_of(&v["delta_variance"]), &want) < 1e-3);
}

#[test]
fn offline_passes_of_a_cnn_shard_and_merge() {
    let c = cnn("cnn-offline");
    let fim = |out: &Path, extra: &[&str]| {
        let mut cmd = bin();
        cmd.args(["fim", "--weights"])
            .arg(c.d.join("model.safetensors"))
            .args(["--arch", CNN, "--train-x"])
            .arg(c.d.join("x.npy"))
            .arg("--train-y")
            .arg(c.d.join("y.npy"))
            .args([
                "--likelihood",
                "categorical",
                "--dtype",
                "f64",
                "--json",
                "--out",
            ])
            .arg(out)
            .args(extra);
        run_ok(&mut cmd)
    };
    let whole = c.d.join("whole.safetensors");
    let v = fim(&whole, &[]);
    assert_eq!(v["num_params"].as_u64(), Some(c.model.num_params() as u64));
    let shards: Vec<PathBuf> = (0..2)
        .map(|i| c.d.join(format!("s{i}.safetensors")))
        .collect();
    for (i, s) in shards.iter().enumerate() {
        fim(s, &["--shard", &format!("{i}/2")]);
    }
    let merged = c.d.join("merged.safetensors");
    run_ok(
        bin()
            .arg("merge")
            .args(&shards)
            .arg("--out")
            .arg(&merged)
            .arg("--json"),
    );
    let a = FisherArtifact::load(&whole).unwrap();
    let b = FisherArtifact::load(&merged).unwrap();
    assert!(max_rel_err(b.diag.sums(), a.diag.sums()) < 1e-13);
    let params = c.model.params().unwrap();
    let g = GenericFisher::new(
        &params,
        Likelihood::Categorical.of(&c.model),
        &c.data,
        GenericOptions::default(),
    );
    assert!(max_rel_err(a.diag.sums(), g.fisher_diag().unwrap().sums()) < 1e-10);
    // variance from the merged pass equals variance from the data
    let from_file = run_ok(variance(&c, "diag-fim", &[]).arg("--fisher").arg(&merged));
    let mut cmd = variance(&c, "diag-fim", &[]);
    with_data(&mut cmd, &c);
    let from_data = run_ok(&mut cmd);
    assert!(
        max_rel_err(
            &vec_of(&from_file["delta_variance"]),
            &vec_of(&from_data["delta_variance"])
        ) < 1e-13
    );
    // a dense pass serves full-fim
    let dense = c.d.join("dense.safetensors");
    fim(&dense, &["--kind", "dense"]);
    let v = run_ok(variance(&c, "full-fim", &[]).arg("--fisher").arg(&dense));
    let want = reference(
        &c,
        SigmaStrategy::InverseFullEmpiricalFim,
        FullMethod::Dense,
    );
    assert!(max_rel_err(&vec_of(&v["delta_variance"]), &want) < 1e-9);
}

#[test]
fn every_mismatch_is_one_clear_line() {
    let c = cnn("cnn-mismatch");
    let d = &c.d;
    // a layer's shape against the file: the tensor and both shapes
    let wrong = CNN.replace("linear(6,3)", "linear(6,4)");
    let e = run_err(
        bin()
            .args(["fim", "--weights"])
            .arg(d.join("model.safetensors"))
            .args(["--arch", &wrong, "--train-x"])
            .arg(d.join("x.npy"))
            .arg("--train-y")
            .arg(d.join("y.npy"))
            .args(["--likelihood", "categorical", "--out"])
            .arg(d.join("never.safetensors")),
    );
    assert!(
        e.contains("'8.weight'") && e.contains("[3, 6]") && e.contains("[4, 6]"),
        "{e}"
    );
    // an unknown layer or keyword
    let e = run_err(&mut variance_of(
        &c,
        "seq:conv2d(1,4,3,pad=1)",
        "q.npy",
        "identity",
        &[],
    ));
    assert!(e.contains("unknown keyword 'pad'"), "{e}");
    let e = run_err(&mut variance_of(
        &c,
        "seq:conv9d(1,4,3)",
        "q.npy",
        "identity",
        &[],
    ));
    assert!(e.contains("unknown layer 'conv9d'"), "{e}");
    // an input shape the network cannot take: the module where it breaks
    save_npy(&d.join("q9.npy"), &[2, 1, 10, 10], &pseudo_random(200, 3));
    let e = run_err(&mut variance_of(&c, CNN, "q9.npy", "identity", &[]));
    assert!(
        e.contains("module 8 (linear(6,3))") && e.contains("[24]"),
        "{e}"
    );
    // tensors in the file that no module uses
    let fewer =
        "seq:conv2d(1,4,3,padding=1),batchnorm2d(4),relu,maxpool2d(2),conv2d(4,6,3,stride=2)";
    let e = run_err(&mut variance_of(&c, fewer, "q.npy", "identity", &[]));
    assert!(
        e.contains("\"8.weight\"") && e.contains("used by no module"),
        "{e}"
    );
    // training inputs of another shape than the queries
    save_npy(
        &d.join("x9.npy"),
        &[30, 1, 9, 8],
        &pseudo_random(30 * 72, 4),
    );
    let mut cmd = variance(&c, "diag-fim", &[]);
    cmd.arg("--train-x")
        .arg(d.join("x9.npy"))
        .arg("--train-y")
        .arg(d.join("y.npy"))
        .args(["--likelihood", "categorical"]);
    let e = run_err(&mut cmd);
    assert!(e.contains("[1, 9, 8]") && e.contains("[1, 8, 8]"), "{e}");
}

#[test]
fn rollouts_of_a_step_network_through_the_cli() {
    let d = dir().join("roll");
    std::fs::create_dir_all(&d).unwrap();
    let arch = "seq:linear(3,8),tanh,linear(8,3)";
    let spec: SeqSpec = arch.parse().unwrap();
    let sd = state_dict(&spec, 70);
    candle_core::safetensors::save(&sd, d.join("step.safetensors")).unwrap();
    let n = 40;
    let s = pseudo_random(n * 3, 5);
    let s1: Vec<f64> = pseudo_random(n * 3, 6);
    save_npy(&d.join("s.npy"), &[n, 3], &s);
    save_npy(&d.join("s1.npy"), &[n, 3], &s1);
    let z = pseudo_random(4 * 3, 7);
    save_npy(&d.join("z.npy"), &[4, 3], &z);
    let model = Sequential::from_tensors(spec, &[3], &sd, "", DType::F64, "sd").unwrap();
    let params = model.params().unwrap();
    let data = TensorDataset::new(
        Tensor::from_vec(s, (n, 3), &Device::Cpu).unwrap(),
        Tensor::from_vec(s1, (n, 3), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let zt = Tensor::from_vec(z, (4, 3), &Device::Cpu).unwrap();
    let lik = Likelihood::gaussian(0.2);
    let fisher = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    for k in [1usize, 4] {
        let roll = model.rollout(k).unwrap();
        let (qg, qv) = qoi_gradients(
            &params,
            &zt,
            Qoi::Output(1).of(&roll),
            &GenericOptions::default(),
        )
        .unwrap();
        for (sigma, strategy) in [
            ("diag-fim", SigmaStrategy::DiagonalEmpiricalFim),
            ("full-fim", SigmaStrategy::InverseFullEmpiricalFim),
        ] {
            let o = SigmaOptions {
                damping: 1e-3,
                ..Default::default()
            };
            let want = build_sigma(strategy, params.num_params(), &o, Some(&fisher))
                .unwrap()
                .quad_forms(qg.as_ref())
                .unwrap();
            for a in [arch, "mlp:3,8,3:tanh"] {
                let mut cmd = bin();
                cmd.args(["variance", "--weights"])
                    .arg(d.join("step.safetensors"))
                    .args(["--arch", a, "--queries"])
                    .arg(d.join("z.npy"))
                    .args(["--qoi", "output:1", "--sigma", sigma, "--damping", "1e-3"])
                    .args(["--dtype", "f64", "--json", "--rollout", &k.to_string()])
                    .arg("--train-x")
                    .arg(d.join("s.npy"))
                    .arg("--train-y")
                    .arg(d.join("s1.npy"))
                    .args(["--likelihood", "gaussian:0.2"]);
                let v = run_ok(&mut cmd);
                let err = max_rel_err(&vec_of(&v["delta_variance"]), &want);
                assert!(err < 1e-9, "K = {k}, {sigma}, {a}: {err:e}");
                assert!(max_rel_err(&vec_of(&v["qoi"]), &qv) < 1e-12);
                assert_eq!(v["rollout"].as_u64(), Some(k as u64));
            }
        }
    }
    // a network whose output is not its input cannot be rolled out
    let mut cmd = bin();
    cmd.args(["variance", "--weights"])
        .arg(d.join("step.safetensors"))
        .args(["--arch", "seq:linear(3,8),tanh", "--queries"])
        .arg(d.join("z.npy"))
        .args(["--sigma", "identity", "--rollout", "3"]);
    let e = run_err(&mut cmd);
    assert!(e.contains("2.weight") || e.contains("rolled-out"), "{e}");
}

/// `variance --rollout 5` on the fixture deltavar 0.1.1 computed with a QoI functional that loops
/// the step network five times (tests/data/seq, scripts/make_seq_fixtures.py).
#[test]
fn rollout_fixture_from_deltavar_through_the_cli() {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/seq/rollout-4-16-4-tanh-k5");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
    for (sigma, key, tol) in [
        ("identity", "identity", 1e-12),
        ("diag-fim", "diagonal_empirical_fim", 1e-12),
        ("full-fim", "inverse_full_empirical_fim", 5e-6),
    ] {
        let mut cmd = bin();
        cmd.args(["variance", "--weights"])
            .arg(d.join("model.safetensors"))
            .args(["--arch", "seq:linear(4,16),tanh,linear(16,4)", "--queries"])
            .arg(d.join("queries.npy"))
            .args(["--qoi", "output:1", "--sigma", sigma, "--damping", "1e-3"])
            .args(["--dtype", "f64", "--json", "--rollout", "5"])
            .arg("--train-x")
            .arg(d.join("train_x.npy"))
            .arg("--train-y")
            .arg(d.join("train_y.npy"))
            .args(["--likelihood", "gaussian:0.5"]);
        let v = run_ok(&mut cmd);
        let err = max_rel_err(&vec_of(&v["delta_variance"]), &vec_of(&expected[key]));
        assert!(err < tol, "{sigma}: {err:e}");
        assert!(max_rel_err(&vec_of(&v["qoi"]), &vec_of(&expected["qoi_value"])) < 1e-12);
    }
}
