//! Writing a network as a graph in Rust: [`GraphBuilder`] adds layers by their weights'
//! state-dict names (VarBuilder style: `linear(x, "blocks.0.fc1", true)` reads
//! `blocks.0.fc1.weight` and `blocks.0.fc1.bias`), tracks each value's per-example shape, and
//! [`GraphBuilder::finish`] returns the [`Graph`] the native engine
//! ([`crate::engine::GraphEngine`]) runs — the same graph an ONNX file becomes, without
//! exporting one.
//!
//! Shapes here are per example: the builder puts the batch axis in front of every value that
//! depends on the data input, so `x` of shape `[C, H, W]` is `(B, C, H, W)` in the graph and
//! axis arguments count from the first per-example axis. Values that do not depend on the data
//! (parameters, constants, `positions`) have no batch axis and broadcast against it.
//!
//! Parameters are read from [`Weights`] at most once under each name (a second read of the
//! same name is the same parameter: tied weights). [`GraphBuilder::finish`] refuses weights no
//! layer read (`num_batches_tracked` excepted), as a PyTorch `load_state_dict(strict=True)`
//! would. The graph holds every parameter as f64 ([`Param::data`]).
//!
//! ```
//! use deltavar::graph::build::{GraphBuilder, Weights};
//! use deltavar::model::Activation;
//!
//! # fn main() -> deltavar::Result<()> {
//! // a residual block on 8 features: x + fc2(relu(fc1(x)))
//! let w = Weights::from_named(vec![
//!     ("fc1.weight".into(), vec![16, 8], vec![0.01; 128]),
//!     ("fc1.bias".into(), vec![16], vec![0.0; 16]),
//!     ("fc2.weight".into(), vec![8, 16], vec![0.02; 128]),
//!     ("fc2.bias".into(), vec![8], vec![0.0; 8]),
//! ])?;
//! let (mut b, x) = GraphBuilder::new(w, &[8]);
//! let h = b.linear(x, "fc1", true)?;
//! let h = b.activation(h, Activation::Relu);
//! let h = b.linear(h, "fc2", true)?;
//! let y = b.add(x, h)?;
//! let graph = b.finish(y)?;
//! assert_eq!(graph.num_params(), 128 + 16 + 128 + 8);
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::ir::{
    AutoPad, Binary, Data, ElemType, Graph, Node, Op, Param, ReduceKind, Tensor, Unary, ValueId,
    Window,
};
use super::ops::util::{broadcast_dims, MAX_ELEMENTS};
use crate::error::{Error, Result};
use crate::model::Activation;

/// Named tensors (a state dict) for a [`GraphBuilder`], held as f64 and checked finite.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    source: String,
}

impl Weights {
    /// From (name, shape, values) triples; every value must be finite and the shape must hold
    /// the values.
    pub fn from_named(named: Vec<(String, Vec<usize>, Vec<f64>)>) -> Result<Self> {
        let mut w = Weights {
            tensors: HashMap::new(),
            source: "(weights)".into(),
        };
        for (name, shape, data) in named {
            w.insert(name, shape, data)?;
        }
        Ok(w)
    }

    /// From candle tensors (any float dtype), e.g. what `candle_core::safetensors::load`
    /// returns; `source` names them in errors (the file). Integer tensors are skipped.
    pub fn from_tensors(
        tensors: &HashMap<String, candle_core::Tensor>,
        source: &str,
    ) -> Result<Self> {
        let mut w = Weights {
            tensors: HashMap::new(),
            source: source.to_string(),
        };
        for (name, t) in tensors {
            if !t.dtype().is_float() {
                continue;
            }
            let data = crate::params::with_float_slice(t, |s| match s {
                crate::params::FloatSlice::F32(v) => v.iter().map(|x| *x as f64).collect(),
                crate::params::FloatSlice::F64(v) => v.to_vec(),
            })?;
            w.insert(name.clone(), t.dims().to_vec(), data)?;
        }
        Ok(w)
    }

    /// Reads a safetensors file (a PyTorch state dict) with [`read_safetensors`]: every float
    /// tensor as f64, integer tensors skipped. Errors name the file and the tensor.
    pub fn from_safetensors(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_safetensors_where(path, |_| true)
    }

    /// [`Weights::from_safetensors`] converting only the tensors whose names `keep` accepts (a
    /// model under a prefix in a larger checkpoint: the others are never converted).
    pub fn from_safetensors_where(
        path: impl AsRef<Path>,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        let path = path.as_ref();
        let mut w = Weights {
            tensors: HashMap::new(),
            source: path.display().to_string(),
        };
        read_safetensors(path, keep, |name, _, shape, data| {
            w.insert(name.to_string(), shape.to_vec(), data)
        })?;
        Ok(w)
    }

