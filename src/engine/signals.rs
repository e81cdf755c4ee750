//! Output signals: the derivative of each example's objective (log-likelihood or QoI) with
//! respect to its own model output row, ∂uᵢ/∂fᵢ (B×out). Everything here is f64.

use candle_core::{Device, Tensor, Var};

use crate::data::RowsRef;
use crate::engine::batch::Rows;
use crate::error::{Error, Result};
use crate::likelihood::{check_label, class_labels, Likelihood};
use crate::qoi::Qoi;

/// Class labels from a zero-copy view, checked to be integers in 0..c.
fn view_labels(
    r: RowsRef<'_>,
    cols: usize,
    rows: usize,
    b: usize,
    c: usize,
    first_row: usize,
) -> Result<Vec<usize>> {
    if rows != b || cols != 1 {
        return Err(Error::shape(
            "categorical labels y",
            format!("[{b}]"),
            format!("[{rows}, {cols}]"),
        ));
    }
    let check = |i: usize, l: f64| check_label(l, c, first_row + i);
    match r {
        RowsRef::I64(v) => v
            .iter()
            .enumerate()
            .map(|(i, l)| check(i, *l as f64))
            .collect(),
        RowsRef::F32(v) => v
            .iter()
            .enumerate()
            .map(|(i, l)| check(i, *l as f64))
            .collect(),
        RowsRef::F64(v) => v.iter().enumerate().map(|(i, l)| check(i, *l)).collect(),
    }
}

/// p = softmax(f), with the vectorised f64 exp (within 2 ulp of libm's).
fn softmax_row(f: &[f64], p: &mut [f64]) {
    let m = f.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    p.copy_from_slice(f);
    crate::scalar::fastmath::exp_shift_f64(p, m);
    let s: f64 = p.iter().sum();
    let inv = 1.0 / s;
    for pi in p.iter_mut() {
        *pi *= inv;
    }
}

fn check_output(f: &[f64], o: usize, first_row: usize) -> Result<()> {
    if let Some(k) = f.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "model output".into(),
            detail: format!(
                "example {}, output {} is {}",
                first_row + k / o,
                k % o,
                f[k]
            ),
        });
    }
    Ok(())
}

/// Values (B,) and the gradient of their sum w.r.t. the output (B×out), by candle autograd on
/// the output alone.
fn closure_signal(
    f: &[f64],
    b: usize,
    o: usize,
    call: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    what: &str,
    first_row: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let out = Var::from_vec(f.to_vec(), (b, o), &Device::Cpu)?;
    let v = call(out.as_tensor())?;
    if v.dims() != [b] {
        return Err(Error::shape(
            format!("{what} output (one value per row)"),
            format!("[{b}]"),
            format!("{:?}", v.dims()),
        ));
    }
    let values = v.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: what.into(),
            detail: format!("example {} gives {}", first_row + i, values[i]),
        });
    }
    let grads = v.sum_all()?.backward()?;
    let mut signal = vec![0.0; b * o];
    if let Some(g) = grads.get(out.as_tensor()) {
        crate::params::copy_tensor_f64(g, &mut signal)?;
    }
    Ok((values, signal))
}

impl Likelihood {
    /// ∂ log p(yᵢ|fᵢ) / ∂fᵢ for the rows of `f` (B×o, row-major).
    pub(crate) fn signal(
        &self,
        f: &[f64],
        b: usize,
        o: usize,
        y: Rows<'_>,
        first_row: usize,
    ) -> Result<Vec<f64>> {
        check_output(f, o, first_row)?;
        let signal = match self {
            Likelihood::Gaussian { sigma } => {
                crate::likelihood::check_sigma(sigma, o)?;
                let (yr, yc) = y.dims();
                if yr != b || yc != o {
                    return Err(Error::shape(
                        "gaussian targets y",
                        format!("[{b}, {o}]"),
                        format!("[{yr}, {yc}]"),
                    ));
                }
                let mut yv: Vec<f64> = Vec::new();
                y.copy_into(&mut yv, "targets y", first_row)?;
                let inv: Vec<f64> = (0..o)
                    .map(|k| 1.0 / sigma[if sigma.len() == 1 { 0 } else { k }].powi(2))
                    .collect();
                f.iter()
                    .zip(&yv)
                    .enumerate()
                    .map(|(k, (fi, yi))| (yi - fi) * inv[k % o])
                    .collect()
            }
            Likelihood::Categorical => {
                let labels = match y {
                    Rows::Tensor(t) => class_labels(t, b, o, first_row)?,
                    Rows::View(r, cols, rows) => view_labels(r, cols, rows, b, o, first_row)?,
                };
                let mut signal = vec![0.0; b * o];
                for (i, l) in labels.into_iter().enumerate() {
                    let row = &mut signal[i * o..(i + 1) * o];
                    softmax_row(&f[i * o..(i + 1) * o], row);
                    for v in row.iter_mut() {
                        *v = -*v;
                    }
                    row[l] += 1.0;
                }
                signal
            }
            Likelihood::Custom(c) => {
                let yt = y.tensor()?;
                closure_signal(
                    f,
                    b,
                    o,
                    |out| c(out, &yt),
                    "log-likelihood closure",
                    first_row,
                )?
                .1
            }
        };
        if let Some(k) = signal.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "log-likelihood gradient".into(),
                detail: format!(
                    "example {}, output {} is {}",
                    first_row + k / o,
                    k % o,
                    signal[k]
                ),
            });
        }
        Ok(signal)
    }
}

impl Qoi {
    /// QoI values (B,) and ∂qᵢ/∂fᵢ (B×o) for the rows of `f`.
    pub(crate) fn signal(
        &self,
        f: &[f64],
        b: usize,
        o: usize,
        first_row: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        check_output(f, o, first_row)?;
        let k = match self {
            Qoi::Output(k) | Qoi::Prob(k) => *k,
            _ => 0,
        };
        if k >= o {
            return Err(Error::invalid(
                "QoI output index",
                k,
                format!("the model has {o} outputs (0..{o})"),
            ));
        }
        match self {
            Qoi::Sum => Ok((
                f.chunks_exact(o).map(|r| r.iter().sum()).collect(),
                vec![1.0; b * o],
            )),
            Qoi::Output(_) => {
                let mut s = vec![0.0; b * o];
                for i in 0..b {
                    s[i * o + k] = 1.0;
                }
                Ok((f.chunks_exact(o).map(|r| r[k]).collect(), s))
            }
            Qoi::Prob(_) => {
                let mut s = vec![0.0; b * o];
                let mut values = Vec::with_capacity(b);
                for i in 0..b {
                    let row = &mut s[i * o..(i + 1) * o];
                    softmax_row(&f[i * o..(i + 1) * o], row);
                    let pk = row[k];
                    values.push(pk);
                    for v in row.iter_mut() {
                        *v *= -pk;
                    }
                    row[k] += pk;
                }
                Ok((values, s))
            }
            Qoi::Custom(c) => closure_signal(f, b, o, |out| c(out), "QoI closure", first_row),
        }
    }
}
