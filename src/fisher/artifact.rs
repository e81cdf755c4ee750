//! Saved Fisher passes: the accumulated sums in a safetensors file with JSON metadata, checked
//! against the model when loaded, and mergeable across shards of a dataset.
//!
//! File layout: tensor `diag_sum` (f64, \[P\]) = Σᵢ gᵢ∘gᵢ, and for dense passes `dense_sum`
//! (f64, [P, P]) = Σᵢ gᵢgᵢᵀ; the safetensors metadata key `deltavar` holds [`FisherMeta`] as
//! JSON. The convention is always "sum": divide by `num_examples` for the mean Fisher.
//!
//! Shards: a pass over shard i of n covers examples [⌊iN/n⌋, ⌊(i+1)N/n⌋); merging every shard's
//! file sums the tensors and the counts, which equals the one-pass result up to float
//! summation order.

use std::collections::HashMap;
use std::path::Path;

use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fisher::{FisherDense, FisherDiag};
use crate::params::Params;

/// The format version written by this crate.
pub const FORMAT_VERSION: u32 = 1;

/// Metadata of a saved Fisher pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FisherMeta {
    /// [`FORMAT_VERSION`] at writing.
    pub format_version: u32,
    /// Examples summed.
    pub num_examples: usize,
    /// Always "sum" (the tensors hold sums; divide by `num_examples` for the mean).
    pub convention: String,
    /// "diag" or "dense".
    pub kind: String,
    /// The likelihood, e.g. "categorical" or "gaussian:0.5".
    pub likelihood: String,
    /// Parameter names in flat order.
    pub param_names: Vec<String>,
    /// Parameter shapes in flat order.
    pub param_shapes: Vec<Vec<usize>>,
    /// Fingerprint of the weights the pass used ([`weights_fingerprint`]).
    pub weights_fingerprint: String,
    /// The example ranges covered, [start, end) each (one per merged shard).
    pub ranges: Vec<(usize, usize)>,
    /// Total examples of the dataset the shards come from.
    pub dataset_len: usize,
}

/// A Fisher pass: sums and metadata.
#[derive(Debug, Clone)]
pub struct FisherArtifact {
    /// Metadata.
    pub meta: FisherMeta,
    /// Σᵢ gᵢ∘gᵢ.
    pub diag: FisherDiag,
    /// Σᵢ gᵢgᵢᵀ for dense passes.
    pub dense: Option<FisherDense>,
    /// Whether this artifact may serve as a Fisher when it covers only part of its dataset
    /// (not saved; default false: an incomplete artifact is an error when used).
    pub allow_partial: bool,
    /// The file it was read from (not saved; `None` for an artifact made in memory), named in
    /// errors.
    pub source: Option<String>,
}

/// FNV-1a 64 over the parameter names, shapes and values (rounded to f32, so f32 and f64 loads
/// of the same weights agree), as 16 hex digits.
pub fn weights_fingerprint(params: &Params) -> Result<String> {
    let named: Vec<(String, candle_core::Tensor)> = params
        .entries()
        .iter()
        .map(|e| (e.name.clone(), e.var.as_tensor().clone()))
        .collect();
    tensors_fingerprint(&named)
}

/// [`weights_fingerprint`] of named tensors in the given order (for a model's own weights,
/// e.g. [`crate::Mlp::named_tensors`]: the fingerprint of exactly what a pass sums over).
pub fn tensors_fingerprint(named: &[(String, candle_core::Tensor)]) -> Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for (name, t) in named {
        eat(name.as_bytes());
        for d in t.dims() {
            eat(&(*d as u64).to_le_bytes());
        }
        let mut values = vec![0.0f64; t.elem_count()];
        crate::params::copy_tensor_f64(t, &mut values)?;
        for v in &values {
            eat(&(*v as f32).to_bits().to_le_bytes());
        }
    }
    Ok(format!("{h:016x}"))
}

