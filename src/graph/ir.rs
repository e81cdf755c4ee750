//! The graph IR: values, nodes with typed operators, constants and parameters. Built by the ONNX
//! reader ([`super::onnx`]) or by hand; [`Graph::validate`] puts the nodes in topological order
//! and refuses cycles, dangling inputs and values written twice.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Index of a value in [`Graph::values`].
pub type ValueId = usize;

/// The element type of a value: floats (f16/f32/f64 in the file, the engine's precision when
/// run), integers (i64) or booleans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    /// Floating point.
    Float,
    /// Integers (any width in the file, i64 when run).
    Int,
    /// Booleans.
    Bool,
}

/// A tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum Data<T> {
    /// Floats in the run's precision.
    F(Vec<T>),
    /// Integers.
    I(Vec<i64>),
    /// Booleans.
    B(Vec<bool>),
}

/// A dense row-major tensor: constants (`Tensor<f64>`) and the values of a pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements, row-major (`shape.iter().product()` of them).
    pub data: Data<T>,
}

impl<T> Tensor<T> {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element type.
    pub fn elem_type(&self) -> ElemType {
        match self.data {
            Data::F(_) => ElemType::Float,
            Data::I(_) => ElemType::Int,
            Data::B(_) => ElemType::Bool,
        }
    }

    /// The floats, or `None`.
    pub fn floats(&self) -> Option<&[T]> {
        match &self.data {
            Data::F(v) => Some(v),
            _ => None,
        }
    }

    /// The integers, or `None`.
    pub fn ints(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I(v) => Some(v),
            _ => None,
        }
    }
}

/// The padding rule of a convolution or pooling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoPad {
    /// Explicit `pads`.
    NotSet,
    /// Output size ⌈in/stride⌉, extra padding at the end.
    SameUpper,
    /// Output size ⌈in/stride⌉, extra padding at the start.
    SameLower,
    /// No padding.
    Valid,
}

/// A sliding window (convolution or pooling) over the trailing spatial axes.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    /// Kernel size per spatial axis (`None`: from the weight's shape, convolutions only).
    pub kernel: Option<Vec<usize>>,
    /// Strides (empty: all 1).
    pub strides: Vec<usize>,
    /// Padding, begins then ends (empty: zeros).
    pub pads: Vec<usize>,
    /// Dilations (empty: all 1).
    pub dilations: Vec<usize>,
    /// The padding rule.
    pub auto_pad: AutoPad,
    /// Pooling: output size rounded up.
    pub ceil_mode: bool,
}

/// Elementwise functions of one float input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    /// −x.
    Neg,
    /// √x.
    Sqrt,
    /// eˣ.
    Exp,
    /// ln x.
    Log,
    /// max(x, 0).
    Relu,
    /// x for x ≥ 0, αx below.
    LeakyRelu(f64),
    /// 1/(1+e⁻ˣ).
    Sigmoid,
    /// tanh x.
    Tanh,
    /// erf x.
    Erf,
    /// GELU, exact (erf) or its tanh approximation.
    Gelu {
        /// The tanh approximation.
        tanh: bool,
    },
    /// ln(1 + eˣ).
    Softplus,
    /// |x|.
    Abs,
    /// 1/x.
    Reciprocal,
}

/// Elementwise functions of two inputs with numpy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a·b.
    Mul,
    /// a / b.
    Div,
    /// aᵇ (differentiable in a; b must not depend on the parameters or the data).
    Pow,
}

/// Comparisons and logic (no gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logic {
    /// a == b.
    Equal,
    /// a < b.
    Less,
    /// a > b.
    Greater,
    /// a ≤ b.
    LessOrEqual,
    /// a ≥ b.
    GreaterOrEqual,
    /// a ∧ b.
    And,
    /// a ∨ b.
    Or,
    /// ¬a.
    Not,
}

/// Reductions over axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceKind {
    /// Mean.
    Mean,
    /// Sum.
    Sum,
    /// Maximum (the gradient goes to the first maximum).
    Max,
}

/// A Slice's (starts, ends, axes) attributes (opset < 10).
pub type SliceAttrs = (Vec<i64>, Vec<i64>, Option<Vec<i64>>);

