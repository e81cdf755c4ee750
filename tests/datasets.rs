//! Memory-mapped `.npy` datasets: equal results to in-memory data, and an error per bad file.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::*;
use deltavar::data::{write_npy, NpyArray, NpyDtype, RowsRef};
use deltavar::*;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deltavar-ds-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn fixtures_through_mmap_match_in_memory() {
    for name in CASES {
        let case = Case::load(name);
        let mm = MmapNpyDataset::open(case.dir.join("train_x.npy"), case.dir.join("train_y.npy"))
            .unwrap();
        let mem = case.data(DType::F32);
        assert_eq!(mm.len(), mem.len());
        let (mlp, _vm) = case.model(DType::F64);
        let engine = mlp_engine(&mlp);
        let lik: Likelihood = case.likelihood();
        let opts = FactoredOptions {
            batch_size: 17,
            threads: 2,
        };
        let a = engine.sum_sq(&lik, &mm, &opts).unwrap();
        let b = engine.sum_sq(&lik, &mem, &opts).unwrap();
        assert_eq!(a, b, "{name}");
        let mean: Vec<f64> = a.iter().map(|v| v / mm.len() as f64).collect();
        assert!(
            norm_rel_err(&mean, &case.vec("fim_diagonal"))
                < parity_tol(name, "fim_diagonal", "direct"),
            "{name}"
        );
        // get() copies one batch into tensors with the same values
        let (x, y) = mm.get(3, 5).unwrap();
        let (xm, ym) = mem.get(3, 5).unwrap();
        assert_eq!(
            x.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            xm.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        );
        assert_eq!(y.dims(), ym.dims());
    }
}

#[test]
fn write_then_read_every_dtype() {
    let p = tmp("f64.npy");
    write_npy(&p, &[3, 2], RowsRef::F64(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).unwrap();
    let a = NpyArray::open(&p).unwrap();
    assert_eq!((a.shape(), a.dtype()), (&[3usize, 2][..], NpyDtype::F64));
    match a.rows_ref(1, 2).unwrap() {
        RowsRef::F64(v) => assert_eq!(v, &[3.0, 4.0, 5.0, 6.0]),
        _ => panic!("dtype"),
    }
    let p = tmp("i64.npy");
    write_npy(&p, &[4], RowsRef::I64(&[0, 1, 2, 3])).unwrap();
    assert_eq!(NpyArray::open(&p).unwrap().dtype(), NpyDtype::I64);
    // numpy can read what we write: candle's reader agrees too
    let t = Tensor::read_npy(&p).unwrap();
    assert_eq!(t.to_vec1::<i64>().unwrap(), vec![0, 1, 2, 3]);
    let p = tmp("f32.npy");
    write_npy(&p, &[2, 2], RowsRef::F32(&[1.5, -2.0, 0.25, 8.0])).unwrap();
    let t = Tensor::read_npy(&p).unwrap();
    assert_eq!(t.dims(), &[2, 2]);
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![1.5, -2.0, 0.25, 8.0]
    );
}

fn raw_npy(path: &PathBuf, header: &str, data: &[u8]) {
    let mut h = header.to_string();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn every_bad_file_is_an_error_naming_it() {
    let good_y = tmp("y.npy");
    write_npy(&good_y, &[4], RowsRef::I64(&[0, 1, 2, 0])).unwrap();
    let x4 = tmp("x4.npy");
    write_npy(&x4, &[4, 2], RowsRef::F32(&[0.0; 8])).unwrap();

    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        (
            "int32.npy",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (4, 2), }".into(),
            vec![0; 32],
            "<i4",
        ),
        (
            "bigend.npy",
            "{'descr': '>f4', 'fortran_order': False, 'shape': (4, 2), }".into(),
            vec![0; 32],
            ">f4",
        ),
        (
            "fortran.npy",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 2), }".into(),
            vec![0; 32],
            "Fortran",
        ),
        (
            "truncated.npy",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }".into(),
            vec![0; 20],
            "truncated",
        ),
    ];
    for (name, header, data, needle) in cases {
        let p = tmp(name);
        raw_npy(&p, &header, &data);
        let e = MmapNpyDataset::open(&p, &good_y).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(name) && msg.contains(needle), "{name}: {msg}");
    }
    // not an npy file at all
    let p = tmp("text.npy");
    std::fs::write(&p, "hello, I am text").unwrap();
    let e = MmapNpyDataset::open(&p, &good_y).unwrap_err();
    assert!(
        e.to_string().contains("text.npy") && e.to_string().contains("NUMPY"),
        "{e}"
    );
    // a missing file
    let e = MmapNpyDataset::open(tmp("nope.npy"), &good_y).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("nope.npy"),
        "{e}"
    );
    // x and y lengths differ
    let y3 = tmp("y3.npy");
    write_npy(&y3, &[3], RowsRef::I64(&[0, 1, 2])).unwrap();
    let e = MmapNpyDataset::open(&x4, &y3).unwrap_err();
    assert!(
        e.to_string().contains("3 rows") && e.to_string().contains("x4.npy"),
        "{e}"
    );
    // inputs without a feature dimension
    let e = MmapNpyDataset::open(&good_y, &good_y).unwrap_err();
    assert!(
        e.to_string().contains("at least one feature dimension") && e.to_string().contains("y.npy"),
        "{e}"
    );
    // a label out of range is caught by the likelihood, naming the example
    let ybad = tmp("ybad.npy");
    write_npy(&ybad, &[4], RowsRef::I64(&[0, 1, 9, 0])).unwrap();
    let ds = MmapNpyDataset::open(&x4, &ybad).unwrap();
    let vm = candle_nn::VarMap::new();
    let mlp = Mlp::new(
        candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &[2, 3],
        Activation::Identity,
        None,
    )
    .unwrap();
    let e = mlp_engine(&mlp)
        .sum_sq(&Likelihood::Categorical, &ds, &FactoredOptions::default())
        .unwrap_err();
    assert!(
        e.to_string().contains("example 2") && e.to_string().contains("0..3"),
        "{e}"
    );
    // non-finite inputs name the row
    let xnan = tmp("xnan.npy");
    write_npy(
        &xnan,
        &[4, 2],
        RowsRef::F32(&[0.0, 0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0, 0.0]),
    )
    .unwrap();
    let ds = MmapNpyDataset::open(&xnan, &good_y).unwrap();
    let e = mlp_engine(&mlp)
        .sum_sq(&Likelihood::Categorical, &ds, &FactoredOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("row 2"), "{e}");
}

