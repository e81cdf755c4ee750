//! `Linear`: y = x Wᵀ + b over the last dimension, any number of leading dimensions.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::capture;

/// A linear layer, a drop-in for `candle_nn::Linear` (same `VarBuilder` names `weight` (out, in)
/// and `bias` (out), same initialisation), captured by the capture engine. Input (…, in): the
/// first dimension indexes the examples, the dimensions between are uses of the layer
/// (positions of a sequence).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// From a weight (out, in) and an optional bias (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
    /// The weight (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias (out).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `candle_nn::linear`'s counterpart: `weight` (out, in) and `bias` (out) from `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// `candle_nn::linear_no_bias`'s counterpart.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let l = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear::new(l.weight().clone(), None))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let (out, inp) = self.weight.dims2()?;
        if dims.is_empty() || dims[dims.len() - 1] != inp {
            candle_core::bail!(
                "Linear: input {:?} does not end in the layer's {inp} inputs",
                dims
            );
        }
        let b = if dims.len() == 1 { 1 } else { dims[0] };
        let t = x.elem_count() / (b * inp).max(1);
        let capturing = capture::active();
        // while capturing, the weights are detached: the probes carry every gradient needed
        let w = if capturing {
            self.weight.detach()
        } else {
            self.weight.clone()
        };
        let x3 = x.reshape((b, t, inp))?;
        let mut z = x3.broadcast_matmul(&w.t()?)?;
        if let Some(bias) = &self.bias {
            let bias = if capturing {
                bias.detach()
            } else {
                bias.clone()
            };
            z = z.broadcast_add(&bias)?;
        }
        let z = capture::probe_use(z, &x3, &self.weight, self.bias.as_ref())?;
        let mut shape = dims;
        let last = shape.len() - 1;
        shape[last] = out;
        z.reshape(shape)
    }
}
