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
