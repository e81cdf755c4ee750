//! The graph builder: the transformer classifier written with it (`GraphEngine::from_transformer`)
//! against the generic path (one candle backward per example through the same model) in f64, and
//! every loading mistake as an error naming the tensor.

mod common;

use candle_core::DType;
use common::*;
use deltavar::graph::build::{GraphBuilder, Weights};
use deltavar::model::{Transformer, TransformerConfig};
use deltavar::*;

#[test]
fn the_transformer_as_a_graph_matches_the_generic_path() {
    let cfg = TransformerConfig {
        vocab: 11,
        max_len: 6,
        d: 8,
        heads: 2,
        layers: 2,
        hidden: 12,
        classes: 3,
        eps: 1e-5,
    };
    let model = Transformer::init(cfg, DType::F64, 5).unwrap();
    let params = model.params().unwrap();
    let (n, t) = (7, 5);
    let x = token_ids(n, t, 11, 1);
    let data = TensorDataset::new(x.clone(), random_labels(n, 3, 2)).unwrap();
    let lik = Likelihood::Categorical;
    let engine = GraphEngine::from_transformer(&model, t).unwrap();
    assert_eq!(engine.num_params(), params.num_params());
    let o = FactoredOptions {
        batch_size: 3,
        threads: 2,
    };
    let g = engine.per_example_gradients(&lik, &data, 0, n, &o).unwrap();
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let want = generic.per_example_gradients(0, n).unwrap();
    assert!(mat_rel_err(&g, &want) < 1e-10, "{}", mat_rel_err(&g, &want));
    let (qg, qv) = engine.query_gradients(&Qoi::Prob(2), &x, 1, &o).unwrap();
    let (qw, vw) = qoi_gradients(
        &params,
        &x,
        Qoi::Prob(2).of(&model),
        &GenericOptions::default(),
    )
    .unwrap();
    assert!(mat_rel_err(&qg, &qw) < 1e-10);
    assert!(max_rel_err(&qv, &vw) < 1e-12);
}

fn weights() -> Vec<(String, Vec<usize>, Vec<f64>)> {
    vec![
        ("fc.weight".into(), vec![3, 4], vec![0.1; 12]),
        ("fc.bias".into(), vec![3], vec![0.0; 3]),
    ]
}

#[test]
fn loading_mistakes_are_errors_naming_the_tensor() {
    let build = |w: Vec<(String, Vec<usize>, Vec<f64>)>, width: usize| -> Result<_> {
        let (mut b, x) = GraphBuilder::new(Weights::from_named(w)?, &[width]);
        let y = b.linear(x, "fc", true)?;
        b.finish(y)
    };
    assert_eq!(build(weights(), 4).unwrap().num_params(), 15);
    // the input does not fit the weight
    let e = build(weights(), 5).unwrap_err().to_string();
    assert!(e.contains("fc.weight") && e.contains("[3, 4]"), "{e}");
    // a missing bias, an extra tensor, a NaN, a shape that does not hold its values
    let mut w = weights();
    w.pop();
    let e = build(w, 4).unwrap_err().to_string();
    assert!(e.contains("'fc.bias'") && e.contains("missing"), "{e}");
    let mut w = weights();
    w.push(("head.weight".into(), vec![1], vec![0.0]));
    let e = build(w, 4).unwrap_err().to_string();
    assert!(
        e.contains("head.weight") && e.contains("read by no layer"),
        "{e}"
    );
    let mut w = weights();
    w[0].2[5] = f64::NAN;
    let e = build(w, 4).unwrap_err().to_string();
    assert!(e.contains("'fc.weight'") && e.contains("element 5"), "{e}");
    let mut w = weights();
    w[1].1 = vec![4];
    let e = build(w, 4).unwrap_err().to_string();
    assert!(e.contains("'fc.bias'") && e.contains("3 values"), "{e}");
    // shape mistakes inside the network
    let (mut b, x) = GraphBuilder::new(Weights::from_named(weights()).unwrap(), &[4]);
    assert!(b.reshape(x, &[3]).is_err());
    assert!(b.transpose(x, &[1]).is_err());
    assert!(b.softmax(x, 1).is_err());
    assert!(b.matmul(x, x).is_err());
    assert!(b.max_pool2d(x, 2, 2).is_err());
    // sizes that overflow are errors, not wrapped arithmetic
    assert!(b.narrow(x, 0, usize::MAX, 2).is_err());
    assert!(b.constant(&[usize::MAX, 2], vec![]).is_err());
    let big = b.reshape(x, &[2, 2]).unwrap();
    assert!(b.reshape(big, &[usize::MAX, 3]).is_err());
    // attention needs (T, d) with heads dividing d
    assert!(deltavar::graph::models::attention(&mut b, x, "fc", "fc", 4, 2, true).is_err());
    assert!(deltavar::graph::models::attention(&mut b, big, "fc", "fc", 2, 3, true).is_err());
    // an output that does not depend on the input
    let (mut b, _) = GraphBuilder::new(Weights::from_named(vec![]).unwrap(), &[4]);
    let c = b.constant(&[2], vec![1.0, 2.0]).unwrap();
    assert!(b.finish(c).is_err());
}