/// An operator with its attributes. Inputs and outputs are the node's, in ONNX order.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Y = α·op(A)·op(B) + β·C.
    Gemm {
        /// α.
        alpha: f64,
        /// β.
        beta: f64,
        /// A transposed.
        trans_a: bool,
        /// B transposed.
        trans_b: bool,
    },
    /// numpy matmul.
    MatMul,
    /// N-d convolution (1-D and 2-D), with groups.
    Conv {
        /// Window.
        window: Window,
        /// Groups.
        group: usize,
    },
    /// Max pooling.
    MaxPool {
        /// Window.
        window: Window,
    },
    /// Average pooling.
    AveragePool {
        /// Window.
        window: Window,
        /// Count padded positions in the divisor.
        count_include_pad: bool,
    },
    /// Mean over the spatial axes.
    GlobalAveragePool,
    /// Batch normalization with running statistics (inference).
    BatchNorm {
        /// ε.
        epsilon: f64,
    },
    /// Layer normalization over the axes from `axis` on.
    LayerNorm {
        /// First normalized axis.
        axis: i64,
        /// ε.
        epsilon: f64,
    },
    /// Elementwise function.
    Unary(Unary),
    /// Broadcasting binary function.
    Binary(Binary),
    /// Comparison or logic.
    Logic(Logic),
    /// Select: cond ? x : y.
    Where,
    /// Softmax over one axis (`legacy`: opset < 13, over the axes from `axis` on).
    Softmax {
        /// Axis.
        axis: i64,
        /// log-softmax.
        log: bool,
        /// Opset < 13 semantics.
        legacy: bool,
    },
    /// Reduction.
    Reduce {
        /// What.
        kind: ReduceKind,
        /// Axes from the attribute (opsets before they became an input).
        axes: Option<Vec<i64>>,
        /// Keep reduced axes with size 1.
        keepdims: bool,
        /// No axes: identity instead of all axes.
        noop_with_empty_axes: bool,
    },
    /// Permute axes.
    Transpose {
        /// The permutation (`None`: reverse).
        perm: Option<Vec<usize>>,
    },
    /// Reshape to the shape input.
    Reshape {
        /// A 0 in the shape means 0 (else: copy the input's dim).
        allowzero: bool,
    },
    /// To 2-D at `axis`.
    Flatten {
        /// Axis.
        axis: i64,
    },
    /// Remove size-1 axes.
    Squeeze {
        /// From the attribute (opset < 13).
        axes: Option<Vec<i64>>,
    },
    /// Insert size-1 axes.
    Unsqueeze {
        /// From the attribute (opset < 13).
        axes: Option<Vec<i64>>,
    },
    /// Split along an axis.
    Split {
        /// Axis.
        axis: i64,
        /// Sizes from the attribute (opset < 13).
        split: Option<Vec<i64>>,
    },
    /// Concatenate along an axis.
    Concat {
        /// Axis.
        axis: i64,
    },
    /// Slice (opset ≥ 10: starts, ends, axes, steps inputs; before: attributes).
    Slice {
        /// (starts, ends, axes) attributes (opset < 10).
        attrs: Option<SliceAttrs>,
    },
    /// Broadcast to a shape.
    Expand,
    /// Gather along an axis.
    Gather {
        /// Axis.
        axis: i64,
    },
    /// GatherND.
    GatherNd {
        /// Leading batch dimensions.
        batch_dims: usize,
    },
    /// ScatterND (reduction none or add).
    ScatterNd {
        /// Add instead of replace.
        add: bool,
    },
    /// ScatterElements (reduction none or add).
    ScatterElements {
        /// Axis.
        axis: i64,
        /// Add instead of replace.
        add: bool,
    },
    /// Identity (also Dropout in inference).
    Identity,
    /// The shape as a 1-D int tensor (slice `start..end`).
    Shape {
        /// Start.
        start: i64,
        /// End (`None`: the rank).
        end: Option<i64>,
    },
    /// The number of elements.
    Size,
    /// start, limit, delta → a 1-D range.
    Range,
    /// Upper or lower triangle of the last two axes (diagonal offset k input).
    Trilu {
        /// Upper.
        upper: bool,
    },
    /// A tensor of the shape input filled with a value.
    ConstantOfShape {
        /// The value (one element).
        value: Tensor<f64>,
    },
    /// Convert the element type.
    Cast {
        /// Target.
        to: ElemType,
    },
    /// Convert to the second input's element type.
    CastLike,
}

impl Op {
    /// Whether the op only reshapes its first input: its output holds the same values in the
    /// same order (Reshape, Flatten, Squeeze, Unsqueeze, Identity).
    pub fn is_reshape(&self) -> bool {
        matches!(
            self,
            Op::Reshape { .. }
                | Op::Flatten { .. }
                | Op::Squeeze { .. }
                | Op::Unsqueeze { .. }
                | Op::Identity
        )
    }

