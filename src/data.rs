//! Training data for the Fisher passes: sources of (x, y) rows with random access by range.
//!
//! The seed iterates a PyTorch `DataLoader`; here a [`Dataset`] hands out any contiguous range of
//! examples as a pair of candle tensors whose first dimension is the example index. Engines pick
//! their own chunking (the `batch_size` option), so results never depend on how data was batched.

use candle_core::Tensor;

use crate::error::{Error, Result};

/// A source of training examples. `x` and `y` of a range both have the range's length as their
/// first dimension; `y` may be f32/f64 targets (gaussian) or integer class labels (categorical).
pub trait Dataset: Sync {
    /// Number of examples N.
    fn len(&self) -> usize;

    /// `true` when the dataset has no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Examples `start .. start + len` as `(x, y)`.
    fn get(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)>;
}

/// An in-memory dataset of two tensors sharing their first dimension.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use deltavar::{Dataset, TensorDataset};
/// let x = Tensor::zeros((5, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
/// let y = Tensor::zeros((5, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
/// let d = TensorDataset::new(x, y).unwrap();
/// assert_eq!(d.len(), 5);
/// assert_eq!(d.get(1, 2).unwrap().0.dims(), &[2, 3]);
/// ```
#[derive(Debug, Clone)]
pub struct TensorDataset {
    x: Tensor,
    y: Tensor,
}

impl TensorDataset {
    /// Pairs `x` (N, …) with `y` (N, …). Fails if either is a scalar or the first dimensions differ.
    pub fn new(x: Tensor, y: Tensor) -> Result<Self> {
        if x.rank() == 0 || y.rank() == 0 {
            return Err(Error::shape(
                "dataset tensors (need a leading example dimension)",
                "rank >= 1",
                format!("x {:?}, y {:?}", x.dims(), y.dims()),
            ));
        }
        if x.dim(0)? != y.dim(0)? {
            return Err(Error::shape(
                "dataset (x and y must have the same number of rows)",
                format!("y with {} rows", x.dim(0)?),
                format!("{} rows", y.dim(0)?),
            ));
        }
        Ok(Self { x, y })
    }

    /// The inputs.
    pub fn x(&self) -> &Tensor {
        &self.x
    }

    /// The targets.
    pub fn y(&self) -> &Tensor {
        &self.y
    }
}

impl Dataset for TensorDataset {
    fn len(&self) -> usize {
        self.x.dims()[0]
    }
    fn get(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        check_range(self.len(), start, len)?;
        Ok((self.x.narrow(0, start, len)?, self.y.narrow(0, start, len)?))
    }
}

/// A list of (x, y) batches, like the seed's `DataLoader`, seen as one dataset.
#[derive(Debug, Clone)]
pub struct BatchList {
    batches: Vec<TensorDataset>,
    starts: Vec<usize>,
    total: usize,
}

impl BatchList {
    /// From (x, y) batches; each must pass [`TensorDataset::new`] and all must agree on the
    /// trailing dimensions.
    pub fn new(batches: Vec<(Tensor, Tensor)>) -> Result<Self> {
        let mut out = Vec::with_capacity(batches.len());
        let mut starts = Vec::with_capacity(batches.len());
        let mut total = 0;
        for (i, (x, y)) in batches.into_iter().enumerate() {
            let d = TensorDataset::new(x, y)?;
            if let Some(first) = out.first() {
                let first: &TensorDataset = first;
                if first.x.dims()[1..] != d.x.dims()[1..] || first.y.dims()[1..] != d.y.dims()[1..]
                {
                    return Err(Error::shape(
                        format!("batch {i} of the batch list"),
                        format!(
                            "x {:?}, y {:?} after the first dim",
                            &first.x.dims()[1..],
                            &first.y.dims()[1..]
                        ),
                        format!("x {:?}, y {:?}", d.x.dims(), d.y.dims()),
                    ));
                }
            }
            starts.push(total);
            total += d.len();
            out.push(d);
        }
        Ok(Self {
            batches: out,
            starts,
            total,
        })
    }
}

impl Dataset for BatchList {
    fn len(&self) -> usize {
        self.total
    }
    fn get(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        check_range(self.total, start, len)?;
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        let end = start + len;
        for (b, &s) in self.batches.iter().zip(&self.starts) {
            let e = s + b.len();
            if e <= start || s >= end {
                continue;
            }
            let lo = start.max(s) - s;
            let hi = end.min(e) - s;
            let (x, y) = b.get(lo, hi - lo)?;
            xs.push(x);
            ys.push(y);
        }
        if xs.len() == 1 {
            return Ok((xs.remove(0), ys.remove(0)));
        }
        if xs.is_empty() {
            let b = &self.batches[0];
            return b.get(0, 0);
        }
        Ok((Tensor::cat(&xs, 0)?, Tensor::cat(&ys, 0)?))
    }
}

pub(crate) fn check_range(n: usize, start: usize, len: usize) -> Result<()> {
    if start.checked_add(len).is_none_or(|e| e > n) {
        return Err(Error::shape(
            "dataset range",
            format!("a range inside 0..{n}"),
            format!("{start}..{}", start.saturating_add(len)),
        ));
    }
    Ok(())
}
