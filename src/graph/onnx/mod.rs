//! Reading ONNX files into the graph IR ([`crate::graph::Graph`]). Nothing outside this module
//! knows about protobuf or ONNX's encodings.
//!
//! - The file is decoded with prost ([`proto`], written without protoc); initializers may keep
//!   their data inside the file or in external files beside it (`location`/`offset`/`length`,
//!   relative paths inside the model's folder only).
//! - Every length is checked before anything is allocated: a tensor whose data is shorter than
//!   its dims claim, a negative dimension, an element count that overflows, an unknown data type
//!   or opset, an attribute of the wrong kind are each a one-line [`Error::BadFile`] naming the
//!   tensor or node.
//! - Operators are parsed into [`Op`] with their attributes and opset rules (axes that moved from
//!   attributes to inputs, legacy softmax); an operator outside [`SUPPORTED_OPS`] is an
//!   [`Error::Unsupported`] naming the node, the operator and the set.

pub mod proto;

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path};

use prost::Message;

use super::ir::*;
use crate::error::{Error, Result};

/// The default-domain opsets this reader knows.
pub const OPSETS: std::ops::RangeInclusive<i64> = 7..=23;

/// A decoded ONNX file: the graph with every initializer as a constant (parameters are chosen
/// afterwards by [`crate::graph::Graph::from_onnx`]), and the file order of the initializers.
pub(crate) struct Imported {
    pub graph: Graph,
    /// Initializer values in file order.
    pub initializers: Vec<ValueId>,
}

