//! A PyTorch `nn.Sequential` of known modules: convolutions, pooling, flatten, Linear, norms,
//! dropout and elementwise activations, loaded from a safetensors state dict with PyTorch's names
//! (`{index}.weight`, `{index}.bias`).
//!
//! The architecture is written `seq:LAYER,LAYER,...` ([`SeqSpec`]); the per-example input shape
//! comes from the data (`(C, H, W)` for images). [`Sequential`] runs as a candle [`Module`] built
//! from [`crate::nn`] layers (so the capture and generic engines see it), and the native
//! graph engine runs it as a graph ([`crate::graph::models::sequential`], [`crate::engine::GraphEngine::from_sequential`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};

use super::Activation;
use crate::error::{Error, Result};
use crate::params::Params;

/// One module of an `nn.Sequential`, with PyTorch's arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqLayer {
    /// `nn.Linear(in, out, bias)`: applies to the last dimension.
    Linear {
        /// in_features.
        inp: usize,
        /// out_features.
        out: usize,
        /// Whether it has a bias.
        bias: bool,
    },
    /// `nn.Conv1d(in, out, k, stride, padding, dilation, bias)` on (C, L).
    Conv1d(ConvArgs),
    /// `nn.Conv2d(in, out, k, stride, padding, dilation, bias)` on (C, H, W), square kernel.
    Conv2d(ConvArgs),
    /// `nn.MaxPool2d(k, stride)` (stride defaults to k), floor mode, no padding.
    MaxPool2d {
        /// Window size.
        k: usize,
        /// Step.
        stride: usize,
    },
    /// `nn.AvgPool2d(k, stride)` (stride defaults to k), floor mode, no padding.
    AvgPool2d {
        /// Window size.
        k: usize,
        /// Step.
        stride: usize,
    },
    /// `nn.Flatten()`: everything but the batch dimension into one.
    Flatten,
    /// `nn.LayerNorm(d, eps)` over the last dimension, with weight and bias.
    LayerNorm {
        /// normalized_shape (the last dimension).
        d: usize,
        /// eps (PyTorch's default 1e-5).
        eps: f64,
    },
    /// `nn.BatchNorm2d(c, eps)` in eval mode: the running mean and variance from the file.
    BatchNorm2d {
        /// Channels.
        c: usize,
        /// eps (PyTorch's default 1e-5).
        eps: f64,
    },
    /// `nn.Dropout`: the identity at inference.
    Dropout,
    /// An elementwise activation module (`nn.ReLU`, `nn.Tanh`, ...).
    Act(Activation),
}

/// A convolution's arguments (groups = 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvArgs {
    /// in_channels.
    pub inp: usize,
    /// out_channels.
    pub out: usize,
    /// kernel_size (square for 2-D).
    pub k: usize,
    /// stride.
    pub stride: usize,
    /// padding (zeros, both sides).
    pub padding: usize,
    /// dilation.
    pub dilation: usize,
    /// Whether it has a bias.
    pub bias: bool,
}

impl SeqLayer {
    /// Whether the layer has parameters (weight and maybe bias).
    pub fn has_params(&self) -> bool {
        matches!(
            self,
            SeqLayer::Linear { .. }
                | SeqLayer::Conv1d(_)
                | SeqLayer::Conv2d(_)
                | SeqLayer::LayerNorm { .. }
                | SeqLayer::BatchNorm2d { .. }
        )
    }