    /// Only the tensors whose names `keep` accepts.
    pub fn retain(mut self, keep: impl Fn(&str) -> bool) -> Self {
        self.tensors.retain(|k, _| keep(k));
        self
    }

    /// The shape of tensor `name`, if there is one.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(s, _)| s.clone())
    }

    /// The values of tensor `name` (row-major), if there is one.
    pub fn values(&self, name: &str) -> Option<&[f64]> {
        self.tensors.get(name).map(|(_, v)| v.as_slice())
    }

    /// Only the tensors whose names start with `prefix` (a `.` is added when missing), with
    /// the prefix taken off: the model inside a larger checkpoint.
    pub fn with_prefix(self, prefix: &str) -> Self {
        if prefix.is_empty() {
            return self;
        }
        let p = if prefix.ends_with('.') {
            prefix.to_string()
        } else {
            format!("{prefix}.")
        };
        let tensors = self
            .tensors
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|s| (s.to_string(), v)))
            .collect();
        Weights {
            tensors,
            source: self.source,
        }
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// Where the tensors came from (for messages).
    pub fn source(&self) -> &str {
        &self.source
    }

    fn insert(&mut self, name: String, shape: Vec<usize>, data: Vec<f64>) -> Result<()> {
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n == data.len());
        if n.is_none() {
            return Err(Error::BadFile {
                path: self.source.clone(),
                detail: format!(
                    "tensor '{name}' has shape {shape:?} but {} values",
                    data.len()
                ),
            });
        }
        if let Some(k) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("tensor '{name}' of {}", self.source),
                detail: format!("element {k} is {}", data[k]),
            });
        }
        self.tensors.insert(name, (shape, data));
        Ok(())
    }
}

/// Little-endian floats of `N` bytes each, as f64 (the bytes need no alignment).
fn le_floats<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(bytes.len() / N);
    out.extend(bytes.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        f(a)
    }));
    out
}