/// The one item of `items` (the graph's data inputs or outputs): none is a bad file, several
/// are unsupported (the engine takes models with one input and one output).
fn only_one<'a, I>(
    path: &Path,
    items: &'a [I],
    name: impl Fn(&I) -> &String,
    what: &str,
) -> Result<&'a I> {
    match items {
        [one] => Ok(one),
        [] => Err(bad(path, format!("the graph has no {what}"))),
        many => Err(Error::Unsupported(format!(
            "{}: the graph has {} {what}s ({}); the graph engine takes models with one {what}",
            path.display(),
            many.len(),
            many.iter()
                .map(|i| name(i).as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::BadFile {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

/// Reads and decodes `path`.
pub(crate) fn import(path: &Path) -> Result<Imported> {
    let file = std::fs::File::open(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    // SAFETY: the map is read-only and only read while `file` is open; a file changed by
    // another process while it is decoded gives a decode error or wrong values, never UB in
    // safe code that reads the slice as bytes.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let model = proto::ModelProto::decode(&map[..]).map_err(|e| {
        bad(
            path,
            format!("not an ONNX model (protobuf decoding failed: {e})"),
        )
    })?;
    drop(map);
    let dir = path.parent().unwrap_or(Path::new("."));
    from_model(model, path, dir)
}

fn from_model(model: proto::ModelProto, path: &Path, dir: &Path) -> Result<Imported> {
    let mut opset = None;
    for o in &model.opset_import {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            opset = Some(o.version);
        }
    }
    let opset = opset.ok_or_else(|| {
        bad(
            path,
            "no default-domain opset in opset_import (is this an ONNX model?)",
        )
    })?;
    if !OPSETS.contains(&opset) {
        return Err(bad(
            path,
            format!(
                "opset {opset} is not supported (this reader knows opsets {} to {}); re-export with opset_version in that range",
                OPSETS.start(),
                OPSETS.end()
            ),
        ));
    }
    let g = model
        .graph
        .ok_or_else(|| bad(path, "the model has no graph"))?;
    let mut values: Vec<String> = vec![];
    let mut ids: HashMap<String, ValueId> = HashMap::new();
    let mut id = |name: &str, values: &mut Vec<String>| -> ValueId {
        if let Some(v) = ids.get(name) {
            return *v;
        }
        values.push(name.to_string());
        ids.insert(name.to_string(), values.len() - 1);
        values.len() - 1
    };
    let mut consts = HashMap::new();
    let mut initializers = vec![];
    let mut init_names = HashSet::new();
    for t in &g.initializer {
        if t.name.is_empty() {
            return Err(bad(path, "an initializer has no name"));
        }
        if !init_names.insert(t.name.clone()) {
            return Err(bad(path, format!("initializer '{}' appears twice", t.name)));
        }
        let c = tensor(t, path, dir)?;
        let v = id(&t.name, &mut values);
        consts.insert(v, c);
        initializers.push(v);
    }
    let data_inputs: Vec<&proto::ValueInfoProto> = g
        .input
        .iter()
        .filter(|i| !init_names.contains(&i.name))
        .collect();
    let input = *only_one(path, &data_inputs, |i| &i.name, "data input")?;
    let (input_type, input_dims) = match input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref())
    {
        Some(tt) => {
            let et = elem_type(tt.elem_type).ok_or_else(|| {
                bad(
                    path,
                    format!(
                        "input '{}' has element type {}, not a number",
                        input.name, tt.elem_type
                    ),
                )
            })?;
            let dims = tt.shape.as_ref().map(|s| {
                s.dim
                    .iter()
                    .skip(1)
                    .map(|d| d.dim_value.filter(|v| *v >= 0).map(|v| v as usize))
                    .collect::<Vec<_>>()
            });
            (et, dims)
        }
        None => (ElemType::Float, None),
    };
    let input_id = id(&input.name, &mut values);
    let output = id(
        &only_one(path, &g.output, |o| &o.name, "output")?.name,
        &mut values,
    );
    let mut nodes = Vec::with_capacity(g.node.len());
    for (k, n) in g.node.iter().enumerate() {
        let name = if n.name.is_empty() {
            format!("{}#{k}", n.op_type)
        } else {
            n.name.clone()
        };
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            return Err(Error::Unsupported(format!(
                "node '{name}' is op '{}' of domain '{}'; the graph engine runs the default ONNX domain only ({})",
                n.op_type,
                n.domain,
                SUPPORTED_OPS.join(", ")
            )));
        }
        let at = Attrs {
            node: n,
            name: &name,
            path,
        };
        if n.op_type == "Constant" {
            let c = at.constant(dir)?;
            let out = n
                .output
                .first()
                .ok_or_else(|| bad(path, format!("Constant node '{name}' has no output")))?;
            let v = id(out, &mut values);
            if consts.insert(v, c).is_some() {
                return Err(bad(
                    path,
                    format!("node '{name}' writes '{out}', which is already an initializer"),
                ));
            }
            continue;
        }
        let op = parse_op(&at, opset, dir)?;
        let inputs = n
            .input
            .iter()
            .map(|s| (!s.is_empty()).then(|| id(s, &mut values)))
            .collect();
        let outputs = n
            .output
            .iter()
            .map(|s| (!s.is_empty()).then(|| id(s, &mut values)))
            .collect();
        nodes.push(Node {
            name,
            op,
            inputs,
            outputs,
        });
    }
    let mut graph = Graph {
        values,
        nodes,
        input: input_id,
        input_type,
        input_dims,
        output,
        consts,
        params: vec![],
        source: path.display().to_string(),
    };
    check_extra_outputs(&graph, path)?;
    graph.validate()?;
    Ok(Imported {
        graph,
        initializers,
    })
}

/// Nodes whose extra outputs the engine does not compute (MaxPool indices, Dropout masks,
/// batch-norm training statistics) must not be read.
fn check_extra_outputs(g: &Graph, path: &Path) -> Result<()> {
    let mut read = HashSet::new();
    for n in &g.nodes {
        read.extend(n.inputs.iter().flatten().copied());
    }
    read.insert(g.output);
    for n in &g.nodes {
        let computed = match n.op {
            Op::Split { .. } => usize::MAX,
            _ => 1,
        };
        for o in n.outputs.iter().skip(computed).flatten() {
            if read.contains(o) {
                return Err(Error::Unsupported(format!(
                    "{}: {} has its output '{}' read, which the graph engine does not compute \
                     (MaxPool indices, Dropout masks and batch-norm training statistics are not supported)",
                    path.display(),
                    n.describe(),
                    g.values[*o]
                )));
            }
        }
    }
    Ok(())
}

fn elem_type(code: i32) -> Option<ElemType> {
    use proto::data_type as d;
    match code {
        d::FLOAT | d::DOUBLE | d::FLOAT16 | d::BFLOAT16 => Some(ElemType::Float),
        d::INT64 | d::INT32 | d::INT16 | d::INT8 | d::UINT8 | d::UINT16 | d::UINT32 | d::UINT64 => {
            Some(ElemType::Int)
        }
        d::BOOL => Some(ElemType::Bool),
        _ => None,
    }
}

fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// A tensor's dims, checked: non-negative, element count without overflow.
fn dims_of(t: &proto::TensorProto, path: &Path) -> Result<(Vec<usize>, usize)> {
    let mut shape = Vec::with_capacity(t.dims.len());
    let mut n: usize = 1;
    for &d in &t.dims {
        if d < 0 {
            return Err(bad(
                path,
                format!("tensor '{}' has a negative dimension {d}", t.name),
            ));
        }
        let d = usize::try_from(d)
            .map_err(|_| bad(path, format!("tensor '{}': dimension too large", t.name)))?;
        n = n.checked_mul(d).ok_or_else(|| {
            bad(
                path,
                format!(
                    "tensor '{}' has dims {:?}, more elements than can be addressed",
                    t.name, t.dims
                ),
            )
        })?;
        shape.push(d);
    }
    Ok((shape, n))
}

/// The bytes of an external tensor, read after checking the file holds them.
fn external_bytes(t: &proto::TensorProto, path: &Path, dir: &Path, want: usize) -> Result<Vec<u8>> {
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for e in &t.external_data {
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => {
                offset = e.value.parse().map_err(|_| {
                    bad(
                        path,
                        format!("tensor '{}': bad external offset '{}'", t.name, e.value),
                    )
                })?
            }
            "length" => {
                length = Some(e.value.parse().map_err(|_| {
                    bad(
                        path,
                        format!("tensor '{}': bad external length '{}'", t.name, e.value),
                    )
                })?)
            }
            _ => {}
        }
    }
    let loc = location.ok_or_else(|| {
        bad(
            path,
            format!("tensor '{}' is external but names no location", t.name),
        )
    })?;
    let rel = Path::new(&loc);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(bad(
            path,
            format!(
                "tensor '{}' points outside the model's folder ('{loc}'); external data must sit beside the model",
                t.name
            ),
        ));
    }
    let file = dir.join(rel);
    let want = want as u64;
    if let Some(l) = length {
        if l != want {
            return Err(bad(
                path,
                format!(
                    "tensor '{}': external length {l} bytes, its dims need {want}",
                    t.name
                ),
            ));
        }
    }
    let meta = std::fs::metadata(&file).map_err(|e| Error::Io {
        path: file.display().to_string(),
        source: e,
    })?;
    if offset.checked_add(want).is_none_or(|end| end > meta.len()) {
        return Err(bad(
            &file,
            format!(
                "holds {} bytes, tensor '{}' needs {want} at offset {offset}",
                meta.len(),
                t.name
            ),
        ));
    }
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(&file).map_err(|e| Error::Io {
        path: file.display().to_string(),
        source: e,
    })?;
    let mut buf = vec![0u8; want as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| Error::Io {
            path: file.display().to_string(),
            source: e,
        })?;
    Ok(buf)
}

