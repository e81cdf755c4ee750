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

/// Uniform draws on [0, 1) from `seed` (splitmix64, 53-bit mantissas): the deterministic
/// initialisation of [`Sequential::init`] and [`Transformer::init`].
pub(crate) fn seeded_uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Every tensor of a safetensors file, as candle reads them (a file that is not one is an
/// error naming it).
pub(crate) fn read_candle_tensors(
    path: &std::path::Path,
) -> crate::error::Result<std::collections::HashMap<String, candle_core::Tensor>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).map_err(|e| {
        crate::error::Error::BadFile {
            path: path.display().to_string(),
            detail: format!("not a readable safetensors file: {e}"),
        }
    })
}
