use candle_core::Tensor;

use crate::error::{Error, Result};

/// An elementwise activation between Linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// φ(z) = z.
    Identity,
    /// max(z, 0).
    Relu,
    /// tanh(z).
    Tanh,
    /// 1 / (1 + e^{-z}).
    Sigmoid,
    /// The exact GELU, z·Φ(z) with the erf form (PyTorch's default `nn.GELU()`).
    Gelu,
    /// The tanh approximation of GELU (PyTorch's `nn.GELU(approximate="tanh")`, candle's `gelu`).
    GeluTanh,
    /// z·sigmoid(z).
    Silu,
    /// log(1 + e^z), computed stably as max(z,0) + log(1 + e^{-|z|}).
    Softplus,
}

impl Activation {
    /// All activations, for tests and help texts.
    pub const ALL: [Activation; 8] = [
        Activation::Identity,
        Activation::Relu,
        Activation::Tanh,
        Activation::Sigmoid,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Silu,
        Activation::Softplus,
    ];

    /// The name used by the CLI and `FromStr`.
    pub fn name(&self) -> &'static str {
        match self {
            Activation::Identity => "identity",
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu-tanh",
            Activation::Silu => "silu",
            Activation::Softplus => "softplus",
        }
    }

    /// Applies φ elementwise with candle ops (differentiable).
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Identity => Ok(z.clone()),
            Activation::Relu => z.relu(),
            Activation::Tanh => z.tanh(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(z),
            Activation::Gelu => z.gelu_erf(),
            Activation::GeluTanh => z.gelu(),
            Activation::Silu => z.silu(),
            Activation::Softplus => {
                let t = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
                z.relu()? + t
            }
        }
    }
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Activation::ALL.iter().copied().find(|a| a.name() == s).ok_or_else(|| {
            Error::invalid(
                "activation",
                s,
                "expected one of identity, relu, tanh, sigmoid, gelu, gelu-tanh, silu, softplus",
            )
        })
    }
}