/// Decodes a TensorProto (inline or external data) into an f64/i64/bool tensor.
pub(crate) fn tensor(t: &proto::TensorProto, path: &Path, dir: &Path) -> Result<Tensor<f64>> {
    use proto::data_type as d;
    let (shape, n) = dims_of(t, path)?;
    let size = match t.data_type {
        d::FLOAT | d::INT32 | d::UINT32 => 4,
        d::DOUBLE | d::INT64 | d::UINT64 => 8,
        d::FLOAT16 | d::BFLOAT16 | d::INT16 | d::UINT16 => 2,
        d::INT8 | d::UINT8 | d::BOOL => 1,
        other => {
            return Err(bad(
                path,
                format!(
                    "tensor '{}' has data type {other}, which the graph engine does not read (floats, integers and booleans only)",
                    t.name
                ),
            ))
        }
    };
    let want = n
        .checked_mul(size)
        .ok_or_else(|| bad(path, format!("tensor '{}' is too large", t.name)))?;
    let external;
    let raw: Option<&[u8]> = if t.data_location == 1 {
        external = external_bytes(t, path, dir, want)?;
        Some(&external)
    } else if !t.raw_data.is_empty() || n == 0 {
        Some(&t.raw_data)
    } else {
        None
    };
    let short = |have: usize| {
        bad(
            path,
            format!(
                "tensor '{}' has dims {:?} ({n} elements) but its data holds {have}",
                t.name, shape
            ),
        )
    };
    if let Some(raw) = raw {
        if raw.len() != want {
            return Err(short(raw.len() / size));
        }
        let chunks = raw.chunks_exact(size);
        let data = match t.data_type {
            d::FLOAT => Data::F(
                chunks
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect(),
            ),
            d::DOUBLE => Data::F(
                chunks
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            d::FLOAT16 => Data::F(
                chunks
                    .map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]])) as f64)
                    .collect(),
            ),
            d::BFLOAT16 => Data::F(
                chunks
                    .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                    .collect(),
            ),
            d::INT64 => Data::I(
                chunks
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            d::UINT64 => Data::I(
                chunks
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as i64)
                    .collect(),
            ),
            d::INT32 => Data::I(
                chunks
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
            ),
            d::UINT32 => Data::I(
                chunks
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                    .collect(),
            ),
            d::INT16 => Data::I(
                chunks
                    .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                    .collect(),
            ),
            d::UINT16 => Data::I(
                chunks
                    .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                    .collect(),
            ),
            d::INT8 => Data::I(chunks.map(|c| c[0] as i8 as i64).collect()),
            d::UINT8 => Data::I(chunks.map(|c| c[0] as i64).collect()),
            _ => Data::B(chunks.map(|c| c[0] != 0).collect()),
        };
        return Ok(Tensor { shape, data });
    }
    // typed fields
    let check = |have: usize| if have == n { Ok(()) } else { Err(short(have)) };
    let data = match t.data_type {
        d::FLOAT => {
            check(t.float_data.len())?;
            Data::F(t.float_data.iter().map(|v| *v as f64).collect())
        }
        d::DOUBLE => {
            check(t.double_data.len())?;
            Data::F(t.double_data.clone())
        }
        d::FLOAT16 => {
            check(t.int32_data.len())?;
            Data::F(
                t.int32_data
                    .iter()
                    .map(|v| half_to_f32(*v as u16) as f64)
                    .collect(),
            )
        }
        d::BFLOAT16 => {
            check(t.int32_data.len())?;
            Data::F(
                t.int32_data
                    .iter()
                    .map(|v| f32::from_bits((*v as u32 & 0xffff) << 16) as f64)
                    .collect(),
            )
        }
        d::INT64 => {
            check(t.int64_data.len())?;
            Data::I(t.int64_data.clone())
        }
        d::UINT32 | d::UINT64 => {
            check(t.uint64_data.len())?;
            Data::I(t.uint64_data.iter().map(|v| *v as i64).collect())
        }
        d::BOOL => {
            check(t.int32_data.len())?;
            Data::B(t.int32_data.iter().map(|v| *v != 0).collect())
        }
        _ => {
            check(t.int32_data.len())?;
            Data::I(t.int32_data.iter().map(|v| *v as i64).collect())
        }
    };
    Ok(Tensor { shape, data })
}

