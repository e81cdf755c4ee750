//! Built-in log-likelihoods log p(y | f(x)) of a model output f(x), per example.
//!
//! Both are written with plain tensor ops (a one-hot product, not `gather`), so they also
//! differentiate twice in candle.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// A user closure `(output (B, out), y) -> log-likelihoods (B,)`, row i depending on output row i
/// and target row i only.
pub type LikelihoodFn = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// A per-example log-likelihood of the model output: gaussian, categorical, or a user closure.
///
/// Both engines take it: the generic path differentiates `log_likelihood` through the whole
/// model with candle; the native engines need only its gradient with respect to the output,
/// computed in closed form for the built-ins and by candle on the (B, out) output alone for a
/// closure.
#[derive(Clone)]
pub enum Likelihood {
    /// Σ_k log N(y_k | f_k, σ_k²): `sigma` has one entry (shared) or one per output.
    /// Targets y: float, shape (B, out).
    Gaussian {
        /// The noise standard deviation(s), each finite and > 0.
        sigma: Vec<f64>,
    },
    /// log softmax(f)\[y\] with f the logits. Targets y: integer class indices, shape (B,).
    Categorical,
    /// `log p(y | f)` per row from the output f and the targets y, shape (B,).
    Custom(Arc<LikelihoodFn>),
}

impl std::fmt::Debug for Likelihood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Likelihood::Gaussian { sigma } => write!(f, "Gaussian {{ sigma: {sigma:?} }}"),
            Likelihood::Categorical => write!(f, "Categorical"),
            Likelihood::Custom(_) => write!(f, "Custom(closure)"),
        }
    }
}

impl std::str::FromStr for Likelihood {
    type Err = Error;
    /// Parses `gaussian` (σ = 1), `gaussian:SIGMA` or `categorical`.
    ///
    /// ```
    /// use deltavar::Likelihood;
    /// assert!(matches!("gaussian:0.5".parse::<Likelihood>().unwrap(), Likelihood::Gaussian { .. }));
    /// assert!("poisson".parse::<Likelihood>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "likelihood",
                s,
                "expected gaussian, gaussian:SIGMA (SIGMA > 0) or categorical",
            )
        };
        match s.split_once(':') {
            None if s == "gaussian" => Ok(Likelihood::gaussian(1.0)),
            None if s == "categorical" => Ok(Likelihood::Categorical),
            Some(("gaussian", sig)) => {
                let v: f64 = sig.parse().map_err(|_| bad())?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(bad());
                }
                Ok(Likelihood::gaussian(v))
            }
            _ => Err(bad()),
        }
    }
}

impl Likelihood {
    /// A user closure `(output, y) -> log-likelihoods (B,)`.
    pub fn custom(
        f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Self {
        Likelihood::Custom(Arc::new(f))
    }

    /// Gaussian with one shared σ.
    pub fn gaussian(sigma: f64) -> Self {
        Likelihood::Gaussian { sigma: vec![sigma] }
    }

    /// The closure `(x, y) ↦ log p(y | model(x))` (shape (B,)) for [`crate::GenericFisher`].
    pub fn of<'a, M: candle_core::Module + Sync>(
        &'a self,
        model: &'a M,
    ) -> impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync + 'a {
        move |x, y| {
            self.log_likelihood(&model.forward(x)?, y)
                .map_err(candle_core::Error::wrap)
        }
    }

    /// Per-example log-likelihoods, shape (B,), of `output` (B, out) against targets `y`.
    pub fn log_likelihood(&self, output: &Tensor, y: &Tensor) -> Result<Tensor> {
        if let Likelihood::Custom(f) = self {
            return Ok(f(output, y)?);
        }
        let (b, out) = output.dims2().map_err(|_| {
            Error::shape(
                "model output for the likelihood",
                "(batch, outputs)",
                format!("{:?}", output.dims()),
            )
        })?;
        match self {
            Likelihood::Gaussian { sigma } => {
                check_sigma(sigma, out)?;
                let y = if y.rank() == 1 && out == 1 {
                    y.unsqueeze(1)?
                } else {
                    y.clone()
                };
                if y.dims() != [b, out] {
                    return Err(Error::shape(
                        "gaussian targets y",
                        format!("[{b}, {out}]"),
                        format!("{:?}", y.dims()),
                    ));
                }
                let y = y.to_dtype(output.dtype())?;
                let inv: Vec<f64> = (0..out)
                    .map(|k| 1.0 / sigma[if sigma.len() == 1 { 0 } else { k }])
                    .collect();
                let inv = Tensor::new(inv.as_slice(), output.device())?
                    .to_dtype(output.dtype())?
                    .unsqueeze(0)?;
                let r = (y - output)?.broadcast_mul(&inv)?;
                let c: f64 = (0..out)
                    .map(|k| {
                        sigma[if sigma.len() == 1 { 0 } else { k }].ln()
                            + 0.5 * (2.0 * std::f64::consts::PI).ln()
                    })
                    .sum();
                Ok(((r.sqr()?.sum(1)? * -0.5)? - c)?)
            }
            Likelihood::Categorical => {
                let onehot = one_hot(y, b, out, output)?;
                let lsm = candle_nn::ops::log_softmax(output, D::Minus1)?;
                Ok((lsm * onehot)?.sum(1)?)
            }
            Likelihood::Custom(f) => Ok(f(output, y)?),
        }
    }
}

