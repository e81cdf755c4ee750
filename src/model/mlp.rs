use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, VarBuilder, VarMap};

use super::Activation;
use crate::error::{Error, Result};
use crate::params::{ParamOrder, Params};

/// A sequential MLP: Linear layers with one elementwise activation between them (none after the
/// last), like a PyTorch `nn.Sequential(Linear, act, Linear, act, ..., Linear)`.
///
/// Parameter names follow `nn.Sequential`: Linear layer i is at `{prefix}{2i}.weight` (out×in)
/// and `{prefix}{2i}.bias`, unless explicit layer names are given.
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
    names: Vec<String>,
    sizes: Vec<usize>,
    act: Activation,
}

/// P of an MLP with layer widths `sizes`.
pub(crate) fn num_params_of(sizes: &[usize]) -> usize {
    sizes.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
}

/// An MLP architecture, `mlp:IN,H1,...,OUT:ACT` (for example `mlp:784,256,10:relu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpSpec {
    /// Layer widths `[in, h1, ..., out]`.
    pub sizes: Vec<usize>,
    /// The activation between Linear layers.
    pub activation: Activation,
}

impl std::str::FromStr for MlpSpec {
    type Err = Error;
    /// ```
    /// use deltavar::model::MlpSpec;
    /// let a: MlpSpec = "mlp:4,16,3:tanh".parse().unwrap();
    /// assert_eq!(a.sizes, vec![4, 16, 3]);
    /// assert!("mlp:4,0,3:tanh".parse::<MlpSpec>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "arch",
                s,
                "expected mlp:IN,H1,...,OUT:ACT, for example mlp:784,256,10:relu",
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 3 || parts[0] != "mlp" {
            return Err(bad());
        }
        let sizes = parts[1]
            .split(',')
            .map(|w| w.trim().parse::<usize>().map_err(|_| bad()))
            .collect::<Result<Vec<_>>>()?;
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(bad());
        }
        Ok(Self {
            sizes,
            activation: parts[2].parse()?,
        })
    }
}

impl MlpSpec {
    /// The same network as an `nn.Sequential` architecture (Linear at 0, 2, 4, ..., the
    /// activation modules between them).
    ///
    /// ```
    /// use deltavar::model::MlpSpec;
    /// let a: MlpSpec = "mlp:4,16,3:tanh".parse().unwrap();
    /// assert_eq!(a.to_seq().to_string(), "seq:linear(4,16),tanh,linear(16,3)");
    /// ```
    pub fn to_seq(&self) -> super::SeqSpec {
        let mut layers = vec![];
        for (i, w) in self.sizes.windows(2).enumerate() {
            if i > 0 {
                layers.push(super::SeqLayer::Act(self.activation));
            }
            layers.push(super::SeqLayer::Linear {
                inp: w[0],
                out: w[1],
                bias: true,
            });
        }
        super::SeqSpec { layers }
    }
}

/// The default `nn.Sequential` layer names `0, 2, 4, ...` for `n` Linear layers.
pub fn sequential_layer_names(n: usize) -> Vec<String> {
    (0..n).map(|i| (2 * i).to_string()).collect()
}