    /// The parameter shapes (weight, then bias if any) in PyTorch's layout.
    pub fn param_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        match *self {
            SeqLayer::Linear { inp, out, bias } => {
                let mut v = vec![("weight", vec![out, inp])];
                if bias {
                    v.push(("bias", vec![out]));
                }
                v
            }
            SeqLayer::Conv1d(a) | SeqLayer::Conv2d(a) => {
                let w = if matches!(self, SeqLayer::Conv1d(_)) {
                    vec![a.out, a.inp, a.k]
                } else {
                    vec![a.out, a.inp, a.k, a.k]
                };
                let mut v = vec![("weight", w)];
                if a.bias {
                    v.push(("bias", vec![a.out]));
                }
                v
            }
            SeqLayer::LayerNorm { d, .. } => vec![("weight", vec![d]), ("bias", vec![d])],
            SeqLayer::BatchNorm2d { c, .. } => vec![("weight", vec![c]), ("bias", vec![c])],
            _ => vec![],
        }
    }

    /// The buffers read from the file (not parameters): BatchNorm's running statistics.
    pub fn buffer_shapes(&self) -> Vec<(&'static str, Vec<usize>)> {
        match *self {
            SeqLayer::BatchNorm2d { c, .. } => {
                vec![("running_mean", vec![c]), ("running_var", vec![c])]
            }
            _ => vec![],
        }
    }

    /// Why the layer's own arguments are invalid (a zero size, stride, kernel or dilation, or a
    /// size beyond 2²⁴), if they are.
    pub fn check_args(&self) -> std::result::Result<(), String> {
        const MAX: usize = 1 << 24;
        let ok = |v: usize, what: &str, zero_ok: bool| {
            if (v == 0 && !zero_ok) || v > MAX {
                Err(format!(
                    "{what} = {v} must lie in {}..={MAX}",
                    usize::from(!zero_ok)
                ))
            } else {
                Ok(())
            }
        };
        match self {
            SeqLayer::Linear { inp, out, .. } => {
                ok(*inp, "in_features", false)?;
                ok(*out, "out_features", false)
            }
            SeqLayer::Conv1d(a) | SeqLayer::Conv2d(a) => {
                ok(a.inp, "in_channels", false)?;
                ok(a.out, "out_channels", false)?;
                ok(a.k, "kernel_size", false)?;
                ok(a.stride, "stride", false)?;
                ok(a.padding, "padding", true)?;
                ok(a.dilation, "dilation", false)
            }
            SeqLayer::MaxPool2d { k, stride } | SeqLayer::AvgPool2d { k, stride } => {
                ok(*k, "kernel_size", false)?;
                ok(*stride, "stride", false)
            }
            SeqLayer::LayerNorm { d: c, eps } | SeqLayer::BatchNorm2d { c, eps } => {
                ok(*c, "features", false)?;
                if !(eps.is_finite() && *eps > 0.0) {
                    return Err(format!("eps = {eps} must be finite and > 0"));
                }
                Ok(())
            }
            SeqLayer::Flatten | SeqLayer::Dropout | SeqLayer::Act(_) => Ok(()),
        }
    }

    /// The output shape for a per-example input shape, or why the layer cannot take it.
    pub fn output_shape(&self, s: &[usize]) -> std::result::Result<Vec<usize>, String> {
        self.check_args()?;
        let conv_out = |n: usize, a: &ConvArgs, what: &str| {
            let span = a.dilation * (a.k - 1) + 1;
            let padded = n + 2 * a.padding;
            if padded < span {
                return Err(format!(
                    "its kernel spans {span} but the padded {what} is {padded}"
                ));
            }
            Ok((padded - span) / a.stride + 1)
        };
        let pool_out = |n: usize, k: usize, st: usize, what: &str| {
            if n < k {
                return Err(format!("its window is {k} but the {what} is {n}"));
            }
            Ok((n - k) / st + 1)
        };
        match self {
            SeqLayer::Linear { inp, out, .. } => match s.last() {
                Some(l) if l == inp => {
                    let mut o = s.to_vec();
                    *o.last_mut().unwrap_or(&mut 0) = *out;
                    Ok(o)
                }
                _ => Err(format!("it takes (..., {inp}) but gets {s:?}")),
            },
            SeqLayer::Conv1d(a) => match s {
                [c, l] if *c == a.inp => Ok(vec![a.out, conv_out(*l, a, "length")?]),
                _ => Err(format!("it takes ({}, L) but gets {s:?}", a.inp)),
            },
            SeqLayer::Conv2d(a) => match s {
                [c, h, w] if *c == a.inp => Ok(vec![
                    a.out,
                    conv_out(*h, a, "height")?,
                    conv_out(*w, a, "width")?,
                ]),
                _ => Err(format!("it takes ({}, H, W) but gets {s:?}", a.inp)),
            },
            SeqLayer::MaxPool2d { k, stride } | SeqLayer::AvgPool2d { k, stride } => match s {
                [c, h, w] => Ok(vec![
                    *c,
                    pool_out(*h, *k, *stride, "height")?,
                    pool_out(*w, *k, *stride, "width")?,
                ]),
                _ => Err(format!("it takes (C, H, W) but gets {s:?}")),
            },
            SeqLayer::Flatten => Ok(vec![s.iter().product()]),
            SeqLayer::LayerNorm { d, .. } => match s.last() {
                Some(l) if l == d => Ok(s.to_vec()),
                _ => Err(format!(
                    "it normalises a last dimension of {d} but gets {s:?}"
                )),
            },
            SeqLayer::BatchNorm2d { c, .. } => match s {
                [cc, _, _] if cc == c => Ok(s.to_vec()),
                _ => Err(format!("it takes ({c}, H, W) but gets {s:?}")),
            },
            SeqLayer::Dropout | SeqLayer::Act(_) => Ok(s.to_vec()),
        }
    }
}