    /// The ONNX name of the operator.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Conv { .. } => "Conv",
            Op::MaxPool { .. } => "MaxPool",
            Op::AveragePool { .. } => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::LayerNorm { .. } => "LayerNormalization",
            Op::Unary(u) => match u {
                Unary::Neg => "Neg",
                Unary::Sqrt => "Sqrt",
                Unary::Exp => "Exp",
                Unary::Log => "Log",
                Unary::Relu => "Relu",
                Unary::LeakyRelu(_) => "LeakyRelu",
                Unary::Sigmoid => "Sigmoid",
                Unary::Tanh => "Tanh",
                Unary::Erf => "Erf",
                Unary::Gelu { .. } => "Gelu",
                Unary::Softplus => "Softplus",
                Unary::Abs => "Abs",
                Unary::Reciprocal => "Reciprocal",
            },
            Op::Binary(b) => match b {
                Binary::Add => "Add",
                Binary::Sub => "Sub",
                Binary::Mul => "Mul",
                Binary::Div => "Div",
                Binary::Pow => "Pow",
            },
            Op::Logic(l) => match l {
                Logic::Equal => "Equal",
                Logic::Less => "Less",
                Logic::Greater => "Greater",
                Logic::LessOrEqual => "LessOrEqual",
                Logic::GreaterOrEqual => "GreaterOrEqual",
                Logic::And => "And",
                Logic::Or => "Or",
                Logic::Not => "Not",
            },
            Op::Where => "Where",
            Op::Softmax { log: false, .. } => "Softmax",
            Op::Softmax { log: true, .. } => "LogSoftmax",
            Op::Reduce { kind, .. } => match kind {
                ReduceKind::Mean => "ReduceMean",
                ReduceKind::Sum => "ReduceSum",
                ReduceKind::Max => "ReduceMax",
            },
            Op::Transpose { .. } => "Transpose",
            Op::Reshape { .. } => "Reshape",
            Op::Flatten { .. } => "Flatten",
            Op::Squeeze { .. } => "Squeeze",
            Op::Unsqueeze { .. } => "Unsqueeze",
            Op::Split { .. } => "Split",
            Op::Concat { .. } => "Concat",
            Op::Slice { .. } => "Slice",
            Op::Expand => "Expand",
            Op::Gather { .. } => "Gather",
            Op::GatherNd { .. } => "GatherND",
            Op::ScatterNd { .. } => "ScatterND",
            Op::ScatterElements { .. } => "ScatterElements",
            Op::Identity => "Identity",
            Op::Shape { .. } => "Shape",
            Op::Size => "Size",
            Op::Range => "Range",
            Op::Trilu { .. } => "Trilu",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Cast { .. } => "Cast",
            Op::CastLike => "CastLike",
        }
    }
}

/// The operators the graph engine runs (forward and backward), by their ONNX names.
pub const SUPPORTED_OPS: &[&str] = &[
    "Gemm",
    "MatMul",
    "Conv",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "BatchNormalization",
    "LayerNormalization",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Neg",
    "Sqrt",
    "Exp",
    "Log",
    "Abs",
    "Reciprocal",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Gelu",
    "Softplus",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "Transpose",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Split",
    "Concat",
    "Slice",
    "Expand",
    "Where",
    "Gather",
    "GatherND",
    "ScatterND",
    "ScatterElements",
    "Identity",
    "Dropout",
    "Shape",
    "Size",
    "Range",
    "Trilu",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "And",
    "Or",
    "Not",
    "ConstantOfShape",
    "Constant",
    "Cast",
    "CastLike",
];

/// One operator application.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Its name (the file's, or `op_type#index` when it has none).
    pub name: String,
    /// The operator.
    pub op: Op,
    /// Inputs (`None`: an omitted optional input).
    pub inputs: Vec<Option<ValueId>>,
    /// Outputs (`None`: an omitted optional output).
    pub outputs: Vec<Option<ValueId>>,
}

impl Node {
    /// Input `i` if present.
    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }

    /// "node 'name' (Op)" for error messages.
    pub fn describe(&self) -> String {
        format!("node '{}' ({})", self.name, self.op.name())
    }
}

/// A parameter: a float tensor the per-example gradients are taken against.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Its name (the state dict's).
    pub name: String,
    /// The value it is.
    pub value: ValueId,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values (f64; the engine converts them to its precision).
    pub data: Vec<f64>,
}

