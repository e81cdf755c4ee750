//! Every Σ implementation against an explicit dense f64 computation on small random MLPs:
//! the per-example gradient matrix G is formed, F = GᵀG/N by plain loops, inverses by
//! Gauss-Jordan elimination (independent of faer).

mod common;

use common::*;
use deltavar::seed::*;
use deltavar::sigma::*;
use deltavar::*;
use faer::Mat;

struct Setup {
    p: usize,
    n: usize,
    g: Vec<Vec<f64>>,      // N gradients of length P
    q: Mat<f64>,           // P×M query gradients
    fisher_diag: Vec<f64>, // from the library
    fisher_full: Mat<f64>, // from the library
}

fn setup(act: Activation, categorical: bool, seed: u64) -> Setup {
    let sizes = [3, 5, 4, if categorical { 3 } else { 2 }];
    let (mlp, _vm, params) = random_mlp(&sizes, act, seed);
    let n = 17;
    let x = random_tensor(n, 3, seed + 1);
    let (y, lik) = if categorical {
        (random_labels(n, 3, seed + 2), Likelihood::Categorical)
    } else {
        (
            random_tensor(n, 2, seed + 2),
            Likelihood::Gaussian {
                sigma: vec![0.5, 1.5],
            },
        )
    };
    let data = TensorDataset::new(x, y).unwrap();
    let fisher = GenericFisher::new(
        &params,
        ll_closure(&mlp, &lik),
        &data,
        GenericOptions {
            batch_size: 6,
            ..Default::default()
        },
    );
    let gm = fisher.per_example_gradients(0, n).unwrap();
    let p = params.num_params();
    let g: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..p).map(|i| gm[(i, j)]).collect())
        .collect();
    let qoi = Qoi::Output(1);
    let (q, _) = qoi_gradients(
        &params,
        &random_tensor(4, 3, seed + 3),
        qoi.of(&mlp),
        &GenericOptions::default(),
    )
    .unwrap();
    Setup {
        p,
        n,
        g,
        q,
        fisher_diag: fisher.fisher_diag().unwrap().mean(),
        fisher_full: fisher.fisher_dense(DEFAULT_MEMORY_BUDGET).unwrap().mean(),
    }
}

fn col(m: &Mat<f64>, j: usize) -> Vec<f64> {
    (0..m.nrows()).map(|i| m[(i, j)]).collect()
}

