//! Offline Fisher passes over a dataset (whole or one shard), for saving and reusing later.

use super::artifact::{
    shard_range, tensors_fingerprint, FisherArtifact, FisherMeta, FORMAT_VERSION,
};
use super::FisherSource;
use super::NativeFisher;
use crate::data::{Dataset, DatasetRange};
use crate::engine::{ExampleGradients, FactoredOptions};
use crate::error::Result;
use crate::fisher::FisherDiag;
use crate::likelihood::Likelihood;

/// What a pass accumulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// Σ gᵢ∘gᵢ, O(P).
    Diag,
    /// Σ gᵢgᵢᵀ (and its diagonal), O(P²): small P only.
    Dense,
}

impl std::str::FromStr for PassKind {
    type Err = crate::error::Error;
    /// `diag` or `dense`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "diag" => Ok(PassKind::Diag),
            "dense" => Ok(PassKind::Dense),
            _ => Err(crate::error::Error::invalid(
                "kind",
                s,
                "expected diag or dense",
            )),
        }
    }
}

/// Parses a shard `I/N` (0 ≤ I < N) into `(I, N)`.
///
/// ```
/// assert_eq!(deltavar::fisher::parse_shard("2/8").unwrap(), (2, 8));
/// assert!(deltavar::fisher::parse_shard("8/8").is_err());
/// ```
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || crate::error::Error::invalid("shard", s, "expected I/N with 0 <= I < N");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Options of [`fisher_pass`].
#[derive(Debug, Clone)]
pub struct PassOptions {
    /// Diag or dense.
    pub kind: PassKind,
    /// `Some((i, n))`: only shard i of n.
    pub shard: Option<(usize, usize)>,
    /// The engine's options (batch size, threads).
    pub engine: FactoredOptions,
    /// Budget for the dense pass, bytes.
    pub memory_budget: u64,
    /// Batches per progress step (each step runs in parallel on the workers). Default 64.
    pub batches_per_step: usize,
    /// Its stop check ([`Progress::with_stop`](crate::Progress::with_stop)) is asked after
    /// every step of a diagonal pass: [`Error::Interrupted`](crate::Error::Interrupted) when it
    /// says stop. Default none.
    pub progress: crate::progress::Progress,
}

impl Default for PassOptions {
    fn default() -> Self {
        Self {
            kind: PassKind::Diag,
            shard: None,
            engine: FactoredOptions::default(),
            memory_budget: super::DEFAULT_MEMORY_BUDGET,
            batches_per_step: 64,
            progress: crate::progress::Progress::none(),
        }
    }
}

/// Runs a Fisher pass of a model over `data` (or one shard of it), calling
/// `progress(done, total)` as examples are processed: on the graph engine (any model: `mlp:`,
/// `seq:`, ONNX, a [`crate::graph::build::GraphBuilder`] network) or the capture engine
/// ([`crate::engine::CaptureEngine`]: any model built from [`crate::nn`] layers).
/// `likelihood_name` is recorded in the metadata (for example "categorical" or
/// "gaussian:0.5"). The artifact's parameter names, shapes and weight fingerprint are the
/// engine's parameters (the state dict's), the weights that were summed over; shards merge.
///
/// Memory: the engine's (weights + per worker a P-vector and one batch) for diag, plus O(P²)
/// for dense; the dataset is read batch by batch (memory-mapped files stay on disk).
pub fn fisher_pass<E: ExampleGradients + Clone>(
    engine: &E,
    lik: Likelihood,
    likelihood_name: &str,
    data: &dyn Dataset,
    opts: &PassOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<FisherArtifact> {
    let named = engine.named_tensors()?;
    let (start, end) = match opts.shard {
        Some((i, n)) => shard_range(i, n, data.len())?,
        None => (0, data.len()),
    };
    let total = end - start;
    let p: usize = named.iter().map(|(_, t)| t.elem_count()).sum();
    let meta = FisherMeta {
        format_version: FORMAT_VERSION,
        num_examples: total,
        convention: "sum".into(),
        kind: match opts.kind {
            PassKind::Diag => "diag".into(),
            PassKind::Dense => "dense".into(),
        },
        likelihood: likelihood_name.into(),
        param_names: named.iter().map(|(n, _)| n.clone()).collect(),
        param_shapes: named.iter().map(|(_, t)| t.dims().to_vec()).collect(),
        weights_fingerprint: tensors_fingerprint(&named)?,
        ranges: vec![(start, end)],
        dataset_len: data.len(),
    };
    progress(0, total);
    match opts.kind {
        PassKind::Diag => {
            let step = (opts.engine.batch_size.max(1)).saturating_mul(opts.batches_per_step.max(1));
            let mut diag = FisherDiag::from_sums(vec![0.0; p], 0)?;
            let mut done = 0;
            while done < total {
                let len = step.min(total - done);
                let range = DatasetRange::new(data, start + done, len)?;
                let part = engine.sum_sq(&lik, &range, &opts.engine)?;
                diag.merge(&FisherDiag::from_sums(part, len)?)?;
                done += len;
                progress(done, total);
                opts.progress
                    .check(|| format!("the Fisher pass, {done} of {total} examples"))?;
            }
            Ok(FisherArtifact {
                meta,
                diag,
                dense: None,
                allow_partial: false,
                source: None,
            })
        }
        PassKind::Dense => {
            let range = DatasetRange::new(data, start, total)?;
            let dense = NativeFisher::with_engine(engine.clone(), lik, &range, opts.engine.clone())
                .fisher_dense(opts.memory_budget)?;
            progress(total, total);
            Ok(FisherArtifact {
                meta,
                diag: dense.diag(),
                dense: Some(dense),
                allow_partial: false,
                source: None,
            })
        }
    }
}