/// Checks gaussian σ values: one shared or one per output, each finite and > 0.
pub(crate) fn check_sigma(sigma: &[f64], out: usize) -> Result<()> {
    if sigma.is_empty() || (sigma.len() != 1 && sigma.len() != out) {
        return Err(Error::shape(
            "gaussian sigma (one value, or one per output)",
            format!("1 or {out} values"),
            format!("{} values", sigma.len()),
        ));
    }
    if let Some(s) = sigma.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(Error::invalid(
            "gaussian sigma",
            s,
            "must be finite and > 0",
        ));
    }
    Ok(())
}

/// One-hot (B, C) in `like`'s dtype from integer labels (B,); labels out of 0..C are an error.
pub(crate) fn one_hot(y: &Tensor, b: usize, c: usize, like: &Tensor) -> Result<Tensor> {
    let labels = class_labels(y, b, c, 0)?;
    let mut data = vec![0f64; b * c];
    for (i, &l) in labels.iter().enumerate() {
        data[i * c + l] = 1.0;
    }
    Ok(Tensor::from_vec(data, (b, c), like.device())?.to_dtype(like.dtype())?)
}

/// Integer class labels (B,) (or (B, 1)) checked to lie in 0..C; `first_row` numbers the
/// examples in error messages.
pub(crate) fn class_labels(y: &Tensor, b: usize, c: usize, first_row: usize) -> Result<Vec<usize>> {
    let y = if y.rank() == 2 && y.dims()[1] == 1 {
        y.squeeze(1)?
    } else {
        y.clone()
    };
    if y.dims() != [b] {
        return Err(Error::shape(
            "categorical labels y",
            format!("[{b}]"),
            format!("{:?}", y.dims()),
        ));
    }
    let labels: Vec<f64> = match y.dtype() {
        DType::I64 => y.to_vec1::<i64>()?.into_iter().map(|v| v as f64).collect(),
        DType::U32 => y.to_vec1::<u32>()?.into_iter().map(f64::from).collect(),
        DType::U8 => y.to_vec1::<u8>()?.into_iter().map(f64::from).collect(),
        DType::F32 | DType::F64 => y.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        dt => {
            return Err(Error::invalid(
                "categorical label dtype",
                format!("{dt:?}"),
                "use i64, u32 or u8",
            ))
        }
    };
    labels
        .into_iter()
        .enumerate()
        .map(|(i, l)| check_label(l, c, first_row + i))
        .collect()
}

/// One class label, checked to be an integer in 0..c; `example` numbers it in the error.
pub(crate) fn check_label(l: f64, c: usize, example: usize) -> Result<usize> {
    if l.fract() != 0.0 || !l.is_finite() || l < 0.0 || l >= c as f64 {
        Err(Error::invalid(
            format!("categorical label of example {example}"),
            l,
            format!("must be an integer in 0..{c} (the model has {c} outputs)"),
        ))
    } else {
        Ok(l as usize)
    }
}