/// Issue 8, defect 1: a header whose shape product wraps around usize (f32 shape
/// (300, 2^62 + 6): 300·(2^62 + 6)·4 wraps to 7200 bytes, exactly a real 300×6 payload) must be
/// refused by the dataset itself, naming the file, before any row is read.
#[test]
fn wrapping_shape_product_is_a_bad_file() {
    let big = (1u64 << 62) + 6;
    let p = tmp("wrap.npy");
    raw_npy(
        &p,
        &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': (300, {big}), }}"),
        &vec![0u8; 300 * 6 * 4],
    );
    let e = NpyArray::open(&p).unwrap_err();
    assert!(
        matches!(e, Error::BadFile { .. }) && e.to_string().contains("wrap.npy"),
        "{e}"
    );
    let y = tmp("wrap_y.npy");
    write_npy(&y, &[300], RowsRef::I64(&[0; 300])).unwrap();
    let e = MmapNpyDataset::open(&p, &y).unwrap_err();
    assert!(
        matches!(e, Error::BadFile { .. }) && e.to_string().contains("wrap.npy"),
        "{e}"
    );
    // a row product that wraps while the row count is 0 (total 0 elements) is refused too
    let p0 = tmp("wrap0.npy");
    raw_npy(
        &p0,
        &format!("{{'descr': '<f8', 'fortran_order': False, 'shape': (0, {big}, {big}), }}"),
        &[],
    );
    assert!(matches!(NpyArray::open(&p0), Err(Error::BadFile { .. })));
    // trailing bytes after the payload are a size mismatch, not silently ignored
    let pt = tmp("trailing.npy");
    raw_npy(
        &pt,
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 2), }",
        &[0u8; 36],
    );
    let e = NpyArray::open(&pt).unwrap_err();
    assert!(e.to_string().contains("trailing"), "{e}");
    // releasing a range outside the file is a no-op, not an overflow
    let ok = tmp("ok.npy");
    write_npy(&ok, &[4, 2], RowsRef::F32(&[0.0; 8])).unwrap();
    let a = NpyArray::open(&ok).unwrap();
    a.release_rows(usize::MAX, 2);
    assert!(a.rows_ref(usize::MAX, 2).is_err());
}

#[test]
fn in_memory_arrays_read_like_files_and_refuse_bad_shapes() {
    use deltavar::data::RowsBuf;
    // the same rows from a file and from memory
    let p = tmp("mem.npy");
    let vals: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
    write_npy(&p, &[4, 3], RowsRef::F32(&vals)).unwrap();
    let file = NpyArray::open(&p).unwrap();
    let mem = NpyArray::from_rows("x", &[4, 3], RowsBuf::F32(vals.clone())).unwrap();
    assert_eq!(
        (mem.shape(), mem.rows(), mem.row_len()),
        (file.shape(), 4, 3)
    );
    assert_eq!(mem.path().to_str(), Some("x"));
    match (mem.rows_ref(1, 2).unwrap(), file.rows_ref(1, 2).unwrap()) {
        (RowsRef::F32(a), RowsRef::F32(b)) => assert_eq!(a, b),
        _ => panic!("dtype changed"),
    }
    assert!(mem.rows_ref(3, 2).is_err());
    // a dataset of two in-memory arrays, checked like two files
    let y = NpyArray::from_rows("y", &[4], RowsBuf::I64(vec![0, 1, 2, 1])).unwrap();
    let d = MmapNpyDataset::from_arrays(mem, y).unwrap();
    assert_eq!(d.len(), 4);
    let short = NpyArray::from_rows("y", &[3], RowsBuf::I64(vec![0, 1, 2])).unwrap();
    let x = NpyArray::from_rows("x", &[4, 3], RowsBuf::F32(vals)).unwrap();
    let e = MmapNpyDataset::from_arrays(x, short).unwrap_err();
    assert!(e.to_string().contains("3 rows"), "{e}");
    // a shape that does not match the data, or whose row size wraps with zero rows
    let e = NpyArray::from_rows("q", &[2, 3], RowsBuf::F64(vec![0.0; 5])).unwrap_err();
    assert!(
        e.to_string().contains("q") && e.to_string().contains("5 elements"),
        "{e}"
    );
    let e = NpyArray::from_rows("q", &[0, 1 << 40, 1 << 40], RowsBuf::F64(vec![])).unwrap_err();
    assert!(e.to_string().contains("more elements than"), "{e}");
}
