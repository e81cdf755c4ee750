//! The .npy reader on arbitrary bytes: an error or an array whose every row range reads back,
//! never a panic, an overflow or an allocation of the claimed size.
#![no_main]

use deltavar::data::NpyArray;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::write_input("npy", data);
    if let Ok(a) = NpyArray::open(&p) {
        let rows = a.rows();
        let _ = a.rows_ref(0, rows);
        let _ = a.rows_ref(rows / 2, rows - rows / 2);
        let _ = a.rows_ref(rows, 1); // past the end: an error
        let _ = a.shape();
    }
});
