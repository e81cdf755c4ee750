//! Learned Σ scales: the fit against exact recovery, the one-scale α, β fit of `metrics`, the
//! optimality (KKT) conditions checked by finite differences, recovery of known scales from
//! simulated errors, the per-group delta variances against Σ's diagonal blocks, and the file
//! round trip with hostile files.

mod common;

use common::*;
use deltavar::calibration::*;
use deltavar::sigma::*;
use faer::Mat;

/// Standard normal deviates (Box–Muller over `pseudo_random`).
fn normals(n: usize, seed: u64) -> Vec<f64> {
    let u = pseudo_random(2 * n, seed);
    (0..n)
        .map(|i| {
            let a = (u[2 * i].abs() % 1.0).max(1e-12);
            let b = u[2 * i + 1].abs() % 1.0;
            (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
        })
        .collect()
}

fn nll(e: &[f64], rows: &[Vec<f64>], s: &[f64], beta: f64) -> f64 {
    let m = e.len() as f64;
    e.iter()
        .zip(rows)
        .map(|(e, r)| {
            let v: f64 = r.iter().zip(s).map(|(a, b)| a * b).sum::<f64>() + beta;
            0.5 * (2.0 * std::f64::consts::PI * v).ln() + e * e / (2.0 * v)
        })
        .sum::<f64>()
        / m
}

/// L×L diagonal blocks (a block-diagonal Σ) from rows of per-group ΔVar.
fn diag_blocks(rows: &[Vec<f64>]) -> Vec<Vec<f64>> {
    rows.iter()
        .map(|r| {
            let l = r.len();
            (0..l * l)
                .map(|i| if i / l == i % l { r[i / l] } else { 0.0 })
                .collect()
        })
        .collect()
}

fn groups(l: usize) -> Vec<ParamGroup> {
    let names: Vec<(String, usize)> = (0..l).map(|i| (format!("{i}.weight"), 2)).collect();
    layer_groups(&names)
}

#[test]
fn exact_recovery_when_the_errors_follow_one_group() {
    let rows: Vec<Vec<f64>> = (0..400)
        .map(|i| vec![0.1 + (i % 7) as f64, (i % 5) as f64])
        .collect();
    let e: Vec<f64> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (4.0 * r[0]).sqrt() * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let blocks = diag_blocks(&rows);
    let c = fit_calibration(
        &e,
        &blocks,
        &groups(2),
        "diag",
        &CalibrationOptions::default(),
    )
    .unwrap();
    assert!(c.converged);
    assert!((c.scales[0] - 4.0).abs() < 1e-9, "{c:?}");
    // s = u²: a scale heading to the bound converges like u, so s to about 1e-8
    assert!(c.scales[1] < 1e-6 && c.beta < 1e-6, "{c:?}");
    // the pointwise minimum of the NLL: v = e²
    let want = e
        .iter()
        .map(|e| 0.5 * (2.0 * std::f64::consts::PI * e * e).ln() + 0.5)
        .sum::<f64>()
        / 400.0;
    assert!((c.nll - want).abs() < 1e-9, "{} {want}", c.nll);
    assert!((calibrated_nll(&e, &blocks, &c).unwrap() - c.nll).abs() < 1e-9);
}

#[test]
fn one_group_is_the_alpha_beta_fit_of_metrics() {
    for seed in [1u64, 2, 3] {
        let m = 300;
        let v: Vec<f64> = pseudo_random(m, seed).iter().map(|x| x * x * 3.0).collect();
        let z = normals(m, seed + 10);
        let e: Vec<f64> = v
            .iter()
            .zip(&z)
            .map(|(v, z)| (0.7 * v + 0.2).sqrt() * z)
            .collect();
        let rows: Vec<Vec<f64>> = v.iter().map(|x| vec![*x]).collect(); // 1×1 blocks
        let c =
            fit_calibration(&e, &rows, &groups(1), "s", &CalibrationOptions::default()).unwrap();
        let mm = deltavar::metrics::uncertainty_metrics(&e, &v).unwrap();
        assert!(c.converged);
        assert!(
            (c.scales[0] - mm.alpha).abs() < 1e-6 * mm.alpha.max(1e-3),
            "seed {seed}: {} vs {}",
            c.scales[0],
            mm.alpha
        );
        assert!(
            (c.beta - mm.beta).abs() < 1e-6 * mm.beta.max(1e-3),
            "{} vs {}",
            c.beta,
            mm.beta
        );
        assert!((c.nll - mm.nll).abs() < 1e-10, "{} vs {}", c.nll, mm.nll);
    }
}

#[test]
fn the_fit_satisfies_the_kkt_conditions_and_recovers_known_scales() {
    // three groups with very different magnitudes; the truth: s = (2, 0.5e6, 0), β = 0.1
    let m = 20_000;
    let u = pseudo_random(3 * m, 77);
    let rows: Vec<Vec<f64>> = (0..m)
        .map(|i| {
            vec![
                u[3 * i] * u[3 * i] * 2.0,
                u[3 * i + 1] * u[3 * i + 1] * 1e-6,
                u[3 * i + 2].abs(),
            ]
        })
        .collect();
    let truth = [2.0, 0.5e6, 0.0];
    let z = normals(m, 78);
    let e: Vec<f64> = rows
        .iter()
        .zip(&z)
        .map(|(r, z)| {
            let v: f64 = r.iter().zip(&truth).map(|(a, b)| a * b).sum::<f64>() + 0.1;
            v.sqrt() * z
        })
        .collect();
    let c = fit_calibration(
        &e,
        &diag_blocks(&rows),
        &groups(3),
        "s",
        &CalibrationOptions::default(),
    )
    .unwrap();
    assert!(c.converged, "{c:?}");
    assert!((c.scales[0] / 2.0 - 1.0).abs() < 0.1, "{c:?}");
    assert!((c.scales[1] / 0.5e6 - 1.0).abs() < 0.1, "{c:?}");
    assert!(c.scales[2] < 0.05, "{c:?}");
    assert!((c.beta / 0.1 - 1.0).abs() < 0.3, "{c:?}");
    // KKT by central/forward differences of the NLL in each coordinate
    let mut th: Vec<f64> = c.scales.clone();
    th.push(c.beta);
    let f0 = nll(&e, &rows, &c.scales, c.beta);
    assert!((f0 - c.nll).abs() < 1e-10);
    for j in 0..4 {
        let h =
            1e-5 * th.iter().cloned().fold(0.0, f64::max).max(1.0) * if j == 1 { 1e6 } else { 1.0 };
        let at = |x: f64| {
            let mut t = th.clone();
            t[j] = x;
            nll(&e, &rows, &t[..3], t[3])
        };
        if th[j] > 2.0 * h {
            let d = (at(th[j] + h) - at(th[j] - h)) / (2.0 * h);
            assert!(d.abs() * th[j] < 1e-6, "coordinate {j}: derivative {d:e}");
        } else {
            let d = (at(th[j] + h) - at(th[j])) / h;
            assert!(d > -1e-6, "coordinate {j} at the bound: derivative {d:e}");
        }
    }
    // no feasible perturbation lowers the NLL
    let p = pseudo_random(400, 5);
    for k in 0..100 {
        let t: Vec<f64> = (0..4)
            .map(|j| (th[j] * (1.0 + 1e-3 * p[4 * k + j]) + 1e-6 * p[4 * k + j].abs()).max(0.0))
            .collect();
        assert!(nll(&e, &rows, &t[..3], t[3]) >= f0 - 1e-12);
    }
}

#[test]
fn group_delta_variances_are_the_diagonal_blocks_of_sigma() {
    let p = 7;
    let g = Mat::from_fn(p, 4, |i, j| {
        ((i * 3 + j * 5) % 7) as f64 - 3.0 + 0.1 * j as f64
    });
    let gr = layer_groups(&[("a.weight", 3), ("a.bias", 1), ("b.weight", 2), ("c", 1)]);
    assert_eq!(gr.len(), 3);
    assert_eq!(
        (gr[0].len, gr[1].offset, gr[1].len, gr[2].offset),
        (4, 4, 2, 6)
    );
    // a diagonal Σ: diagonal blocks that add up to ΔVar
    let d = DiagonalSigma::new((0..p).map(|i| 0.5 + i as f64).collect()).unwrap();
    let blocks = group_delta_variances(g.as_ref(), &d, &gr).unwrap();
    let total = d.quad_forms(g.as_ref()).unwrap();
    for (b, t) in blocks.iter().zip(&total) {
        assert!((b.iter().sum::<f64>() - t).abs() < 1e-12 * t);
        assert!(b[1] == 0.0 && b[5] == 0.0);
    }
    // a dense Σ: C_lk = g_lᵀ Σ_lk g_k, summing to ΔVar; s ≡ 1 reproduces ΔVar, and scaling one
    // group is Σ' = S^½ Σ S^½
    let a = Mat::from_fn(p, p, |i, j| ((i + 2 * j) % 5) as f64 * 0.1);
    let s = &a * a.transpose() + Mat::<f64>::identity(p, p);
    let dense = DenseSigma::new(s.clone()).unwrap();
    let blocks = group_delta_variances(g.as_ref(), &dense, &gr).unwrap();
    let total = dense.quad_forms(g.as_ref()).unwrap();
    for (m, b) in blocks.iter().enumerate() {
        for (l, gl) in gr.iter().enumerate() {
            for (k, gk) in gr.iter().enumerate() {
                let want: f64 = (gl.offset..gl.offset + gl.len)
                    .flat_map(|i| (gk.offset..gk.offset + gk.len).map(move |j| (i, j)))
                    .map(|(i, j)| g[(i, m)] * s[(i, j)] * g[(j, m)])
                    .sum();
                assert!((b[l * 3 + k] - want).abs() < 1e-12 * want.abs().max(1.0));
            }
        }
        assert!((b.iter().sum::<f64>() - total[m]).abs() < 1e-12 * total[m]);
    }
    let scales = [2.0, 0.25, 9.0];
    let cal = Calibration {
        groups: gr.clone(),
        scales: scales.to_vec(),
        beta: 0.0,
        nll: 0.0,
        num_points: 0,
        sigma: "dense".into(),
        iterations: 0,
        converged: true,
    };
    let got = cal.apply(&blocks).unwrap();
    let root: Vec<f64> = (0..p)
        .map(|i| {
            scales[gr
                .iter()
                .position(|x| i >= x.offset && i < x.offset + x.len)
                .unwrap()]
            .sqrt()
        })
        .collect();
    let scaled = Mat::from_fn(p, p, |i, j| root[i] * s[(i, j)] * root[j]);
    let want = DenseSigma::new(scaled)
        .unwrap()
        .quad_forms(g.as_ref())
        .unwrap();
    assert!(max_rel_err(&got, &want) < 1e-12);
    // groups that do not tile P
    let bad = vec![ParamGroup {
        name: "x".into(),
        offset: 0,
        len: 3,
    }];
    let e = group_delta_variances(g.as_ref(), &d, &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("parameter groups"), "{e}");
}

#[test]
fn bad_inputs_and_files_are_errors() {
    let o = CalibrationOptions::default();
    let gr = groups(2);
    assert!(fit_calibration(&[], &[], &gr, "s", &o).is_err());
    let b = vec![1.0, 0.0, 0.0, 1.0];
    assert!(fit_calibration(&[1.0], &[vec![1.0, 1.0]], &gr, "s", &o).is_err());
    assert!(fit_calibration(&[1.0, 2.0], std::slice::from_ref(&b), &gr, "s", &o).is_err());
    let e = fit_calibration(&[f64::NAN], std::slice::from_ref(&b), &gr, "s", &o)
        .err()
        .unwrap();
    assert!(e.to_string().contains("errors"), "{e}");
    let e = fit_calibration(&[1.0], &[vec![-1.0, 0.0, 0.0, 1.0]], &gr, "s", &o)
        .err()
        .unwrap();
    assert!(e.to_string().contains("≥ 0"), "{e}");
    let e = fit_calibration(&[1.0], &[vec![1.0, f64::INFINITY, 0.0, 1.0]], &gr, "s", &o)
        .err()
        .unwrap();
    assert!(e.to_string().contains("point 0"), "{e}");
    let e = fit_calibration(&[0.0, 0.0], &vec![b.clone(); 2], &gr, "s", &o)
        .err()
        .unwrap();
    assert!(e.to_string().contains("all zero"), "{e}");
    // a group whose ΔVar is zero everywhere gets scale 0
    let rows: Vec<Vec<f64>> = (0..50).map(|i| vec![1.0 + i as f64, 0.0]).collect();
    let e: Vec<f64> = normals(50, 3)
        .iter()
        .zip(&rows)
        .map(|(z, r)| z * r[0].sqrt())
        .collect();
    let c = fit_calibration(&e, &diag_blocks(&rows), &gr, "s", &o).unwrap();
    assert_eq!(c.scales[1], 0.0);
    assert!(c.scales[0] > 0.0);

    // round trip and hostile files
    let dir = std::env::temp_dir().join(format!("deltavar-cal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cal.json");
    c.save(&path).unwrap();
    let back = Calibration::load(&path).unwrap();
    assert_eq!(back, c);
    assert!(back.check_groups(&gr).is_ok());
    let e = back.check_groups(&groups(3)).err().unwrap().to_string();
    assert!(e.contains("fit the calibration for this model"), "{e}");
    let applied = back.apply(&[vec![2.0, 0.0, 0.0, 5.0]]).unwrap();
    assert!((applied[0] - 2.0 * c.scales[0]).abs() < 1e-15);
    assert!(back.apply(&[vec![2.0]]).is_err());
    let json = std::fs::read_to_string(&path).unwrap();
    for (bad, what) in [
        ("{", "not a calibration file"),
        (&json.replace("\"beta\":", "\"beta\": -1.0, \"x\":"), "≥ 0"),
        (&json.replacen("\"len\": 2", "\"len\": 0", 1), "tile"),
    ] {
        std::fs::write(&path, bad).unwrap();
        let e = Calibration::load(&path).err().unwrap().to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
    assert!(Calibration::load(dir.join("missing.json")).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// `deltavar calibrate` and `variance --calibration` through the binary equal the library
/// pipeline (per-layer ΔVar, the fit, the scaled sum).
#[cfg(feature = "cli")]
#[test]
fn calibrate_and_apply_through_the_cli() {
    use candle_core::DType;
    use deltavar::*;
    let case = Case::load("tanh-4-16-16-3");
    let d = &case.dir;
    let dir = std::env::temp_dir().join(format!("deltavar-cal-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("scales.json");
    let common_args = |c: &mut std::process::Command, sigma: &str| {
        c.args(["--arch", "mlp:4,16,16,3:tanh", "--weights"])
            .arg(d.join("model.safetensors"))
            .args(["--qoi", "output:1", "--sigma", sigma, "--damping", "1e-3"])
            .args(["--dtype", "f64", "--likelihood", "gaussian:0.5", "--json"])
            .arg("--train-x")
            .arg(d.join("train_x.npy"))
            .arg("--train-y")
            .arg(d.join("train_y.npy"));
    };
    let run = |c: &mut std::process::Command| {
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"));
    c.arg("calibrate");
    common_args(&mut c, "full-fim");
    // any (M, 4) floats serve as targets for output:1
    c.arg("--val-x").arg(d.join("queries.npy"));
    c.arg("--val-y").arg(d.join("queries.npy"));
    c.arg("--out").arg(&file);
    let j = run(&mut c);
    let fit = Calibration::load(&file).unwrap();
    assert_eq!(fit.groups.len(), 3);
    assert_eq!(j["calibration"]["scales"].as_array().unwrap().len(), 3);
    assert!(
        j["nll_one_scale"].as_f64().unwrap() >= fit.nll - 1e-9,
        "{j}"
    );

    // the library
    let (mlp, _vm) = case.model(DType::F64);
    let q = case.npy("queries.npy", Some(DType::F64));
    let data = case.data(DType::F64);
    let fisher = mlp_fisher(
        &mlp,
        Likelihood::gaussian(0.5),
        &data,
        FactoredOptions::default(),
    );
    let engine = mlp_engine(&mlp);
    let g = engine_group_delta_variances_with(
        &engine,
        deltavar::delta::named_groups(&engine.named_tensors().unwrap()),
        DeltaRequest::new(&q, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(&fisher)
            .qoi(Qoi::Output(1))
            .options(SigmaOptions {
                damping: 1e-3,
                ..Default::default()
            }),
    )
    .unwrap();
    let names: Vec<&str> = g.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["0", "2", "4"]);
    let qv: Vec<f64> = q.flatten_all().unwrap().to_vec1().unwrap();
    let e: Vec<f64> = (0..g.result.qoi.len())
        .map(|m| qv[m * 4 + 1] - g.result.qoi[m])
        .collect();
    let lib = fit_calibration(
        &e,
        &g.blocks,
        &g.groups,
        &g.result.sigma,
        &CalibrationOptions::default(),
    )
    .unwrap();
    assert!(max_rel_err(&fit.scales, &lib.scales) < 1e-9 || (fit.scales == lib.scales));
    assert!((fit.beta - lib.beta).abs() <= 1e-9 * lib.beta.max(1e-12));

    // variance --calibration: Σ s_l ΔVar_l, and β on top for the predictive variance
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"));
    c.arg("variance");
    common_args(&mut c, "full-fim");
    c.arg("--queries").arg(d.join("queries.npy"));
    c.arg("--calibration").arg(&file);
    let v = run(&mut c);
    let want = lib.apply(&g.blocks).unwrap();
    let got: Vec<f64> = v["delta_variance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(max_rel_err(&got, &want) < 1e-9, "{v}");
    let pv = v["predictive_variance"].as_array().unwrap();
    assert!((pv[0].as_f64().unwrap() - want[0] - lib.beta).abs() < 1e-9 * (want[0] + lib.beta));

    // scales fitted for another Σ are refused, in one line
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"));
    c.arg("variance");
    common_args(&mut c, "diag-fim");
    c.arg("--queries").arg(d.join("queries.npy"));
    c.arg("--calibration").arg(&file);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("calibrate again"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1);
    std::fs::remove_dir_all(&dir).ok();
}