impl std::fmt::Display for SeqLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conv = |f: &mut std::fmt::Formatter<'_>, n: &str, a: &ConvArgs| {
            write!(f, "{n}({},{},{}", a.inp, a.out, a.k)?;
            if a.stride != 1 {
                write!(f, ",stride={}", a.stride)?;
            }
            if a.padding != 0 {
                write!(f, ",padding={}", a.padding)?;
            }
            if a.dilation != 1 {
                write!(f, ",dilation={}", a.dilation)?;
            }
            if !a.bias {
                write!(f, ",bias=false")?;
            }
            write!(f, ")")
        };
        match self {
            SeqLayer::Linear { inp, out, bias } => {
                write!(f, "linear({inp},{out}")?;
                if !bias {
                    write!(f, ",bias=false")?;
                }
                write!(f, ")")
            }
            SeqLayer::Conv1d(a) => conv(f, "conv1d", a),
            SeqLayer::Conv2d(a) => conv(f, "conv2d", a),
            SeqLayer::MaxPool2d { k, stride } => write!(f, "maxpool2d({k},stride={stride})"),
            SeqLayer::AvgPool2d { k, stride } => write!(f, "avgpool2d({k},stride={stride})"),
            SeqLayer::Flatten => write!(f, "flatten"),
            SeqLayer::LayerNorm { d, eps } => write!(f, "layernorm({d},eps={eps})"),
            SeqLayer::BatchNorm2d { c, eps } => write!(f, "batchnorm2d({c},eps={eps})"),
            SeqLayer::Dropout => write!(f, "dropout"),
            SeqLayer::Act(a) => write!(f, "{}", a.name()),
        }
    }
}

/// An `nn.Sequential` architecture: `seq:LAYER,LAYER,...`, one entry per module, in order
/// (module i owns the state-dict names `i.weight`, `i.bias`).
///
/// Entries, with PyTorch's positional order and keyword names: `linear(in,out[,bias=false])`,
/// `conv1d(in,out,k[,stride=s][,padding=p][,dilation=d][,bias=false])`, `conv2d(...)` (same),
/// `maxpool2d(k[,stride=s])`, `avgpool2d(k[,stride=s])`, `flatten`, `layernorm(d[,eps=e])`,
/// `batchnorm2d(c[,eps=e])`, `dropout` (any argument ignored), and the activations
/// `relu, tanh, sigmoid, gelu, gelu-tanh, silu, softplus, identity`.
///
/// ```
/// use deltavar::model::{SeqSpec, SeqLayer};
/// let s: SeqSpec = "seq:conv2d(1,16,5,padding=2),relu,maxpool2d(2),flatten,linear(3136,10)"
///     .parse().unwrap();
/// assert_eq!(s.layers.len(), 5);
/// assert_eq!(s.output_shape(&[1, 28, 28]).unwrap(), vec![10]);
/// assert!("seq:conv2d(1,16,5,pad=2)".parse::<SeqSpec>().is_err()); // unknown keyword
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SeqSpec {
    /// The modules in order.
    pub layers: Vec<SeqLayer>,
}

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> std::result::Result<Vec<&str>, String> {
    let mut out = vec![];
    let (mut depth, mut start) = (0i32, 0);
    for (i, ch) in s.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("unbalanced ')'".into());
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced '('".into());
    }
    out.push(&s[start..]);
    Ok(out)
}

/// Positional and keyword arguments of one entry.
struct Args<'a> {
    entry: &'a str,
    pos: Vec<&'a str>,
    kw: Vec<(&'a str, &'a str)>,
}

