//! The peer workloads of `../shared/bench/peers.py`, run by deltavar on the very same files.
//!
//!     /tmp/peers-venv/bin/python ../shared/bench/peers.py /tmp/dv-workloads diag   # writes the data, times the peers
//!     DV_WORKLOADS=/tmp/dv-workloads cargo bench --bench workloads -- diag-generic
//!
//! Prints one JSON line per measurement (best of `DV_REPS`, default 2, runs).

mod common;
use common::peak_rss_bytes;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use deltavar::sigma::FullMethod;
use deltavar::*;

fn best_of<T>(reps: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..reps {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.expect("reps >= 1"))
}

fn load_diag(dir: &std::path::Path) -> Option<(Mlp, TensorDataset, usize)> {
    let d = dir.join("diag");
    if !d.join("model.safetensors").exists() {
        eprintln!("no workload at {} (run peers.py first)", d.display());
        return None;
    }
    let (mlp, vm) = Mlp::load_safetensors(
        d.join("model.safetensors"),
        Activation::Relu,
        DType::F32,
        &Device::Cpu,
        "",
        None,
    )
    .expect("model");
    let p = mlp.params(&vm).expect("params").num_params();
    let x = Tensor::read_npy(d.join("train_x.npy")).expect("x");
    let y = Tensor::read_npy(d.join("train_y.npy")).expect("y");
    Some((mlp, TensorDataset::new(x, y).expect("data"), p))
}

