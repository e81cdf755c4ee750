//! A pre-LayerNorm transformer encoder classifier: token and position embeddings, L blocks of
//! multi-head self-attention (no mask) and a GELU MLP, both residual, a final layer norm, the
//! mean over positions and a Linear head (the peers' `TinyTransformer`, and the shape of most
//! small sequence classifiers).
//!
//! State-dict names (PyTorch's): `emb.weight` (V, d), `pos.weight` (T, d),
//! `blocks.{i}.{ln1,qkv,proj,ln2,fc1,fc2}.{weight,bias}` (qkv: (3d, d) with q, k, v stacked;
//! fc1: (hidden, d); fc2: (d, hidden)), `ln_f.{weight,bias}`, `head.{weight,bias}` (C, d).
//! As a candle [`Module`] it is built from [`crate::nn`] layers (so the generic and capture
//! engines run it); the graph engine runs it without candle's autograd
//! ([`crate::engine::GraphEngine::from_transformer`], the model written with the graph builder
//! for one sequence length).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var, D};

use crate::error::{Error, Result};
use crate::params::Params;

/// The sizes of a [`Transformer`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransformerConfig {
    /// Vocabulary size V (rows of `emb.weight`).
    pub vocab: usize,
    /// Longest sequence T (rows of `pos.weight`).
    pub max_len: usize,
    /// Model width d.
    pub d: usize,
    /// Attention heads (d must be a multiple).
    pub heads: usize,
    /// Blocks L.
    pub layers: usize,
    /// MLP width (PyTorch's usual 4d).
    pub hidden: usize,
    /// Classes C (rows of `head.weight`).
    pub classes: usize,
    /// Layer-norm eps (PyTorch's default 1e-5).
    pub eps: f64,
}

impl TransformerConfig {
    fn check(&self) -> Result<()> {
        let sizes = [
            ("vocab", self.vocab),
            ("max_len", self.max_len),
            ("d", self.d),
            ("heads", self.heads),
            ("hidden", self.hidden),
            ("classes", self.classes),
        ];
        for (what, v) in sizes {
            if v == 0 || v > 1 << 24 {
                return Err(Error::invalid(
                    format!("transformer {what}"),
                    v,
                    "must lie in 1..=2^24",
                ));
            }
        }
        if self.d % self.heads != 0 {
            return Err(Error::invalid(
                "transformer heads",
                self.heads,
                format!("must divide the width d = {}", self.d),
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::invalid("layer-norm eps", self.eps, "must be > 0"));
        }
        Ok(())
    }

    /// The parameter names and shapes in state-dict order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, h) = (self.d, self.hidden);
        let mut v = vec![
            ("emb.weight".to_string(), vec![self.vocab, d]),
            ("pos.weight".to_string(), vec![self.max_len, d]),
        ];
        for i in 0..self.layers {
            for (n, w) in [
                ("ln1", vec![d]),
                ("qkv", vec![3 * d, d]),
                ("proj", vec![d, d]),
                ("ln2", vec![d]),
                ("fc1", vec![h, d]),
                ("fc2", vec![d, h]),
            ] {
                let out = w[0];
                v.push((format!("blocks.{i}.{n}.weight"), w));
                v.push((format!("blocks.{i}.{n}.bias"), vec![out]));
            }
        }
        v.push(("ln_f.weight".into(), vec![d]));
        v.push(("ln_f.bias".into(), vec![d]));
        v.push(("head.weight".into(), vec![self.classes, d]));
        v.push(("head.bias".into(), vec![self.classes]));
        v
    }

    /// P.
    pub fn num_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }
}

/// A pre-LN transformer encoder classifier loaded from a state dict (see the module docs).
/// Its flat parameter layout is the state-dict order of [`TransformerConfig::param_shapes`].
#[derive(Debug, Clone)]
pub struct Transformer {
    cfg: TransformerConfig,
    prefix: String,
    vars: Vec<(String, Var)>,
}

