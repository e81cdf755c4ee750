//! The capture context: while a capture engine runs a model's forward pass on this thread, every
//! `deltavar::nn` layer with parameters records each use — what it read (its input rows, or the
//! unfolded patches of a convolution) and a zero probe `Var` added to what it wrote, whose
//! gradient after one backward pass is the per-example output signal δ (capture.md).
//!
//! Outside a capture the layers add nothing and record nothing.

use std::cell::RefCell;

use candle_core::{Tensor, Var};

/// What a layer use read, in the form its per-example gradient needs.
#[derive(Debug, Clone)]
pub enum UseInput {
    /// A linear map of input rows (B, T, in): gᵂ = Σₜ δₜ xₜᵀ (Linear, the patches of a conv).
    Rows(Tensor),
    /// An embedding lookup of token ids (B, T) (integers) in a table of `vocab` rows: row v of
    /// gᵂ is Σ_{t: idₜ = v} δₜ.
    Tokens {
        /// The ids, (B, T).
        ids: Tensor,
        /// Rows of the table.
        vocab: usize,
    },
    /// An elementwise scale of the normalised input x̂ (B, T, d) (layer / RMS norm):
    /// gᵞ = Σₜ δₜ∘x̂ₜ.
    Scale(Tensor),
}

/// One use of a layer inside a captured forward pass.
#[derive(Debug, Clone)]
pub struct UseRecord {
    /// The layer's weight tensor itself (the parameter).
    pub weight: Tensor,
    /// The layer's bias (out), if any: gᵇ = Σₜ δₜ.
    pub bias: Option<Tensor>,
    /// What the layer read, detached.
    pub input: UseInput,
    /// The zero probe added to what it wrote, (B, T, out).
    pub probe: Var,
}

thread_local! {
    static CAPTURE: RefCell<Option<Vec<UseRecord>>> = const { RefCell::new(None) };
}

/// Whether a capture is running on this thread.
pub fn active() -> bool {
    CAPTURE.with(|c| c.borrow().is_some())
}

/// Records one use (no-op outside a capture).
pub(crate) fn push(rec: UseRecord) {
    CAPTURE.with(|c| {
        if let Some(v) = c.borrow_mut().as_mut() {
            v.push(rec);
        }
    });
}

/// A running capture on this thread; ends it when dropped (also on an error or a panic).
pub struct CaptureGuard {
    _private: (),
}

impl CaptureGuard {
    /// Starts capturing on this thread. Fails if a capture is already running here (captures
    /// do not nest).
    pub fn begin() -> crate::Result<Self> {
        CAPTURE.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_some() {
                return Err(crate::Error::Unsupported(
                    "a capture is already running on this thread (captures do not nest)".into(),
                ));
            }
            *c = Some(Vec::new());
            Ok(Self { _private: () })
        })
    }

    /// The uses recorded so far, in call order, and the capture goes on empty.
    pub fn take(&self) -> Vec<UseRecord> {
        CAPTURE.with(|c| {
            c.borrow_mut()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default()
        })
    }
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURE.with(|c| *c.borrow_mut() = None);
    }
}

/// Adds a zero probe to `z` (B, T, out) and records the use, when capturing; returns `z`
/// unchanged otherwise. `input` is (B, T, in).
pub(crate) fn probe_use(
    z: Tensor,
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    probe_with(z, UseInput::Rows(input.detach()), weight, bias)
}

/// Adds a zero probe to `z` (B, T, out) and records the use with the given input, when
/// capturing.
pub(crate) fn probe_with(
    z: Tensor,
    input: UseInput,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !active() {
        return Ok(z);
    }
    let probe = Var::zeros(z.shape(), z.dtype(), z.device())?;
    let out = (z + probe.as_tensor())?;
    push(UseRecord {
        weight: weight.clone(),
        bias: bias.cloned(),
        input,
        probe,
    });
    Ok(out)
}
