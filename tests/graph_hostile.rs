//! Hostile and malformed ONNX files, and graphs whose operators mix the examples of a batch:
//! each is an error naming the culprit (the file, the tensor, the node), never a panic or an
//! allocation of what the file claims.

use std::path::PathBuf;

use deltavar::engine::GraphEngine;
use deltavar::graph::onnx::proto::*;
use deltavar::graph::Graph;
use prost::Message;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dv-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn vi(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: elem,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            dim_value: (*d >= 0).then_some(*d),
                            dim_param: (*d < 0).then(|| "batch".to_string()),
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

fn node(op: &str, ins: &[&str], outs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_{}", outs.first().unwrap_or(&"")),
        op_type: op.into(),
        domain: String::new(),
        attribute: attrs,
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i: v,
        ..Default::default()
    }
}

fn floats_init(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn ints_init(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::INT64,
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, out: &str, opset: i64) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "test".into(),
        producer_version: String::new(),
        graph: Some(GraphProto {
            node: nodes,
            name: "g".into(),
            initializer: inits,
            input: vec![vi("x", data_type::FLOAT, &[-1, 4])],
            output: vec![vi(out, data_type::FLOAT, &[-1, 3])],
            value_info: vec![],
        }),
    }
}

/// A linear model x (B, 4) · Wᵀ + b, the base the cases change.
fn linear() -> (Vec<NodeProto>, Vec<TensorProto>) {
    (
        vec![node(
            "Gemm",
            &["x", "W", "b"],
            &["y"],
            vec![int("transB", 1)],
        )],
        vec![
            floats_init("W", &[3, 4], &[0.1; 12]),
            floats_init("b", &[3], &[0.0; 3]),
        ],
    )
}

fn write(name: &str, m: &ModelProto) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}