/// The Linear layers of an MLP state dict: their names (`names`, or nn.Sequential's `0, 2, 4, …`
/// for as many as `{prefix}{name}.weight` exists) and the widths `[in, h1, …, out]` read from
/// the weights' (out, in) shapes, each layer taking the previous one's outputs. `prefix` is
/// empty or ends with `.`; `shape_of` gives a tensor's shape by its full name, `all` every name
/// (for the message when none is found). Errors name `source`. Shared by
/// [`Mlp::load_safetensors`] and the graph's `mlp:` loader.
pub(crate) fn state_dict_layers(
    prefix: &str,
    names: Option<&[String]>,
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    all: impl FnOnce() -> Vec<String>,
    source: &str,
) -> Result<(Vec<String>, Vec<usize>)> {
    let bad = |detail: String| Error::BadFile {
        path: source.to_string(),
        detail,
    };
    let names: Vec<String> = match names {
        Some(n) => n.to_vec(),
        None => (0..)
            .map(|i| (2 * i).to_string())
            .take_while(|n| shape_of(&format!("{prefix}{n}.weight")).is_some())
            .collect(),
    };
    if names.is_empty() {
        let mut keys = all();
        keys.sort();
        return Err(bad(format!(
            "no Linear weight '{prefix}0.weight' found (tensors: {keys:?}); check the prefix / layer names"
        )));
    }
    let mut sizes = vec![];
    for (i, n) in names.iter().enumerate() {
        let key = format!("{prefix}{n}.weight");
        match shape_of(&key).as_deref() {
            Some(&[o, inp]) => {
                if i == 0 {
                    sizes.push(inp);
                } else if sizes[i] != inp {
                    return Err(bad(format!(
                        "'{key}' takes {inp} inputs but the previous layer has {} outputs",
                        sizes[i]
                    )));
                }
                sizes.push(o);
            }
            Some(s) => return Err(bad(format!("'{key}' has shape {s:?}, expected (out, in)"))),
            None => return Err(bad(format!("tensor '{key}' (layer {i}) is missing"))),
        }
    }
    Ok((names, sizes))
}