/// A node's attributes, read with type checks.
struct Attrs<'a> {
    node: &'a proto::NodeProto,
    name: &'a str,
    path: &'a Path,
}

impl Attrs<'_> {
    fn get(&self, key: &str) -> Option<&proto::AttributeProto> {
        self.node.attribute.iter().find(|a| a.name == key)
    }

    fn err(&self, detail: impl std::fmt::Display) -> Error {
        bad(
            self.path,
            format!("node '{}' ({}): {detail}", self.name, self.node.op_type),
        )
    }

    fn kind(&self, a: &proto::AttributeProto, want: i32, what: &str) -> Result<()> {
        if !a.ref_attr_name.is_empty() {
            return Err(self.err(format!(
                "attribute '{}' refers to a function attribute, which is not supported",
                a.name
            )));
        }
        // type 0 (UNDEFINED) is tolerated: old writers leave it out
        if a.r#type != 0 && a.r#type != want {
            return Err(self.err(format!(
                "attribute '{}' must be {what}, it has type {}",
                a.name, a.r#type
            )));
        }
        Ok(())
    }

    fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(a) => {
                self.kind(a, proto::attribute_type::INT, "an int")?;
                Ok(a.i)
            }
        }
    }

    fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(a) => {
                self.kind(a, proto::attribute_type::FLOAT, "a float")?;
                Ok(a.f as f64)
            }
        }
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(a) => {
                self.kind(a, proto::attribute_type::INTS, "a list of ints")?;
                Ok(Some(a.ints.clone()))
            }
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(a) => {
                self.kind(a, proto::attribute_type::STRING, "a string")?;
                Ok(Some(String::from_utf8_lossy(&a.s).into_owned()))
            }
        }
    }

    fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.ints(key)?.unwrap_or_default();
        v.iter()
            .map(|x| {
                usize::try_from(*x)
                    .map_err(|_| self.err(format!("attribute '{key}' has a negative entry {x}")))
            })
            .collect()
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        Ok(self.int(key, default as i64)? != 0)
    }

    fn window(&self, conv: bool) -> Result<Window> {
        let kernel = match self.ints("kernel_shape")? {
            Some(_) => Some(self.usizes("kernel_shape")?),
            None if conv => None,
            None => return Err(self.err("attribute 'kernel_shape' is required")),
        };
        if kernel.as_ref().is_some_and(|k| k.contains(&0)) {
            return Err(self.err("a kernel dimension is 0"));
        }
        let strides = self.usizes("strides")?;
        let dilations = self.usizes("dilations")?;
        if strides.contains(&0) || dilations.contains(&0) {
            return Err(self.err("strides and dilations must be at least 1"));
        }
        let auto_pad = match self.string("auto_pad")?.as_deref() {
            None | Some("NOTSET") | Some("") => AutoPad::NotSet,
            Some("SAME_UPPER") => AutoPad::SameUpper,
            Some("SAME_LOWER") => AutoPad::SameLower,
            Some("VALID") => AutoPad::Valid,
            Some(o) => return Err(self.err(format!("unknown auto_pad '{o}'"))),
        };
        Ok(Window {
            kernel,
            strides,
            pads: self.usizes("pads")?,
            dilations,
            auto_pad,
            ceil_mode: self.bool("ceil_mode", false)?,
        })
    }

    /// A Constant node's value.
    fn constant(&self, dir: &Path) -> Result<Tensor<f64>> {
        for a in &self.node.attribute {
            match a.name.as_str() {
                "value" => {
                    self.kind(a, proto::attribute_type::TENSOR, "a tensor")?;
                    let t =
                        a.t.as_ref()
                            .ok_or_else(|| self.err("attribute 'value' holds no tensor"))?;
                    return tensor(t, self.path, dir);
                }
                "value_float" => {
                    return Ok(Tensor {
                        shape: vec![],
                        data: Data::F(vec![a.f as f64]),
                    })
                }
                "value_floats" => {
                    return Ok(Tensor {
                        shape: vec![a.floats.len()],
                        data: Data::F(a.floats.iter().map(|v| *v as f64).collect()),
                    })
                }
                "value_int" => {
                    return Ok(Tensor {
                        shape: vec![],
                        data: Data::I(vec![a.i]),
                    })
                }
                "value_ints" => {
                    return Ok(Tensor {
                        shape: vec![a.ints.len()],
                        data: Data::I(a.ints.clone()),
                    })
                }
                _ => {}
            }
        }
        Err(self.err("a Constant needs a value, value_float(s) or value_int(s) attribute"))
    }
}