impl<'a> Args<'a> {
    fn parse(entry: &'a str, inner: &'a str) -> std::result::Result<Self, String> {
        let mut pos = vec![];
        let mut kw = vec![];
        if !inner.trim().is_empty() {
            for a in inner.split(',') {
                let a = a.trim();
                match a.split_once('=') {
                    Some((k, v)) => kw.push((k.trim(), v.trim())),
                    None if kw.is_empty() => pos.push(a),
                    None => {
                        return Err(format!(
                            "'{entry}': positional argument '{a}' after a keyword argument"
                        ))
                    }
                }
            }
        }
        Ok(Self { entry, pos, kw })
    }

    /// Checks the keywords against `allowed` and the positional count against `names`.
    fn check(
        &self,
        names: &[&str],
        required: usize,
        allowed: &[&str],
    ) -> std::result::Result<(), String> {
        if self.pos.len() < required || self.pos.len() > names.len() {
            return Err(format!(
                "'{}' takes {} positional argument(s) ({}), got {}",
                self.entry,
                if required == names.len() {
                    required.to_string()
                } else {
                    format!("{required} to {}", names.len())
                },
                names.join(", "),
                self.pos.len()
            ));
        }
        for (k, _) in &self.kw {
            if !allowed.contains(k) && !names.contains(k) {
                return Err(format!(
                    "'{}': unknown keyword '{k}' (known: {})",
                    self.entry,
                    names
                        .iter()
                        .chain(allowed)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        Ok(())
    }

    fn raw(&self, i: usize, name: &str) -> Option<&'a str> {
        self.pos
            .get(i)
            .copied()
            .or_else(|| self.kw.iter().find(|(k, _)| *k == name).map(|(_, v)| *v))
    }

    fn usize(
        &self,
        i: usize,
        name: &str,
        default: Option<usize>,
    ) -> std::result::Result<usize, String> {
        match self.raw(i, name) {
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|v| *v > 0 || name == "padding")
                .ok_or_else(|| format!("'{}': {name} = '{v}' is not a valid size", self.entry)),
            None => default.ok_or_else(|| format!("'{}': {name} is required", self.entry)),
        }
    }

    fn bool(&self, name: &str, default: bool) -> std::result::Result<bool, String> {
        match self.kw.iter().find(|(k, _)| *k == name) {
            Some((_, v)) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(format!(
                    "'{}': {name} = '{v}' is not true/false",
                    self.entry
                )),
            },
            None => Ok(default),
        }
    }

    fn f64(&self, i: usize, name: &str, default: f64) -> std::result::Result<f64, String> {
        match self.raw(i, name) {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    format!("'{}': {name} = '{v}' is not a positive number", self.entry)
                }),
            None => Ok(default),
        }
    }
}

