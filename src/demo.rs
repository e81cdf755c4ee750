//! The demo: a small MLP trained on 1-D data with a gap, and its delta variance along a grid.
//!
//! `deltavar demo` (and `cargo run --release --example regression_plot`) run [`run_demo`]: it
//! trains a 1-32-32-1 tanh MLP with candle-nn's AdamW on 160 points of y = sin(x) + noise drawn
//! from x ∈ [-4, -1.5] ∪ [1.5, 4], computes ΔVar of the prediction on x ∈ [-6, 6] under Σ = I,
//! the inverse diagonal Fisher and the inverse full Fisher (the paper's posterior scaling F⁻¹/N for
//! the Fisher ones), prints a table and writes a PNG of mean ± 2·sqrt(ΔVar) over the data.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};

use crate::delta::{engine_delta_variances_with, SigmaOptions, SigmaStrategy};
use crate::engine::FactoredOptions;
use crate::error::{Error, Result};
use crate::likelihood::Likelihood;
use crate::model::{Activation, Mlp};
use crate::TensorDataset;

/// Noise standard deviation of the demo data.
pub const NOISE: f64 = 0.1;

/// One grid point of the demo.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoPoint {
    /// Input.
    pub x: f64,
    /// Prediction.
    pub mean: f64,
    /// ΔVar with Σ = I.
    pub identity: f64,
    /// ΔVar with Σ = diag(F + λ)⁻¹ / N.
    pub diag_fim: f64,
    /// ΔVar with Σ = (F + λI)⁻¹ / N.
    pub full_fim: f64,
    /// "data", "gap" or "outside".
    pub region: &'static str,
}

/// The demo's calibration: per-layer scales against one scale, out of sample.
#[derive(Debug, Clone)]
pub struct DemoCalibration {
    /// The fit (on the first half).
    pub fit: crate::calibration::Calibration,
    /// Mean NLL on the second half under α·ΔVar + β (α, β fitted on the first half).
    pub nll_one_scale: f64,
    /// The one-scale fit's mean NLL on the first half (in sample; `fit.nll` is the per-layer one).
    pub nll_one_scale_in_sample: f64,
    /// Mean NLL on the second half under Σ_l s_l ΔVar_l + β.
    pub nll_per_layer: f64,
}

/// What the demo produced.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The grid.
    pub points: Vec<DemoPoint>,
    /// Training inputs and targets.
    pub train: Vec<(f64, f64)>,
    /// Final training mean squared error.
    pub train_mse: f64,
    /// The PNG written, if any.
    pub png: Option<PathBuf>,
    /// Uncertainty-quality metrics of ΔVar on 400 held-out points drawn over the whole range
    /// [-6, 6] (errors e = y − f(x) with y = sin x + noise), per Σ.
    pub metrics: Vec<(&'static str, crate::metrics::UncertaintyMetrics)>,
    /// Learned per-layer scales of the full F⁻¹/N, fitted on the first half of the held-out
    /// points and scored on the second half against one scale (α, β) fitted on the same half.
    pub calibration: DemoCalibration,
    /// Wall time.
    pub seconds: f64,
}

fn lcg(state: &mut u64) -> f64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

fn normal(state: &mut u64) -> f64 {
    (-2.0 * lcg(state).ln()).sqrt() * (2.0 * std::f64::consts::PI * lcg(state)).cos()
}

fn region(x: f64) -> &'static str {
    let a = x.abs();
    if a < 1.5 {
        "gap"
    } else if a <= 4.0 {
        "data"
    } else {
        "outside"
    }
}