/// `Weights::from_safetensors` reads the file memory-mapped and converts each float tensor to
/// f64 itself: F32, F64, F16 and BF16 give the values candle reads, integer tensors are
/// skipped, a NaN names its tensor and file, a corrupt file is an error naming the file.
#[test]
fn safetensors_weights_are_read_exactly_in_every_float_type() {
    use candle_core::{Device, Tensor};
    let dir = std::env::temp_dir().join(format!("deltavar-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vals = [0.1f64, -2.5, 3.0e-3, 7.0, -0.0, 1.0e4];
    let mut map = std::collections::HashMap::new();
    for (name, dt) in [
        ("a32", DType::F32),
        ("a64", DType::F64),
        ("a16", DType::F16),
        ("abf", DType::BF16),
    ] {
        let t = Tensor::new(&vals[..], &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        map.insert(name.to_string(), t.to_dtype(dt).unwrap());
    }
    map.insert(
        "ids".to_string(),
        Tensor::new(&[1i64, 2, 3], &Device::Cpu).unwrap(),
    );
    let path = dir.join("w.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    let w = Weights::from_safetensors(&path).unwrap();
    assert_eq!(w.names(), vec!["a16", "a32", "a64", "abf"]);
    for name in ["a32", "a64", "a16", "abf"] {
        let want: Vec<f64> = map[name]
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(w.values(name).unwrap(), want.as_slice(), "{name}");
        assert_eq!(w.shape_of(name).unwrap(), vec![2, 3], "{name}");
    }
    assert_eq!(w.values("a64").unwrap(), &vals[..]);

    let mut bad = vals;
    bad[4] = f64::NAN;
    let nan: std::collections::HashMap<String, Tensor> = [(
        "layer.weight".to_string(),
        Tensor::new(&bad[..], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    )]
    .into_iter()
    .collect();
    let p = dir.join("nan.safetensors");
    candle_core::safetensors::save(&nan, &p).unwrap();
    let e = Weights::from_safetensors(&p).unwrap_err().to_string();
    assert!(
        e.contains("layer.weight") && e.contains("nan.safetensors") && e.contains("element 4"),
        "{e}"
    );

    let p = dir.join("corrupt.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
    let e = Weights::from_safetensors(&p).unwrap_err().to_string();
    assert!(e.contains("corrupt.safetensors"), "{e}");
    let e = Weights::from_safetensors(dir.join("missing.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The engine holds a model's weights once, in its precision: it drops the graph's f64 copy
/// only where its own copy gives the values back exactly, so `named_tensors` (what Fisher
/// files fingerprint) returns the graph's values in every case — an f32 run of f64 weights
/// that f32 cannot hold included.
#[test]
fn the_engine_keeps_every_weight_value_it_was_given() {
    let third = 1.0 / 3.0; // not an f32
    let named = vec![
        (
            "fc.weight".to_string(),
            vec![2, 3],
            vec![0.5, -1.25, third, 2.0, 0.0, -4.0],
        ),
        ("fc.bias".to_string(), vec![2], vec![0.25, -0.75]),
    ];
    for dt in [DType::F32, DType::F64] {
        let (mut b, x) = GraphBuilder::new(Weights::from_named(named.clone()).unwrap(), &[3]);
        let y = b.linear(x, "fc", true).unwrap();
        let engine = GraphEngine::new(b.finish(y).unwrap(), &[3], dt).unwrap();
        let got = engine.named_tensors().unwrap();
        for ((name, _, want), (gname, t)) in named.iter().zip(&got) {
            assert_eq!(name, gname);
            let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(&v, want, "{name} in {dt:?}");
        }
        // the exact f32 values (the bias) are held by the engine alone in an f32 run
        let bias = &engine.graph().params[1];
        assert_eq!(bias.data.is_empty(), dt == DType::F32 || dt == DType::F64);
        let weight = &engine.graph().params[0];
        assert_eq!(weight.data.is_empty(), dt == DType::F64, "{dt:?}");
    }
}

/// `mlp:` from a state dict (`graph::models::mlp_state_dict`, what `--arch mlp:` loads): a
/// prefix and Linear layer names are honoured and kept in the parameter names, tensors outside
/// the layers are ignored, and the graph equals the candle `Mlp` loaded from the same file;
/// widths that are not the architecture's and a missing layer are errors naming the file.
#[test]
fn an_mlp_loads_from_a_state_dict_with_its_prefix_and_layer_names() {
    use candle_core::{Device, Tensor};
    use deltavar::pipeline::{ModelSpec, Network};
    let dir = std::env::temp_dir().join(format!("deltavar-mlpsd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = |n: usize, shape: &[usize], seed: u64| {
        Tensor::from_vec(pseudo_random(n, seed), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let map: std::collections::HashMap<String, Tensor> = [
        ("model.fc1.weight", t(32, &[8, 4], 1)),
        ("model.fc1.bias", t(8, &[8], 2)),
        ("model.fc2.weight", t(24, &[3, 8], 3)),
        ("model.fc2.bias", t(3, &[3], 4)),
        ("head.extra", t(5, &[5], 5)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let path = dir.join("m.safetensors");
    candle_core::safetensors::save(&map, &path).unwrap();
    let spec = |arch: &str, names: &[&str]| ModelSpec {
        prefix: "model".into(),
        layer_names: Some(names.iter().map(|s| s.to_string()).collect()),
        ..ModelSpec::new(arch, Some(path.clone()))
    };
    let net = Network::load(&spec("mlp:4,8,3:tanh", &["fc1", "fc2"]), None).unwrap();
    let names: Vec<String> = net
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "model.fc1.weight",
            "model.fc1.bias",
            "model.fc2.weight",
            "model.fc2.bias"
        ]
    );
    let names_owned = vec!["fc1".to_string(), "fc2".to_string()];
    let (mlp, _vm) = Mlp::load_safetensors(
        &path,
        Activation::Tanh,
        DType::F32,
        &Device::Cpu,
        "model",
        Some(&names_owned),
    )
    .unwrap();
    let data = TensorDataset::new(random_tensor(9, 4, 6), random_tensor(9, 3, 7)).unwrap();
    let lik = Likelihood::gaussian(0.5);
    let o = FactoredOptions::default();
    let want = GraphEngine::from_mlp(&mlp)
        .unwrap()
        .sum_sq(&lik, &data, &o)
        .unwrap();
    let got = net.engine().sum_sq(&lik, &data, &o).unwrap();
    assert_eq!(got, want);

    let e = Network::load(&spec("mlp:4,8,2:tanh", &["fc1", "fc2"]), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer widths [4, 8, 3]") && e.contains("m.safetensors"),
        "{e}"
    );
    let e = Network::load(&spec("mlp:4,8,3:tanh", &["fc1", "fc3"]), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.fc3.weight") && e.contains("m.safetensors"),
        "{e}"
    );
    // only the tensors under the prefix are read; a prefix with none lists the file's
    let wrong = ModelSpec {
        prefix: "modle".into(),
        ..spec("mlp:4,8,3:tanh", &["fc1", "fc2"])
    };
    let e = Network::load(&wrong, None).unwrap_err().to_string();
    assert!(
        e.contains("prefix 'modle.'") && e.contains("model.fc1.weight") && e.contains("head.extra"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
