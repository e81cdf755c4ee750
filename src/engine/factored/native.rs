//! A native forward and backward pass of a known MLP over faer matmuls, producing each Linear
//! layer's per-example factors: its input rows X (B×in) and back-propagated signals Δ (B×out).
//!
//! All buffers are row-major (one example per row), so one example's factors are contiguous.
//! Cost per batch: the forward's matmuls plus one matmul per layer but the first for Δ.

use candle_core::Tensor;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::engine::batch::{cast_slice, copy_rows, Rows};
use crate::error::{Error, Result};
use crate::model::{Activation, Mlp};
use crate::scalar::Scalar;

/// Whether φ' needs the pre-activation z (otherwise it follows from a = φ(z)).
fn needs_pre(act: Activation) -> bool {
    matches!(
        act,
        Activation::Gelu | Activation::GeluTanh | Activation::Silu | Activation::Softplus
    )
}

/// A weight tensor as the engine reads it.
#[derive(Debug, Clone)]
pub(crate) enum Weights<T> {
    /// The model's own tensor (a contiguous CPU tensor in the engine's precision): no copy;
    /// each pass reads it under candle's storage lock.
    Shared(Tensor),
    /// A copy converted to the engine's precision.
    Owned(Vec<T>),
}

impl<T: Scalar> Weights<T> {
    /// Shares `t` when it is a contiguous CPU tensor of the engine's precision, copies it
    /// otherwise; fails naming `what` on a NaN or infinity.
    fn of(t: &Tensor, what: &str) -> Result<Self> {
        if t.dtype() == <T as Scalar>::DTYPE && t.is_contiguous() && t.device().is_cpu() {
            let bad = crate::params::with_float_slice(t, |s| {
                cast_slice::<T>(s).and_then(|v| v.iter().position(|x| !x.f64().is_finite()))
            })?;
            if let Some(k) = bad {
                return Err(Error::NonFinite {
                    what: what.into(),
                    detail: format!("element {k}"),
                });
            }
            return Ok(Weights::Shared(t.clone()));
        }
        let mut v = Vec::new();
        copy_rows(t, &mut v, what, 0)?;
        Ok(Weights::Owned(v))
    }

    /// Runs `f` on the values.
    pub fn with<R>(&self, f: impl FnOnce(&[T]) -> R) -> Result<R> {
        match self {
            Weights::Owned(v) => Ok(f(v)),
            Weights::Shared(t) => {
                crate::params::with_float_slice(t, |s| cast_slice::<T>(s).map(f))?.ok_or_else(
                    || {
                        Error::Unsupported(
                        "a model weight changed its dtype or device after the engine was built: \
                         rebuild the engine"
                            .into(),
                    )
                    },
                )
            }
        }
    }
}

/// One Linear layer's weights in the engine's precision.
#[derive(Debug, Clone)]
pub(crate) struct NativeLayer<T> {
    /// out×in, row-major (PyTorch's and candle's layout).
    pub w: Weights<T>,
    /// out.
    pub b: Weights<T>,
    pub inp: usize,
    pub out: usize,
}

/// The weights of an [`Mlp`] as the engine reads them: the model's own tensors when they are
/// contiguous CPU tensors in the engine's precision (no copy, so the engine sees later changes to
/// the variables), otherwise a converted snapshot (rebuild the engine after changing them).
#[derive(Debug, Clone)]
pub(crate) struct NativeMlp<T> {
    pub layers: Vec<NativeLayer<T>>,
    pub act: Activation,
}

/// Per-thread buffers for one batch.
#[derive(Debug, Default)]
pub(crate) struct Workspace<T> {
    /// acts[l]: input of layer l (B×in_l); acts[L] is the model output (B×out).
    pub acts: Vec<Vec<T>>,
    /// pre[l]: pre-activation of hidden layer l (B×out_l), for l < L-1, kept only for the
    /// activations whose derivative needs it.
    pub pre: Vec<Vec<T>>,
    /// deltas[l]: ∂u/∂z_l (B×out_l), u the per-example objective.
    pub deltas: Vec<Vec<T>>,
    /// rows of the current batch.
    pub rows: usize,
}

impl<T: Scalar> NativeMlp<T> {
    pub fn from_mlp(mlp: &Mlp) -> Result<Self> {
        let mut layers = Vec::with_capacity(mlp.layers().len());
        for (i, l) in mlp.layers().iter().enumerate() {
            let w = l.weight();
            let (out, inp) = w.dims2()?;
            let b = l.bias().ok_or_else(|| {
                Error::Parameter(format!(
                    "layer {i} has no bias; the factored engine expects Linear layers with bias"
                ))
            })?;
            layers.push(NativeLayer {
                w: Weights::of(w, &format!("weight of layer {i}"))?,
                b: Weights::of(b, &format!("bias of layer {i}"))?,
                inp,
                out,
            });
        }
        Ok(Self {
            layers,
            act: mlp.activation(),
        })
    }