fn parse_layer(entry: &str) -> std::result::Result<SeqLayer, String> {
    let entry = entry.trim();
    let (name, inner) = match entry.find('(') {
        Some(i) if entry.ends_with(')') => (&entry[..i], &entry[i + 1..entry.len() - 1]),
        Some(_) => return Err(format!("'{entry}': missing ')'")),
        None => (entry, ""),
    };
    let name = name.trim().to_ascii_lowercase();
    let a = Args::parse(entry, inner)?;
    let conv = |a: &Args| -> std::result::Result<ConvArgs, String> {
        let names = [
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
        ];
        a.check(&names, 3, &["bias"])?;
        Ok(ConvArgs {
            inp: a.usize(0, "in_channels", None)?,
            out: a.usize(1, "out_channels", None)?,
            k: a.usize(2, "kernel_size", None)?,
            stride: a.usize(3, "stride", Some(1))?,
            padding: a.usize(4, "padding", Some(0))?,
            dilation: a.usize(5, "dilation", Some(1))?,
            bias: a.bool("bias", true)?,
        })
    };
    Ok(match name.as_str() {
        "linear" => {
            a.check(&["in_features", "out_features"], 2, &["bias"])?;
            SeqLayer::Linear {
                inp: a.usize(0, "in_features", None)?,
                out: a.usize(1, "out_features", None)?,
                bias: a.bool("bias", true)?,
            }
        }
        "conv1d" => SeqLayer::Conv1d(conv(&a)?),
        "conv2d" => SeqLayer::Conv2d(conv(&a)?),
        "maxpool2d" | "avgpool2d" => {
            a.check(&["kernel_size", "stride"], 1, &[])?;
            let k = a.usize(0, "kernel_size", None)?;
            let stride = a.usize(1, "stride", Some(k))?;
            if name == "maxpool2d" {
                SeqLayer::MaxPool2d { k, stride }
            } else {
                SeqLayer::AvgPool2d { k, stride }
            }
        }
        "flatten" => {
            a.check(&[], 0, &[])?;
            SeqLayer::Flatten
        }
        "layernorm" => {
            a.check(&["normalized_shape", "eps"], 1, &[])?;
            SeqLayer::LayerNorm {
                d: a.usize(0, "normalized_shape", None)?,
                eps: a.f64(1, "eps", 1e-5)?,
            }
        }
        "batchnorm2d" => {
            a.check(&["num_features", "eps"], 1, &["momentum"])?;
            SeqLayer::BatchNorm2d {
                c: a.usize(0, "num_features", None)?,
                eps: a.f64(1, "eps", 1e-5)?,
            }
        }
        "dropout" => SeqLayer::Dropout,
        other => match other.parse::<Activation>() {
            Ok(act) if inner.trim().is_empty() => SeqLayer::Act(act),
            Ok(_) => return Err(format!("'{entry}': an activation takes no arguments")),
            Err(_) => {
                return Err(format!(
                    "unknown layer '{other}' (known: linear, conv1d, conv2d, maxpool2d, \
                     avgpool2d, flatten, layernorm, batchnorm2d, dropout, relu, tanh, sigmoid, \
                     gelu, gelu-tanh, silu, softplus, identity)"
                ))
            }
        },
    })
}

impl std::str::FromStr for SeqSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let body = s.trim().strip_prefix("seq:").ok_or_else(|| {
            Error::invalid(
                "arch",
                s,
                "expected seq:LAYER,LAYER,... (for example seq:conv2d(1,16,5,padding=2),relu,flatten,linear(12544,10))",
            )
        })?;
        let layers = split_top(body)
            .and_then(|parts| {
                parts
                    .into_iter()
                    .map(parse_layer)
                    .collect::<std::result::Result<Vec<_>, _>>()
            })
            .map_err(|e| Error::invalid("arch", s, e))?;
        if layers.is_empty() {
            return Err(Error::invalid("arch", s, "no layers"));
        }
        Ok(Self { layers })
    }
}

impl std::fmt::Display for SeqSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq:")?;
        for (i, l) in self.layers.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{l}")?;
        }
        Ok(())
    }
}

