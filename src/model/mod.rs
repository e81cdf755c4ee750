//! Models `deltavar` knows, loadable from a PyTorch `nn.Sequential` safetensors export: a
//! sequential MLP of Linear layers with an elementwise activation ([`Mlp`]), and any
//! `nn.Sequential` of convolutions, pooling, flatten, Linear, norms and activations
//! ([`Sequential`], architecture string [`SeqSpec`]).

mod activation;
mod mlp;
mod sequential;
mod transformer;

pub use activation::Activation;
pub(crate) use mlp::state_dict_layers;
pub use mlp::{Mlp, MlpSpec};
pub(crate) use sequential::check_running_var;
pub use sequential::{ConvArgs, Rollout, SeqLayer, SeqSpec, Sequential};
pub use transformer::{Transformer, TransformerConfig};