    pub fn num_inputs(&self) -> usize {
        self.layers[0].inp
    }

    pub fn num_outputs(&self) -> usize {
        self.layers.last().map(|l| l.out).unwrap_or(0)
    }

    pub fn num_params(&self) -> usize {
        self.layers.iter().map(|l| l.out * l.inp + l.out).sum()
    }

    /// Loads the inputs `x` (B×in, any float dtype) into the workspace and runs the forward pass.
    pub fn forward(&self, x: Rows<'_>, ws: &mut Workspace<T>, first_row: usize) -> Result<()> {
        let nl = self.layers.len();
        ws.acts.resize_with(nl + 1, Vec::new);
        ws.pre.resize_with(nl, Vec::new);
        ws.deltas.resize_with(nl, Vec::new);
        let (b, cols) = x.dims();
        let inp = self.num_inputs();
        let rank_ok = match x {
            Rows::Tensor(t) => t.rank() == 2,
            Rows::View(..) => true,
        };
        if !rank_ok || cols != inp {
            let got = match x {
                Rows::Tensor(t) => format!("{:?}", t.dims()),
                Rows::View(..) => format!("[{b}, {cols}]"),
            };
            return Err(Error::shape("model inputs", format!("[{b}, {inp}]"), got));
        }
        ws.rows = b;
        x.copy_into(&mut ws.acts[0], "input data x", first_row)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let (lo, hi) = ws.acts.split_at_mut(l + 1);
            let a_in = &lo[l];
            let z = &mut hi[0];
            z.clear();
            z.resize(b * layer.out, T::default());
            layer.w.with(|w| {
                matmul(
                    MatMut::from_row_major_slice_mut(z, b, layer.out),
                    Accum::Replace,
                    MatRef::from_row_major_slice(a_in, b, layer.inp),
                    MatRef::from_row_major_slice(w, layer.out, layer.inp).transpose(),
                    T::of(1.0),
                    Par::Seq,
                )
            })?;
            let hidden = l + 1 < nl;
            let bias_of = |z: &mut Vec<T>, relu: bool| {
                layer.b.with(|bias| {
                    for row in z.chunks_exact_mut(layer.out) {
                        for (v, bb) in row.iter_mut().zip(bias) {
                            let t = *v + *bb;
                            *v = if !relu || t > T::default() {
                                t
                            } else {
                                T::default()
                            };
                        }
                    }
                })
            };
            match (hidden, self.act) {
                (true, Activation::Relu) => {
                    // bias and ReLU in one pass; the backward reads the mask from the output
                    bias_of(z, true)?;
                }
                _ => {
                    bias_of(z, false)?;
                    if hidden && self.act != Activation::Identity {
                        if needs_pre(self.act) {
                            let pre = &mut ws.pre[l];
                            pre.clear();
                            pre.extend_from_slice(z);
                        }
                        let act = self.act;
                        z.iter_mut().for_each(|v| *v = T::of(act.value(v.f64())));
                    }
                }
            }
        }
        Ok(())
    }

    /// Back-propagates the output signal already in `ws.deltas[L-1]` (B×out) through the
    /// network, filling every layer's Δ.
    pub fn backward(&self, ws: &mut Workspace<T>) -> Result<()> {
        let b = ws.rows;
        for l in (1..self.layers.len()).rev() {
            let layer = &self.layers[l];
            let (lo, hi) = ws.deltas.split_at_mut(l);
            let d_prev = &mut lo[l - 1];
            d_prev.clear();
            d_prev.resize(b * layer.inp, T::default());
            layer.w.with(|w| {
                matmul(
                    MatMut::from_row_major_slice_mut(d_prev, b, layer.inp),
                    Accum::Replace,
                    MatRef::from_row_major_slice(&hi[0], b, layer.out),
                    MatRef::from_row_major_slice(w, layer.out, layer.inp),
                    T::of(1.0),
                    Par::Seq,
                )
            })?;
            let post = &ws.acts[l];
            match self.act {
                Activation::Identity => {}
                Activation::Relu => {
                    for (d, a) in d_prev.iter_mut().zip(post) {
                        *d = if *a > T::default() { *d } else { T::default() };
                    }
                }
                act if needs_pre(act) => {
                    let pre = &ws.pre[l - 1];
                    for ((d, z), a) in d_prev.iter_mut().zip(pre).zip(post) {
                        *d = T::of(d.f64() * act.derivative(z.f64(), a.f64()));
                    }
                }
                act => {
                    // tanh and sigmoid: φ' from the output alone
                    for (d, a) in d_prev.iter_mut().zip(post) {
                        *d = T::of(d.f64() * act.derivative(0.0, a.f64()));
                    }
                }
            }
        }
        Ok(())
    }

    /// The model output of the last forward pass (B×out, row-major).
    pub fn output<'a>(&self, ws: &'a Workspace<T>) -> &'a [T] {
        &ws.acts[self.layers.len()]
    }
}