impl SeqSpec {
    /// Checks a state dict against the architecture, by tensor names and shapes only: every
    /// parameter and buffer a module needs is present under `prefix` with PyTorch's shape, and
    /// no tensor under `prefix` is left unused (`num_batches_tracked` excepted). `shape_of`
    /// gives a tensor's shape by its full name, `names` every name; `source` names the file in
    /// errors. Returns [`SeqSpec::shapes`] of `input_shape`.
    pub fn check_state_dict<'a>(
        &self,
        input_shape: &[usize],
        prefix: &str,
        source: &str,
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
        names: impl Iterator<Item = &'a str>,
    ) -> Result<Vec<Vec<usize>>> {
        let shapes = self.shapes(input_shape)?;
        let bad = |detail: String| Error::BadFile {
            path: source.to_string(),
            detail,
        };
        let mut used = std::collections::HashSet::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (part, shape) in l.param_shapes().into_iter().chain(l.buffer_shapes()) {
                let key = format!("{prefix}{i}.{part}");
                match shape_of(&key) {
                    None => {
                        return Err(bad(format!(
                            "tensor '{key}' (module {i}, {l}) is missing; expected shape {shape:?}"
                        )))
                    }
                    Some(s) if s != shape => {
                        return Err(bad(format!(
                            "tensor '{key}' (module {i}, {l}) has shape {s:?}, the architecture needs {shape:?}"
                        )))
                    }
                    Some(_) => {}
                }
                used.insert(key);
            }
            if !l.buffer_shapes().is_empty() {
                used.insert(format!("{prefix}{i}.num_batches_tracked"));
            }
        }
        let mut unused: Vec<&str> = names
            .filter(|k| !used.contains(*k) && k.starts_with(prefix))
            .collect();
        if !unused.is_empty() {
            unused.sort_unstable();
            return Err(bad(format!(
                "tensor(s) {unused:?} are used by no module of {self}; check --arch (module indices \
                 follow nn.Sequential's numbering, activations and pooling count too)"
            )));
        }
        Ok(shapes)
    }

    /// The per-example shapes: entry l is the input of module l, the last the output. Fails
    /// naming the first module that cannot take its input.
    pub fn shapes(&self, input: &[usize]) -> Result<Vec<Vec<usize>>> {
        if input.is_empty() || input.contains(&0) {
            return Err(Error::shape(
                "per-example input of the sequential model",
                "a non-empty shape without zeros",
                format!("{input:?}"),
            ));
        }
        let mut shapes = vec![input.to_vec()];
        for (i, l) in self.layers.iter().enumerate() {
            let next = l.output_shape(&shapes[i]).map_err(|e| {
                Error::Unsupported(format!(
                    "module {i} ({l}) cannot take the per-example input {:?}: {e}",
                    shapes[i]
                ))
            })?;
            // per-example sizes (and a convolution's patches K·L) must stay addressable
            let prod = |v: &[usize]| v.iter().try_fold(1usize, |a, d| a.checked_mul(*d));
            let patches = match l {
                SeqLayer::Conv1d(a) | SeqLayer::Conv2d(a) => {
                    let spatial = prod(&next[1..]);
                    let k = a.inp.checked_mul(a.k).and_then(|v| {
                        if matches!(l, SeqLayer::Conv2d(_)) {
                            v.checked_mul(a.k)
                        } else {
                            Some(v)
                        }
                    });
                    spatial.zip(k).and_then(|(s, k)| s.checked_mul(k))
                }
                _ => Some(0),
            };
            let limit = 1usize << 40;
            if [prod(&next), patches]
                .iter()
                .any(|v| v.is_none_or(|v| v > limit))
            {
                return Err(Error::Unsupported(format!(
                    "module {i} ({l}): the per-example sizes {:?} -> {next:?} are too large",
                    shapes[i]
                )));
            }
            shapes.push(next);
        }
        Ok(shapes)
    }

    /// The per-example output shape for a per-example input shape.
    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        Ok(self.shapes(input)?.pop().unwrap_or_default())
    }

    /// The state-dict names of the parameters, in order (`{prefix}{i}.weight`, `{prefix}{i}.bias`).
    pub fn param_names(&self, prefix: &str) -> Vec<String> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.param_shapes()
                    .into_iter()
                    .map(move |(n, _)| format!("{prefix}{i}.{n}"))
            })
            .collect()
    }

    /// P.
    pub fn num_params(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.param_shapes())
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// Fails unless every value of a BatchNorm's running variance `key` is finite and ≥ 0.
pub(crate) fn check_running_var(vals: &[f64], key: &str, source: &str) -> Result<()> {
    match vals.iter().position(|x| !x.is_finite() || *x < 0.0) {
        Some(k) => Err(Error::BadFile {
            path: source.to_string(),
            detail: format!(
                "'{key}'[{k}] = {} (a variance must be finite and >= 0)",
                vals[k]
            ),
        }),
        None => Ok(()),
    }
}

/// One module's tensors.
#[derive(Debug, Clone)]
pub(crate) struct SeqTensors {
    pub weight: Option<Var>,
    pub bias: Option<Var>,
    /// BatchNorm: running mean and variance.
    pub stats: Option<(Tensor, Tensor)>,
}

/// An `nn.Sequential` model loaded from a state dict: a candle [`Module`] (built from
/// [`crate::nn`] layers, so the capture and generic engines see it) and the input of the native
/// graph engine ([`crate::engine::GraphEngine::from_sequential`]).
///
/// Its flat parameter layout is the state-dict order of [`SeqSpec::param_names`].
#[derive(Debug, Clone)]
pub struct Sequential {
    spec: SeqSpec,
    prefix: String,
    shapes: Vec<Vec<usize>>,
    tensors: Vec<SeqTensors>,
    source: String,
}

fn normalize_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('.') {
        prefix.to_string()
    } else {
        format!("{prefix}.")
    }
}

