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
