//! The readers take paths (they memory-map their files): each input is written to one file per
//! fuzzing process under the temp folder, then read.

use std::path::PathBuf;

pub fn write_input(ext: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("deltavar-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp folder");
    let p = dir.join(format!("input.{ext}"));
    std::fs::write(&p, data).expect("write input");
    p
}
