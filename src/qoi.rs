//! The quantity of interest q(θ, z) on a model's output (its gradients are taken by the engines:
//! [`crate::qoi_gradient`], [`crate::GraphEngine::query_layered_gradients`]).

use std::sync::Arc;

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// A user closure `output (B, out) -> QoI values (B,)`, row i depending on output row i only.
pub type QoiFn = dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// A quantity of interest on a model output row f(z): built-in, or a user closure.
#[derive(Clone)]
pub enum Qoi {
    /// Σ_k f_k(z).
    Sum,
    /// f_k(z) (a logit for a classifier).
    Output(usize),
    /// softmax(f(z))_k.
    Prob(usize),
    /// Values (B,) from the output (B, out), row i depending on output row i only.
    Custom(Arc<QoiFn>),
}

impl std::fmt::Debug for Qoi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Qoi::Sum => write!(f, "Sum"),
            Qoi::Output(k) => write!(f, "Output({k})"),
            Qoi::Prob(k) => write!(f, "Prob({k})"),
            Qoi::Custom(_) => write!(f, "Custom(closure)"),
        }
    }
}

impl Qoi {
    /// Per-row values, shape (B,), of a model output (B, out).
    pub fn eval(&self, output: &Tensor) -> Result<Tensor> {
        let (_, out) = output.dims2().map_err(|_| {
            Error::shape(
                "model output for the QoI",
                "(batch, outputs)",
                format!("{:?}", output.dims()),
            )
        })?;
        let k = match self {
            Qoi::Sum => return Ok(output.sum(1)?),
            Qoi::Custom(f) => return Ok(f(output)?),
            Qoi::Output(k) | Qoi::Prob(k) => *k,
        };
        if k >= out {
            return Err(Error::invalid(
                "QoI output index",
                k,
                format!("the model has {out} outputs (0..{out})"),
            ));
        }
        match self {
            Qoi::Output(_) => Ok(output.narrow(1, k, 1)?.squeeze(1)?),
            _ => Ok(candle_nn::ops::softmax(output, D::Minus1)?
                .narrow(1, k, 1)?
                .squeeze(1)?),
        }
    }
}

impl Qoi {
    /// A user closure `output (B, out) -> values (B,)`.
    pub fn custom(
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
    ) -> Self {
        Qoi::Custom(Arc::new(f))
    }

    /// The closure `z ↦ Σ_rows qoi(model(z))` for [`crate::engine::qoi_gradient`] /
    /// [`crate::engine::qoi_gradients`] (for one query row it is the QoI itself).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use deltavar::{qoi_gradient, Activation, Mlp, Qoi};
    /// let vm = VarMap::new();
    /// let mlp = Mlp::new(VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu), &[2, 4, 3], Activation::Relu, None).unwrap();
    /// let params = mlp.params(&vm).unwrap();
    /// let z = Tensor::new(&[[0.1f64, 0.2]], &Device::Cpu).unwrap();
    /// let g = qoi_gradient(&params, &z, Qoi::Prob(1).of(&mlp)).unwrap();
    /// assert!(g.value > 0.0 && g.value < 1.0);
    /// ```
    pub fn of<'a, M: candle_core::Module + Sync>(
        &self,
        model: &'a M,
    ) -> impl Fn(&Tensor) -> candle_core::Result<Tensor> + Sync + 'a {
        let q = self.clone();
        move |z| {
            q.eval(&model.forward(z)?)
                .map_err(candle_core::Error::wrap)?
                .sum_all()
        }
    }
}

impl std::str::FromStr for Qoi {
    type Err = Error;
    /// Parses `sum`, `output:K` or `prob:K`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::invalid("qoi", s, "expected sum, output:K or prob:K");
        if s == "sum" {
            return Ok(Qoi::Sum);
        }
        let (kind, k) = s.split_once(':').ok_or_else(bad)?;
        let k: usize = k.parse().map_err(|_| bad())?;
        match kind {
            "output" => Ok(Qoi::Output(k)),
            "prob" => Ok(Qoi::Prob(k)),
            _ => Err(bad()),
        }
    }
}