impl Param {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A model as a graph: one data input, one output, constants (buffers, shape tensors, masks)
/// and parameters.
#[derive(Debug, Clone)]
pub struct Graph {
    /// Value names (index = [`ValueId`]).
    pub values: Vec<String>,
    /// Nodes, in topological order after [`Graph::validate`].
    pub nodes: Vec<Node>,
    /// The data input.
    pub input: ValueId,
    /// Its element type (float inputs, or integer token ids).
    pub input_type: ElemType,
    /// Its declared per-example dims after the batch axis (`None`: symbolic or unknown).
    pub input_dims: Option<Vec<Option<usize>>>,
    /// The output.
    pub output: ValueId,
    /// Constants by value: initializers that are not parameters, and Constant nodes.
    pub consts: HashMap<ValueId, Tensor<f64>>,
    /// Parameters, in flat-layout order.
    pub params: Vec<Param>,
    /// Where the graph came from (for messages).
    pub source: String,
}

impl Graph {
    /// Number of parameters P.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.numel()).sum()
    }

    /// The value's name.
    pub fn value_name(&self, v: ValueId) -> &str {
        self.values.get(v).map(|s| s.as_str()).unwrap_or("?")
    }

    /// Puts the nodes in topological order and checks the graph: every input produced by a
    /// node, a constant, a parameter or the data input; no value written twice; no cycle; the
    /// output produced. Errors name the node or value at fault.
    pub fn validate(&mut self) -> Result<()> {
        let bad = |detail: String| Error::BadFile {
            path: self.source.clone(),
            detail,
        };
        let nv = self.values.len();
        if self.input >= nv || self.output >= nv {
            return Err(bad("the graph's input or output is not a value".into()));
        }
        // who writes each value
        let mut producer: Vec<Option<usize>> = vec![None; nv];
        let mut is_source = vec![false; nv];
        is_source[self.input] = true;
        for v in self.consts.keys() {
            if *v >= nv {
                return Err(bad(format!("constant {v} out of range")));
            }
            is_source[*v] = true;
        }
        for p in &self.params {
            if p.value >= nv {
                return Err(bad(format!("parameter '{}' out of range", p.name)));
            }
            if is_source[p.value] {
                return Err(bad(format!(
                    "parameter '{}' is also a constant or the input",
                    p.name
                )));
            }
            is_source[p.value] = true;
        }
        for (k, n) in self.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                if *o >= nv {
                    return Err(bad(format!("{} writes an unknown value", n.describe())));
                }
                if is_source[*o] || producer[*o].is_some() {
                    return Err(bad(format!(
                        "{} writes '{}', which is already an input, initializer or another node's output",
                        n.describe(),
                        self.values[*o]
                    )));
                }
                producer[*o] = Some(k);
            }
        }
        for n in &self.nodes {
            for i in n.inputs.iter().flatten() {
                if *i >= nv || (!is_source[*i] && producer[*i].is_none()) {
                    return Err(bad(format!(
                        "{} reads '{}', which no node, initializer or graph input provides (a dangling input)",
                        n.describe(),
                        self.values.get(*i).map(|s| s.as_str()).unwrap_or("?")
                    )));
                }
            }
        }
        if !is_source[self.output] && producer[self.output].is_none() {
            return Err(bad(format!(
                "the output '{}' is not produced by any node",
                self.values[self.output]
            )));
        }
        // Kahn's algorithm, keeping the file's order among ready nodes
        let n = self.nodes.len();
        let mut indeg = vec![0usize; n];
        let mut users: Vec<Vec<usize>> = vec![vec![]; n];
        for (k, node) in self.nodes.iter().enumerate() {
            for i in node.inputs.iter().flatten() {
                if let Some(p) = producer[*i] {
                    indeg[k] += 1;
                    users[p].push(k);
                }
            }
        }
        let mut ready: std::collections::BTreeSet<usize> =
            (0..n).filter(|k| indeg[*k] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(k) = ready.pop_first() {
            order.push(k);
            for &u in &users[k] {
                indeg[u] -= 1;
                if indeg[u] == 0 {
                    ready.insert(u);
                }
            }
        }
        if order.len() < n {
            let stuck = (0..n)
                .find(|k| indeg[*k] > 0)
                .map(|k| self.nodes[k].describe())
                .unwrap_or_default();
            return Err(bad(format!(
                "the graph has a cycle (through {stuck}); a model graph must be acyclic"
            )));
        }
        let mut nodes: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        self.nodes = order.into_iter().filter_map(|k| nodes[k].take()).collect();
        Ok(())
    }
}
