//! `BatchNorm2d` in evaluation mode: a per-channel affine map of the input normalised by the
//! running statistics (no batch statistics, so the examples of a batch stay independent).

use candle_core::{Module, Tensor};

use super::capture::{self, UseInput};

/// y = γ_c·x̂ + β_c with x̂ = (x − μ_c)/sqrt(σ²_c + eps), μ and σ² the running mean and variance
/// (PyTorch's `nn.BatchNorm2d` after `model.eval()`). Input (B, C, H, W). The capture engine
/// sees each pixel as a use of a per-channel scale: gᵞ = Σ_hw δ∘x̂, gᵝ = Σ_hw δ.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Option<Tensor>,
    mean: Tensor,
    var: Tensor,
    eps: f64,
}

impl BatchNorm2d {
    /// From γ (C), β (C), the running mean (C) and variance (C), and eps.
    pub fn new(weight: Tensor, bias: Option<Tensor>, mean: Tensor, var: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias,
            mean,
            var,
            eps,
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

impl Module for BatchNorm2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let shape = (1, c, 1, 1);
        let mean = self.mean.to_dtype(x.dtype())?.reshape(shape)?;
        let inv = ((self.var.to_dtype(x.dtype())? + self.eps)?.sqrt()?.recip())?.reshape(shape)?;
        let xhat = x.broadcast_sub(&mean)?.broadcast_mul(&inv)?;
        let capturing = capture::active();
        let (g, beta) = if capturing {
            (self.weight.detach(), self.bias.as_ref().map(|t| t.detach()))
        } else {
            (self.weight.clone(), self.bias.clone())
        };
        let mut y = xhat.broadcast_mul(&g.reshape(shape)?)?;
        if let Some(beta) = &beta {
            y = y.broadcast_add(&beta.reshape(shape)?)?;
        }
        if !capturing {
            return Ok(y);
        }
        // uses: (B, H·W, C)
        let to_uses = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
        };
        let y = capture::probe_with(
            to_uses(&y)?,
            UseInput::Scale(to_uses(&xhat.detach())?),
            &self.weight,
            self.bias.as_ref(),
        )?;
        y.transpose(1, 2)?.reshape((b, c, h, w))
    }
}
