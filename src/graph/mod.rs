//! Models as graphs: the IR ([`ir`]), the ONNX reader ([`onnx`]), the operators with their
//! forward and backward passes ([`ops`]), the analysis of batch axes and parameter uses
//! ([`analysis`]), the batched executor ([`exec`]) and the per-example rules where parameters
//! meet the batch ([`per_example`]). The per-example engine over it is
//! [`crate::engine::GraphEngine`].
//!
//! Loading a PyTorch model: [`Graph::from_onnx`] reads the file and decides which initializers
//! are the parameters. With the state dict (`weights`), every float tensor in it must be read by
//! the graph under its name and shape with its values (batch-norm running statistics stay
//! buffers); a tensor the graph does not read, reads with other values (folded), or reads
//! through an anonymous copy (a split tie, a transposed Linear weight) is an error naming it.

pub mod analysis;
pub mod backward;
pub mod build;
pub mod exec;
pub mod ir;
pub mod models;
pub mod onnx;
pub mod ops;
pub mod per_example;
pub mod records;

use std::collections::{HashMap, HashSet};
use std::path::Path;

pub use analysis::Analysis;
pub use ir::{Data, ElemType, Graph, Node, Op, Param, Tensor, ValueId, SUPPORTED_OPS};

use crate::error::{Error, Result};

const REEXPORT: &str = "re-export with `python scripts/export_torch.py --onnx` or `deltavar_rs.Model.from_torch` (torch.onnx dynamo export, every parameter kept as an initializer under its state-dict name)";

impl Graph {
    /// Reads an ONNX model. Without `weights`, the parameters are the float initializers of
    /// rank ≥ 1 with finite values that the graph reads, except batch-norm running statistics
    /// (the exporters write Python scalars as rank-0 constants and masks with infinities); with
    /// `weights` (the model's state dict as safetensors) they are exactly the
    /// float tensors of the state dict, checked against the file (see the module docs).
    pub fn from_onnx(path: impl AsRef<Path>, weights: Option<&Path>) -> Result<Graph> {
        let path = path.as_ref();
        let imported = onnx::import(path)?;
        let mut g = imported.graph;
        let mut read: HashSet<ValueId> = HashSet::new();
        let mut stats: HashSet<ValueId> = HashSet::new();
        for n in &g.nodes {
            read.extend(n.inputs.iter().flatten().copied());
            if let Op::BatchNorm { .. } = n.op {
                stats.extend(n.input(3));
                stats.extend(n.input(4));
            }
        }
        read.insert(g.output);
        let chosen: Vec<(ValueId, Option<Vec<f64>>)> = match weights {
            None => imported
                .initializers
                .iter()
                .filter(|v| {
                    let Some(t) = g.consts.get(v) else {
                        return false;
                    };
                    match &t.data {
                        Data::F(d) => {
                            read.contains(v)
                                && !stats.contains(v)
                                && !t.shape.is_empty()
                                && !d.is_empty()
                                && d.iter().all(|x| x.is_finite())
                        }
                        _ => false,
                    }
                })
                .map(|v| (*v, None))
                .collect(),
            Some(w) => bind_weights(&g, &imported.initializers, &read, &stats, w)?,
        };
        for (v, data) in chosen {
            let Some(c) = g.consts.remove(&v) else {
                continue;
            };
            let data = match (data, c.data) {
                (Some(d), _) => d,
                (None, Data::F(d)) => d,
                _ => continue,
            };
            g.params.push(Param {
                name: g.values[v].clone(),
                value: v,
                shape: c.shape,
                data,
            });
        }
        g.validate()?;
        Ok(g)
    }

    /// The parameters as named candle tensors (f64), in flat-layout order: what Fisher files
    /// record and fingerprint.
    pub fn named_tensors(&self) -> Result<Vec<(String, candle_core::Tensor)>> {
        self.params
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    candle_core::Tensor::from_slice(
                        &p.data,
                        p.shape.as_slice(),
                        &candle_core::Device::Cpu,
                    )?,
                ))
            })
            .collect()
    }
}