impl Mlp {
    /// Builds an MLP with layer widths `sizes` (`[in, h1, ..., out]`) from a [`VarBuilder`], at
    /// the given layer names (default `nn.Sequential` names when `None`). With a `VarMap`-backed
    /// builder the weights become trainable `Var`s (new ones are initialised as candle-nn does).
    pub fn new(
        vb: VarBuilder,
        sizes: &[usize],
        act: Activation,
        layer_names: Option<&[String]>,
    ) -> Result<Self> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::invalid(
                "MLP sizes",
                format!("{sizes:?}"),
                "need at least [in, out], every width >= 1",
            ));
        }
        let n = sizes.len() - 1;
        let names = match layer_names {
            Some(names) if names.len() != n => {
                return Err(Error::shape(
                    "MLP layer names",
                    format!("{n} names"),
                    format!("{} names", names.len()),
                ))
            }
            Some(names) => names.to_vec(),
            None => sequential_layer_names(n),
        };
        let mut layers = Vec::with_capacity(n);
        for (i, name) in names.iter().enumerate() {
            let l = candle_nn::linear(sizes[i], sizes[i + 1], vb.pp(name)).map_err(|e| {
                Error::Parameter(format!(
                    "layer {i} ('{name}', expected weight {}×{} and bias {}): {e}",
                    sizes[i + 1],
                    sizes[i],
                    sizes[i + 1]
                ))
            })?;
            layers.push(l);
        }
        Ok(Self {
            layers,
            names,
            sizes: sizes.to_vec(),
            act,
        })
    }

    /// Loads a PyTorch-style safetensors file as trainable variables in `dtype` on `device`.
    /// Layer widths are read from the weights: Linear layer i is at `{prefix}{name_i}.weight` with
    /// `name_i` from `layer_names` or `2i` (counting up until a name is missing).
    /// Returns the model and the `VarMap` that owns its variables.
    pub fn load_safetensors(
        path: impl AsRef<Path>,
        act: Activation,
        dtype: DType,
        device: &Device,
        prefix: &str,
        layer_names: Option<&[String]>,
    ) -> Result<(Self, VarMap)> {
        let path = path.as_ref();
        let prefix = if prefix.is_empty() || prefix.ends_with('.') {
            prefix.to_string()
        } else {
            format!("{prefix}.")
        };
        let prefix = prefix.as_str();
        // memory-mapped and loaded one tensor at a time: the file is never read into memory
        // whole, and only one tensor is held besides the variables (a 4.3 GB layer of a
        // 4.4 GB model needs 8.7 GB at the peak, not 13)
        // SAFETY: the map is only read; as with any mapped file, another process rewriting the
        // file meanwhile could change the values read.
        let st =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
                Error::BadFile {
                    path: path.display().to_string(),
                    detail: format!("not a readable safetensors file: {e}"),
                }
            })?;
        let tensors: std::collections::HashMap<String, Vec<usize>> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        let source = path.display().to_string();
        let (names, sizes) = state_dict_layers(
            prefix,
            layer_names,
            |k| tensors.get(k).cloned(),
            || tensors.keys().cloned().collect(),
            &source,
        )?;
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Parameter("VarMap lock poisoned".into()))?;
            for (i, n) in names.iter().enumerate() {
                for part in ["weight", "bias"] {
                    let key = format!("{prefix}{n}.{part}");
                    if !tensors.contains_key(&key) {
                        return Err(Error::BadFile {
                            path: source.clone(),
                            detail: format!("tensor '{key}' (layer {i}) is missing"),
                        });
                    }
                    let t = st.load(&key, device).map_err(|e| Error::BadFile {
                        path: path.display().to_string(),
                        detail: format!("tensor '{key}' cannot be read: {e}"),
                    })?;
                    let bad = crate::params::with_float_slice(&t, |s| match s {
                        crate::params::FloatSlice::F32(v) => {
                            crate::scalar::first_non_finite(v, |x| x as f64)
                        }
                        crate::params::FloatSlice::F64(v) => {
                            crate::scalar::first_non_finite(v, |x| x)
                        }
                    })?;
                    if let Some((k, v)) = bad {
                        return Err(Error::NonFinite {
                            what: format!("tensor '{key}' of {}", path.display()),
                            detail: format!("element {k} is {v}"),
                        });
                    }
                    let var = Var::from_tensor(&t.to_dtype(dtype)?)?;
                    drop(t);
                    data.insert(key, var);
                }
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let vb = if prefix.is_empty() {
            vb
        } else {
            vb.pp(prefix.trim_end_matches('.'))
        };
        let mlp = Self::new(vb, &sizes, act, Some(&names))?;
        let mlp = Self {
            names: names.iter().map(|n| format!("{prefix}{n}")).collect(),
            ..mlp
        };
        Ok((mlp, varmap))
    }

    /// The layer widths `[in, h1, ..., out]`.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// The precision of the weights (the first layer's).
    pub fn dtype(&self) -> candle_core::DType {
        self.layers
            .first()
            .map(|l| l.weight().dtype())
            .unwrap_or(candle_core::DType::F32)
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.act
    }

    /// The Linear layers.
    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }

    /// Full names of the layers (prefix included).
    pub fn layer_names(&self) -> &[String] {
        &self.names
    }

    /// The parameter names in `nn.Sequential` state-dict order (`0.weight, 0.bias, 2.weight, ...`).
    pub fn param_names(&self) -> Vec<String> {
        self.names
            .iter()
            .flat_map(|n| [format!("{n}.weight"), format!("{n}.bias")])
            .collect()
    }

    /// The weight and bias tensors in state-dict order, with their names (the values the
    /// graph engine snapshots, [`crate::GraphEngine::from_mlp`]).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .zip(&self.layers)
            .flat_map(|(n, l)| {
                let mut v = vec![(format!("{n}.weight"), l.weight().clone())];
                if let Some(b) = l.bias() {
                    v.push((format!("{n}.bias"), b.clone()));
                }
                v
            })
            .collect()
    }

    /// The parameters of this MLP from its `VarMap`, in state-dict order.
    pub fn params(&self, varmap: &VarMap) -> Result<Params> {
        Params::from_varmap(varmap, ParamOrder::Explicit(self.param_names()))
    }

    /// Number of parameters P.
    pub fn num_params(&self) -> usize {
        num_params_of(&self.sizes)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i < last {
                h = self.act.forward(&h)?;
            }
        }
        Ok(h)
    }
}
