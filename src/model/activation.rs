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
    /// The exact GELU, z·Φ(z) with the erf form (PyTorch's default `nn.GELU()`; candle's
    /// `gelu_erf`).
    Gelu,
    /// The tanh approximation of GELU, ½z(1 + tanh(√(2/π)(z + 0.044715z³))) (PyTorch's
    /// `nn.GELU(approximate="tanh")`; candle's `gelu`).
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
            // Composed from exact primitives: candle's fused gelu ops differentiate with
            // rounded constants (0.398942, 0.797885, ...), ~1e-7 off the true derivative.
            Activation::Gelu => {
                let phi = ((z * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)?;
                (z * 0.5)? * phi
            }
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let inner = ((z + ((z.sqr()? * z)? * 0.044715)?)? * c)?;
                (z * 0.5)? * (inner.tanh()? + 1.0)?
            }
            Activation::Silu => z.silu(),
            Activation::Softplus => {
                let t = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
                z.relu()? + t
            }
        }
    }
}

impl Activation {
    /// φ(z) for one f64 value (the native engine's forward).
    #[inline]
    pub fn value(&self, z: f64) -> f64 {
        match self {
            Activation::Identity => z,
            Activation::Relu => z.max(0.0),
            Activation::Tanh => z.tanh(),
            Activation::Sigmoid => sigmoid(z),
            Activation::Gelu => 0.5 * z * (1.0 + libm::erf(z * std::f64::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => 0.5 * z * (1.0 + gelu_tanh_inner(z).tanh()),
            Activation::Silu => z * sigmoid(z),
            Activation::Softplus => z.max(0.0) + (-z.abs()).exp().ln_1p(),
        }
    }

    /// φ'(z), given z and a = φ(z) (the native engine's backward). ReLU's derivative at 0 is 0,
    /// as in PyTorch.
    #[inline]
    pub fn derivative(&self, z: f64, a: f64) -> f64 {
        match self {
            Activation::Identity => 1.0,
            Activation::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Tanh => 1.0 - a * a,
            Activation::Sigmoid => a * (1.0 - a),
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + libm::erf(z * std::f64::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
                cdf + z * pdf
            }
            Activation::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let t = gelu_tanh_inner(z).tanh();
                0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)
            }
            Activation::Silu => {
                let s = sigmoid(z);
                s * (1.0 + z * (1.0 - s))
            }
            Activation::Softplus => sigmoid(z),
        }
    }
}

#[inline]
fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[inline]
fn gelu_tanh_inner(z: f64) -> f64 {
    (2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z * z * z)
}

impl std::str::FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Activation::ALL
            .iter()
            .copied()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                Error::invalid(
                "activation",
                s,
                "expected one of identity, relu, tanh, sigmoid, gelu, gelu-tanh, silu, softplus",
            )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn forward_values_match_closed_forms() {
        let z = Tensor::new(&[-2.0f64, 1.0, 30.0], &Device::Cpu).unwrap();
        let expect = [
            (Activation::Identity, [-2.0, 1.0, 30.0]),
            (Activation::Relu, [0.0, 1.0, 30.0]),
            (
                Activation::Tanh,
                [-0.9640275800758169, 0.7615941559557649, 1.0],
            ),
            (
                Activation::Sigmoid,
                [0.11920292202211755, 0.7310585786300049, 0.9999999999999065],
            ),
            (
                Activation::Gelu,
                [-0.04550026389635842, 0.8413447460685429, 30.0],
            ),
            (
                Activation::GeluTanh,
                [-0.04540230591222195, 0.8411919906082768, 30.0],
            ),
            (
                Activation::Silu,
                [-0.23840584404423515, 0.7310585786300049, 29.999999999997197],
            ),
            (
                Activation::Softplus,
                [0.12692801104297263, 1.3132616875182228, 30.0],
            ),
        ];
        for (act, want) in expect {
            let got = act.forward(&z).unwrap().to_vec1::<f64>().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-14 * w.abs().max(1.0),
                    "{}: {g} vs {w}",
                    act.name()
                );
            }
            assert_eq!(act.name().parse::<Activation>().unwrap(), act);
            for (zi, w) in [-2.0, 1.0, 30.0].iter().zip(want) {
                assert!(
                    (act.value(*zi) - w).abs() <= 1e-14 * w.abs().max(1.0),
                    "{} scalar",
                    act.name()
                );
            }
            // the scalar derivative against a central difference
            for zi in [-1.3, -0.2, 0.4, 2.1] {
                let h = 1e-6;
                let fd = (act.value(zi + h) - act.value(zi - h)) / (2.0 * h);
                let d = act.derivative(zi, act.value(zi));
                assert!(
                    (d - fd).abs() < 1e-8,
                    "{} derivative at {zi}: {d} vs {fd}",
                    act.name()
                );
            }
        }
        assert!("swish".parse::<Activation>().is_err());
    }
}