fn main() {
    let dir =
        PathBuf::from(std::env::var("DV_WORKLOADS").unwrap_or_else(|_| "/tmp/dv-workloads".into()));
    let reps: usize = std::env::var("DV_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |w: &str| which.is_empty() || which.iter().any(|a| a == w);

    if want("diag-factored") {
        if let Some((mlp, data, p)) = load_diag(&dir) {
            for bs in [128, 256, 512] {
                let opts = FactoredOptions {
                    batch_size: bs,
                    threads: 0,
                };
                let engine = GraphEngine::from_mlp(&mlp).expect("engine");
                let lik: Likelihood = Likelihood::Categorical;
                let (t, diag) = best_of(reps.max(3), || {
                    engine.sum_sq(&lik, &data, &opts).expect("diag")
                });
                let s: f64 = diag.iter().sum::<f64>() / data.len() as f64;
                println!(
                    "{{\"workload\":\"diag\",\"path\":\"factored\",\"batch_size\":{bs},\"seconds\":{t:.4},\"P\":{p},\"N\":{},\"trace_F\":{s:.6e},\"peak_rss_mib\":{:.1}}}",
                    data.len(),
                    peak_rss_bytes() as f64 / (1u64 << 20) as f64
                );
            }
        }
    }

    if want("queries") {
        let d = dir.join("queries");
        if d.join("model.safetensors").exists() {
            let (mlp, _vm) = Mlp::load_safetensors(
                d.join("model.safetensors"),
                Activation::Relu,
                DType::F32,
                &Device::Cpu,
                "",
                None,
            )
            .expect("model");
            let q = Tensor::read_npy(d.join("queries.npy")).expect("queries");
            let engine = GraphEngine::from_mlp(&mlp).expect("engine");
            let p = engine.num_params();
            let diag: Vec<f64> = (0..p)
                .map(|i| ((i * 7919) % 1000) as f64 / 1000.0)
                .collect();
            let sigma = deltavar::sigma::DiagonalSigma::new(diag).expect("sigma");
            let opts = FactoredOptions::default();
            let qoi: Qoi = Qoi::Output(3);
            let (t, dv) = best_of(reps.max(5), || {
                let (qf, _) = engine
                    .query_layered_gradients(&qoi, &q, 1, &opts, LayerRoute::Factor)
                    .expect("queries");
                query_delta_variances(&qf, &sigma).expect("dv")
            });
            println!(
                "{{\"workload\":\"queries\",\"path\":\"factored\",\"M\":{},\"seconds\":{t:.4},\"dv0\":{:.6e}}}",
                dv.len(),
                dv[0]
            );
        } else {
            eprintln!(
                "no workload at {} (run peers.py ... queries first)",
                d.display()
            );
        }
    }

    if want("full") {
        let d = dir.join("full");
        if d.join("model.safetensors").exists() {
            let q = Tensor::read_npy(d.join("queries.npy")).expect("queries");
            let x = Tensor::read_npy(d.join("train_x.npy")).expect("x");
            let y = Tensor::read_npy(d.join("train_y.npy")).expect("y");
            let mut reference: Option<Vec<f64>> = None;
            for (dtype, label) in [(DType::F64, "f64"), (DType::F32, "f32")] {
                let (mlp, _vm) = Mlp::load_safetensors(
                    d.join("model.safetensors"),
                    Activation::Tanh,
                    dtype,
                    &Device::Cpu,
                    "",
                    None,
                )
                .expect("model");
                let data = TensorDataset::new(
                    x.to_dtype(dtype).expect("x"),
                    y.to_dtype(dtype).expect("y"),
                )
                .expect("data");
                let qd = q.to_dtype(dtype).expect("q");
                use deltavar::sigma::KernelPrecision;
                for (method, kp) in [
                    (FullMethod::Dense, KernelPrecision::F64),
                    (FullMethod::Kernel, KernelPrecision::F64),
                    (FullMethod::Kernel, KernelPrecision::Mixed),
                    (FullMethod::Auto, KernelPrecision::Auto),
                ] {
                    let opts = SigmaOptions {
                        damping: 1e-3,
                        full_method: method,
                        kernel_precision: kp,
                        ..Default::default()
                    };
                    let (t, out) = best_of(reps, || {
                        mlp_delta_variances(
                            &mlp,
                            Qoi::Sum,
                            &qd,
                            SigmaStrategy::InverseFullEmpiricalFim,
                            &opts,
                            Some((&data, Likelihood::gaussian(1.0))),
                            &FactoredOptions::default(),
                        )
                        .expect("full")
                    });
                    if reference.is_none() {
                        reference = Some(out.delta_variance.clone());
                    }
                    let r = reference.as_ref().expect("reference");
                    let err = out
                        .delta_variance
                        .iter()
                        .zip(r)
                        .map(|(a, b)| ((a - b) / b).abs())
                        .fold(0.0, f64::max);
                    println!(
                        "{{\"workload\":\"full\",\"dtype\":\"{label}\",\"method\":\"{}\",\"kernel_precision\":\"{kp:?}\",\"seconds\":{t:.4},\"dv0\":{:.6e},\"max_rel_err_vs_dense_f64\":{err:.2e},\"peak_rss_mib\":{:.1}}}",
                        out.method.as_ref().map(|m| m.method.name()).unwrap_or("?"),
                        out.delta_variance[0],
                        peak_rss_bytes() as f64 / (1u64 << 20) as f64
                    );
                }
            }
        } else {
            eprintln!(
                "no workload at {} (run peers.py ... full first)",
                d.display()
            );
        }
    }

    // the low-rank Σ against the exact kernel answer as k grows (only when asked: it is long)
    if which.iter().any(|a| a == "lowrank") {
        lowrank_sweep(&dir, "full", &[4, 16, 64, 256, 1024]);
        lowrank_sweep(&dir, "cg", &[8, 32]);
    }

    if want("cg") {
        let d = dir.join("cg");
        if d.join("model.safetensors").exists() {
            let (mlp, _vm) = Mlp::load_safetensors(
                d.join("model.safetensors"),
                Activation::Relu,
                DType::F32,
                &Device::Cpu,
                "",
                None,
            )
            .expect("model");
            let x = Tensor::read_npy(d.join("train_x.npy")).expect("x");
            let y = Tensor::read_npy(d.join("train_y.npy")).expect("y");
            let data = TensorDataset::new(x, y).expect("data");
            let q = Tensor::read_npy(d.join("queries.npy")).expect("queries");
            let fisher = GraphFisher::with_engine(
                GraphEngine::from_mlp(&mlp).expect("engine"),
                Likelihood::Categorical,
                &data,
                FactoredOptions::default(),
            );
            let engine = fisher.engine().clone();
            let (qf, _) = engine
                .query_layered_gradients(
                    &Qoi::Output(3),
                    &q,
                    1,
                    &FactoredOptions::default(),
                    LayerRoute::Factor,
                )
                .expect("queries");
            // the exact answer by the kernel method, end to end (factors, Gram, Cholesky, queries)
            let t = Instant::now();
            let g = fisher
                .gradient_matrix(DEFAULT_MEMORY_BUDGET)
                .expect("factors");
            let t_factors = t.elapsed().as_secs_f64();
            let kernel =
                deltavar::sigma::KernelInverseFisher::new(g.clone(), 1e-3).expect("kernel");
            let dv = query_delta_variances(&qf, &kernel).expect("dv");
            let t_kernel = t.elapsed().as_secs_f64();
            println!(
                "{{\"workload\":\"cg\",\"method\":\"kernel\",\"seconds\":{t_kernel:.3},\"factors_seconds\":{t_factors:.3},\"peak_rss_mib\":{:.1},\"delta_variance\":{:?}}}",
                peak_rss_bytes() as f64 / (1u64 << 20) as f64,
                dv
            );
            // CG: cost per iteration, and the iterations to 1e-6 / 1e-10 with each preconditioner
            let qg = qf.to_dense();
            let iters: usize = std::env::var("DV_CG_ITERS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(3);
            for pre in [
                deltavar::sigma::CgPreconditioner::Identity,
                deltavar::sigma::CgPreconditioner::Jacobi,
                deltavar::sigma::CgPreconditioner::Nystrom { rank: 0 },
            ] {
                let cg = deltavar::sigma::CgInverseFisher::new(
                    g.clone(),
                    1e-3,
                    deltavar::sigma::CgOptions {
                        tol: 1e-30,
                        max_iter: iters,
                        accept_unconverged: true,
                        preconditioner: pre,
                        ..Default::default()
                    },
                )
                .expect("cg");
                let t = Instant::now();
                let r = cg.quad_forms_reported(qg.as_ref()).expect("cg");
                let secs = t.elapsed().as_secs_f64();
                let r = r.cg.expect("report");
                println!(
                    "{{\"workload\":\"cg\",\"method\":\"cg\",\"preconditioner\":\"{pre:?}\",\"iterations\":{},\"seconds_per_iteration\":{:.3},\"worst_rel_residual\":{:.2e}}}",
                    r.iterations,
                    secs / (r.iterations + 1) as f64,
                    r.rel_residuals.iter().cloned().fold(0.0, f64::max)
                );
            }
            if let Ok(tol) = std::env::var("DV_CG_TOL") {
                let tol: f64 = tol.parse().expect("tol");
                // DV_CG_PRE=identity,jacobi,nystrom picks the preconditioners; DV_CG_MAXIT caps
                // the iterations (default 2000). The time includes building the preconditioner.
                let pres =
                    std::env::var("DV_CG_PRE").unwrap_or_else(|_| "identity,jacobi,nystrom".into());
                let max_iter: usize = std::env::var("DV_CG_MAXIT")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(2000);
                for name in pres.split(',') {
                    let pre = match name {
                        "identity" => deltavar::sigma::CgPreconditioner::Identity,
                        "jacobi" => deltavar::sigma::CgPreconditioner::Jacobi,
                        _ => deltavar::sigma::CgPreconditioner::Nystrom { rank: 0 },
                    };
                    let t = Instant::now();
                    let cg = deltavar::sigma::CgInverseFisher::new(
                        g.clone(),
                        1e-3,
                        deltavar::sigma::CgOptions {
                            tol,
                            max_iter,
                            accept_unconverged: true,
                            preconditioner: pre,
                            ..Default::default()
                        },
                    )
                    .expect("cg");
                    let t_pre = t.elapsed().as_secs_f64();
                    let got = cg.quad_forms_reported(qg.as_ref()).expect("cg");
                    let (got, r) = (got.values, got.cg.expect("report"));
                    let err = got
                        .iter()
                        .zip(&dv)
                        .map(|(a, b)| ((a - b) / b).abs())
                        .fold(0.0, f64::max);
                    println!(
                        "{{\"workload\":\"cg\",\"method\":\"cg\",\"preconditioner\":\"{}\",\"tol\":{tol:e},\"iterations\":{},\"seconds\":{:.1},\"preconditioner_seconds\":{t_pre:.1},\"converged\":{},\"max_rel_err_vs_kernel\":{err:.2e}}}",
                        r.preconditioner,
                        r.iterations,
                        t.elapsed().as_secs_f64(),
                        r.converged
                    );
                }
            }
        } else {
            eprintln!("no workload at {} (run peers.py ... cg first)", d.display());
        }
    }

    if want("diag-generic") {
        let d = dir.join("diag");
        if !d.join("model.safetensors").exists() {
            eprintln!("no workload at {} (run peers.py first)", d.display());
            return;
        }
        let (mlp, vm) = Mlp::load_safetensors(
            d.join("model.safetensors"),
            Activation::Relu,
            DType::F32,
            &Device::Cpu,
            "",
            None,
        )
        .expect("model");
        let params = mlp.params(&vm).expect("params");
        let x = Tensor::read_npy(d.join("train_x.npy")).expect("x");
        let y = Tensor::read_npy(d.join("train_y.npy")).expect("y");
        let data = TensorDataset::new(x, y).expect("data");
        let lik = Likelihood::Categorical;
        // candle's matmul threading follows RAYON_NUM_THREADS (set it in the shell to compare)
        let env = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
        let variants: Vec<usize> = match std::env::var("DV_VARIANT").ok().as_deref() {
            Some("one") => vec![0],
            _ => vec![0, 1],
        };
        for threads in variants {
            let opts = GenericOptions {
                batch_size: 512,
                threads,
            };
            let fisher = GenericFisher::new(&params, lik.of(&mlp), &data, opts);
            let (t, diag) = best_of(reps, || fisher.fisher_diag().expect("diag"));
            let s: f64 = diag.mean().iter().sum();
            println!(
                "{{\"workload\":\"diag\",\"path\":\"generic\",\"threads\":{threads},\"RAYON_NUM_THREADS\":\"{env}\",\"seconds\":{t:.4},\"P\":{},\"N\":{},\"trace_F\":{s:.6e}}}",
                params.num_params(),
                data.len()
            );
        }
    }
}

/// `lowrank`: on W-full (f64 model, Gaussian, 256 queries) and W-cg (f32 model, categorical,
/// 16 queries): the exact ΔVar by the kernel method, then `lowrank:K` with and without the
/// diagonal for each K, with the error against the exact values, Spearman's rank correlation
/// with them, the eigensolver's residuals and products, time and peak memory.
fn lowrank_sweep(dir: &std::path::Path, name: &str, ranks: &[usize]) {
    let d = dir.join(name);
    if !d.join("model.safetensors").exists() {
        eprintln!(
            "no workload at {} (run peers.py ... {name} first)",
            d.display()
        );
        return;
    }
    let (act, dtype, lik, qoi) = if name == "full" {
        (
            Activation::Tanh,
            DType::F64,
            Likelihood::gaussian(1.0),
            Qoi::Sum,
        )
    } else {
        (
            Activation::Relu,
            DType::F32,
            Likelihood::Categorical,
            Qoi::Output(3),
        )
    };
    let (mlp, _vm) = Mlp::load_safetensors(
        d.join("model.safetensors"),
        act,
        dtype,
        &Device::Cpu,
        "",
        None,
    )
    .expect("model");
    let rd = |f: &str| {
        Tensor::read_npy(d.join(f))
            .expect("npy")
            .to_dtype(dtype)
            .expect("dtype")
    };
    let (x, q) = (rd("train_x.npy"), rd("queries.npy"));
    let y = Tensor::read_npy(d.join("train_y.npy")).expect("y");
    let y = if y.dtype() == DType::I64 {
        y
    } else {
        y.to_dtype(dtype).expect("y")
    };
    let data = TensorDataset::new(x, y).expect("data");
    let eo = FactoredOptions::default();
    let run = |strategy: SigmaStrategy| {
        let opts = SigmaOptions {
            damping: 1e-3,
            full_method: FullMethod::Kernel,
            ..Default::default()
        };
        let t = Instant::now();
        let out = mlp_delta_variances(
            &mlp,
            qoi.clone(),
            &q,
            strategy,
            &opts,
            Some((&data, lik.clone())),
            &eo,
        )
        .expect("delta variances");
        (t.elapsed().as_secs_f64(), out)
    };
    let (t_exact, exact) = run(SigmaStrategy::InverseFullEmpiricalFim);
    println!(
        "{{\"workload\":\"lowrank-{name}\",\"sigma\":\"exact (kernel)\",\"seconds\":{t_exact:.3},\"num_params\":{},\"peak_rss_mib\":{:.1}}}",
        exact.num_params,
        peak_rss_bytes() as f64 / (1u64 << 20) as f64
    );
    let spearman = |a: &[f64], b: &[f64]| {
        let (ra, rb) = (
            deltavar::metrics::average_ranks(a),
            deltavar::metrics::average_ranks(b),
        );
        let m = ra.len() as f64;
        let (ma, mb) = (ra.iter().sum::<f64>() / m, rb.iter().sum::<f64>() / m);
        let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    };
    for &k in ranks {
        for diag in [true, false] {
            let s = format!("lowrank:{k}{}", if diag { "" } else { ":nodiag" });
            let (t, out) = run(s.parse().expect("strategy"));
            let mut rel: Vec<f64> = out
                .delta_variance
                .iter()
                .zip(&exact.delta_variance)
                .map(|(a, b)| ((a - b) / b).abs())
                .collect();
            rel.sort_by(|a, b| a.total_cmp(b));
            let r = out.lowrank.as_ref().expect("report");
            println!(
                "{{\"workload\":\"lowrank-{name}\",\"sigma\":\"{s}\",\"seconds\":{t:.3},\"eigensolver\":\"{}\",\"rank\":{},\"matvecs\":{},\"worst_rel_residual\":{:.1e},\"median_rel_err\":{:.3e},\"max_rel_err\":{:.3e},\"spearman\":{:.4},\"peak_rss_mib\":{:.1}}}",
                r.eigensolver,
                r.rank,
                r.matvecs,
                r.relative_residuals.iter().cloned().fold(0.0, f64::max),
                rel[rel.len() / 2],
                rel[rel.len() - 1],
                spearman(&out.delta_variance, &exact.delta_variance),
                peak_rss_bytes() as f64 / (1u64 << 20) as f64
            );
        }
    }
}
