//! The crate's model types as graphs, written with [`GraphBuilder`]: the MLP, the
//! `nn.Sequential` of a `seq:` spec and the transformer classifier. Their flat parameter layout
//! is the model's own (state-dict order), so Fisher files and per-example gradients agree with
//! the capture and generic engines on the same model.

use std::collections::HashMap;

use super::build::{ConvOptions, GraphBuilder, Value, Weights};
use super::Graph;
use crate::error::{Error, Result};
use crate::model::{Mlp, MlpSpec, SeqLayer, SeqSpec, Sequential, Transformer};

fn named(tensors: Vec<(String, candle_core::Tensor)>, source: &str) -> Result<Weights> {
    let map: HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    Weights::from_tensors(&map, source)
}

/// An [`Mlp`] as a graph: Linear layers under its layer names with its activation between.
pub fn mlp(m: &Mlp) -> Result<Graph> {
    let arch = MlpSpec {
        sizes: m.sizes().to_vec(),
        activation: m.activation(),
    };
    mlp_state_dict(
        &arch,
        named(m.named_tensors(), "the MLP")?,
        "",
        Some(m.layer_names()),
    )
}

/// The MLP `arch` (`mlp:IN,H,...,OUT:ACT`) from a state dict: Linear layers `PREFIX NAME`
/// (`.weight` of shape (out, in), `.bias` where the file has one) with the activation between,
/// under `names` (default nn.Sequential's `0, 2, 4, …`, as many as the file holds). Parameter
/// names keep the prefix; tensors outside these layers are ignored. Fails naming the file when
/// a weight is missing or the file's layer widths are not `arch`'s. This is the `mlp:`
/// loader's route: nothing but the graph is built.
pub fn mlp_state_dict(
    arch: &MlpSpec,
    w: Weights,
    prefix: &str,
    names: Option<&[String]>,
) -> Result<Graph> {
    let prefix = if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_string()
    } else {
        format!("{prefix}.")
    };
    let (names, widths) = crate::model::state_dict_layers(
        &prefix,
        names,
        |k| w.shape_of(k),
        || w.names().into_iter().map(String::from).collect(),
        w.source(),
    )?;
    let names: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
    if widths != arch.sizes {
        let sizes: Vec<String> = arch.sizes.iter().map(|s| s.to_string()).collect();
        return Err(Error::invalid(
            "--arch",
            format!("mlp:{}", sizes.join(",")),
            format!("the weights in {} have layer widths {widths:?}", w.source()),
        ));
    }
    let keep: std::collections::HashSet<String> = names
        .iter()
        .flat_map(|n| [format!("{n}.weight"), format!("{n}.bias")])
        .collect();
    let w = w.retain(|k| keep.contains(k));
    let (mut b, x) = GraphBuilder::new(w, &widths[..1]);
    let mut h = x;
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            h = b.activation(h, arch.activation);
        }
        let bias = b.has_tensor(&format!("{name}.bias"));
        h = b.linear(h, name, bias)?;
    }
    b.finish(h)
}

/// A [`Sequential`] as a graph, modules at their nn.Sequential indices.
pub fn sequential(m: &Sequential) -> Result<Graph> {
    let mut t: Vec<(String, candle_core::Tensor)> = vec![];
    for (i, ts) in m.tensors().iter().enumerate() {
        if let Some(w) = &ts.weight {
            t.push((format!("{i}.weight"), w.as_tensor().clone()));
        }
        if let Some(bias) = &ts.bias {
            t.push((format!("{i}.bias"), bias.as_tensor().clone()));
        }
        if let Some((mean, var)) = &ts.stats {
            t.push((format!("{i}.running_mean"), mean.clone()));
            t.push((format!("{i}.running_var"), var.clone()));
        }
    }
    seq(m.spec(), named(t, m.source())?, m.input_shape())
}

/// The `nn.Sequential` that `spec` describes, as a graph on examples of `input_shape`, from its
/// state dict (take a model inside a larger checkpoint with [`Weights::with_prefix`]). The
/// state dict is checked against the architecture first ([`SeqSpec::check_state_dict`]: every
/// tensor present with PyTorch's shape, none left over, running variances ≥ 0), so an error
/// names the module. Nothing but the graph is built: this is the `seq:` loader's route.
pub fn seq(spec: &SeqSpec, w: Weights, input_shape: &[usize]) -> Result<Graph> {
    spec.check_state_dict(
        input_shape,
        "",
        w.source(),
        |k| w.shape_of(k),
        w.names().into_iter(),
    )?;
    for (i, l) in spec.layers.iter().enumerate() {
        if !l.buffer_shapes().is_empty() {
            let key = format!("{i}.running_var");
            crate::model::check_running_var(w.values(&key).unwrap_or(&[]), &key, w.source())?;
        }
    }
    let (mut b, x) = GraphBuilder::new(w, input_shape);
    let mut h = x;
    for (i, l) in spec.layers.iter().enumerate() {
        let name = i.to_string();
        h = match *l {
            SeqLayer::Linear { bias, .. } => b.linear(h, &name, bias)?,
            SeqLayer::Conv1d(a) | SeqLayer::Conv2d(a) => {
                let o = ConvOptions {
                    stride: a.stride,
                    padding: a.padding,
                    dilation: a.dilation,
                    groups: 1,
                };
                b.conv(h, &name, o, a.bias)?
            }
            SeqLayer::MaxPool2d { k, stride } => b.max_pool2d(h, k, stride)?,
            SeqLayer::AvgPool2d { k, stride } => b.avg_pool2d(h, k, stride)?,
            SeqLayer::Flatten => b.flatten(h),
            SeqLayer::LayerNorm { eps, .. } => b.layer_norm(h, &name, eps)?,
            SeqLayer::BatchNorm2d { eps, .. } => b.batch_norm(h, &name, eps)?,
            SeqLayer::Dropout => h,
            SeqLayer::Act(a) => b.activation(h, a),
        };
    }
    b.finish(h)
}

