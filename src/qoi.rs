//! Stage 2a: the quantity of interest q(θ, z) and its gradient ∇θ q (the seed's `get_qoi_gradient`).

use candle_core::{Tensor, D};
use faer::Mat;

use crate::error::{Error, Result};
use crate::params::Params;

/// Built-in quantities of interest on a model output row f(z).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qoi {
    /// Σ_k f_k(z).
    Sum,
    /// f_k(z) (a logit for a classifier).
    Output(usize),
    /// softmax(f(z))_k.
    Prob(usize),
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
    /// The closure `z ↦ Σ_rows qoi(model(z))` for [`qoi_gradient`] / [`qoi_gradients`] (for one
    /// query row it is the QoI itself).
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
        self,
        model: &'a M,
    ) -> impl Fn(&Tensor) -> candle_core::Result<Tensor> + Sync + 'a {
        move |z| {
            self.eval(&model.forward(z)?)
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

/// A QoI value and its gradient with respect to every parameter.
#[derive(Debug, Clone)]
pub struct QoiGradient {
    /// q(θ, z).
    pub value: f64,
    /// ∇θ q in the flat layout of the [`Params`] it was taken against (length P).
    pub flat: Vec<f64>,
}

impl QoiGradient {
    /// The gradient per parameter tensor (name, f64 tensor shaped like the parameter), the
    /// seed's pytree form.
    pub fn per_tensor(&self, params: &Params) -> Result<Vec<(String, Tensor)>> {
        params.unflatten(&self.flat)
    }
}

/// Takes the scalar `q` returned by a closure and checks it.
fn scalar_value(q: &Tensor, what: &str) -> Result<f64> {
    if q.elem_count() != 1 {
        return Err(Error::NotScalar {
            what: what.into(),
            shape: format!("{:?}", q.dims()),
        });
    }
    let v = q
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?[0];
    if !v.is_finite() {
        return Err(Error::NonFinite {
            what: format!("{what} output"),
            detail: format!("the value is {v}"),
        });
    }
    Ok(v)
}

/// ∇θ q(θ, z) for a user closure `qoi(z)` that runs the model (capturing it) and returns a scalar
/// tensor (a single element of any shape). The seed's `get_qoi_gradient(qoi_functional, params,
/// model, z)`.
///
/// Errors if the closure fails, its output is not a single element, or the value or gradient is
/// not finite. A parameter that receives no gradient is an error naming it (usually an op
/// without a backward pass upstream, such as candle-nn's fused `layer_norm`), unless it was
/// allowed with [`Params::allow_unused`].
///
/// ```
/// use candle_core::{Device, DType, Tensor, Var};
/// use deltavar::{qoi_gradient, Params};
/// let w = Var::from_tensor(&Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu).unwrap()).unwrap();
/// let params = Params::from_vars(vec![("w".into(), w.clone())]).unwrap();
/// let z = Tensor::new(&[[3.0f64], [4.0]], &Device::Cpu).unwrap();
/// let g = qoi_gradient(&params, &z, |z| w.as_tensor().matmul(z)).unwrap();
/// assert_eq!(g.value, 11.0);
/// assert_eq!(g.flat, vec![3.0, 4.0]);
/// ```
pub fn qoi_gradient<F>(params: &Params, z: &Tensor, qoi: F) -> Result<QoiGradient>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    let q = qoi(z)?;
    let value = scalar_value(&q, "QoI closure")?;
    let grads = q.sum_all()?.backward()?;
    let flat = params.flatten_grads(&grads)?;
    crate::error::check_finite("QoI gradient", &flat)?;
    Ok(QoiGradient { value, flat })
}

/// Gradients of a QoI at M query points, the rows of `queries` (M, …), as a P×M block (one
/// column per query) plus the M values. Generic path: one forward/backward per query, in parallel
/// on `threads` workers (see [`crate::engine::GenericOptions`]). Memory O(P·M).
pub fn qoi_gradients<F>(
    params: &Params,
    queries: &Tensor,
    qoi: F,
    opts: &crate::engine::GenericOptions,
) -> Result<(Mat<f64>, Vec<f64>)>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor> + Sync,
{
    let m = *queries.dims().first().ok_or_else(|| {
        Error::shape(
            "queries (one row per query: the first dimension indexes the queries)",
            "a tensor of rank >= 1",
            "a scalar",
        )
    })?;
    let p = params.num_params();
    let cols = crate::engine::generic::map_examples(m, opts, |j| {
        let z = queries.narrow(0, j, 1)?;
        let g = qoi_gradient(params, &z, &qoi).map_err(|e| match e {
            Error::NonFinite { what, detail } => Error::NonFinite {
                what,
                detail: format!("{detail} (query {j})"),
            },
            e => e,
        })?;
        Ok(g)
    })?;
    let mut mat = Mat::<f64>::zeros(p, m);
    let mut values = Vec::with_capacity(m);
    for (j, g) in cols.into_iter().enumerate() {
        for (i, v) in g.flat.into_iter().enumerate() {
            mat[(i, j)] = v;
        }
        values.push(g.value);
    }
    Ok((mat, values))
}