fn check_all(s: &Setup, label: &str) {
    let (p, n) = (s.p, s.n);
    // F by plain loops
    let f: Vec<Vec<f64>> = (0..p)
        .map(|a| {
            (0..p)
                .map(|b| s.g.iter().map(|g| g[a] * g[b]).sum::<f64>() / n as f64)
                .collect()
        })
        .collect();
    let fd: Vec<f64> = (0..p).map(|a| f[a][a]).collect();
    assert!(max_rel_err(&s.fisher_diag, &fd) < 1e-12, "{label}: diag F");
    assert!(
        norm_rel_err(&to_rows(s.fisher_full.as_ref()).concat(), &f.concat()) < 1e-12,
        "{label}: dense F"
    );

    let m = s.q.ncols();
    let qs: Vec<Vec<f64>> = (0..m).map(|j| col(&s.q, j)).collect();
    let check = |name: &str, sigma: &dyn SigmaOp, dense: &[Vec<f64>], tol: f64| {
        let got = sigma.quad_forms(s.q.as_ref()).unwrap();
        let want: Vec<f64> = qs.iter().map(|q| bilinear(q, dense, q)).collect();
        assert!(
            max_rel_err(&got, &want) < tol,
            "{label}: {name} quad forms {got:?} vs {want:?}"
        );
        for (j, q) in qs.iter().enumerate() {
            assert!(
                (sigma.quad_form(q).unwrap() - want[j]).abs() <= tol * want[j].abs(),
                "{label}: {name} single"
            );
        }
        match sigma.apply(s.q.as_ref()) {
            Ok(applied) => {
                for (j, q) in qs.iter().enumerate() {
                    let want: Vec<f64> = dense
                        .iter()
                        .map(|row| row.iter().zip(q).map(|(a, b)| a * b).sum())
                        .collect();
                    assert!(
                        norm_rel_err(&col(&applied, j), &want) < tol,
                        "{label}: {name} apply"
                    );
                }
            }
            // only the custom Σ (a quadratic form, no operator) may refuse to apply
            Err(Error::Unsupported(_)) if name == "custom" => {}
            Err(e) => panic!("{label}: {name} apply failed: {e}"),
        }
    };
    let eye: Vec<Vec<f64>> = (0..p)
        .map(|i| (0..p).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    check("identity", &IdentitySigma::new(p), &eye, 1e-14);

    let d: Vec<f64> = pseudo_random(p, 77).iter().map(|v| v.abs() + 0.1).collect();
    let dmat: Vec<Vec<f64>> = (0..p)
        .map(|i| (0..p).map(|j| if i == j { d[i] } else { 0.0 }).collect())
        .collect();
    check(
        "diagonal",
        &DiagonalSigma::new(d.clone()).unwrap(),
        &dmat,
        1e-14,
    );

    let a = pseudo_random(p * p, 78);
    let spd: Vec<Vec<f64>> = (0..p)
        .map(|i| {
            (0..p)
                .map(|j| {
                    (0..p).map(|k| a[i * p + k] * a[j * p + k]).sum::<f64>()
                        + if i == j { 1.0 } else { 0.0 }
                })
                .collect()
        })
        .collect();
    let spd_mat = Mat::from_fn(p, p, |i, j| spd[i][j]);
    check("dense", &DenseSigma::new(spd_mat).unwrap(), &spd, 1e-12);
    let spd2 = spd.clone();
    check(
        "custom",
        &CustomSigma::new(p, move |g| bilinear(g, &spd2, g)),
        &spd,
        1e-12,
    );

    for lam in [1e-6, 1e-3, 1.0] {
        let inv_diag: Vec<Vec<f64>> = (0..p)
            .map(|i| {
                (0..p)
                    .map(|j| if i == j { 1.0 / (fd[i] + lam) } else { 0.0 })
                    .collect()
            })
            .collect();
        check(
            "inverse diag",
            &InverseDiagonalFisher::new(&s.fisher_diag, lam).unwrap(),
            &inv_diag,
            1e-12,
        );
        let damped: Vec<Vec<f64>> = (0..p)
            .map(|i| {
                (0..p)
                    .map(|j| f[i][j] + if i == j { lam } else { 0.0 })
                    .collect()
            })
            .collect();
        let inv = gauss_jordan_inverse(&damped);
        let full = InverseFullFisher::new(s.fisher_full.as_ref(), lam).unwrap();
        // the conditioning of F + λI bounds the achievable agreement
        let tol = if lam < 1e-5 { 1e-6 } else { 1e-9 };
        check(&format!("inverse full λ={lam}"), &full, &inv, tol);
        let explicit = full.to_dense();
        assert!(
            norm_rel_err(&to_rows(explicit.as_ref()).concat(), &inv.concat()) < tol,
            "{label}: to_dense λ={lam}"
        );
        let scaled = ScaledSigma::new(full, 1.0 / n as f64).unwrap();
        let inv_n: Vec<Vec<f64>> = inv
            .iter()
            .map(|r| r.iter().map(|v| v / n as f64).collect())
            .collect();
        check("scaled inverse full", &scaled, &inv_n, tol);
    }
    // the entry point agrees with the operators
    let g0 = &qs[0];
    let via_entry = calculate_delta_variance(
        g0,
        SigmaStrategy::Dense(Mat::from_fn(p, p, |i, j| spd[i][j])),
        &SigmaOptions::default(),
        None,
    )
    .unwrap();
    assert!((via_entry - bilinear(g0, &spd, g0)).abs() < 1e-12 * via_entry);
}

#[test]
fn every_sigma_matches_dense_reference_gaussian() {
    for (k, act) in Activation::ALL.iter().enumerate() {
        let s = setup(*act, false, 100 + k as u64);
        check_all(&s, &format!("gaussian {}", act.name()));
    }
}

#[test]
fn every_sigma_matches_dense_reference_categorical() {
    for (k, act) in Activation::ALL.iter().enumerate() {
        let s = setup(*act, true, 200 + k as u64);
        check_all(&s, &format!("categorical {}", act.name()));
    }
}

#[test]
fn query_block_equals_single_query_gradients() {
    let (mlp, _vm, params) = random_mlp(&[3, 6, 2], Activation::Gelu, 5);
    let zs = random_tensor(5, 3, 6);
    let f = Qoi::Prob(1).of(&mlp);
    let (block, values) = qoi_gradients(
        &params,
        &zs,
        &f,
        &GenericOptions {
            threads: 2,
            ..Default::default()
        },
    )
    .unwrap();
    for (j, value) in values.iter().enumerate() {
        let one = qoi_gradient(&params, &zs.narrow(0, j, 1).unwrap(), &f).unwrap();
        assert_eq!(one.flat, col(&block, j));
        assert_eq!(one.value, *value);
    }
}
