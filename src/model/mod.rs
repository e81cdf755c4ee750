//! Models `deltavar` knows: a sequential MLP of Linear layers with an elementwise activation,
//! loadable from a PyTorch `nn.Sequential` safetensors export.

mod activation;
mod mlp;

pub use activation::Activation;
pub(crate) use mlp::{gram_width, layer_offsets, num_params_of};
pub use mlp::{Mlp, MlpSpec};