impl Sequential {
    /// Builds the model from named tensors (a state dict): every parameter and buffer the
    /// architecture needs must be present with PyTorch's shape; a tensor no module uses is an
    /// error (`num_batches_tracked` excepted). `input_shape` is one example's input shape
    /// ((C, H, W) for images). Parameters become `Var`s in `dtype`.
    pub fn from_tensors(
        spec: SeqSpec,
        input_shape: &[usize],
        tensors: &HashMap<String, Tensor>,
        prefix: &str,
        dtype: DType,
        source: &str,
    ) -> Result<Self> {
        let prefix = normalize_prefix(prefix);
        let shapes = spec.check_state_dict(
            input_shape,
            &prefix,
            source,
            |k| tensors.get(k).map(|t| t.dims().to_vec()),
            tensors.keys().map(|k| k.as_str()),
        )?;
        let get = |i: usize, part: &str| -> Result<Tensor> {
            let key = format!("{prefix}{i}.{part}");
            let t = tensors.get(&key).ok_or_else(|| Error::BadFile {
                path: source.to_string(),
                detail: format!("tensor '{key}' is missing"),
            })?;
            Ok(t.to_dtype(dtype)?)
        };
        let mut out = Vec::with_capacity(spec.layers.len());
        for (i, l) in spec.layers.iter().enumerate() {
            let mut t = SeqTensors {
                weight: None,
                bias: None,
                stats: None,
            };
            for (part, _) in l.param_shapes() {
                let v = Var::from_tensor(&get(i, part)?)?;
                if part == "weight" {
                    t.weight = Some(v);
                } else {
                    t.bias = Some(v);
                }
            }
            if !l.buffer_shapes().is_empty() {
                let (m, v) = (get(i, "running_mean")?, get(i, "running_var")?);
                let vals = v.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                check_running_var(&vals, &format!("{prefix}{i}.running_var"), source)?;
                t.stats = Some((m, v));
            }
            out.push(t);
        }
        Ok(Self {
            spec,
            prefix,
            shapes,
            tensors: out,
            source: source.to_string(),
        })
    }

    /// Loads a PyTorch state dict saved as safetensors (see [`Sequential::from_tensors`]).
    pub fn load_safetensors(
        path: impl AsRef<Path>,
        spec: SeqSpec,
        input_shape: &[usize],
        dtype: DType,
        prefix: &str,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = super::read_candle_tensors(path)?;
        Self::from_tensors(
            spec,
            input_shape,
            &tensors,
            prefix,
            dtype,
            &path.display().to_string(),
        )
    }

    /// A model with PyTorch's default initialisation (uniform ±1/√fan_in for weights and biases,
    /// ones and zeros for norms, zero mean and unit variance for BatchNorm statistics), from a
    /// seed: for tests and demos.
    pub fn init(spec: SeqSpec, input_shape: &[usize], dtype: DType, seed: u64) -> Result<Self> {
        let mut uniform = super::seeded_uniform(seed);
        let mut tensors = HashMap::new();
        for (i, l) in spec.layers.iter().enumerate() {
            let fan_in = match l {
                SeqLayer::Linear { inp, .. } => *inp,
                SeqLayer::Conv1d(a) => a.inp * a.k,
                SeqLayer::Conv2d(a) => a.inp * a.k * a.k,
                _ => 1,
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            let norm = matches!(l, SeqLayer::LayerNorm { .. } | SeqLayer::BatchNorm2d { .. });
            for (part, shape) in l.param_shapes().into_iter().chain(l.buffer_shapes()) {
                let n: usize = shape.iter().product();
                let v: Vec<f64> = (0..n)
                    .map(|_| match (norm, part) {
                        (true, "weight") | (true, "running_var") => 1.0 + 0.2 * (uniform() - 0.5),
                        (true, _) => 0.2 * (uniform() - 0.5),
                        _ => bound * (2.0 * uniform() - 1.0),
                    })
                    .collect();
                tensors.insert(
                    format!("{i}.{part}"),
                    Tensor::from_vec(v, shape, &Device::Cpu)?,
                );
            }
        }
        Self::from_tensors(spec, input_shape, &tensors, "", dtype, "(initialised)")
    }

    /// The architecture.
    pub fn spec(&self) -> &SeqSpec {
        &self.spec
    }

    /// The per-example shapes: entry l is module l's input, the last the output.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Where the weights came from (the file, for messages).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The parameters' precision (f32 for a model without parameters).
    pub fn dtype(&self) -> DType {
        self.tensors
            .iter()
            .find_map(|t| t.weight.as_ref().map(|w| w.dtype()))
            .unwrap_or(DType::F32)
    }

    /// One example's input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.shapes[0]
    }

