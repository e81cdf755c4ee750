//! Loading PyTorch-style safetensors MLPs: default `nn.Sequential` names, a prefix, explicit layer
//! names, and the errors for files that do not fit.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use common::*;
use deltavar::*;

fn tensors(names: &[&str], sizes: &[usize], prefix: &str) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for (i, n) in names.iter().enumerate() {
        let (inp, out) = (sizes[i], sizes[i + 1]);
        let w = Tensor::from_vec(
            pseudo_random(out * inp, i as u64 + 1),
            (out, inp),
            &Device::Cpu,
        )
        .unwrap();
        let b = Tensor::from_vec(pseudo_random(out, i as u64 + 10), out, &Device::Cpu).unwrap();
        m.insert(format!("{prefix}{n}.weight"), w);
        m.insert(format!("{prefix}{n}.bias"), b);
    }
    m
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("deltavar-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn default_prefixed_and_named_layers_load_to_the_same_model() {
    let sizes = [3, 5, 4, 2];
    let a = tmp("plain.safetensors");
    candle_core::safetensors::save(&tensors(&["0", "2", "4"], &sizes, ""), &a).unwrap();
    let b = tmp("prefixed.safetensors");
    candle_core::safetensors::save(&tensors(&["0", "2", "4"], &sizes, "net."), &b).unwrap();
    let c = tmp("named.safetensors");
    candle_core::safetensors::save(&tensors(&["enc", "mid", "head"], &sizes, ""), &c).unwrap();

    let dev = Device::Cpu;
    let (ma, vma) =
        Mlp::load_safetensors(&a, Activation::Silu, DType::F64, &dev, "", None).unwrap();
    let (mb, vmb) =
        Mlp::load_safetensors(&b, Activation::Silu, DType::F64, &dev, "net", None).unwrap();
    let names: Vec<String> = ["enc", "mid", "head"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (mc, vmc) =
        Mlp::load_safetensors(&c, Activation::Silu, DType::F64, &dev, "", Some(&names)).unwrap();
    assert_eq!(ma.sizes(), &sizes);
    assert_eq!(mb.param_names()[0], "net.0.weight");
    assert_eq!(
        mc.param_names(),
        [
            "enc.weight",
            "enc.bias",
            "mid.weight",
            "mid.bias",
            "head.weight",
            "head.bias"
        ]
    );
    let x = random_tensor(4, 3, 5);
    let ya = ma
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for m in [&mb, &mc] {
        assert_eq!(
            m.forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            ya
        );
    }
    let (pa, pb, pc) = (
        ma.params(&vma).unwrap(),
        mb.params(&vmb).unwrap(),
        mc.params(&vmc).unwrap(),
    );
    assert_eq!(pa.flat_values().unwrap(), pb.flat_values().unwrap());
    assert_eq!(pa.flat_values().unwrap(), pc.flat_values().unwrap());
    // the graph engine follows the same flat layout
    let z = random_tensor(2, 3, 6);
    let (q, _) = mlp_engine(&mc)
        .query_layered_gradients(
            &Qoi::Sum,
            &z,
            1,
            &FactoredOptions::default(),
            LayerRoute::Factor,
        )
        .unwrap();
    let (g, _) = qoi_gradients(&pc, &z, Qoi::Sum.of(&mc), &GenericOptions::default()).unwrap();
    let qg = q.to_dense();
    assert!(
        norm_rel_err(
            &to_rows(qg.as_ref()).concat(),
            &to_rows(g.as_ref()).concat()
        ) < 1e-12
    );
}

#[test]
fn files_that_do_not_fit_are_errors() {
    let dev = Device::Cpu;
    // not a safetensors file
    let bad = tmp("garbage.safetensors");
    std::fs::write(&bad, b"this is not a safetensors file").unwrap();
    let e = Mlp::load_safetensors(&bad, Activation::Relu, DType::F32, &dev, "", None)
        .err()
        .unwrap();
    assert!(
        matches!(e, Error::BadFile { .. }) && e.to_string().contains("garbage"),
        "{e}"
    );
    // missing file
    let e = Mlp::load_safetensors(
        tmp("missing.safetensors"),
        Activation::Relu,
        DType::F32,
        &dev,
        "",
        None,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("missing.safetensors"), "{e}");
    // wrong prefix
    let a = tmp("plain2.safetensors");
    candle_core::safetensors::save(&tensors(&["0", "2"], &[3, 4, 2], ""), &a).unwrap();
    let e = Mlp::load_safetensors(&a, Activation::Relu, DType::F32, &dev, "model", None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("model.0.weight"), "{e}");
    // widths that do not chain
    let mut t = tensors(&["0", "2"], &[3, 4, 2], "");
    t.insert(
        "2.weight".into(),
        Tensor::zeros((2, 5), DType::F32, &dev).unwrap(),
    );
    let b = tmp("mismatch.safetensors");
    candle_core::safetensors::save(&t, &b).unwrap();
    let e = Mlp::load_safetensors(&b, Activation::Relu, DType::F32, &dev, "", None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("takes 5 inputs"), "{e}");
    // a missing bias
    let mut t = tensors(&["0"], &[3, 2], "");
    t.remove("0.bias");
    let c = tmp("nobias.safetensors");
    candle_core::safetensors::save(&t, &c).unwrap();
    let e = Mlp::load_safetensors(&c, Activation::Relu, DType::F32, &dev, "", None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("0.bias"), "{e}");
}