/// Runs the demo; writes `delta_variance.png` into `out_dir` when given.
pub fn run_demo(out_dir: Option<&Path>) -> Result<DemoReport> {
    let t0 = Instant::now();
    let dev = Device::Cpu;
    let mut seed = 7u64;
    // data: two clusters with a gap in the middle
    let n = 160;
    let xs: Vec<f64> = (0..n)
        .map(|i| {
            let u = 1.5 + 2.5 * lcg(&mut seed);
            if i % 2 == 0 {
                -u
            } else {
                u
            }
        })
        .collect();
    let ys: Vec<f64> = xs
        .iter()
        .map(|x| x.sin() + NOISE * normal(&mut seed))
        .collect();
    let x = Tensor::from_vec(xs.clone(), (n, 1), &dev)?;
    let y = Tensor::from_vec(ys.clone(), (n, 1), &dev)?;

    // model and training (candle-nn AdamW, full batch)
    let varmap = VarMap::new();
    let mlp = Mlp::new(
        VarBuilder::from_varmap(&varmap, DType::F64, &dev),
        &[1, 32, 32, 1],
        Activation::Tanh,
        None,
    )?;
    let params = mlp.params(&varmap)?;
    let init: Vec<f64> = params
        .entries()
        .iter()
        .flat_map(|e| {
            let fan_in = if e.dims.len() == 2 {
                e.dims[1] as f64
            } else {
                1.0
            };
            (0..e.numel)
                .map(|_| normal(&mut seed) / fan_in.sqrt())
                .collect::<Vec<_>>()
        })
        .collect();
    params.set_flat_values(&init)?;
    let vars: Vec<candle_core::Var> = params.entries().iter().map(|e| e.var.clone()).collect();
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut mse = f64::NAN;
    for _ in 0..2000 {
        let loss = (mlp.forward(&x)? - &y)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        mse = loss.to_vec0::<f64>()?;
    }
    if !mse.is_finite() {
        return Err(Error::NonFinite {
            what: "demo training loss".into(),
            detail: format!("{mse}"),
        });
    }

    // delta variances on a grid
    let grid: Vec<f64> = (0..=120).map(|i| -6.0 + 0.1 * i as f64).collect();
    let z = Tensor::from_vec(grid.clone(), (grid.len(), 1), &dev)?;
    let data = TensorDataset::new(x, y)?;
    let lik = Likelihood::gaussian(NOISE);
    let eo = FactoredOptions::default();
    let engine = crate::GraphEngine::from_mlp(&mlp)?;
    let fisher = crate::GraphFisher::with_engine(engine.clone(), lik.clone(), &data, eo.clone());
    let variances = |z: &Tensor, strategy, opts: &SigmaOptions| {
        engine_delta_variances_with(
            &engine,
            crate::DeltaRequest::new(z, strategy)
                .fisher(&fisher)
                .options(opts.clone())
                .engine_options(eo.clone()),
        )
    };
    let run = |strategy, posterior| {
        let opts = SigmaOptions {
            damping: 1e-4,
            posterior_scale: posterior,
            ..Default::default()
        };
        variances(&z, strategy, &opts)
    };
    let id = run(SigmaStrategy::Identity, false)?;
    let dg = run(SigmaStrategy::DiagonalEmpiricalFim, true)?;
    let fl = run(SigmaStrategy::InverseFullEmpiricalFim, true)?;
    let points: Vec<DemoPoint> = grid
        .iter()
        .enumerate()
        .map(|(i, &xv)| DemoPoint {
            x: xv,
            mean: id.qoi[i],
            identity: id.delta_variance[i],
            diag_fim: dg.delta_variance[i],
            full_fim: fl.delta_variance[i],
            region: region(xv),
        })
        .collect();
    // is the uncertainty any good? held-out points over the whole range, gap and outside included
    let m_out = 400;
    let hx: Vec<f64> = (0..m_out).map(|_| -6.0 + 12.0 * lcg(&mut seed)).collect();
    let hy: Vec<f64> = hx
        .iter()
        .map(|x| x.sin() + NOISE * normal(&mut seed))
        .collect();
    let hz = Tensor::from_vec(hx.clone(), (m_out, 1), &dev)?;
    let held = |strategy, posterior| -> Result<crate::metrics::UncertaintyMetrics> {
        let opts = SigmaOptions {
            damping: 1e-4,
            posterior_scale: posterior,
            ..Default::default()
        };
        let r = variances(&hz, strategy, &opts)?;
        let e: Vec<f64> = hy.iter().zip(&r.qoi).map(|(y, f)| y - f).collect();
        crate::metrics::uncertainty_metrics(&e, &r.delta_variance)
    };
    let metrics = vec![
        ("identity", held(SigmaStrategy::Identity, false)?),
        (
            "diag F⁻¹/N",
            held(SigmaStrategy::DiagonalEmpiricalFim, true)?,
        ),
        (
            "full F⁻¹/N",
            held(SigmaStrategy::InverseFullEmpiricalFim, true)?,
        ),
    ];
    // learned per-layer scales: fit on one half of the held-out points, score on the other
    let g = crate::engine_group_delta_variances_with(
        &engine,
        crate::delta::named_groups(&engine.named_tensors()?),
        crate::DeltaRequest::new(&hz, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(&fisher)
            .options(SigmaOptions {
                damping: 1e-4,
                posterior_scale: true,
                ..Default::default()
            })
            .engine_options(eo.clone()),
    )?;
    let e: Vec<f64> = hy.iter().zip(&g.result.qoi).map(|(y, f)| y - f).collect();
    let half = m_out / 2;
    let fit = crate::calibration::fit_calibration(
        &e[..half],
        &g.blocks[..half],
        &g.groups,
        &g.result.sigma,
        &Default::default(),
    )?;
    let one = crate::metrics::uncertainty_metrics(&e[..half], &g.result.delta_variance[..half])?;
    let one_cal = crate::calibration::Calibration {
        groups: vec![crate::calibration::ParamGroup {
            name: "all".into(),
            offset: 0,
            len: g.result.num_params,
        }],
        scales: vec![one.alpha],
        beta: one.beta,
        ..fit.clone()
    };
    let test_total: Vec<Vec<f64>> = g.result.delta_variance[half..]
        .iter()
        .map(|v| vec![*v])
        .collect();
    let calibration = DemoCalibration {
        nll_one_scale_in_sample: one.nll,
        nll_one_scale: crate::calibration::calibrated_nll(&e[half..], &test_total, &one_cal)?,
        nll_per_layer: crate::calibration::calibrated_nll(&e[half..], &g.blocks[half..], &fit)?,
        fit,
    };
    let train: Vec<(f64, f64)> = xs.into_iter().zip(ys).collect();
    let png = match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io {
                path: dir.display().to_string(),
                source: e,
            })?;
            let path = dir.join("delta_variance.png");
            plot(&path, &points, &train)?;
            Some(path)
        }
        None => None,
    };
    Ok(DemoReport {
        points,
        train,
        train_mse: mse,
        png,
        metrics,
        calibration,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// DejaVu Sans (Bitstream Vera license, assets/fonts/LICENSE-DejaVu.txt), compiled into the
/// binary so the plot's text needs no system font.
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Mean ± 2·sqrt(ΔVar) under the full Σ = F⁻¹/N (shaded) and under the diagonal Σ (dashed
/// bounds), the training points, axes with tick labels, a caption and a legend.
fn plot(path: &Path, points: &[DemoPoint], train: &[(f64, f64)]) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| Error::BadFile {
        path: path.display().to_string(),
        detail: format!("could not draw the plot: {e}"),
    };
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| err("the built-in font could not be read".into()))?;
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (ylo, yhi) = (-3.0f64, 3.0f64);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Delta variance of a 1-32-32-1 tanh MLP trained on sin(x) with a gap",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(52)
        .build_cartesian_2d(-6.0f64..6.0f64, ylo..yhi)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("x")
        .y_desc("f(x)")
        .x_labels(13)
        .y_labels(7)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let clamp = |y: f64| y.clamp(ylo, yhi);
    let band: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.x, clamp(p.mean + 2.0 * p.full_fim.sqrt())))
        .chain(
            points
                .iter()
                .rev()
                .map(|p| (p.x, clamp(p.mean - 2.0 * p.full_fim.sqrt()))),
        )
        .collect();
    let blue = RGBColor(120, 160, 230);
    chart
        .draw_series(std::iter::once(Polygon::new(band, blue.mix(0.45).filled())))
        .map_err(|e| err(e.to_string()))?
        .label("mean ± 2·sqrt(ΔVar), full Σ = F⁻¹/N")
        .legend(move |(x, y)| {
            Rectangle::new([(x, y - 6), (x + 20, y + 6)], blue.mix(0.45).filled())
        });
    let green = RGBColor(30, 140, 60);
    for sign in [1.0, -1.0] {
        let series = chart
            .draw_series(DashedLineSeries::new(
                points
                    .iter()
                    .map(|p| (p.x, clamp(p.mean + sign * 2.0 * p.diag_fim.sqrt()))),
                6,
                4,
                green.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?;
        if sign > 0.0 {
            series
                .label("mean ± 2·sqrt(ΔVar), diagonal Σ = diag(F)⁻¹/N")
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], green.stroke_width(2))
                });
        }
    }
    let dark = RGBColor(20, 60, 160);
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.x, clamp(p.mean))),
            dark.stroke_width(3),
        ))
        .map_err(|e| err(e.to_string()))?
        .label("network mean f(x)")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], dark.stroke_width(3)));
    let red = RGBColor(200, 40, 40);
    chart
        .draw_series(
            train
                .iter()
                .map(|(x, y)| Circle::new((*x, clamp(*y)), 3, red.filled())),
        )
        .map_err(|e| err(e.to_string()))?
        .label("training data")
        .legend(move |(x, y)| Circle::new((x + 10, y), 4, red.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// The demo's printed table: every 10th grid point, then the mean ΔVar per region.
pub fn demo_table(r: &DemoReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "trained a 1-32-32-1 tanh MLP on {} points (x in [-4,-1.5] and [1.5,4], y = sin x + N(0, {NOISE}^2)); train MSE {:.4}\n\n",
        r.train.len(),
        r.train_mse
    ));
    s.push_str(
        "     x   region    mean   ΔVar(I)   ΔVar(diag F⁻¹/N)  ΔVar(full F⁻¹/N)  ±2σ(full)\n",
    );
    for p in r.points.iter().step_by(10) {
        s.push_str(&format!(
            "{:>6.1}   {:<7} {:>6.3} {:>9.3e} {:>18.3e} {:>17.3e} {:>10.3}\n",
            p.x,
            p.region,
            p.mean,
            p.identity,
            p.diag_fim,
            p.full_fim,
            2.0 * p.full_fim.sqrt()
        ));
    }
    s.push_str("\nmean ΔVar by region (full F⁻¹/N):");
    for reg in ["data", "gap", "outside"] {
        let v: Vec<f64> = r
            .points
            .iter()
            .filter(|p| p.region == reg)
            .map(|p| p.full_fim)
            .collect();
        s.push_str(&format!(
            "  {reg} {:.3e}",
            v.iter().sum::<f64>() / v.len().max(1) as f64
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "\nis the uncertainty any good? {} held-out points on [-6, 6] (errors y - f(x)):\n",
        r.metrics.first().map(|m| m.1.m).unwrap_or(0)
    ));
    s.push_str(
        "  Σ              spearman  pearson  removal AUC (oracle)   alpha      beta       NLL\n",
    );
    let opt = |x: Option<f64>| {
        x.map(|v| format!("{v:>7.3}"))
            .unwrap_or_else(|| "    n/a".into())
    };
    for (name, m) in &r.metrics {
        s.push_str(&format!(
            "  {name:<13} {}  {}  {:>6.3} ({:.3})      {:>9.3e}  {:>9.3e}  {:>6.3}\n",
            opt(m.spearman),
            opt(m.pearson),
            m.removal_auc,
            m.removal_auc_oracle,
            m.alpha,
            m.beta,
            m.nll
        ));
    }
    let c = &r.calibration;
    s.push_str(&format!(
        "\nlearned per-layer scales of full F⁻¹/N (fitted on {} held-out points, scored on the other {}):\n  scales",
        c.fit.num_points,
        r.metrics.first().map(|m| m.1.m).unwrap_or(0) - c.fit.num_points
    ));
    for (g, sc) in c.fit.groups.iter().zip(&c.fit.scales) {
        s.push_str(&format!("  layer {}: {sc:.3e}", g.name));
    }
    s.push_str(&format!(
        "  beta {:.3e}\n  mean NLL in sample: one scale {:.3}, one scale per layer {:.3}; out of sample: {:.3}, {:.3}\n",
        c.fit.beta, c.nll_one_scale_in_sample, c.fit.nll, c.nll_one_scale, c.nll_per_layer
    ));
    s
}

/// Draws an evaluation of delta variances on held-out data into a PNG: |e| against √ΔVar (log
/// axes; zero values drawn at the smallest positive one) and the removal curves (points removed
/// by ΔVar descending, and by e² — the oracle), with the metrics in the caption.
pub fn evaluation_plot(
    path: &Path,
    errors: &[f64],
    variances: &[f64],
    m: &crate::metrics::UncertaintyMetrics,
) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| Error::BadFile {
        path: path.display().to_string(),
        detail: format!("could not draw the plot: {e}"),
    };
    let (by_v, oracle) = crate::metrics::removal_curves(errors, variances)?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| err("the built-in font could not be read".into()))?;
    let root = BitMapBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into());
    let root = root
        .titled(
            &format!(
                "{} points: Spearman {}, Pearson {}, removal AUC {:.3} (oracle {:.3}), NLL {:.3}",
                m.m,
                opt(m.spearman),
                opt(m.pearson),
                m.removal_auc,
                m.removal_auc_oracle,
                m.nll
            ),
            ("sans-serif", 19),
        )
        .map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(560);
    // scatter on log axes
    let pos = |v: &[f64]| {
        v.iter()
            .cloned()
            .filter(|x| *x > 0.0)
            .fold(f64::INFINITY, f64::min)
    };
    let sd: Vec<f64> = variances.iter().map(|v| v.sqrt()).collect();
    let ae: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
    let (sd_min, ae_min) = (pos(&sd), pos(&ae));
    let floor = |x: f64, lo: f64| if x > 0.0 { x } else { lo };
    let span = |v: &[f64], lo: f64| {
        let hi = v.iter().cloned().fold(lo, f64::max);
        let lo = if lo.is_finite() { lo } else { 1e-6 };
        (lo / 1.5, (hi * 1.5).max(lo * 10.0))
    };
    let (x0, x1) = span(&sd, sd_min);
    let (y0, y1) = span(&ae, ae_min);
    let mut c = ChartBuilder::on(&left)
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("sqrt(ΔVar)")
        .y_desc("|error|")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let blue = RGBColor(50, 90, 200);
    c.draw_series(sd.iter().zip(&ae).map(|(x, y)| {
        Circle::new(
            (floor(*x, x0 * 1.2), floor(*y, y0 * 1.2)),
            2,
            blue.mix(0.5).filled(),
        )
    }))
    .map_err(|e| err(e.to_string()))?;
    // removal curves
    let n = by_v.len().max(1) as f64;
    let top = by_v.iter().chain(&oracle).cloned().fold(1.0f64, f64::max) * 1.05;
    let mut r = ChartBuilder::on(&right)
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0f64..1.0f64, 0.0f64..top)
        .map_err(|e| err(e.to_string()))?;
    r.configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("fraction of points removed")
        .y_desc("remaining MSE / MSE")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let line = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(k, y)| (k as f64 / n, *y))
            .collect()
    };
    r.draw_series(LineSeries::new(line(&by_v), blue.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?
        .label("removed by ΔVar")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    let gray = RGBColor(120, 120, 120);
    r.draw_series(LineSeries::new(line(&oracle), gray.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?
        .label("oracle (removed by error)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], gray.stroke_width(2)));
    r.draw_series(DashedLineSeries::new(
        vec![(0.0, 1.0), (1.0, 1.0)],
        6,
        4,
        BLACK.stroke_width(1),
    ))
    .map_err(|e| err(e.to_string()))?
    .label("uninformative")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(1)));
    r.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