impl Transformer {
    /// From named tensors: the sizes are read from the shapes (V, T, d from the embeddings, L
    /// from the blocks present, the MLP width from `fc1`, C from the head); `heads` is given.
    /// Every tensor must have its PyTorch shape; a tensor no part uses is an error.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        heads: usize,
        prefix: &str,
        dtype: DType,
        source: &str,
    ) -> Result<Self> {
        let prefix = if prefix.is_empty() || prefix.ends_with('.') {
            prefix.to_string()
        } else {
            format!("{prefix}.")
        };
        let bad = |detail: String| Error::BadFile {
            path: source.to_string(),
            detail,
        };
        let dims = |name: &str| -> Result<Vec<usize>> {
            tensors
                .get(&format!("{prefix}{name}"))
                .map(|t| t.dims().to_vec())
                .ok_or_else(|| bad(format!("tensor '{prefix}{name}' is missing")))
        };
        let emb = dims("emb.weight")?;
        let pos = dims("pos.weight")?;
        let head = dims("head.weight")?;
        let fc1 = dims("blocks.0.fc1.weight")?;
        if emb.len() != 2 || pos.len() != 2 || head.len() != 2 || fc1.len() != 2 {
            return Err(bad(format!(
                "emb {emb:?}, pos {pos:?}, head {head:?} and fc1 {fc1:?} must be matrices"
            )));
        }
        let layers = (0..)
            .take_while(|i| tensors.contains_key(&format!("{prefix}blocks.{i}.qkv.weight")))
            .count();
        let cfg = TransformerConfig {
            vocab: emb[0],
            max_len: pos[0],
            d: emb[1],
            heads,
            layers,
            hidden: fc1[0],
            classes: head[0],
            eps: 1e-5,
        };
        cfg.check()?;
        let mut used = std::collections::HashSet::new();
        let mut vars = vec![];
        for (name, shape) in cfg.param_shapes() {
            let key = format!("{prefix}{name}");
            let t = tensors
                .get(&key)
                .ok_or_else(|| bad(format!("tensor '{key}' is missing; expected {shape:?}")))?;
            if t.dims() != shape.as_slice() {
                return Err(bad(format!(
                    "tensor '{key}' has shape {:?}, the transformer (d = {}, MLP {}, V = {}, T = {}, C = {}) needs {shape:?}",
                    t.dims(),
                    cfg.d,
                    cfg.hidden,
                    cfg.vocab,
                    cfg.max_len,
                    cfg.classes
                )));
            }
            used.insert(key.clone());
            vars.push((key, Var::from_tensor(&t.to_dtype(dtype)?)?));
        }
        let mut unused: Vec<&String> = tensors
            .keys()
            .filter(|k| !used.contains(*k) && k.starts_with(&prefix))
            .collect();
        if !unused.is_empty() {
            unused.sort();
            return Err(bad(format!(
                "tensor(s) {unused:?} are used by no part of the transformer"
            )));
        }
        Ok(Self { cfg, prefix, vars })
    }

    /// Loads a PyTorch state dict saved as safetensors ([`Transformer::from_tensors`]).
    pub fn load_safetensors(
        path: impl AsRef<Path>,
        heads: usize,
        dtype: DType,
        prefix: &str,
    ) -> Result<Self> {
        let path = path.as_ref();
        let tensors = super::read_candle_tensors(path)?;
        Self::from_tensors(&tensors, heads, prefix, dtype, &path.display().to_string())
    }

    /// A model with small random weights (norms near 1), from a seed: for tests and demos.
    pub fn init(cfg: TransformerConfig, dtype: DType, seed: u64) -> Result<Self> {
        cfg.check()?;
        let mut uniform = super::seeded_uniform(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.param_shapes() {
            let n: usize = shape.iter().product();
            let norm = name.contains("ln");
            let fan_in = if shape.len() == 2 { shape[1] } else { cfg.d } as f64;
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    let u = 2.0 * uniform() - 1.0;
                    if norm && name.ends_with("weight") {
                        1.0 + 0.1 * u
                    } else if norm {
                        0.1 * u
                    } else if name.starts_with("emb") || name.starts_with("pos") {
                        u
                    } else {
                        u / fan_in.sqrt()
                    }
                })
                .collect();
            tensors.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?);
        }
        let mut m = Self::from_tensors(&tensors, cfg.heads, "", dtype, "(initialised)")?;
        m.cfg.eps = cfg.eps;
        Ok(m)
    }

    /// The sizes.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// The parameter names in state-dict order (prefix included).
    pub fn param_names(&self) -> Vec<String> {
        self.vars.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The parameter tensors in state-dict order, with their names.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The parameters, in state-dict order (the flat layout of every engine).
    pub fn params(&self) -> Result<Params> {
        Params::from_vars(self.vars.clone())
    }

    /// P.
    pub fn num_params(&self) -> usize {
        self.cfg.num_params()
    }

    /// The parameters' precision.
    pub fn dtype(&self) -> DType {
        self.vars
            .first()
            .map(|(_, v)| v.dtype())
            .unwrap_or(DType::F32)
    }

    fn t(&self, name: &str) -> candle_core::Result<Tensor> {
        let key = format!("{}{name}", self.prefix);
        self.vars
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, v)| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::Msg(format!("missing {key}")))
    }

    pub(crate) fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(self.t(name)?)
    }

    fn linear(&self, name: &str) -> candle_core::Result<crate::nn::Linear> {
        Ok(crate::nn::Linear::new(
            self.t(&format!("{name}.weight"))?,
            Some(self.t(&format!("{name}.bias"))?),
        ))
    }

    fn norm(&self, name: &str) -> candle_core::Result<crate::nn::Norm> {
        Ok(crate::nn::Norm::new(
            self.t(&format!("{name}.weight"))?,
            Some(self.t(&format!("{name}.bias"))?),
            self.cfg.eps,
            true,
        ))
    }
}

