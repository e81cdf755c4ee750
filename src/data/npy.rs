//! `.npy` files, memory-mapped (memmap2): header parsing, validation and zero-copy row views;
//! the same arrays held in memory ([`NpyArray::from_rows`]).
//!
//! Supported: C-order arrays of little-endian f32 (`<f4`), f64 (`<f8`) and i64 (`<i8`), format
//! versions 1.0–3.0. Anything else (Fortran order, other dtypes, big-endian, a file shorter than
//! its header says) is an [`Error::BadFile`] naming the file and what was expected.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Element type of an `.npy` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f4`.
    F32,
    /// `<f8`.
    F64,
    /// `<i8`.
    I64,
}

impl NpyDtype {
    /// Bytes per element.
    pub fn size(&self) -> usize {
        match self {
            NpyDtype::F32 => 4,
            NpyDtype::F64 | NpyDtype::I64 => 8,
        }
    }
}

/// A borrowed run of rows of an `.npy` array.
#[derive(Debug, Clone, Copy)]
pub enum RowsRef<'a> {
    /// f32 data.
    F32(&'a [f32]),
    /// f64 data.
    F64(&'a [f64]),
    /// i64 data.
    I64(&'a [i64]),
}

/// An owned run of rows: the data of an in-memory [`NpyArray`].
#[derive(Debug, Clone)]
pub enum RowsBuf {
    /// f32 data.
    F32(Vec<f32>),
    /// f64 data.
    F64(Vec<f64>),
    /// i64 data.
    I64(Vec<i64>),
}

impl RowsBuf {
    fn len(&self) -> usize {
        match self {
            RowsBuf::F32(v) => v.len(),
            RowsBuf::F64(v) => v.len(),
            RowsBuf::I64(v) => v.len(),
        }
    }
    fn dtype(&self) -> NpyDtype {
        match self {
            RowsBuf::F32(_) => NpyDtype::F32,
            RowsBuf::F64(_) => NpyDtype::F64,
            RowsBuf::I64(_) => NpyDtype::I64,
        }
    }
}

/// Where an [`NpyArray`]'s elements live.
#[derive(Debug)]
enum Storage {
    /// A memory-mapped file; the data start `offset` bytes in.
    Mapped { mmap: Mmap, offset: usize },
    /// Owned, in memory (arrays handed over by a caller, e.g. the Python package's NumPy arrays).
    Owned(RowsBuf),
}

/// A C-order array of f32, f64 or i64: a memory-mapped `.npy` file ([`NpyArray::open`]) or rows
/// held in memory ([`NpyArray::from_rows`]); both are read the same way, so every reader of
/// `.npy` data (datasets, queries, held-out targets) takes either.
///
/// Memory: a file, the mapping only (pages are read on demand and can be dropped by the OS), so
/// files far larger than RAM work; in memory, the data themselves.
#[derive(Debug)]
pub struct NpyArray {
    path: PathBuf,
    storage: Storage,
    dtype: NpyDtype,
    shape: Vec<usize>,
    row_len: usize,
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::BadFile {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// Parses the Python-dict header of an `.npy` file: returns (descr, fortran_order, shape).
fn parse_header(path: &Path, h: &str) -> Result<(String, bool, Vec<usize>)> {
    let field = |key: &str| -> Result<&str> {
        let k = format!("'{key}':");
        let i = h
            .find(&k)
            .ok_or_else(|| bad(path, format!("npy header has no '{key}' entry: {h}")))?;
        Ok(h[i + k.len()..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| {
            bad(
                path,
                format!("cannot read the dtype in the npy header: {h}"),
            )
        })?
        .to_string();
    let fortran = field("fortran_order")?.starts_with("True");
    let shape = field("shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| {
            bad(
                path,
                format!("cannot read the shape in the npy header: {h}"),
            )
        })?;
    let dims = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| bad(path, format!("bad shape entry '{s}' in {h}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((descr, fortran, dims))
}

/// Elements per row of `shape`, checked on its own: with zero rows the total is 0 whatever the
/// trailing dimensions are, so a hostile shape like (0, 2⁴⁰, 2⁴⁰) must not wrap here.
fn row_len(path: &Path, shape: &[usize], dtype: NpyDtype) -> Result<usize> {
    shape
        .iter()
        .skip(1)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|r| r.checked_mul(dtype.size()).is_some())
        .ok_or_else(|| {
            bad(
                path,
                format!("shape {shape:?}: one row has more elements than this machine can address"),
            )
        })
}

impl NpyArray {
    /// Maps `path` and checks its header and size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        // SAFETY: the mapping is read-only; as with any memory map, the file must not be
        // truncated by another process while it is mapped (documented on `MmapNpyDataset`).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if mmap.len() < 10 || &mmap[..6] != b"\x93NUMPY" {
            return Err(bad(path, "not an .npy file (missing the \\x93NUMPY magic)"));
        }
        let major = mmap[6];
        let (hlen, hstart) = match major {
            1 => (u16::from_le_bytes([mmap[8], mmap[9]]) as usize, 10),
            2 | 3 => {
                if mmap.len() < 12 {
                    return Err(bad(path, "truncated npy header"));
                }
                (
                    u32::from_le_bytes([mmap[8], mmap[9], mmap[10], mmap[11]]) as usize,
                    12,
                )
            }
            v => return Err(bad(path, format!("unsupported npy format version {v}"))),
        };
        if mmap.len() < hstart + hlen {
            return Err(bad(path, "truncated npy header"));
        }
        let header = std::str::from_utf8(&mmap[hstart..hstart + hlen])
            .map_err(|_| bad(path, "npy header is not text"))?;
        let (descr, fortran, shape) = parse_header(path, header)?;
        if fortran {
            return Err(bad(
                path,
                "Fortran-order arrays are not supported; save with np.ascontiguousarray(a)",
            ));
        }
        let dtype = match descr.as_str() {
            "<f4" => NpyDtype::F32,
            "<f8" => NpyDtype::F64,
            "<i8" => NpyDtype::I64,
            d => {
                return Err(bad(
                    path,
                    format!("dtype '{d}' is not supported; use little-endian float32 (<f4), float64 (<f8) or int64 (<i8)"),
                ))
            }
        };
        let offset = hstart + hlen;
        // checked arithmetic: a hostile header whose shape product wraps must not pass the size
        // check (rows_ref would then read outside the mapping)
        let count = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("shape {shape:?} has more elements than this machine can address"),
                )
            })?;
        let row_len = row_len(path, &shape, dtype)?;
        let need = count
            .checked_mul(dtype.size())
            .and_then(|b| b.checked_add(offset))
            .ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "shape {shape:?} of {descr} needs more bytes than this machine can address"
                    ),
                )
            })?;
        if mmap.len() != need {
            if mmap.len() > need {
                return Err(bad(
                    path,
                    format!(
                        "size mismatch: shape {shape:?} of {descr} needs {need} bytes, the file has {} (trailing data)",
                        mmap.len()
                    ),
                ));
            }
            return Err(bad(
                path,
                format!(
                    "truncated: shape {shape:?} of {descr} needs {need} bytes, the file has {}",
                    mmap.len()
                ),
            ));
        }
        if offset % dtype.size() != 0 {
            return Err(bad(path, "npy data is not aligned to its element size"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            storage: Storage::Mapped { mmap, offset },
            dtype,
            shape,
            row_len,
        })
    }

    /// An in-memory array of `shape` holding `data` (C order). `name` stands in for the file
    /// name in errors (for example "x" or "queries"). A shape whose element count is not the
    /// data's length is an error.
    pub fn from_rows(name: &str, shape: &[usize], data: RowsBuf) -> Result<Self> {
        let path = Path::new(name);
        let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if count != Some(data.len()) {
            return Err(bad(
                path,
                format!(
                    "shape {shape:?} does not match the {} elements given",
                    data.len()
                ),
            ));
        }
        let row_len = row_len(path, shape, data.dtype())?;
        Ok(Self {
            path: path.to_path_buf(),
            dtype: data.dtype(),
            storage: Storage::Owned(data),
            shape: shape.to_vec(),
            row_len,
        })
    }

    /// The file (for an in-memory array, the name it was given).
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// The element type.
    pub fn dtype(&self) -> NpyDtype {
        self.dtype
    }
    /// Rows (the first dimension; 1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
    /// Elements per row.
    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Drops the pages that hold only rows `start .. start + len` from this process's memory
    /// (`madvise(MADV_DONTNEED)`; they are read from the file again if touched later), so a
    /// streaming pass over a file larger than RAM keeps its resident set small.
    pub fn release_rows(&self, start: usize, len: usize) {
        if super::check_range(self.rows(), start, len).is_err() {
            return;
        }
        let Storage::Mapped { mmap, offset } = &self.storage else {
            return;
        };
        let row_bytes = self.row_len() * self.dtype.size();
        let page = 4096;
        let a = offset + start * row_bytes;
        let b = (offset + (start + len) * row_bytes).min(mmap.len());
        let (a, b) = (a.div_ceil(page) * page, b / page * page);
        if a < b {
            // SAFETY: a private read-only file mapping: dropped pages are re-read from the
            // unchanged file on the next access, so any live view keeps seeing the same bytes.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a)
            };
        }
    }

    /// Rows `start .. start + len` without copying.
    pub fn rows_ref(&self, start: usize, len: usize) -> Result<RowsRef<'_>> {
        super::check_range(self.rows(), start, len)?;
        let w = self.row_len();
        let (a, b) = (start * w, (start + len) * w);
        let (mmap, offset) = match &self.storage {
            Storage::Owned(buf) => {
                return Ok(match buf {
                    RowsBuf::F32(v) => RowsRef::F32(&v[a..b]),
                    RowsBuf::F64(v) => RowsRef::F64(&v[a..b]),
                    RowsBuf::I64(v) => RowsRef::I64(&v[a..b]),
                })
            }
            Storage::Mapped { mmap, offset } => (mmap, *offset),
        };
        let bytes = &mmap[offset..];
        // SAFETY: the region was checked to lie inside the mapping in `open`, its start is
        // aligned (mmap is page-aligned and `offset` is a multiple of the element size), and
        // every bit pattern is a valid f32/f64/i64.
        Ok(unsafe {
            match self.dtype {
                NpyDtype::F32 => {
                    RowsRef::F32(&std::slice::from_raw_parts(bytes.as_ptr() as *const f32, b)[a..b])
                }
                NpyDtype::F64 => {
                    RowsRef::F64(&std::slice::from_raw_parts(bytes.as_ptr() as *const f64, b)[a..b])
                }
                NpyDtype::I64 => {
                    RowsRef::I64(&std::slice::from_raw_parts(bytes.as_ptr() as *const i64, b)[a..b])
                }
            }
        })
    }
}

