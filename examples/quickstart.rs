//! The seed's usage example, ported: a linear model 10 → 1, a QoI (the model's output at z),
//! a Gaussian log-likelihood, 100 training points in batches of 32, and the delta variance under
//! every Σ strategy.
//!
//!     cargo run --release --example quickstart

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deltavar::seed::*;
use deltavar::sigma::CustomSigma;
use deltavar::*;
use faer::Mat;

/// Deterministic standard normals (Box-Muller on an xorshift generator), so runs repeat exactly.
fn randn(n: usize, seed: &mut u64) -> Vec<f32> {
    let mut uniform = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            ((-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos()) as f32
        })
        .collect()
}

fn main() -> deltavar::Result<()> {
    let dev = Device::Cpu;
    let mut seed = 42u64;

    // 1. Model, functionals and data. `model = nn.Linear(10, 1)`: a one-layer Mlp.
    let varmap = VarMap::new();
    let model = Mlp::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        &[10, 1],
        Activation::Identity,
        None,
    )?;
    let params = model.params(&varmap)?; // 0.weight (1×10), 0.bias (1): P = 11
                                         // deterministic weights (candle-nn's initialiser draws from the thread RNG)
    let init: Vec<f64> = randn(params.num_params(), &mut seed)
        .iter()
        .map(|v| *v as f64 / 10f64.sqrt())
        .collect();
    params.set_flat_values(&init)?;

    // QoI: the model's output at z.
    let qoi = |z: &Tensor| model.forward(z)?.sum_all();
    // Log-likelihood of each data point: -0.5 * mean((prediction - y)^2), as in the seed's example.
    let log_likelihood = |x: &Tensor, y: &Tensor| (model.forward(x)? - y)?.sqr()?.mean(1)? * -0.5;

    let z = Tensor::from_vec(randn(10, &mut seed), (1, 10), &dev)?;
    let data_x = Tensor::from_vec(randn(1000, &mut seed), (100, 10), &dev)?;
    let noise = Tensor::from_vec(randn(100, &mut seed), (100, 1), &dev)?;
    let data_y = (model.forward(&data_x)?.detach() + (noise * 0.1)?)?; // detach, as the seed does
                                                                       // The seed's DataLoader(batch_size=32), as a list of batches.
    let batches = (0..100)
        .step_by(32)
        .map(|s| {
            let len = 32.min(100 - s);
            Ok((data_x.narrow(0, s, len)?, data_y.narrow(0, s, len)?))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let dataset = BatchList::new(batches)?;

    // 2. The QoI gradient ∇q.
    let grad = qoi_gradient(&params, &z, qoi)?;
    println!(
        "QoI q(z) = {:.4}; gradient over {} parameters",
        grad.value,
        params.num_params()
    );

    // 3. ΔVar = ∇qᵀ Σ ∇q under each strategy.
    let opts = SigmaOptions {
        damping: 1e-5,
        ..Default::default()
    };
    let fisher = GenericFisher::new(
        &params,
        log_likelihood,
        &dataset,
        GenericOptions {
            batch_size: 64,
            ..Default::default()
        },
    );

    let dv = calculate_delta_variance(&grad.flat, SigmaStrategy::Identity, &opts, None)?;
    println!("Delta Variance (Identity Sigma):            {dv:.4}");
    let dv = calculate_delta_variance(
        &grad.flat,
        SigmaStrategy::DiagonalEmpiricalFim,
        &opts,
        Some(&fisher),
    )?;
    println!("Delta Variance (Diagonal FIM Sigma):        {dv:.4}");
    let dv = calculate_delta_variance(
        &grad.flat,
        SigmaStrategy::InverseFullEmpiricalFim,
        &opts,
        Some(&fisher),
    )?;
    println!("Delta Variance (Full inverse FIM Sigma):    {dv:.4}");
    let scaled = SigmaOptions {
        posterior_scale: true,
        ..opts.clone()
    };
    let dv = calculate_delta_variance(
        &grad.flat,
        SigmaStrategy::InverseFullEmpiricalFim,
        &scaled,
        Some(&fisher),
    )?;
    println!("Delta Variance (F^-1 / N, the paper's):     {dv:.6}");

    let p = params.num_params();
    let dv = calculate_delta_variance(
        &grad.flat,
        SigmaStrategy::Diagonal(vec![0.1; p]),
        &opts,
        None,
    )?;
    println!("Delta Variance (Custom Diagonal Sigma 0.1): {dv:.4}");
    let dense = Mat::from_fn(p, p, |i, j| if i == j { 0.2 } else { 0.01 });
    let dv = calculate_delta_variance(&grad.flat, SigmaStrategy::Dense(dense), &opts, None)?;
    println!("Delta Variance (Custom Dense Sigma):        {dv:.4}");
    let custom = CustomSigma::new(p, |g| 0.5 * g.iter().map(|v| v * v).sum::<f64>());
    let dv = calculate_delta_variance(&grad.flat, SigmaStrategy::Custom(custom), &opts, None)?;
    println!("Delta Variance (Custom function 0.5·|g|²):  {dv:.4}");
    Ok(())
}