fn parse_op(at: &Attrs<'_>, opset: i64, dir: &Path) -> Result<Op> {
    let t = at.node.op_type.as_str();
    let unary = |u| Ok(Op::Unary(u));
    let binary = |b| Ok(Op::Binary(b));
    let logic = |l| Ok(Op::Logic(l));
    let reduce = |kind, attr_axes: bool| -> Result<Op> {
        Ok(Op::Reduce {
            kind,
            axes: if attr_axes { at.ints("axes")? } else { None },
            keepdims: at.bool("keepdims", true)?,
            noop_with_empty_axes: at.bool("noop_with_empty_axes", false)?,
        })
    };
    match t {
        "Gemm" => Ok(Op::Gemm {
            alpha: at.float("alpha", 1.0)?,
            beta: at.float("beta", 1.0)?,
            trans_a: at.bool("transA", false)?,
            trans_b: at.bool("transB", false)?,
        }),
        "MatMul" => Ok(Op::MatMul),
        "Conv" => {
            let group = at.int("group", 1)?;
            if group < 1 {
                return Err(at.err(format!("group {group} must be at least 1")));
            }
            Ok(Op::Conv {
                window: at.window(true)?,
                group: group as usize,
            })
        }
        "MaxPool" => {
            if at.int("storage_order", 0)? != 0 {
                return Err(at.err("storage_order 1 (column-major indices) is not supported"));
            }
            Ok(Op::MaxPool {
                window: at.window(false)?,
            })
        }
        "AveragePool" => Ok(Op::AveragePool {
            window: at.window(false)?,
            count_include_pad: at.bool("count_include_pad", false)?,
        }),
        "GlobalAveragePool" => Ok(Op::GlobalAveragePool),
        "BatchNormalization" => {
            if at.bool("training_mode", false)? {
                return Err(Error::Unsupported(format!(
                    "node '{}' is BatchNormalization in training mode, which mixes the examples of a batch: \
                     no per-example gradient exists; export the model in eval mode (model.eval())",
                    at.name
                )));
            }
            Ok(Op::BatchNorm {
                epsilon: at.float("epsilon", 1e-5)?,
            })
        }
        "LayerNormalization" => Ok(Op::LayerNorm {
            axis: at.int("axis", -1)?,
            epsilon: at.float("epsilon", 1e-5)?,
        }),
        "Add" => binary(Binary::Add),
        "Sub" => binary(Binary::Sub),
        "Mul" => binary(Binary::Mul),
        "Div" => binary(Binary::Div),
        "Pow" => binary(Binary::Pow),
        "Neg" => unary(Unary::Neg),
        "Sqrt" => unary(Unary::Sqrt),
        "Exp" => unary(Unary::Exp),
        "Log" => unary(Unary::Log),
        "Abs" => unary(Unary::Abs),
        "Reciprocal" => unary(Unary::Reciprocal),
        "Relu" => unary(Unary::Relu),
        "LeakyRelu" => unary(Unary::LeakyRelu(at.float("alpha", 0.01)?)),
        "Sigmoid" => unary(Unary::Sigmoid),
        "Tanh" => unary(Unary::Tanh),
        "Erf" => unary(Unary::Erf),
        "Softplus" => unary(Unary::Softplus),
        "Gelu" => match at.string("approximate")?.as_deref() {
            None | Some("none") => unary(Unary::Gelu { tanh: false }),
            Some("tanh") => unary(Unary::Gelu { tanh: true }),
            Some(o) => Err(at.err(format!("unknown approximate '{o}'"))),
        },
        "Equal" => logic(Logic::Equal),
        "Less" => logic(Logic::Less),
        "Greater" => logic(Logic::Greater),
        "LessOrEqual" => logic(Logic::LessOrEqual),
        "GreaterOrEqual" => logic(Logic::GreaterOrEqual),
        "And" => logic(Logic::And),
        "Or" => logic(Logic::Or),
        "Not" => logic(Logic::Not),
        "Where" => Ok(Op::Where),
        "Softmax" | "LogSoftmax" => Ok(Op::Softmax {
            axis: at.int("axis", if opset < 13 { 1 } else { -1 })?,
            log: t == "LogSoftmax",
            legacy: opset < 13,
        }),
        "ReduceMean" => reduce(ReduceKind::Mean, opset < 18),
        "ReduceMax" => reduce(ReduceKind::Max, opset < 18),
        "ReduceSum" => reduce(ReduceKind::Sum, opset < 13),
        "Transpose" => Ok(Op::Transpose {
            perm: match at.ints("perm")? {
                None => None,
                Some(_) => Some(at.usizes("perm")?),
            },
        }),
        "Reshape" => Ok(Op::Reshape {
            allowzero: at.bool("allowzero", false)?,
        }),
        "Flatten" => Ok(Op::Flatten {
            axis: at.int("axis", 1)?,
        }),
        "Squeeze" => Ok(Op::Squeeze {
            axes: if opset < 13 { at.ints("axes")? } else { None },
        }),
        "Unsqueeze" => Ok(Op::Unsqueeze {
            axes: if opset < 13 {
                Some(
                    at.ints("axes")?
                        .ok_or_else(|| at.err("attribute 'axes' is required"))?,
                )
            } else {
                None
            },
        }),
        "Split" => Ok(Op::Split {
            axis: at.int("axis", 0)?,
            split: if opset < 13 { at.ints("split")? } else { None },
        }),
        "Concat" => Ok(Op::Concat {
            axis: at
                .get("axis")
                .map(|_| at.int("axis", 0))
                .transpose()?
                .ok_or_else(|| at.err("attribute 'axis' is required"))?,
        }),
        "Slice" => Ok(Op::Slice {
            attrs: if opset < 10 {
                Some((
                    at.ints("starts")?
                        .ok_or_else(|| at.err("attribute 'starts' is required"))?,
                    at.ints("ends")?
                        .ok_or_else(|| at.err("attribute 'ends' is required"))?,
                    at.ints("axes")?,
                ))
            } else {
                None
            },
        }),
        "Expand" => Ok(Op::Expand),
        "Gather" => Ok(Op::Gather {
            axis: at.int("axis", 0)?,
        }),
        "GatherND" => {
            let b = at.int("batch_dims", 0)?;
            Ok(Op::GatherNd {
                batch_dims: usize::try_from(b)
                    .map_err(|_| at.err(format!("batch_dims {b} must be >= 0")))?,
            })
        }
        "ScatterND" | "ScatterElements" => {
            let add = match at.string("reduction")?.as_deref() {
                None | Some("none") => false,
                Some("add") => true,
                Some(o) => {
                    return Err(Error::Unsupported(format!(
                    "node '{}' is {t} with reduction '{o}'; the graph engine supports none and add",
                    at.name
                )))
                }
            };
            if t == "ScatterND" {
                Ok(Op::ScatterNd { add })
            } else {
                Ok(Op::ScatterElements {
                    axis: at.int("axis", 0)?,
                    add,
                })
            }
        }
        "Identity" | "Dropout" => Ok(Op::Identity),
        "Shape" => Ok(Op::Shape {
            start: at.int("start", 0)?,
            end: at.get("end").map(|_| at.int("end", 0)).transpose()?,
        }),
        "Size" => Ok(Op::Size),
        "Range" => Ok(Op::Range),
        "Trilu" => Ok(Op::Trilu {
            upper: at.bool("upper", true)?,
        }),
        "ConstantOfShape" => {
            let value = match at.get("value") {
                None => Tensor {
                    shape: vec![1],
                    data: Data::F(vec![0.0]),
                },
                Some(a) => {
                    at.kind(a, proto::attribute_type::TENSOR, "a tensor")?;
                    let t =
                        a.t.as_ref()
                            .ok_or_else(|| at.err("attribute 'value' holds no tensor"))?;
                    let v = tensor(t, at.path, dir)?;
                    if v.numel() != 1 {
                        return Err(at.err("attribute 'value' must hold one element"));
                    }
                    v
                }
            };
            Ok(Op::ConstantOfShape { value })
        }
        "Cast" => {
            let to = at.int("to", 0)?;
            let to = elem_type(to as i32)
                .ok_or_else(|| at.err(format!("cast to data type {to} is not supported")))?;
            Ok(Op::Cast { to })
        }
        "CastLike" => Ok(Op::CastLike),
        other => Err(Error::Unsupported(format!(
            "node '{}' uses op '{other}', which the graph engine does not support; it runs {}",
            at.name,
            SUPPORTED_OPS.join(", ")
        ))),
    }
}
