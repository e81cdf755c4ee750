//! The Fisher-artifact reader (safetensors + JSON metadata) on arbitrary bytes: an error or an
//! artifact whose checks run, never a panic.
#![no_main]

use deltavar::fisher::FisherArtifact;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::write_input("fim", data);
    if let Ok(a) = FisherArtifact::load(&p) {
        let _ = a.check_complete();
        let _ = FisherArtifact::merge(&[a.clone(), a]);
    }
});