/// Loads and analyses the file; the error message, or None when it loads.
fn load_err(p: &PathBuf) -> Option<String> {
    match Graph::from_onnx(p, None).and_then(|g| GraphEngine::new(g, &[4], candle_core::DType::F64))
    {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

fn expect(name: &str, m: &ModelProto, words: &[&str]) {
    let p = write(name, m);
    let e = load_err(&p).unwrap_or_else(|| panic!("{name}: loaded"));
    for w in words {
        assert!(e.contains(w), "{name}: '{w}' not in: {e}");
    }
    assert!(!e.contains('\n'), "{name}: one line: {e}");
}

#[test]
fn the_base_model_loads() {
    let (n, i) = linear();
    let p = write("base.onnx", &model(n, i, "y", 17));
    assert_eq!(load_err(&p), None);
}

#[test]
fn garbage_truncated_and_empty_files() {
    let p = tmp("garbage.onnx");
    std::fs::write(&p, b"\x0a\xff\xff\xff\xff\x0f not protobuf at all").unwrap();
    let e = load_err(&p).unwrap();
    assert!(
        e.contains("garbage.onnx") && e.contains("not an ONNX model"),
        "{e}"
    );
    let (n, i) = linear();
    let bytes = model(n, i, "y", 17).encode_to_vec();
    let p = tmp("truncated.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_err(&p).is_some());
    let p = tmp("empty.onnx");
    std::fs::write(&p, b"").unwrap();
    let e = load_err(&p).unwrap();
    assert!(e.contains("opset"), "{e}");
    let e = load_err(&tmp("missing.onnx")).unwrap();
    assert!(e.contains("missing.onnx"), "{e}");
}

#[test]
fn cycles_dangling_inputs_and_unknown_opsets() {
    let nodes = vec![
        node("Relu", &["b"], &["a"], vec![]),
        node("Relu", &["a"], &["b"], vec![]),
        node("Add", &["x", "a"], &["y"], vec![]),
    ];
    expect("cycle.onnx", &model(nodes, vec![], "y", 17), &["cycle"]);
    let nodes = vec![node("Add", &["x", "nowhere"], &["y"], vec![])];
    expect(
        "dangling.onnx",
        &model(nodes, vec![], "y", 17),
        &["nowhere", "dangling"],
    );
    let (n, i) = linear();
    expect("opset.onnx", &model(n, i, "y", 99), &["opset 99"]);
    let nodes = vec![node("FooBar", &["x"], &["y"], vec![])];
    expect(
        "unknown-op.onnx",
        &model(nodes, vec![], "y", 17),
        &["FooBar", "Gemm"],
    );
    let mut nodes = vec![node("Relu", &["x"], &["y"], vec![])];
    nodes[0].domain = "com.microsoft".into();
    expect(
        "domain.onnx",
        &model(nodes, vec![], "y", 17),
        &["com.microsoft"],
    );
    let nodes = vec![node("Relu", &["x"], &["z"], vec![])];
    expect("no-output.onnx", &model(nodes, vec![], "y", 17), &["'y'"]);
}

#[test]
fn tensors_with_bad_dims_or_short_data() {
    let (n, mut i) = linear();
    i[0].dims = vec![-3, 4];
    expect("negative.onnx", &model(n, i, "y", 17), &["'W'", "negative"]);
    let (n, mut i) = linear();
    i[0].dims = vec![1 << 40, 1 << 40];
    expect("huge.onnx", &model(n, i, "y", 17), &["'W'"]);
    let (n, mut i) = linear();
    i[0].dims = vec![i64::MAX, 3];
    expect("overflow.onnx", &model(n, i, "y", 17), &["'W'"]);
    let (n, mut i) = linear();
    i[0].raw_data.truncate(20);
    expect("short.onnx", &model(n, i, "y", 17), &["'W'", "12 elements"]);
    let (n, mut i) = linear();
    i[0].data_type = 8; // strings
    expect(
        "string.onnx",
        &model(n, i, "y", 17),
        &["'W'", "data type 8"],
    );
}

#[test]
fn external_data_outside_the_folder_or_missing() {
    let (n, mut i) = linear();
    i[0].raw_data.clear();
    i[0].data_location = 1;
    i[0].external_data = vec![StringStringEntryProto {
        key: "location".into(),
        value: "../../etc/passwd".into(),
    }];
    expect(
        "escape.onnx",
        &model(n, i, "y", 17),
        &["outside the model's folder"],
    );
    let (n, mut i) = linear();
    i[0].raw_data.clear();
    i[0].data_location = 1;
    i[0].external_data = vec![StringStringEntryProto {
        key: "location".into(),
        value: "no-such.bin".into(),
    }];
    expect("missing-ext.onnx", &model(n, i, "y", 17), &["no-such.bin"]);
    // external data shorter than the tensor
    std::fs::write(tmp("short.bin"), [0u8; 10]).unwrap();
    let (n, mut i) = linear();
    i[0].raw_data.clear();
    i[0].data_location = 1;
    i[0].external_data = vec![StringStringEntryProto {
        key: "location".into(),
        value: "short.bin".into(),
    }];
    expect(
        "short-ext.onnx",
        &model(n, i, "y", 17),
        &["short.bin", "48"],
    );
    // and one that is right loads
    let bytes: Vec<u8> = [0.1f32; 12].iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(tmp("w.bin"), bytes).unwrap();
    let (n, mut i) = linear();
    i[0].raw_data.clear();
    i[0].data_location = 1;
    i[0].external_data = vec![StringStringEntryProto {
        key: "location".into(),
        value: "w.bin".into(),
    }];
    let p = write("ext-ok.onnx", &model(n, i, "y", 17));
    assert_eq!(load_err(&p), None);
}

#[test]
fn huge_shapes_built_at_run_time_are_refused_before_allocation() {
    let nodes = vec![
        node("ConstantOfShape", &["s"], &["big"], vec![]),
        node("Gemm", &["x", "W", "b"], &["y0"], vec![int("transB", 1)]),
        node("ReduceSum", &["big"], &["t"], vec![int("keepdims", 0)]),
        node("Add", &["y0", "t"], &["y"], vec![]),
    ];
    let (_, mut i) = linear();
    i.push(ints_init("s", &[3], &[1 << 20, 1 << 20, 1 << 10]));
    expect(
        "constant-of-shape.onnx",
        &model(nodes, i, "y", 17),
        &["ConstantOfShape"],
    );
    let nodes = vec![
        node("Range", &["a", "l", "d"], &["r"], vec![]),
        node("Gemm", &["x", "W", "b"], &["y"], vec![int("transB", 1)]),
        node("Add", &["y", "r"], &["z"], vec![]),
    ];
    let (_, mut i) = linear();
    i.push(ints_init("a", &[], &[0]));
    i.push(ints_init("l", &[], &[i64::MAX]));
    i.push(ints_init("d", &[], &[1]));
    expect("range.onnx", &model(nodes, i, "z", 17), &["Range"]);
}

#[test]
fn bad_indices_permutations_and_windows_are_errors() {
    let (_, mut i) = linear();
    i.push(ints_init("idx", &[1], &[100]));
    let nodes = vec![
        node("Gemm", &["x", "W", "b"], &["y0"], vec![int("transB", 1)]),
        node("Gather", &["y0", "idx"], &["y"], vec![int("axis", 1)]),
    ];
    expect("gather.onnx", &model(nodes, i, "y", 17), &["index 100"]);
    let (mut n, i) = linear();
    n.push(node(
        "Transpose",
        &["y"],
        &["z"],
        vec![ints("perm", &[0, 0])],
    ));
    expect("perm.onnx", &model(n, i, "z", 17), &["perm"]);
    let (mut n, mut i) = linear();
    i.push(ints_init("sh", &[2], &[-1, 5]));
    n.push(node("Reshape", &["y", "sh"], &["z"], vec![]));
    expect("reshape.onnx", &model(n, i, "z", 17), &["Reshape"]);
    // a convolution weight with a zero-size kernel
    let nodes = vec![
        node("Unsqueeze", &["x", "ax"], &["x3"], vec![]),
        node("Conv", &["x3", "K"], &["y"], vec![]),
    ];
    let inits = vec![
        ints_init("ax", &[1], &[1]),
        floats_init("K", &[3, 1, 0], &[]),
    ];
    expect(
        "zero-kernel.onnx",
        &model(nodes, inits, "y", 17),
        &["Conv", "kernel"],
    );
}

#[test]
fn operators_that_mix_examples_are_refused_naming_the_node() {
    // a reduction over the batch axis
    let (mut n, mut i) = linear();
    i.push(ints_init("ax", &[1], &[0]));
    n.push(node(
        "ReduceMean",
        &["y", "ax"],
        &["z"],
        vec![int("keepdims", 1)],
    ));
    expect(
        "reduce-batch.onnx",
        &model(n, i, "z", 18),
        &["ReduceMean", "batch"],
    );
    // a softmax over the batch axis
    let (mut n, i) = linear();
    n.push(node("Softmax", &["y"], &["z"], vec![int("axis", 0)]));
    expect(
        "softmax-batch.onnx",
        &model(n, i, "z", 17),
        &["Softmax", "batch axis"],
    );
    // the batch merged into another axis
    let (mut n, mut i) = linear();
    i.push(ints_init("sh", &[1], &[-1]));
    n.push(node("Reshape", &["y", "sh"], &["z"], vec![]));
    expect(
        "merge-batch.onnx",
        &model(n, i, "z", 17),
        &["Reshape", "merged"],
    );
    // batch norm in training mode
    let nodes = vec![node(
        "BatchNormalization",
        &["x", "s", "b2", "m", "v"],
        &["y"],
        vec![int("training_mode", 1)],
    )];
    expect(
        "bn-train.onnx",
        &model(nodes, vec![], "y", 17),
        &["training mode", "eval"],
    );
}

#[test]
fn a_parameter_meeting_the_batch_without_a_rule_is_named() {
    // Pow with a parameter exponent
    let (mut n, mut i) = linear();
    i.push(floats_init("e", &[3], &[1.0, 2.0, 3.0]));
    n.push(node("Relu", &["y"], &["r"], vec![]));
    n.push(node("Pow", &["r", "e"], &["z"], vec![]));
    expect(
        "pow-param.onnx",
        &model(n, i, "z", 17),
        &["Pow", "'e'", "per-example rule"],
    );
}
