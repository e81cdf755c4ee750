//! `Embedding`: rows of a table looked up by integer token ids.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::capture::{self, UseInput};

/// A lookup table (vocab, d), a drop-in for `candle_nn::Embedding` (same `VarBuilder` name
/// `weight`, same initialisation), captured by the capture engine. Input: integer ids whose
/// first dimension indexes the examples, (B, T) or (B,); output (B, T, d) or (B, d). A learned
/// position embedding is read with ids broadcast to every example, (B, T).
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// From a table (vocab, d).
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }
    /// The table (vocab, d).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// `candle_nn::embedding`'s counterpart: `weight` (vocab, d) from `vb`.
pub fn embedding(vocab: usize, d: usize, vb: VarBuilder) -> candle_core::Result<Embedding> {
    let e = candle_nn::embedding(vocab, d, vb)?;
    Ok(Embedding::new(e.embeddings().clone()))
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (vocab, d) = self.weight.dims2()?;
        let dims = ids.dims().to_vec();
        if dims.is_empty() {
            candle_core::bail!("Embedding: ids need a leading example dimension, got a scalar");
        }
        let b = dims[0];
        let t = ids.elem_count() / b.max(1);
        let capturing = capture::active();
        let w = if capturing {
            self.weight.detach()
        } else {
            self.weight.clone()
        };
        let flat = ids.flatten_all()?;
        let z = w.index_select(&flat, 0)?.reshape((b, t, d))?;
        let z = capture::probe_with(
            z,
            UseInput::Tokens {
                ids: ids.reshape((b, t))?,
                vocab,
            },
            &self.weight,
            None,
        )?;
        let mut shape = dims;
        shape.push(d);
        z.reshape(shape)
    }
}