/// Writes a C-order `.npy` file (format 1.0) of f32, f64 or i64 data.
pub fn write_npy(path: impl AsRef<Path>, shape: &[usize], data: RowsRef<'_>) -> Result<()> {
    use std::io::Write;
    let path = path.as_ref();
    let (descr, bytes): (&str, &[u8]) = match data {
        // SAFETY: plain-old-data slices viewed as bytes
        RowsRef::F32(v) => ("<f4", unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4)
        }),
        RowsRef::F64(v) => ("<f8", unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8)
        }),
        RowsRef::I64(v) => ("<i8", unsafe {
            std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 8)
        }),
    };
    let elem = if descr == "<f4" { 4 } else { 8 };
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .unwrap_or(usize::MAX);
    if count.checked_mul(elem) != Some(bytes.len()) {
        return Err(Error::shape(
            format!("data for {}", path.display()),
            count,
            bytes.len() / elem,
        ));
    }
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let mut f = std::io::BufWriter::new(File::create(path).map_err(io)?);
    f.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
    f.write_all(&(header.len() as u16).to_le_bytes())
        .map_err(io)?;
    f.write_all(header.as_bytes()).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.flush().map_err(io)?;
    Ok(())
}

/// A float .npy of M values, shape (M,) or (M, 1).
pub fn read_vector(path: impl AsRef<Path>) -> Result<Vec<f64>> {
    let path = path.as_ref();
    let a = NpyArray::open(path)?;
    let ok = matches!(a.shape(), [_] | [_, 1]);
    if !ok {
        return Err(Error::BadFile {
            path: path.display().to_string(),
            detail: format!("expected shape (M,) or (M, 1), got {:?}", a.shape()),
        });
    }
    Ok(match a.rows_ref(0, a.rows())? {
        RowsRef::F32(v) => v.iter().map(|x| *x as f64).collect(),
        RowsRef::F64(v) => v.to_vec(),
        RowsRef::I64(_) => {
            return Err(Error::BadFile {
                path: path.display().to_string(),
                detail: "expected float32 or float64 values".into(),
            })
        }
    })
}