/// The example range of shard `i` of `n` over `len` examples.
pub fn shard_range(i: usize, n: usize, len: usize) -> Result<(usize, usize)> {
    if n == 0 || i >= n {
        return Err(Error::invalid(
            "shard",
            format!("{i}/{n}"),
            "use I/N with 0 <= I < N",
        ));
    }
    let at = |k: usize| (k as u128 * len as u128 / n as u128) as usize;
    Ok((at(i), at(i + 1)))
}

fn f64_bytes(v: &[f64]) -> &[u8] {
    // SAFETY: f64 slices are plain old data
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn bytes_f64(path: &Path, what: &str, b: &[u8]) -> Result<Vec<f64>> {
    if b.len() % 8 != 0 {
        return Err(Error::BadFile {
            path: path.display().to_string(),
            detail: format!("'{what}' has a partial f64"),
        });
    }
    Ok(b.chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

impl FisherArtifact {
    /// Writes the artifact.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let p = self.diag.sums().len();
        let dense: Option<Vec<f64>> = self.dense.as_ref().map(|d| {
            (0..p)
                .flat_map(|i| (0..p).map(move |j| (i, j)))
                .map(|(i, j)| d.sum()[(i, j)])
                .collect()
        });
        let mut tensors = vec![(
            "diag_sum".to_string(),
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F64,
                vec![p],
                f64_bytes(self.diag.sums()),
            )
            .map_err(|e| Error::BadFile {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?,
        )];
        if let Some(d) = &dense {
            tensors.push((
                "dense_sum".to_string(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F64,
                    vec![p, p],
                    f64_bytes(d),
                )
                .map_err(|e| Error::BadFile {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?,
            ));
        }
        let meta = serde_json::to_string(&self.meta).map_err(|e| Error::BadFile {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let info = HashMap::from([("deltavar".to_string(), meta)]);
        safetensors::serialize_to_file(tensors, Some(info), path).map_err(|e| Error::BadFile {
            path: path.display().to_string(),
            detail: format!("could not write: {e}"),
        })
    }

    /// Reads an artifact, checking its format and sizes.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |d: String| Error::BadFile {
            path: path.display().to_string(),
            detail: d,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("deltavar"))
            .ok_or_else(|| {
                bad("no 'deltavar' metadata: not a Fisher file written by deltavar".into())
            })?;
        let meta: FisherMeta =
            serde_json::from_str(meta_json).map_err(|e| bad(format!("bad metadata: {e}")))?;
        if meta.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} (this deltavar reads {FORMAT_VERSION})",
                meta.format_version
            )));
        }
        if meta.convention != "sum" {
            return Err(bad(format!(
                "convention '{}' (expected 'sum')",
                meta.convention
            )));
        }
        let p = meta
            .param_shapes
            .iter()
            .try_fold(0usize, |acc, s| {
                s.iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .and_then(|n| acc.checked_add(n))
            })
            .ok_or_else(|| bad("the parameter shapes in the metadata overflow".into()))?;
        if meta.param_names.len() != meta.param_shapes.len() {
            return Err(bad(format!(
                "the metadata has {} parameter names but {} shapes",
                meta.param_names.len(),
                meta.param_shapes.len()
            )));
        }
        if meta
            .ranges
            .iter()
            .any(|r| r.0 > r.1 || r.1 > meta.dataset_len)
            || meta.ranges.iter().map(|r| r.1 - r.0).sum::<usize>() != meta.num_examples
        {
            return Err(bad(format!(
                "the metadata's example ranges {:?} do not fit its dataset of {} examples or its count {}",
                meta.ranges, meta.dataset_len, meta.num_examples
            )));
        }
        let diag_view = st
            .tensor("diag_sum")
            .map_err(|e| bad(format!("no 'diag_sum' tensor: {e}")))?;
        if diag_view.dtype() != safetensors::Dtype::F64 || diag_view.shape() != [p] {
            return Err(bad(format!(
                "'diag_sum' must be f64 [{p}], got {:?} {:?}",
                diag_view.dtype(),
                diag_view.shape()
            )));
        }
        let diag = FisherDiag::from_sums(
            bytes_f64(path, "diag_sum", diag_view.data())?,
            meta.num_examples,
        )?;
        let dense = match st.tensor("dense_sum") {
            Ok(v) => {
                if v.dtype() != safetensors::Dtype::F64 || v.shape() != [p, p] {
                    return Err(bad(format!(
                        "'dense_sum' must be f64 [{p}, {p}], got {:?}",
                        v.shape()
                    )));
                }
                let vals = bytes_f64(path, "dense_sum", v.data())?;
                let m = Mat::from_fn(p, p, |i, j| vals[i * p + j]);
                Some(FisherDense::from_lower_sum(m, meta.num_examples)?)
            }
            Err(_) if meta.kind == "dense" => {
                return Err(bad("kind 'dense' but no 'dense_sum' tensor".into()))
            }
            Err(_) => None,
        };
        Ok(Self {
            meta,
            diag,
            dense,
            allow_partial: false,
            source: Some(path.display().to_string()),
        })
    }

    /// Fails unless this artifact was computed for exactly these parameters and weights.
    pub fn check_model(&self, params: &Params) -> Result<()> {
        let named: Vec<(String, candle_core::Tensor)> = params
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.var.as_tensor().clone()))
            .collect();
        self.check_tensors(&named)
    }

    /// Fails unless this artifact was computed for exactly these named weight tensors (in flat
    /// order), e.g. [`crate::Mlp::named_tensors`].
    pub fn check_tensors(&self, named: &[(String, candle_core::Tensor)]) -> Result<()> {
        let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
        let shapes: Vec<&[usize]> = named.iter().map(|(_, t)| t.dims()).collect();
        if names != self.meta.param_names || shapes != self.meta.param_shapes {
            return Err(Error::Parameter(format!(
                "the Fisher file is for parameters {:?} with shapes {:?}, the model has {:?} with {:?}",
                self.meta.param_names, self.meta.param_shapes, names, shapes
            )));
        }
        let fp = tensors_fingerprint(named)?;
        if fp != self.meta.weights_fingerprint {
            return Err(Error::Parameter(format!(
                "the Fisher file was computed with other weights (fingerprint {}, the model's is {fp}); rerun the Fisher pass for these weights",
                self.meta.weights_fingerprint
            )));
        }
        Ok(())
    }

    /// Sums the shards of one pass. All must share weights, likelihood, kind and layout, and
    /// their example ranges must not overlap.
    pub fn merge(parts: &[FisherArtifact]) -> Result<FisherArtifact> {
        let first = parts
            .first()
            .ok_or_else(|| Error::invalid("merge", "no files", "give at least one Fisher file"))?;
        let mut out = first.clone();
        out.source = None;
        for (k, part) in parts.iter().enumerate().skip(1) {
            let m = &part.meta;
            let same = m.weights_fingerprint == out.meta.weights_fingerprint
                && m.likelihood == out.meta.likelihood
                && m.kind == out.meta.kind
                && m.param_names == out.meta.param_names
                && m.param_shapes == out.meta.param_shapes
                && m.dataset_len == out.meta.dataset_len;
            if !same {
                return Err(Error::invalid(
                    format!("merge part {k}"),
                    format!("{} {} {}", m.weights_fingerprint, m.likelihood, m.kind),
                    format!(
                        "every part must come from the same weights, likelihood, kind and dataset as part 0 ({} {} {})",
                        out.meta.weights_fingerprint, out.meta.likelihood, out.meta.kind
                    ),
                ));
            }
            for r in &m.ranges {
                if out.meta.ranges.iter().any(|q| r.0 < q.1 && q.0 < r.1) {
                    return Err(Error::invalid(
                        format!("merge part {k}"),
                        format!("range {:?}", r),
                        "overlaps a range already merged (the same shard twice?)",
                    ));
                }
            }
            out.diag.merge(&part.diag)?;
            out.dense = match (out.dense.take(), &part.dense) {
                (Some(a), Some(b)) => {
                    let p = a.sum().nrows();
                    let s = Mat::from_fn(p, p, |i, j| a.sum()[(i, j)] + b.sum()[(i, j)]);
                    Some(FisherDense::from_lower_sum(
                        s,
                        a.num_examples() + b.num_examples(),
                    )?)
                }
                _ => None,
            };
            out.meta.num_examples += m.num_examples;
            out.meta.ranges.extend(m.ranges.iter().copied());
        }
        out.meta.ranges.sort_unstable();
        Ok(out)
    }

    /// Whether the merged ranges cover the whole dataset.
    pub fn is_complete(&self) -> bool {
        self.missing_ranges().is_empty()
    }

    /// The example ranges [start, end) of the dataset that no merged shard covers.
    pub fn missing_ranges(&self) -> Vec<(usize, usize)> {
        let mut ranges = self.meta.ranges.clone();
        ranges.sort_unstable();
        let mut missing = Vec::new();
        let mut next = 0;
        for (a, b) in ranges {
            if a > next {
                missing.push((next, a));
            }
            next = next.max(b);
        }
        if next < self.meta.dataset_len {
            missing.push((next, self.meta.dataset_len));
        }
        missing
    }

    /// The fraction of the dataset's examples this artifact covers (1 when the dataset is empty).
    pub fn coverage(&self) -> f64 {
        if self.meta.dataset_len == 0 {
            1.0
        } else {
            self.meta.num_examples as f64 / self.meta.dataset_len as f64
        }
    }

    /// This artifact, allowed (or not) to serve as the Fisher while it covers only part of
    /// its dataset.
    pub fn with_partial_allowed(mut self, allow: bool) -> Self {
        self.allow_partial = allow;
        self
    }

    /// Ok when the artifact covers its whole dataset or partial use is allowed; otherwise an
    /// error naming the missing example ranges. With partial use allowed and ranges missing,
    /// returns a one-line warning with the fraction covered.
    pub fn check_complete(&self) -> Result<Option<String>> {
        let missing = self.missing_ranges();
        if missing.is_empty() {
            return Ok(None);
        }
        let list = missing
            .iter()
            .map(|(a, b)| format!("{a}..{b}"))
            .collect::<Vec<_>>()
            .join(", ");
        let file = match &self.source {
            Some(p) => format!("the Fisher file {p}"),
            None => "the Fisher".to_string(),
        };
        if self.allow_partial {
            return Ok(Some(format!(
                "warning: {file} covers {} of {} examples ({:.1}%); missing {list}",
                self.meta.num_examples,
                self.meta.dataset_len,
                100.0 * self.coverage()
            )));
        }
        Err(Error::Unsupported(format!(
            "{file} covers {} of {} examples: examples {list} are missing; merge the \
             missing shards (deltavar merge) or allow partial use (--allow-partial, \
             FisherArtifact::with_partial_allowed)",
            self.meta.num_examples, self.meta.dataset_len
        )))
    }
}

/// A saved pass as a [`crate::FisherSource`] (no per-example gradients: the dense method only
/// for the full inverse, and only if the pass was dense). An artifact that does not cover its
/// whole dataset is refused unless [`FisherArtifact::with_partial_allowed`].
impl crate::fisher::FisherSource for FisherArtifact {
    fn num_params(&self) -> usize {
        self.diag.sums().len()
    }
    fn num_examples(&self) -> usize {
        self.meta.num_examples
    }
    fn fisher_diag(&self) -> Result<FisherDiag> {
        self.check_complete()?;
        Ok(self.diag.clone())
    }
    fn fisher_dense(&self, memory_budget: u64) -> Result<FisherDense> {
        self.check_complete()?;
        let need = crate::fisher::dense_fisher_bytes(self.num_params());
        if need > memory_budget {
            return Err(Error::MemoryBudget {
                what: "the saved dense Fisher".into(),
                needed: need,
                budget: memory_budget,
                hint: "raise the memory budget".into(),
            });
        }
        self.dense.clone().ok_or_else(|| {
            Error::Unsupported(
                "this Fisher file holds the diagonal only; the full inverse needs a dense pass (fim --kind dense) or the training data".into(),
            )
        })
    }
}
