//! Training data for the Fisher passes: sources of (x, y) rows with random access by range.
//!
//! The seed iterates a PyTorch `DataLoader`; here a [`Dataset`] hands out any contiguous range of
//! examples as a pair of candle tensors whose first dimension is the example index. Engines pick
//! their own chunking (the `batch_size` option), so results never depend on how data was batched.

pub mod npy;

use candle_core::{Device, Tensor};

pub use npy::{read_vector, write_npy, NpyArray, NpyDtype, RowsBuf, RowsRef};

use crate::error::{Error, Result};

/// A batch borrowed from a dataset without copying (rows are contiguous, row-major).
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// Inputs, `rows × x_cols`.
    pub x: RowsRef<'a>,
    /// Input width.
    pub x_cols: usize,
    /// Targets, `rows × y_cols` (`y_cols` = 1 for class labels).
    pub y: RowsRef<'a>,
    /// Target width.
    pub y_cols: usize,
    /// Number of rows.
    pub rows: usize,
}

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

    /// Examples `start .. start + len` borrowed without copying, for sources that hold them
    /// contiguously (memory-mapped files); `None` for the others. The native engines (graph,
    /// capture) read batches this way when they can.
    fn view(&self, _start: usize, _len: usize) -> Option<Result<BatchView<'_>>> {
        None
    }

    /// Tells the source that examples `start .. start + len` are done with, so a memory-mapped
    /// source can drop their pages. Default: nothing.
    fn release(&self, _start: usize, _len: usize) {}
}

/// A dataset of two memory-mapped `.npy` files: inputs `x` (N, ...) — features (N, in), images
/// (N, C, H, W) as f32 or f64, or token ids (N, T) as int64 — and targets `y`, either (N, out)
/// floats (gaussian) or (N,) int64 class labels (categorical); a graph model's targets may have
/// any per-example shape ((N, T) labels of a language model, (N, 40, 1) next states), read as
/// one flattened row per example. Rows of any trailing shape come
/// back from [`Dataset::get`] with that shape.
///
/// Memory: only the pages being read (the OS maps them on demand and may drop them), so the
/// files can be far larger than RAM. The native engines read batches straight from the
/// mapping ([`Dataset::view`]); [`Dataset::get`] copies one batch into candle tensors. The files
/// must not be truncated by another process while mapped.
#[derive(Debug)]
pub struct MmapNpyDataset {
    x: NpyArray,
    y: NpyArray,
}

impl MmapNpyDataset {
    /// Maps both files and checks them against each other.
    pub fn open(x: impl AsRef<std::path::Path>, y: impl AsRef<std::path::Path>) -> Result<Self> {
        Self::from_arrays(NpyArray::open(x)?, NpyArray::open(y)?)
    }

    /// Pairs two arrays, mapped files or in memory ([`NpyArray::from_rows`]), with the checks of
    /// [`MmapNpyDataset::open`]: in memory, the engines read them as they read a file's mapping.
    pub fn from_arrays(x: NpyArray, y: NpyArray) -> Result<Self> {
        if x.shape().len() < 2 {
            return Err(Error::BadFile {
                path: x.path().display().to_string(),
                detail: format!(
                    "inputs x must have shape (N, ...) with at least one feature dimension \
                     (features, (C, H, W) images, (T,) token ids), got {:?}",
                    x.shape()
                ),
            });
        }
        if y.shape().is_empty() {
            return Err(Error::BadFile {
                path: y.path().display().to_string(),
                detail: format!(
                    "targets y must have shape (N,), (N, outputs) or (N, ...) (one row per example), got {:?}",
                    y.shape()
                ),
            });
        }
        if x.rows() != y.rows() {
            return Err(Error::BadFile {
                path: y.path().display().to_string(),
                detail: format!(
                    "has {} rows but {} has {}",
                    y.rows(),
                    x.path().display(),
                    x.rows()
                ),
            });
        }
        Ok(Self { x, y })
    }

    /// The inputs.
    pub fn x(&self) -> &NpyArray {
        &self.x
    }

    /// The targets.
    pub fn y(&self) -> &NpyArray {
        &self.y
    }
}

fn rows_tensor(r: RowsRef<'_>, rows: usize, cols: usize, keep_2d: bool) -> Result<Tensor> {
    let dev = Device::Cpu;
    Ok(match (r, keep_2d) {
        (RowsRef::F32(v), true) => Tensor::from_slice(v, (rows, cols), &dev)?,
        (RowsRef::F64(v), true) => Tensor::from_slice(v, (rows, cols), &dev)?,
        (RowsRef::I64(v), true) => Tensor::from_slice(v, (rows, cols), &dev)?,
        (RowsRef::F32(v), false) => Tensor::from_slice(v, rows, &dev)?,
        (RowsRef::F64(v), false) => Tensor::from_slice(v, rows, &dev)?,
        (RowsRef::I64(v), false) => Tensor::from_slice(v, rows, &dev)?,
    })
}

impl Dataset for MmapNpyDataset {
    fn len(&self) -> usize {
        self.x.rows()
    }
    fn get(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let v = self
            .view(start, len)
            .unwrap_or_else(|| Err(Error::Unsupported("no view".into())))?;
        let mut xshape = self.x.shape().to_vec();
        xshape[0] = len;
        Ok((
            rows_tensor(v.x, len, v.x_cols, true)?.reshape(xshape)?,
            rows_tensor(v.y, len, v.y_cols, self.y.shape().len() >= 2)?,
        ))
    }
    fn release(&self, start: usize, len: usize) {
        self.x.release_rows(start, len);
        self.y.release_rows(start, len);
    }
    fn view(&self, start: usize, len: usize) -> Option<Result<BatchView<'_>>> {
        Some((|| {
            Ok(BatchView {
                x: self.x.rows_ref(start, len)?,
                x_cols: self.x.row_len(),
                y: self.y.rows_ref(start, len)?,
                y_cols: self.y.row_len().max(1),
                rows: len,
            })
        })())
    }
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
            // an empty range: zero rows shaped like the first batch (none for an empty list)
            return match self.batches.first() {
                Some(b) => b.get(0, 0),
                None => Err(Error::Unsupported(
                    "the batch list is empty: it has no rows, and no shape to give an empty range"
                        .into(),
                )),
            };
        }
        Ok((Tensor::cat(&xs, 0)?, Tensor::cat(&ys, 0)?))
    }
}

/// Examples `start .. start + len` of another dataset, as a dataset (for shards and chunks).
pub struct DatasetRange<'a> {
    data: &'a dyn Dataset,
    start: usize,
    len: usize,
}

impl<'a> DatasetRange<'a> {
    /// The range; fails if it does not lie inside `data`.
    pub fn new(data: &'a dyn Dataset, start: usize, len: usize) -> Result<Self> {
        check_range(data.len(), start, len)?;
        Ok(Self { data, start, len })
    }
}

impl Dataset for DatasetRange<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        check_range(self.len, start, len)?;
        self.data.get(self.start + start, len)
    }
    fn view(&self, start: usize, len: usize) -> Option<Result<BatchView<'_>>> {
        if let Err(e) = check_range(self.len, start, len) {
            return Some(Err(e));
        }
        self.data.view(self.start + start, len)
    }
    fn release(&self, start: usize, len: usize) {
        self.data.release(self.start + start, len)
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
