//! Layers the capture engine sees: drop-ins for candle-nn's constructors (same `VarBuilder`
//! names, so existing weights load unchanged), equal to candle-nn's layers in value outside a
//! capture, and differentiable (never the fused ops without a backward pass).
//!
//! Inside a capture ([`capture`]) each layer with parameters records, per use, its input (the
//! unfolded patches for a convolution) and a zero probe on its output; one batched backward then
//! gives every example's output signal δ, and the per-example gradients follow per layer without
//! a backward pass per example. Examples in a batch must be independent (no batch statistics).
//!
//! | layer | parameters | per-use input recorded |
//! |---|---|---|
//! | [`Linear`] ([`linear`], [`linear_no_bias`]) | W (out, in), b | the input rows (B, T, in) |
//! | [`Conv2d`] ([`conv2d`], [`conv2d_no_bias`]) | W (out, C, kh, kw), b | unfolded patches (B, H_out·W_out, C·kh·kw) |
//! | [`Conv1d`] ([`conv1d`]) | W (out, C, k), b | unfolded patches (B, L_out, C·k) |
//! | [`Embedding`] ([`embedding`]) | table (vocab, d) | the token ids (B, T) |
//! | [`Norm`] ([`layer_norm`], [`rms_norm`]) | γ (d), β | the normalised input x̂ (B, T, d) |
//! | [`BatchNorm2d`] (eval mode) | γ (C), β | the normalised input x̂ as (B, H·W, C) |
//! | [`max_pool2d`], [`avg_pool2d`] | none | — (correct backward: candle 0.11.1's max-pool backward is 4× small for 2×2) |

mod batch_norm;
pub mod capture;
mod conv;
mod embedding;
mod linear;
mod norm;
mod pool;

pub use batch_norm::BatchNorm2d;
pub use conv::{conv1d, conv2d, conv2d_no_bias, Conv, Conv1d, Conv2d, Conv2dConfig};
pub use embedding::{embedding, Embedding};
pub use linear::{linear, linear_no_bias, Linear};
pub use norm::{layer_norm, rms_norm, Norm};
pub use pool::{avg_pool2d, max_pool2d};