/// Reads the float tensors of a safetensors file, memory-mapped (never read into memory whole),
/// in name order: for each whose name `keep` accepts, `each(name, dtype, shape, values)` with
/// the values as f64 (F32 and F64 from their bytes, F16 and BF16 through candle). Integer and
/// boolean tensors are skipped. The one reader of state dicts: the `mlp:` and `seq:` loaders
/// and the ONNX `--weights` binding use it. Errors name the file (and the tensor).
pub fn read_safetensors(
    path: &Path,
    keep: impl Fn(&str) -> bool,
    mut each: impl FnMut(&str, safetensors::Dtype, &[usize], Vec<f64>) -> Result<()>,
) -> Result<()> {
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let bad = |detail: String| Error::BadFile {
        path: path.display().to_string(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is only read; as with any mapped file, another process rewriting the
    // file meanwhile could change the values read.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let st = safetensors::SafeTensors::deserialize(&map)
        .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
    let mut names = st.names();
    names.sort_unstable();
    for name in names {
        if !keep(name) {
            continue;
        }
        let view = st
            .tensor(name)
            .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        use safetensors::Dtype as D;
        let bytes = view.data();
        let data: Vec<f64> = match view.dtype() {
            D::F32 => le_floats::<4>(bytes, |c| f32::from_le_bytes(c) as f64),
            D::F64 => le_floats::<8>(bytes, f64::from_le_bytes),
            D::F16 | D::BF16 => {
                let dt = if view.dtype() == D::F16 {
                    candle_core::DType::F16
                } else {
                    candle_core::DType::BF16
                };
                let n = view.shape().iter().product::<usize>();
                candle_core::Tensor::from_raw_buffer(bytes, dt, &[n], &candle_core::Device::Cpu)
                    .and_then(|t| t.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>())
                    .map_err(|e| bad(format!("tensor '{name}': {e}")))?
            }
            _ => continue,
        };
        each(name, view.dtype(), view.shape(), data)?;
    }
    Ok(())
}

/// A value of the graph being built (a handle; see [`GraphBuilder::shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Value(ValueId);

impl Value {
    /// Its id in the graph.
    pub fn id(self) -> ValueId {
        self.0
    }
}

/// A convolution's arguments beyond its weight (PyTorch's `nn.Conv1d`/`nn.Conv2d`; the same
/// stride, padding and dilation on every spatial axis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvOptions {
    /// Stride.
    pub stride: usize,
    /// Zero padding on both sides.
    pub padding: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups (in and out channels both multiples).
    pub groups: usize,
}

impl Default for ConvOptions {
    fn default() -> Self {
        ConvOptions {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// Builds a [`Graph`] layer by layer (see the module docs).
#[derive(Debug)]
pub struct GraphBuilder {
    g: Graph,
    /// (depends on the data, per-example shape) of each value.
    info: Vec<(bool, Vec<usize>)>,
    weights: Weights,
    read: HashMap<String, ValueId>,
}

impl GraphBuilder {
    /// A builder whose data input is one float example of shape `input_shape` (without the
    /// batch axis).
    pub fn new(weights: Weights, input_shape: &[usize]) -> (Self, Value) {
        Self::start(weights, input_shape, ElemType::Float)
    }

    /// A builder whose data input is a sequence of `len` token ids (integers).
    pub fn with_token_input(weights: Weights, len: usize) -> (Self, Value) {
        Self::start(weights, &[len], ElemType::Int)
    }

    fn start(weights: Weights, input_shape: &[usize], ty: ElemType) -> (Self, Value) {
        let g = Graph {
            values: vec!["input".into()],
            nodes: vec![],
            input: 0,
            input_type: ty,
            input_dims: Some(input_shape.iter().map(|&d| Some(d)).collect()),
            output: 0,
            consts: HashMap::new(),
            params: vec![],
            source: format!("graph built from {}", weights.source),
        };
        let b = GraphBuilder {
            g,
            info: vec![(true, input_shape.to_vec())],
            weights,
            read: HashMap::new(),
        };
        (b, Value(0))
    }

    /// The per-example shape of `v` (the whole shape for a value that does not depend on the
    /// data).
    pub fn shape(&self, v: Value) -> &[usize] {
        &self.info[v.0].1
    }

    /// Whether `v` depends on the data input (has the batch axis).
    pub fn is_batched(&self, v: Value) -> bool {
        self.info[v.0].0
    }

    fn new_value(&mut self, name: String, batched: bool, shape: Vec<usize>) -> ValueId {
        self.g.values.push(name);
        self.info.push((batched, shape));
        self.g.values.len() - 1
    }

    /// The shape of the stored tensor `name` (empty when there is none).
    /// Whether the weights hold a tensor `name` (an optional bias, say).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.weights.tensors.contains_key(name)
    }

    fn stored_shape(&self, name: &str) -> Vec<usize> {
        self.weights
            .tensors
            .get(name)
            .map(|t| t.0.clone())
            .unwrap_or_default()
    }

    fn bad(&self, detail: String) -> Error {
        Error::BadFile {
            path: self.weights.source.clone(),
            detail,
        }
    }

    fn shape_err(&self, node: &str, detail: String) -> Error {
        Error::Unsupported(format!("graph builder, {node}: {detail}"))
    }

    /// The element count of `shape`, refused on overflow or above [`MAX_ELEMENTS`].
    fn count(&self, what: &str, shape: &[usize]) -> Result<usize> {
        shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|n| *n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                self.shape_err(
                    what,
                    format!(
                        "shape {shape:?} is over the {MAX_ELEMENTS} elements one value may hold"
                    ),
                )
            })
    }

    /// The parameter `name` (shape checked), read from the weights once; a second call with
    /// the same name is the same parameter (tied weights).
    pub fn param(&mut self, name: &str, shape: &[usize]) -> Result<Value> {
        let v = self.tensor(name, shape)?;
        if self.g.consts.contains_key(&v) {
            return Err(self.bad(format!(
                "tensor '{name}' is read both as a parameter and as a buffer"
            )));
        }
        if !self.g.params.iter().any(|p| p.value == v) {
            let data = self.take_data(name);
            self.g.params.push(Param {
                name: name.to_string(),
                value: v,
                shape: shape.to_vec(),
                data,
            });
        }
        Ok(Value(v))
    }

    /// A tensor of the weights that is not a parameter (batch-norm running statistics).
    pub fn buffer(&mut self, name: &str, shape: &[usize]) -> Result<Value> {
        let v = self.tensor(name, shape)?;
        if self.g.params.iter().any(|p| p.value == v) {
            return Err(self.bad(format!(
                "tensor '{name}' is read both as a parameter and as a buffer"
            )));
        }
        if !self.g.consts.contains_key(&v) {
            let data = self.take_data(name);
            self.g.consts.insert(
                v,
                Tensor {
                    shape: shape.to_vec(),
                    data: Data::F(data),
                },
            );
        }
        Ok(Value(v))
    }

    /// Moves the values of a tensor read for the first time into the graph (its shape stays,
    /// for the messages and `stored_shape`): each weight is held once.
    fn take_data(&mut self, name: &str) -> Vec<f64> {
        self.weights
            .tensors
            .get_mut(name)
            .map(|t| std::mem::take(&mut t.1))
            .unwrap_or_default()
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<ValueId> {
        if let Some(&v) = self.read.get(name) {
            return Ok(v);
        }
        let Some((s, _)) = self.weights.tensors.get(name) else {
            let mut near: Vec<&str> = self
                .weights
                .names()
                .into_iter()
                .filter(|n| {
                    let stem = name.rsplit_once('.').map(|x| x.0).unwrap_or(name);
                    n.starts_with(stem)
                })
                .collect();
            near.truncate(8);
            return Err(self.bad(format!(
                "tensor '{name}' (shape {shape:?}) is missing{}",
                if near.is_empty() {
                    String::new()
                } else {
                    format!("; it has {near:?}")
                }
            )));
        };
        if s.as_slice() != shape {
            return Err(self.bad(format!(
                "tensor '{name}' has shape {s:?}, the layer needs {shape:?}"
            )));
        }
        let v = self.new_value(name.to_string(), false, shape.to_vec());
        self.read.insert(name.to_string(), v);
        Ok(v)
    }

    /// A constant (no batch axis, not a parameter).
    pub fn constant(&mut self, shape: &[usize], data: Vec<f64>) -> Result<Value> {
        let n = self.count("constant", shape)?;
        if n != data.len() {
            return Err(self.shape_err(
                "constant",
                format!("shape {shape:?} holds {n} values, not {}", data.len()),
            ));
        }
        let k = self.g.values.len();
        let v = self.new_value(format!("const_{k}"), false, shape.to_vec());
        self.g.consts.insert(
            v,
            Tensor {
                shape: shape.to_vec(),
                data: Data::F(data),
            },
        );
        Ok(Value(v))
    }

    fn ints(&mut self, data: Vec<i64>) -> ValueId {
        let k = self.g.values.len();
        let n = data.len();
        let v = self.new_value(format!("ints_{k}"), false, vec![n]);
        self.g.consts.insert(
            v,
            Tensor {
                shape: vec![n],
                data: Data::I(data),
            },
        );
        v
    }

    fn node(&mut self, name: &str, op: Op, inputs: &[ValueId], shape: Vec<usize>) -> Value {
        let batched = inputs.iter().any(|&i| self.info[i].0);
        let k = self.g.nodes.len();
        let out = self.new_value(format!("{name}#{k}"), batched, shape);
        self.g.nodes.push(Node {
            name: format!("{name}#{k}"),
            op,
            inputs: inputs.iter().map(|&i| Some(i)).collect(),
            outputs: vec![Some(out)],
        });
        Value(out)
    }

    /// `nn.Linear` over the last axis: `name.weight` (out, in) and, with `bias`, `name.bias`.
    pub fn linear(&mut self, x: Value, name: &str, bias: bool) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let Some(&inp) = s.last() else {
            return Err(self.shape_err(name, "a Linear needs an input with a last axis".into()));
        };
        let wshape = self.stored_shape(&format!("{name}.weight"));
        let out = match wshape.as_slice() {
            [o, i] if *i == inp => *o,
            _ => {
                return Err(self.bad(format!(
                    "tensor '{name}.weight' has shape {wshape:?}, the Linear needs (out, {inp})"
                )))
            }
        };
        let w = self.param(&format!("{name}.weight"), &[out, inp])?;
        let b = if bias {
            Some(self.param(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        let mut ys = s.clone();
        ys[s.len() - 1] = out;
        if s.len() == 1 && self.is_batched(x) {
            let op = Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            };
            let mut ins = vec![x.0, w.0];
            ins.extend(b.map(|b| b.0));
            return Ok(self.node(name, op, &ins, ys));
        }
        let wt = self.node(
            &format!("{name}.T"),
            Op::Transpose {
                perm: Some(vec![1, 0]),
            },
            &[w.0],
            vec![inp, out],
        );
        let y = self.node(name, Op::MatMul, &[x.0, wt.0], ys.clone());
        match b {
            Some(b) => Ok(self.node(
                &format!("{name}.bias"),
                Op::Binary(Binary::Add),
                &[y.0, b.0],
                ys,
            )),
            None => Ok(y),
        }
    }

    /// `nn.Conv1d` / `nn.Conv2d` (by the rank of `name.weight`: (out, in/groups, k) or
    /// (out, in/groups, kh, kw)) on (C, L) or (C, H, W); with `bias`, `name.bias`.
    pub fn conv(&mut self, x: Value, name: &str, o: ConvOptions, bias: bool) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let wshape = self.stored_shape(&format!("{name}.weight"));
        let sp = s.len().saturating_sub(1);
        if !(sp == 1 || sp == 2) || wshape.len() != sp + 2 {
            return Err(self.bad(format!(
                "convolution '{name}' on an input of shape {s:?} needs a weight of rank {}, '{name}.weight' has shape {wshape:?}",
                sp + 2
            )));
        }
        let g = o.groups.max(1);
        if o.stride == 0
            || o.dilation == 0
            || s[0] % g != 0
            || wshape[0] % g != 0
            || wshape[1].checked_mul(g) != Some(s[0])
        {
            return Err(self.shape_err(
                name,
                format!(
                    "weight {wshape:?} with {g} group(s), stride {}, dilation {} does not fit an input of {} channels",
                    o.stride, o.dilation, s[0]
                ),
            ));
        }
        let mut ys = vec![wshape[0]];
        for (a, &len) in s[1..].iter().enumerate() {
            let span = o
                .dilation
                .checked_mul(wshape[2 + a].max(1) - 1)
                .and_then(|x| x.checked_add(1));
            let padded = o.padding.checked_mul(2).and_then(|p| p.checked_add(len));
            match (span, padded) {
                (Some(span), Some(padded)) if wshape[2 + a] > 0 && padded >= span => {
                    ys.push((padded - span) / o.stride + 1)
                }
                _ => {
                    return Err(self.shape_err(
                        name,
                        format!(
                            "kernel {:?} (dilation {}) is larger than the input {s:?} padded by {}",
                            &wshape[2..],
                            o.dilation,
                            o.padding
                        ),
                    ))
                }
            }
        }
        let w = self.param(&format!("{name}.weight"), &wshape)?;
        let mut ins = vec![x.0, w.0];
        if bias {
            ins.push(self.param(&format!("{name}.bias"), &[wshape[0]])?.0);
        }
        let op = Op::Conv {
            window: Window {
                kernel: None,
                strides: vec![o.stride; sp],
                pads: vec![o.padding; 2 * sp],
                dilations: vec![o.dilation; sp],
                auto_pad: AutoPad::NotSet,
                ceil_mode: false,
            },
            group: g,
        };
        Ok(self.node(name, op, &ins, ys))
    }

    fn pool(&mut self, x: Value, k: usize, stride: usize, max: bool) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let what = if max { "max_pool2d" } else { "avg_pool2d" };
        if s.len() != 3 || k == 0 || stride == 0 || s[1] < k || s[2] < k {
            return Err(self.shape_err(
                what,
                format!("window {k}, stride {stride} on an input of shape {s:?} (needs (C, H, W) with H, W ≥ {k})"),
            ));
        }
        let ys = vec![s[0], (s[1] - k) / stride + 1, (s[2] - k) / stride + 1];
        let window = Window {
            kernel: Some(vec![k, k]),
            strides: vec![stride, stride],
            pads: vec![],
            dilations: vec![],
            auto_pad: AutoPad::NotSet,
            ceil_mode: false,
        };
        let op = if max {
            Op::MaxPool { window }
        } else {
            Op::AveragePool {
                window,
                count_include_pad: false,
            }
        };
        Ok(self.node(what, op, &[x.0], ys))
    }

    /// `nn.MaxPool2d(k, stride)` on (C, H, W) (floor mode, no padding).
    pub fn max_pool2d(&mut self, x: Value, k: usize, stride: usize) -> Result<Value> {
        self.pool(x, k, stride, true)
    }

    /// `nn.AvgPool2d(k, stride)` on (C, H, W) (floor mode, no padding).
    pub fn avg_pool2d(&mut self, x: Value, k: usize, stride: usize) -> Result<Value> {
        self.pool(x, k, stride, false)
    }

    /// Everything into one axis (`nn.Flatten()`).
    pub fn flatten(&mut self, x: Value) -> Value {
        let n = self.shape(x).iter().product();
        if self.is_batched(x) {
            self.node("flatten", Op::Flatten { axis: 1 }, &[x.0], vec![n])
        } else {
            self.node("flatten", Op::Flatten { axis: 0 }, &[x.0], vec![1, n])
        }
    }

    /// `nn.LayerNorm(d, eps)` over the last axis with `name.weight` and `name.bias`.
    pub fn layer_norm(&mut self, x: Value, name: &str, eps: f64) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let Some(&d) = s.last() else {
            return Err(self.shape_err(name, "a LayerNorm needs an input with a last axis".into()));
        };
        let w = self.param(&format!("{name}.weight"), &[d])?;
        let b = self.param(&format!("{name}.bias"), &[d])?;
        Ok(self.node(
            name,
            Op::LayerNorm {
                axis: -1,
                epsilon: eps,
            },
            &[x.0, w.0, b.0],
            s,
        ))
    }

    /// `nn.BatchNorm1d/2d(c, eps)` in eval mode on (C, ...): `name.weight`, `name.bias` are
    /// parameters, `name.running_mean`, `name.running_var` buffers (the variance checked ≥ 0).
    pub fn batch_norm(&mut self, x: Value, name: &str, eps: f64) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let Some(&c) = s.first() else {
            return Err(self.shape_err(name, "a BatchNorm needs a channel axis".into()));
        };
        let w = self.param(&format!("{name}.weight"), &[c])?;
        let b = self.param(&format!("{name}.bias"), &[c])?;
        let m = self.buffer(&format!("{name}.running_mean"), &[c])?;
        let vname = format!("{name}.running_var");
        let v = self.buffer(&vname, &[c])?;
        let var = self.g.consts.get(&v.0).and_then(|t| t.floats());
        if let Some((k, x)) = var.and_then(|d| d.iter().enumerate().find(|(_, x)| **x < 0.0)) {
            return Err(self.bad(format!("'{vname}'[{k}] = {x} (a variance must be ≥ 0)")));
        }
        Ok(self.node(
            name,
            Op::BatchNorm { epsilon: eps },
            &[x.0, w.0, b.0, m.0, v.0],
            s,
        ))
    }

    /// An elementwise activation (SiLU as x·σ(x); the identity adds nothing).
    pub fn activation(&mut self, x: Value, a: Activation) -> Value {
        let s = self.shape(x).to_vec();
        let u = match a {
            Activation::Identity => return x,
            Activation::Relu => Unary::Relu,
            Activation::Tanh => Unary::Tanh,
            Activation::Sigmoid => Unary::Sigmoid,
            Activation::Gelu => Unary::Gelu { tanh: false },
            Activation::GeluTanh => Unary::Gelu { tanh: true },
            Activation::Softplus => Unary::Softplus,
            Activation::Silu => {
                let sg = self.node("silu.sigmoid", Op::Unary(Unary::Sigmoid), &[x.0], s.clone());
                return self.node("silu", Op::Binary(Binary::Mul), &[x.0, sg.0], s);
            }
        };
        self.node(&format!("{a:?}").to_lowercase(), Op::Unary(u), &[x.0], s)
    }

    /// The full shapes of `a` and `b` with the batch axis as size 1, broadcast (numpy).
    fn broadcast(&self, what: &str, a: Value, b: Value) -> Result<Vec<usize>> {
        let full = |v: Value| {
            let (bt, s) = &self.info[v.0];
            let mut f = if *bt { vec![1] } else { vec![] };
            f.extend_from_slice(s);
            f
        };
        let out = broadcast_dims(&full(a), &full(b)).ok_or_else(|| {
            self.shape_err(
                what,
                format!(
                    "shapes {:?} and {:?} do not broadcast",
                    self.shape(a),
                    self.shape(b)
                ),
            )
        })?;
        Ok(self.strip(a, b, out))
    }

    fn strip(&self, a: Value, b: Value, full: Vec<usize>) -> Vec<usize> {
        if self.is_batched(a) || self.is_batched(b) {
            full[1..].to_vec()
        } else {
            full
        }
    }

    fn binary(&mut self, what: &str, op: Binary, a: Value, b: Value) -> Result<Value> {
        let s = self.broadcast(what, a, b)?;
        Ok(self.node(what, Op::Binary(op), &[a.0, b.0], s))
    }

    /// a + b (broadcasting; a residual connection).
    pub fn add(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary("add", Binary::Add, a, b)
    }

    /// a · b elementwise (broadcasting).
    pub fn mul(&mut self, a: Value, b: Value) -> Result<Value> {
        self.binary("mul", Binary::Mul, a, b)
    }

    /// c · x for a constant c.
    pub fn scale(&mut self, x: Value, c: f64) -> Result<Value> {
        let k = self.constant(&[], vec![c])?;
        self.mul(x, k)
    }

    /// numpy matmul over the last two axes, broadcasting the leading ones (both may carry
    /// the batch: attention's q·kᵀ).
    pub fn matmul(&mut self, a: Value, b: Value) -> Result<Value> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() < 2 || sb.len() < 2 || sa[sa.len() - 1] != sb[sb.len() - 2] {
            return Err(self.shape_err(
                "matmul",
                format!("shapes {sa:?} and {sb:?} do not multiply (both need ≥ 2 axes, a's last = b's second last)"),
            ));
        }
        let lead = |v: Value, s: &[usize]| -> Vec<usize> {
            let mut f = if self.is_batched(v) { vec![1] } else { vec![] };
            f.extend_from_slice(&s[..s.len() - 2]);
            f
        };
        let mut out = broadcast_dims(&lead(a, &sa), &lead(b, &sb)).ok_or_else(|| {
            self.shape_err(
                "matmul",
                format!("leading axes of {sa:?} and {sb:?} do not broadcast"),
            )
        })?;
        out.push(sa[sa.len() - 2]);
        out.push(sb[sb.len() - 1]);
        let s = self.strip(a, b, out);
        Ok(self.node("matmul", Op::MatMul, &[a.0, b.0], s))
    }

    fn axis(&self, x: Value, axis: usize, what: &str) -> Result<i64> {
        let r = self.shape(x).len();
        if axis >= r {
            return Err(self.shape_err(
                what,
                format!("axis {axis} of a value of shape {:?}", self.shape(x)),
            ));
        }
        Ok((axis + usize::from(self.is_batched(x))) as i64)
    }

    /// Softmax over per-example axis `axis`.
    pub fn softmax(&mut self, x: Value, axis: usize) -> Result<Value> {
        let a = self.axis(x, axis, "softmax")?;
        let s = self.shape(x).to_vec();
        Ok(self.node(
            "softmax",
            Op::Softmax {
                axis: a,
                log: false,
                legacy: false,
            },
            &[x.0],
            s,
        ))
    }

    /// The mean over per-example axis `axis` (the axis removed).
    pub fn mean(&mut self, x: Value, axis: usize) -> Result<Value> {
        let a = self.axis(x, axis, "mean")?;
        let mut s = self.shape(x).to_vec();
        s.remove(axis);
        Ok(self.node(
            "mean",
            Op::Reduce {
                kind: ReduceKind::Mean,
                axes: Some(vec![a]),
                keepdims: false,
                noop_with_empty_axes: false,
            },
            &[x.0],
            s,
        ))
    }

    /// Permutes the per-example axes (`perm` a permutation of 0..rank).
    pub fn transpose(&mut self, x: Value, perm: &[usize]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        let mut seen = vec![false; s.len()];
        if perm.len() != s.len()
            || perm
                .iter()
                .any(|&p| p >= s.len() || std::mem::replace(&mut seen[p], true))
        {
            return Err(self.shape_err(
                "transpose",
                format!("{perm:?} is not a permutation of the axes of {s:?}"),
            ));
        }
        let ys = perm.iter().map(|&p| s[p]).collect();
        let off = usize::from(self.is_batched(x));
        let mut full: Vec<usize> = (0..off).collect();
        full.extend(perm.iter().map(|p| p + off));
        Ok(self.node("transpose", Op::Transpose { perm: Some(full) }, &[x.0], ys))
    }

    /// Reshapes one example to `shape` (same number of elements).
    pub fn reshape(&mut self, x: Value, shape: &[usize]) -> Result<Value> {
        let s = self.shape(x).to_vec();
        if self.count("reshape", &s)? != self.count("reshape", shape)? {
            return Err(self.shape_err(
                "reshape",
                format!("{s:?} has not as many elements as {shape:?}"),
            ));
        }
        let mut dims: Vec<i64> = if self.is_batched(x) { vec![0] } else { vec![] };
        dims.extend(shape.iter().map(|&d| d as i64));
        let sv = self.ints(dims);
        Ok(self.node(
            "reshape",
            Op::Reshape { allowzero: false },
            &[x.0, sv],
            shape.to_vec(),
        ))
    }

    /// `len` entries of per-example axis `axis` from `start` (torch's `narrow`).
    pub fn narrow(&mut self, x: Value, axis: usize, start: usize, len: usize) -> Result<Value> {
        let a = self.axis(x, axis, "narrow")?;
        let mut s = self.shape(x).to_vec();
        let end = start.checked_add(len).filter(|e| *e <= s[axis] && len > 0);
        let Some(end) = end else {
            return Err(self.shape_err(
                "narrow",
                format!("{len} entries from {start} of axis {axis} of {s:?}"),
            ));
        };
        s[axis] = len;
        let st = self.ints(vec![start as i64]);
        let en = self.ints(vec![end as i64]);
        let ax = self.ints(vec![a]);
        Ok(self.node("narrow", Op::Slice { attrs: None }, &[x.0, st, en, ax], s))
    }

    /// Splits per-example axis `axis` into `parts` equal pieces (torch's `chunk`).
    pub fn split(&mut self, x: Value, axis: usize, parts: usize) -> Result<Vec<Value>> {
        let a = self.axis(x, axis, "split")?;
        let mut s = self.shape(x).to_vec();
        if parts == 0 || s[axis] % parts != 0 {
            return Err(self.shape_err(
                "split",
                format!("axis {axis} of {s:?} into {parts} equal parts"),
            ));
        }
        s[axis] /= parts;
        let batched = self.is_batched(x);
        let k = self.g.nodes.len();
        let outs: Vec<ValueId> = (0..parts)
            .map(|i| self.new_value(format!("split#{k}.{i}"), batched, s.clone()))
            .collect();
        self.g.nodes.push(Node {
            name: format!("split#{k}"),
            op: Op::Split {
                axis: a,
                split: None,
            },
            inputs: vec![Some(x.0)],
            outputs: outs.iter().map(|&o| Some(o)).collect(),
        });
        Ok(outs.into_iter().map(Value).collect())
    }

    /// `nn.Embedding`: rows of `name` (V, d) for integer ids (shape `[..]` → `[.., d]`).
    pub fn embedding(&mut self, ids: Value, name: &str) -> Result<Value> {
        let wshape = self.stored_shape(name);
        if wshape.len() != 2 {
            return Err(self.bad(format!(
                "embedding '{name}' needs a (V, d) table, it has shape {wshape:?}"
            )));
        }
        let w = self.param(name, &wshape)?;
        let mut s = self.shape(ids).to_vec();
        s.push(wshape[1]);
        Ok(self.node(name, Op::Gather { axis: 0 }, &[w.0, ids.0], s))
    }

    /// Rows 0..len of the table `name` (a learned position embedding read as
    /// `pos(arange(len))`): shape (len, d), no batch axis.
    pub fn positions(&mut self, name: &str, len: usize) -> Result<Value> {
        let wshape = self.stored_shape(name);
        if wshape.len() != 2 || wshape[0] < len {
            return Err(self.bad(format!(
                "position table '{name}' needs shape (≥ {len}, d), it has {wshape:?}"
            )));
        }
        let w = self.param(name, &wshape)?;
        let ids = self.ints((0..len as i64).collect());
        Ok(self.node(
            name,
            Op::Gather { axis: 0 },
            &[w.0, ids],
            vec![len, wshape[1]],
        ))
    }

    /// Masks attention scores (…, T, T) causally: entries above the diagonal become −∞ (for
    /// a softmax over the last axis).
    pub fn causal_mask(&mut self, scores: Value) -> Result<Value> {
        let s = self.shape(scores).to_vec();
        let (t, t2) = match s.as_slice() {
            [.., a, b] => (*a, *b),
            _ => (0, 1),
        };
        if t != t2 {
            return Err(self.shape_err(
                "causal_mask",
                format!("scores of shape {s:?} are not square in the last two axes"),
            ));
        }
        let n = self.count("causal_mask", &[t, t])?;
        let mask: Vec<f64> = (0..n)
            .map(|k| {
                if k % t > k / t {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let m = self.constant(&[t, t], mask)?;
        self.add(scores, m)
    }

    /// The graph with output `out`. Weights no layer read are an error naming them (strict
    /// loading; `num_batches_tracked` excepted).
    pub fn finish(mut self, out: Value) -> Result<Graph> {
        let read: HashSet<&String> = self.read.keys().collect();
        let mut unused: Vec<&str> = self
            .weights
            .tensors
            .keys()
            .filter(|k| !read.contains(k) && !k.ends_with("num_batches_tracked"))
            .map(|s| s.as_str())
            .collect();
        if !unused.is_empty() {
            unused.sort_unstable();
            return Err(self.bad(format!(
                "tensor(s) {unused:?} are read by no layer of the model; check the architecture, or take the model's tensors with Weights::with_prefix"
            )));
        }
        if !self.is_batched(out) {
            return Err(self.shape_err("finish", "the output does not depend on the input".into()));
        }
        self.g.output = out.0;
        self.g.validate()?;
        Ok(self.g)
    }
}
