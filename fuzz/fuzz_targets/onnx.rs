//! The ONNX reader on arbitrary bytes: an error naming the file or node, or a validated graph
//! that the engine then analyses (small inputs only), never a panic or a huge allocation.
#![no_main]

use deltavar::graph::Graph;
use deltavar::GraphEngine;
use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::write_input("onnx", data);
    if let Ok(g) = Graph::from_onnx(&p, None) {
        // the declared per-example dims when they are small and known, else a guess
        let dims: Vec<usize> = match &g.input_dims {
            Some(d) if d.iter().all(|x| x.is_some_and(|v| v <= 64)) => {
                d.iter().map(|x| x.unwrap_or(1)).collect()
            }
            _ => vec![4],
        };
        let _ = GraphEngine::new(g, &dims, candle_core::DType::F64);
    }
});
