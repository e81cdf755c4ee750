//! Helpers shared by the workload examples (cnn, tiny_transformer).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use deltavar::Params;

/// The mean Fisher diagonal per parameter (state-dict names and shapes); written to `out` as
/// f32 safetensors when given.
pub fn per_tensor_diag(
    params: &Params,
    mean: &[f64],
    out: Option<&Path>,
) -> deltavar::Result<Vec<(String, Tensor)>> {
    let per_tensor = params.unflatten(mean)?;
    if let Some(path) = out {
        let named: HashMap<String, Tensor> = per_tensor
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?)))
            .collect::<deltavar::Result<_>>()?;
        candle_core::safetensors::save(&named, path)?;
    }
    Ok(per_tensor)
}

/// The worst per-tensor relative error (‖a − b‖ / ‖b‖) against `reference` (a safetensors file
/// of the same names), or `None` when the file does not exist. With `verbose`, each tensor's
/// error goes to stderr.
pub fn worst_vs_reference(
    per_tensor: &[(String, Tensor)],
    reference: &Path,
    verbose: bool,
) -> deltavar::Result<Option<f64>> {
    if !reference.exists() {
        return Ok(None);
    }
    let r = candle_core::safetensors::load(reference, &Device::Cpu)?;
    let mut worst = 0.0f64;
    for (name, t) in per_tensor {
        if let Some(rt) = r.get(name) {
            let a = t.flatten_all()?.to_vec1::<f64>()?;
            let b = rt.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
            let den: f64 = b.iter().map(|y| y * y).sum();
            let e = (num / den.max(f64::MIN_POSITIVE)).sqrt();
            if verbose {
                eprintln!("{name}: {e:.2e}");
            }
            worst = worst.max(e);
        }
    }
    Ok(Some(worst))
}

/// The exact (`kernel`) or CG full-inverse ΔVar of the queries' gradients `qg` (P×M) under
/// Σ = (F + 1e-3·I)⁻¹ of `fisher` (memory budget 8 GiB, CG to 1e-6), timed from `t0`, printed
/// as one JSON object for `workload`.
pub fn full_report(
    workload: &str,
    method: &str,
    fisher: &dyn deltavar::FisherSource,
    qg: &faer::Mat<f64>,
    t0: std::time::Instant,
) -> deltavar::Result<()> {
    use deltavar::sigma::FullMethod;
    let method: FullMethod = method.parse()?;
    let sopts = deltavar::SigmaOptions {
        damping: 1e-3,
        full_method: method,
        memory_budget: 8 << 30,
        cg: deltavar::sigma::CgOptions {
            tol: 1e-6,
            ..Default::default()
        },
        ..Default::default()
    };
    let full = deltavar::build_sigma(
        deltavar::SigmaStrategy::InverseFullEmpiricalFim,
        qg.nrows(),
        &sopts,
        Some(fisher),
    )?;
    let r = full.quad_forms_reported(qg.as_ref())?;
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!(
        "{}",
        serde_json::json!({
            "workload": workload,
            "method": method.name(),
            "queries": qg.ncols(),
            "seconds": t0.elapsed().as_secs_f64(),
            "peak_rss_mib": rss as f64 / 1024.0,
            "cg_iterations": r.cg.as_ref().map(|c| c.iterations),
            "delta_variance_first": &r.values[..r.values.len().min(4)],
        })
    );
    Ok(())
}