/// A [`Transformer`] as a graph on token sequences of length `len` (≤ its `max_len`).
pub fn transformer(m: &Transformer, len: usize) -> Result<Graph> {
    let cfg = *m.config();
    let mut t = vec![];
    for (name, _) in cfg.param_shapes() {
        t.push((name.clone(), m.tensor(&name)?));
    }
    let (mut b, tok) = GraphBuilder::with_token_input(named(t, "the transformer")?, len);
    let e = b.embedding(tok, "emb.weight")?;
    let p = b.positions("pos.weight", len)?;
    let mut x = b.add(e, p)?;
    for i in 0..cfg.layers {
        let n = |s: &str| format!("blocks.{i}.{s}");
        let h = b.layer_norm(x, &n("ln1"), cfg.eps)?;
        let y = attention(&mut b, h, &n("qkv"), &n("proj"), cfg.d, cfg.heads, false)?;
        x = b.add(x, y)?;
        let h = b.layer_norm(x, &n("ln2"), cfg.eps)?;
        let h = b.linear(h, &n("fc1"), true)?;
        let h = b.activation(h, crate::model::Activation::Gelu);
        let h = b.linear(h, &n("fc2"), true)?;
        x = b.add(x, h)?;
    }
    let x = b.layer_norm(x, "ln_f", cfg.eps)?;
    let x = b.mean(x, 0)?;
    let y = b.linear(x, "head", true)?;
    b.finish(y)
}

/// Multi-head self-attention on (T, d): q, k, v from one Linear `qkv` (3d, d) stacked in that
/// order, scaled dot products (causally masked when `causal`), softmax, and the output Linear
/// `proj`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use deltavar::graph::build::{GraphBuilder, Weights};
/// use deltavar::graph::models::attention;
/// use deltavar::{FactoredOptions, GraphEngine, Qoi, QueryGradients};
///
/// # fn main() -> deltavar::Result<()> {
/// let (t, d) = (3, 4);
/// let w = |n: usize, s: u64| (0..n).map(|i| ((i as u64 * 7 + s) % 11) as f64 / 10.0 - 0.5).collect();
/// let weights = Weights::from_named(vec![
///     ("qkv.weight".into(), vec![3 * d, d], w(3 * d * d, 1)),
///     ("qkv.bias".into(), vec![3 * d], w(3 * d, 2)),
///     ("proj.weight".into(), vec![d, d], w(d * d, 3)),
///     ("proj.bias".into(), vec![d], w(d, 4)),
/// ])?;
/// let (mut b, x) = GraphBuilder::new(weights, &[t, d]);
/// let y = attention(&mut b, x, "qkv", "proj", d, 2, true)?;
/// let engine = GraphEngine::new(b.finish(y)?, &[t, d], DType::F64)?;
/// // position 0 attends to itself only: its output does not move with the last position
/// let z = Tensor::new(&[[[0.1f64, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]]], &Device::Cpu)?;
/// let z2 = Tensor::new(&[[[0.1f64, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [9.0, -9.0, 3.0, 1.0]]], &Device::Cpu)?;
/// let o = FactoredOptions::default();
/// let (_, a) = engine.query_gradients(&Qoi::Output(0), &z, 1, &o)?;
/// let (_, b2) = engine.query_gradients(&Qoi::Output(0), &z2, 1, &o)?;
/// assert!((a[0] - b2[0]).abs() < 1e-12);
/// let (_, c) = engine.query_gradients(&Qoi::Output(2 * d), &z2, 1, &o)?;
/// let (_, c0) = engine.query_gradients(&Qoi::Output(2 * d), &z, 1, &o)?;
/// assert!((c[0] - c0[0]).abs() > 1e-6); // the last position does
/// # Ok(())
/// # }
/// ```
pub fn attention(
    b: &mut GraphBuilder,
    x: Value,
    qkv: &str,
    proj: &str,
    d: usize,
    heads: usize,
    causal: bool,
) -> Result<Value> {
    let (t, hd) = match *b.shape(x) {
        [t, w] if w == d && heads > 0 && d % heads == 0 => (t, d / heads),
        ref other => {
            return Err(crate::error::Error::invalid(
                "attention input",
                format!("{other:?}"),
                format!("needs one example of shape (T, {d}) and {heads} heads dividing {d}"),
            ))
        }
    };
    let qkv = b.linear(x, qkv, true)?;
    let parts = b.split(qkv, 1, 3)?;
    let mut part = |k: usize, perm: &[usize]| -> Result<Value> {
        let p = b.reshape(parts[k], &[t, heads, hd])?;
        b.transpose(p, perm)
    };
    let q = part(0, &[1, 0, 2])?; // (H, T, hd)
    let kt = part(1, &[1, 2, 0])?; // (H, hd, T)
    let v = part(2, &[1, 0, 2])?;
    let s = b.matmul(q, kt)?;
    let s = b.scale(s, 1.0 / (hd as f64).sqrt())?;
    let s = if causal { b.causal_mask(s)? } else { s };
    let a = b.softmax(s, 2)?;
    let y = b.matmul(a, v)?; // (H, T, hd)
    let y = b.transpose(y, &[1, 0, 2])?;
    let y = b.reshape(y, &[t, d])?;
    b.linear(y, proj, true)
}