    /// One example's output shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.shapes[self.shapes.len() - 1]
    }

    /// The parameter names in state-dict order (prefix included).
    pub fn param_names(&self) -> Vec<String> {
        self.spec.param_names(&self.prefix)
    }

    /// The parameter tensors in state-dict order, with their names.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        let names = self.param_names();
        let vars = self
            .tensors
            .iter()
            .flat_map(|t| t.weight.iter().chain(t.bias.iter()).cloned());
        names.into_iter().zip(vars).collect()
    }

    /// The parameters, in state-dict order (the flat layout of every engine).
    pub fn params(&self) -> Result<Params> {
        Params::from_vars(self.named_vars())
    }

    /// P.
    pub fn num_params(&self) -> usize {
        self.spec.num_params()
    }

    pub(crate) fn tensors(&self) -> &[SeqTensors] {
        &self.tensors
    }

    /// The model applied `k` times (a step function whose input and output shapes agree).
    pub fn rollout(&self, k: usize) -> Result<Rollout<'_>> {
        if k == 0 {
            return Err(Error::invalid("rollout steps", 0, "must be at least 1"));
        }
        if k > 1 && self.input_shape() != self.output_shape() {
            return Err(Error::shape(
                "a rolled-out step network (its output is its next input)",
                format!("{:?}", self.input_shape()),
                format!("output {:?}", self.output_shape()),
            ));
        }
        Ok(Rollout { model: self, k })
    }
}

/// A [`Sequential`] step function applied K times, z → f(f(…f(z))), as a candle [`Module`].
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'a> {
    model: &'a Sequential,
    k: usize,
}

impl Rollout<'_> {
    /// K.
    pub fn steps(&self) -> usize {
        self.k
    }
}

impl Module for Rollout<'_> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for _ in 0..self.k {
            h = self.model.forward(&h)?;
        }
        Ok(h)
    }
}

impl Module for Sequential {
    /// The batched forward pass, input (B, *input_shape), through [`crate::nn`] layers.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (l, t) in self.spec.layers.iter().zip(&self.tensors) {
            let w = || {
                t.weight
                    .as_ref()
                    .map(|v| v.as_tensor().clone())
                    .ok_or_else(|| candle_core::Error::Msg("missing weight".into()))
            };
            let b = t.bias.as_ref().map(|v| v.as_tensor().clone());
            h = match l {
                SeqLayer::Linear { .. } => crate::nn::Linear::new(w()?, b).forward(&h)?,
                SeqLayer::Conv2d(a) => crate::nn::Conv2d::new(w()?, b, conv_cfg(a)).forward(&h)?,
                SeqLayer::Conv1d(a) => crate::nn::Conv1d::new(w()?, b, conv_cfg(a)).forward(&h)?,
                SeqLayer::MaxPool2d { k, stride } => crate::nn::max_pool2d(&h, *k, *stride)?,
                SeqLayer::AvgPool2d { k, stride } => crate::nn::avg_pool2d(&h, *k, *stride)?,
                SeqLayer::Flatten => h.flatten_from(1)?,
                SeqLayer::LayerNorm { eps, .. } => {
                    crate::nn::Norm::new(w()?, b, *eps, true).forward(&h)?
                }
                SeqLayer::BatchNorm2d { eps, .. } => {
                    let (m, v) = t
                        .stats
                        .clone()
                        .ok_or_else(|| candle_core::Error::Msg("missing statistics".into()))?;
                    crate::nn::BatchNorm2d::new(w()?, b, m, v, *eps).forward(&h)?
                }
                SeqLayer::Dropout => h,
                SeqLayer::Act(a) => a.forward(&h)?,
            };
        }
        Ok(h)
    }
}

fn conv_cfg(a: &ConvArgs) -> crate::nn::Conv2dConfig {
    crate::nn::Conv2dConfig {
        padding: a.padding,
        stride: a.stride,
        dilation: a.dilation,
    }
}