impl Module for Transformer {
    /// Token ids (B, T') (integers, T' ≤ max_len) to logits (B, C), through [`crate::nn`]
    /// layers (differentiable: the softmax is `candle_nn::ops::softmax`).
    fn forward(&self, tok: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = tok.dims2()?;
        let (d, heads) = (self.cfg.d, self.cfg.heads);
        let hd = d / heads;
        let emb = crate::nn::Embedding::new(self.t("emb.weight")?);
        let pos = crate::nn::Embedding::new(self.t("pos.weight")?);
        let ids = Tensor::arange(0u32, t as u32, tok.device())?
            .unsqueeze(0)?
            .broadcast_as((b, t))?
            .contiguous()?;
        let mut x = (emb.forward(tok)? + pos.forward(&ids)?)?;
        for i in 0..self.cfg.layers {
            let p = |n: &str| format!("blocks.{i}.{n}");
            let qkv = self
                .linear(&p("qkv"))?
                .forward(&self.norm(&p("ln1"))?.forward(&x)?)?;
            let split = |k: usize| -> candle_core::Result<Tensor> {
                qkv.narrow(2, k * d, d)?
                    .reshape((b, t, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
            x = (&x + self.linear(&p("proj"))?.forward(&y)?)?;
            // GELU composed from erf: candle 0.11.1's fused gelu_erf backward is off by ~1.6e-7
            // relative (measured against finite differences), the composition is exact
            let h = super::Activation::Gelu.forward(
                &self
                    .linear(&p("fc1"))?
                    .forward(&self.norm(&p("ln2"))?.forward(&x)?)?,
            )?;
            x = (&x + self.linear(&p("fc2"))?.forward(&h)?)?;
        }
        self.linear("head")?
            .forward(&self.norm("ln_f")?.forward(&x)?.mean(1)?)
    }
}
