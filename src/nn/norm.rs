//! Layer norm and RMS norm over the last dimension, differentiable (candle-nn's fused versions
//! have no backward pass).

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::capture::{self, UseInput};

/// y = γ∘x̂ + β with x̂ = (x − mean)/sqrt(var + eps) over the last dimension (`LayerNorm`), or
/// y = γ∘x̂ with x̂ = x/sqrt(mean(x²) + eps) (`RmsNorm`). A drop-in for candle-nn's
/// `layer_norm` / `rms_norm` (names `weight`, `bias`), built from differentiable primitives and
/// captured by the capture engine (it records x̂).
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
    remove_mean: bool,
}

impl Norm {
    /// A layer norm (with bias, mean removed) or an RMS norm (no bias, no mean removal).
    pub fn new(weight: Tensor, bias: Option<Tensor>, eps: f64, remove_mean: bool) -> Self {
        Self {
            weight,
            bias,
            eps,
            remove_mean,
        }
    }
    /// γ.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// β.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

/// `candle_nn::layer_norm(size, eps, vb)`'s counterpart (γ = 1, β = 0 when new).
pub fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Norm> {
    let w = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
    let b = vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?;
    Ok(Norm::new(w, Some(b), eps, true))
}

/// `candle_nn::rms_norm(size, eps, vb)`'s counterpart (γ = 1 when new).
pub fn rms_norm(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Norm> {
    let w = vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?;
    Ok(Norm::new(w, None, eps, false))
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = self.weight.dims1()?;
        if dims.is_empty() || dims[dims.len() - 1] != d {
            candle_core::bail!("Norm: input {dims:?} does not end in the layer's {d} features");
        }
        let internal = match x.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            t => t,
        };
        let xi = x.to_dtype(internal)?;
        let xc = if self.remove_mean {
            xi.broadcast_sub(&xi.mean_keepdim(D::Minus1)?)?
        } else {
            xi
        };
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xhat = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(x.dtype())?;
        let capturing = capture::active();
        let (w, bias) = if capturing {
            (self.weight.detach(), self.bias.as_ref().map(|b| b.detach()))
        } else {
            (self.weight.clone(), self.bias.clone())
        };
        let mut y = xhat.broadcast_mul(&w)?;
        if let Some(b) = &bias {
            y = y.broadcast_add(b)?;
        }
        if !capturing {
            return Ok(y);
        }
        let bsz = if dims.len() == 1 { 1 } else { dims[0] };
        let t = x.elem_count() / (bsz * d).max(1);
        let y = capture::probe_with(
            y.reshape((bsz, t, d))?,
            UseInput::Scale(xhat.detach().reshape((bsz, t, d))?),
            &self.weight,
            self.bias.as_ref(),
        )?;
        y.reshape(dims)
    }
}