/// The parameters from a state dict, checked against the graph's initializers: (value, data)
/// in the file's initializer order.
fn bind_weights(
    g: &Graph,
    initializers: &[ValueId],
    read: &HashSet<ValueId>,
    stats: &HashSet<ValueId>,
    path: &Path,
) -> Result<Vec<(ValueId, Option<Vec<f64>>)>> {
    let bad = |detail: String| Error::BadFile {
        path: path.display().to_string(),
        detail,
    };
    let by_name: HashMap<&str, ValueId> = initializers
        .iter()
        .map(|v| (g.values[*v].as_str(), *v))
        .collect();
    let mut weights: HashMap<ValueId, Vec<f64>> = HashMap::new();
    let mut floats: Vec<(String, Vec<usize>, Vec<f64>)> = vec![];
    // integer and boolean buffers (num_batches_tracked, edge lists) are not parameters: the
    // reader skips them
    build::read_safetensors(
        path,
        |_| true,
        |name, dtype, shape, data| {
            if matches!(dtype, safetensors::Dtype::F16 | safetensors::Dtype::BF16) {
                return Err(bad(format!(
                    "tensor '{name}' is {dtype:?}; save the state dict in float32 or float64"
                )));
            }
            let shape = shape.to_vec();
            let v = by_name.get(name).copied().filter(|v| read.contains(v));
            let Some(v) = v else {
                return Err(bad(format!(
                "tensor '{name}' of the state dict is not read by the graph in {}: the exporter folded, renamed or copied it \
                 (batch norm folded into a convolution, a Linear weight copied, tied weights split, equal initializers merged); {REEXPORT}",
                g.source
            )));
            };
            let c = g
                .consts
                .get(&v)
                .ok_or_else(|| bad(format!("tensor '{name}' is not an initializer")))?;
            if c.shape != shape {
                return Err(bad(format!(
                    "tensor '{name}' has shape {shape:?}, the graph reads it as {:?}; {REEXPORT}",
                    c.shape
                )));
            }
            let same = match &c.data {
                Data::F(gv) => gv.iter().zip(&data).all(|(a, b)| {
                    (*a as f32).to_bits() == (*b as f32).to_bits() || (a.is_nan() && b.is_nan())
                }),
                _ => false,
            };
            if !same {
                return Err(bad(format!(
                "the graph in {} reads '{name}' with other values than the state dict (folded, for example batch norm into a convolution); {REEXPORT}",
                g.source
            )));
            }
            if !data.iter().all(|x| x.is_finite()) {
                return Err(Error::NonFinite {
                    what: format!("tensor '{name}' of {}", path.display()),
                    detail: "a parameter holds NaN or an infinity".into(),
                });
            }
            floats.push((name.to_string(), shape, data.clone()));
            if !stats.contains(&v) {
                weights.insert(v, data);
            }
            Ok(())
        },
    )?;
    // anonymous copies of parameters: a tie split, a Linear weight transposed into a constant
    for v in initializers {
        if weights.contains_key(v) || !read.contains(v) {
            continue;
        }
        let Some(Tensor {
            shape,
            data: Data::F(d),
        }) = g.consts.get(v)
        else {
            continue;
        };
        if d.len() < 16 || floats.iter().any(|(n, _, _)| n == &g.values[*v]) {
            continue;
        }
        for (name, ws, wd) in &floats {
            if wd.len() != d.len() {
                continue;
            }
            let eq = |a: f64, b: f64| (a as f32).to_bits() == (b as f32).to_bits();
            let direct = d.iter().zip(wd).all(|(a, b)| eq(*a, *b));
            let transposed = ws.len() == 2
                && shape.len() == 2
                && shape[0] == ws[1]
                && shape[1] == ws[0]
                && (0..ws[0]).all(|i| (0..ws[1]).all(|j| eq(d[j * ws[0] + i], wd[i * ws[1] + j])));
            if direct || transposed {
                return Err(bad(format!(
                    "the graph in {} reads '{}', an anonymous {}copy of the parameter '{name}': the exporter copied it \
                     (a tied weight split, or a Linear weight on 3-D inputs), so its gradient would be lost; {REEXPORT}",
                    g.source,
                    g.values[*v],
                    if transposed { "transposed " } else { "" }
                )));
            }
        }
    }
    Ok(initializers
        .iter()
        .filter_map(|v| weights.remove(v).map(|d| (*v, Some(d))))
        .collect())
}
