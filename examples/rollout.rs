//! The paper's simulator setting: a learned step function f(s) ≈ s′ of a damped pendulum,
//! trained on one-step pairs, then rolled out K times from new initial states; the QoI is a
//! coordinate of the final state and Σ the full inverse Fisher F⁻¹/N (exact, kernel method).
//! The step network's layers are used K times per query: the capture engine sums their
//! per-use gradients.
//!
//!     cargo run --release --example rollout
//!
//! Prints ΔVar of the final angle for each horizon K and starting point; states far from the
//! training distribution and longer horizons get larger variances.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use deltavar::nn;
use deltavar::prelude::*;
use deltavar::{CaptureEngine, CaptureOptions, CapturedFisher};

/// s = (angle, velocity) → s + 0.1·g(s), g an MLP built from deltavar::nn layers.
struct Step {
    l1: nn::Linear,
    l2: nn::Linear,
    l3: nn::Linear,
}

impl Module for Step {
    fn forward(&self, s: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.l1.forward(s)?.tanh()?;
        let h = self.l2.forward(&h)?.tanh()?;
        s + (self.l3.forward(&h)? * 0.1)?
    }
}

/// The step applied `k` times.
struct Rollout<'a> {
    step: &'a Step,
    k: usize,
}

impl Module for Rollout<'_> {
    fn forward(&self, s: &Tensor) -> candle_core::Result<Tensor> {
        let mut s = s.clone();
        for _ in 0..self.k {
            s = self.step.forward(&s)?;
        }
        Ok(s)
    }
}

/// The true simulator: a damped pendulum, one explicit step of dt = 0.1.
fn simulate(a: f64, v: f64) -> (f64, f64) {
    let dt = 0.1;
    let acc = -a.sin() - 0.2 * v;
    (a + dt * v, v + dt * acc)
}

fn main() -> deltavar::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
    let step = Step {
        l1: nn::linear(2, 32, vb.pp("0"))?,
        l2: nn::linear(32, 32, vb.pp("2"))?,
        l3: nn::linear(32, 2, vb.pp("4"))?,
    };
    // training pairs from states with |angle| < 1, |velocity| < 1
    let mut seed = 7u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let n = 512;
    let (mut xs, mut ys) = (Vec::with_capacity(2 * n), Vec::with_capacity(2 * n));
    for _ in 0..n {
        let (a, v) = (rnd(), rnd());
        let (a2, v2) = simulate(a, v);
        xs.extend([a, v]);
        ys.extend([a2, v2]);
    }
    let x = Tensor::from_vec(xs, (n, 2), &dev)?;
    let y = Tensor::from_vec(ys, (n, 2), &dev)?;
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    for _ in 0..1500 {
        let loss = (step.forward(&x)? - &y)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
    }
    let mse = (step.forward(&x)? - &y)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?;
    let sigma_noise = mse.sqrt().max(1e-4);

    // one-step Fisher (gaussian with the residual scale), exact full inverse, posterior F⁻¹/N
    let params = Params::from_varmap(&vm, ParamOrder::Natural)?;
    let data = TensorDataset::new(x, y)?;
    let fisher = CapturedFisher::new(
        &step,
        &params,
        Likelihood::gaussian(sigma_noise),
        &data,
        CaptureOptions::default(),
    );
    let opts = SigmaOptions {
        damping: 1e-4,
        posterior_scale: true,
        full_method: FullMethod::Kernel,
        ..Default::default()
    };
    let sigma = build_sigma(
        SigmaStrategy::InverseFullEmpiricalFim,
        params.num_params(),
        &opts,
        Some(&fisher),
    )?;
    println!(
        "step network P = {}, trained on N = {n} one-step pairs (residual σ = {sigma_noise:.2e}); Σ = {} ({:?})",
        params.num_params(),
        sigma.name(),
        sigma.method.as_ref().map(|m| m.method)
    );
    let starts = Tensor::new(&[[0.5f64, 0.0], [0.9, 0.5], [2.5, 0.0]], &dev)?;
    println!(
        "{:>4}  {:>22}  {:>22}  {:>22}",
        "K", "start (0.5, 0)", "start (0.9, 0.5)", "start (2.5, 0) [outside]"
    );
    for k in [1, 2, 4, 8, 16, 32] {
        let model = Rollout { step: &step, k };
        let engine = CaptureEngine::new(&model, &params);
        let (g, values) =
            engine.query_gradients(&Qoi::Output(0), &starts, &CaptureOptions::default())?;
        let dv = delta_variances(g.as_ref(), &*sigma)?;
        let cells: Vec<String> = values
            .iter()
            .zip(&dv)
            .map(|(v, d)| format!("{v:+.3} ± {:.2e}", d.sqrt()))
            .collect();
        println!(
            "{k:>4}  {:>22}  {:>22}  {:>22}",
            cells[0], cells[1], cells[2]
        );
    }
    Ok(())
}
