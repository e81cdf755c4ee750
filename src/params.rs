//! Stage 1 of the pipeline: the parameters θ, as an ordered set of named candle [`Var`]s with one
//! documented flat layout.
//!
//! **Flat layout.** The flat vector is the concatenation, in the set's order, of each tensor
//! flattened row-major (candle's and PyTorch's contiguous order). For a model exported from
//! PyTorch the order can follow the state dict (`0.weight, 0.bias, 2.weight, ...`) through
//! [`ParamOrder::Natural`], so flat vectors line up with `torch.cat([p.flatten() for p in
//! model.parameters()])`.
//!
//! Memory: the set holds handles to the model's own tensors (no copy); flattening a gradient
//! allocates one `Vec<f64>` of length P.

use std::cmp::Ordering;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use crate::error::{Error, Result};

/// How to order the variables of a [`VarMap`] (whose own storage is an unordered hash map).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamOrder {
    /// PyTorch state-dict-like order: names are split on `.`; numeric segments compare as
    /// numbers (so `2.weight` comes before `10.weight`), other segments as strings, except that a
    /// final `weight` comes before a final `bias` (as `nn.Linear` registers them).
    Natural,
    /// Plain byte-wise string order of the names (`10.` before `2.`).
    Lexicographic,
    /// Exactly these names, in this order. Every name must exist; names of the map not listed
    /// are left out of the set (they are treated as constants).
    Explicit(Vec<String>),
}

/// One parameter tensor of a [`Params`] set.
#[derive(Debug, Clone)]
pub struct ParamEntry {
    /// The parameter's name (for example `0.weight`).
    pub name: String,
    /// The candle variable; gradients are taken with respect to it.
    pub var: Var,
    /// Its shape.
    pub dims: Vec<usize>,
    /// Offset of its first element in the flat vector.
    pub offset: usize,
    /// Number of elements.
    pub numel: usize,
}

/// An ordered set of named candle variables with a fixed flat layout (see the module docs).
///
/// ```
/// use candle_core::{Device, DType, Tensor, Var};
/// use deltavar::Params;
/// let w = Var::from_tensor(&Tensor::zeros((2, 3), DType::F64, &Device::Cpu).unwrap()).unwrap();
/// let b = Var::from_tensor(&Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap()).unwrap();
/// let params = Params::from_vars(vec![("0.weight".into(), w), ("0.bias".into(), b)]).unwrap();
/// assert_eq!(params.num_params(), 8);
/// assert_eq!(params.entries()[1].offset, 6);
/// ```
#[derive(Debug, Clone)]
pub struct Params {
    entries: Vec<ParamEntry>,
    total: usize,
    /// Names of parameters allowed to receive no gradient (see [`Params::allow_unused`]).
    allowed_unused: Vec<String>,
}

/// The error for parameters that received no gradient from a backward pass.
fn no_gradient_error(names: &[&str]) -> Error {
    Error::Parameter(format!(
        "no gradient reached parameter(s) {names:?}: the output does not depend on them, or an \
         op on the path has no backward pass (candle-nn 0.11's fused layer_norm / LayerNorm, \
         rms_norm / RmsNorm, softmax_last_dim and rotary embeddings have none: use \
         candle_nn::ops::layer_norm_slow, rms_norm_slow or softmax(x, dim) instead); if they are \
         truly unused, allow it with Params::allow_unused"
    ))
}

/// Compares two parameter names in [`ParamOrder::Natural`] order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let sa: Vec<&str> = a.split('.').collect();
    let sb: Vec<&str> = b.split('.').collect();
    for i in 0..sa.len().min(sb.len()) {
        let (x, y) = (sa[i], sb[i]);
        if x == y {
            continue;
        }
        let last = i + 1 == sa.len() && i + 1 == sb.len();
        if last {
            let rank = |s: &str| match s {
                "weight" => 0,
                "bias" => 1,
                _ => 2,
            };
            let (rx, ry) = (rank(x), rank(y));
            if rx != ry {
                return rx.cmp(&ry);
            }
        }
        return match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(nx), Ok(ny)) => nx.cmp(&ny).then(x.cmp(y)),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            _ => x.cmp(y),
        };
    }
    sa.len().cmp(&sb.len())
}

impl Params {
    /// Builds a set from `(name, var)` pairs, keeping their order. Names must be unique.
    pub fn from_vars(vars: Vec<(String, Var)>) -> Result<Self> {
        let mut entries = Vec::with_capacity(vars.len());
        let mut offset = 0usize;
        for (name, var) in vars {
            if entries.iter().any(|e: &ParamEntry| e.name == name) {
                return Err(Error::Parameter(format!(
                    "parameter name '{name}' appears twice; names must be unique"
                )));
            }
            let dims = var.dims().to_vec();
            let numel = var.elem_count();
            entries.push(ParamEntry {
                name,
                var,
                dims,
                offset,
                numel,
            });
            offset += numel;
        }
        Ok(Self {
            entries,
            total: offset,
            allowed_unused: Vec::new(),
        })
    }

    /// Builds a set from the variables of a candle [`VarMap`] in the given order.
    pub fn from_varmap(varmap: &VarMap, order: ParamOrder) -> Result<Self> {
        let data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Parameter("the VarMap's lock is poisoned".into()))?;
        let mut pairs: Vec<(String, Var)> = match &order {
            ParamOrder::Explicit(names) => {
                let mut v = Vec::with_capacity(names.len());
                for n in names {
                    let var = data.get(n).ok_or_else(|| {
                        let mut known: Vec<&String> = data.keys().collect();
                        known.sort();
                        Error::Parameter(format!(
                            "parameter '{n}' is not in the VarMap (it has: {known:?})"
                        ))
                    })?;
                    v.push((n.clone(), var.clone()));
                }
                v
            }
            _ => data.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        match order {
            ParamOrder::Natural => pairs.sort_by(|a, b| natural_cmp(&a.0, &b.0)),
            ParamOrder::Lexicographic => pairs.sort_by(|a, b| a.0.cmp(&b.0)),
            ParamOrder::Explicit(_) => {}
        }
        Self::from_vars(pairs)
    }

    /// Allows the named parameters to receive no gradient (their gradient is then zero).
    /// Without this, a parameter missing from a backward pass is an [`Error::Parameter`] naming
    /// it, because the usual cause is an op without a backward pass upstream, which would
    /// otherwise give silently zero gradients. Every name must belong to the set.
    ///
    /// ```
    /// use candle_core::{Device, DType, Tensor, Var};
    /// use deltavar::{qoi_gradient, Params};
    /// let w = Var::from_tensor(&Tensor::new(&[2.0f64], &Device::Cpu).unwrap()).unwrap();
    /// let unused = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
    /// let params = Params::from_vars(vec![("w".into(), w.clone()), ("u".into(), unused)]).unwrap();
    /// let z = Tensor::new(&[3.0f64], &Device::Cpu).unwrap();
    /// let q = |z: &Tensor| (z * w.as_tensor())?.sum_all();
    /// assert!(qoi_gradient(&params, &z, q).is_err()); // 'u' gets no gradient
    /// let params = params.allow_unused(&["u"]).unwrap();
    /// assert_eq!(qoi_gradient(&params, &z, q).unwrap().flat, vec![3.0, 0.0]);
    /// ```
    pub fn allow_unused(mut self, names: &[&str]) -> Result<Self> {
        for n in names {
            if !self.entries.iter().any(|e| e.name == *n) {
                return Err(Error::Parameter(format!(
                    "allow_unused: '{n}' is not a parameter of this set (it has {:?})",
                    self.names()
                )));
            }
            if !self.allowed_unused.iter().any(|a| a == n) {
                self.allowed_unused.push(n.to_string());
            }
        }
        Ok(self)
    }

    /// Names allowed to receive no gradient.
    pub fn allowed_unused(&self) -> &[String] {
        &self.allowed_unused
    }

    /// Fails naming every parameter that has no gradient in `grads` and is not allowed to.
    fn check_all_present(&self, grads: &GradStore) -> Result<()> {
        let missing: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| grads.get(e.var.as_tensor()).is_none())
            .map(|e| e.name.as_str())
            .filter(|n| !self.allowed_unused.iter().any(|a| a == n))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(no_gradient_error(&missing))
        }
    }

    /// Total number of scalar parameters P.
    pub fn num_params(&self) -> usize {
        self.total
    }

    /// The entries in flat order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The names in flat order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// The candle device and dtype of the first parameter (the model's), if any.
    pub fn dtype(&self) -> Option<DType> {
        self.entries.first().map(|e| e.var.dtype())
    }

    /// Flattens the gradients in `grads` into one f64 vector of length P in the flat layout.
    /// A parameter with no gradient in the store is an error naming it, unless allowed by
    /// [`Params::allow_unused`] (then it gets zeros).
    pub fn flatten_grads(&self, grads: &GradStore) -> Result<Vec<f64>> {
        let mut out = vec![0.0f64; self.total];
        self.flatten_grads_into(grads, &mut out)?;
        Ok(out)
    }

    /// Like [`Params::flatten_grads`], writing into `out` (length P).
    pub fn flatten_grads_into(&self, grads: &GradStore, out: &mut [f64]) -> Result<()> {
        if out.len() != self.total {
            return Err(Error::shape("flat gradient buffer", self.total, out.len()));
        }
        self.check_all_present(grads)?;
        for e in &self.entries {
            let dst = &mut out[e.offset..e.offset + e.numel];
            match grads.get(e.var.as_tensor()) {
                Some(g) => copy_tensor_f64(g, dst)?,
                None => dst.fill(0.0),
            }
        }
        Ok(())
    }

    /// The current parameter values as one flat f64 vector.
    pub fn flat_values(&self) -> Result<Vec<f64>> {
        let mut out = vec![0.0f64; self.total];
        for e in &self.entries {
            copy_tensor_f64(e.var.as_tensor(), &mut out[e.offset..e.offset + e.numel])?;
        }
        Ok(out)
    }

    /// Overwrites the parameter values from a flat f64 vector (cast to each variable's dtype).
    pub fn set_flat_values(&self, flat: &[f64]) -> Result<()> {
        let tensors = self.unflatten(flat)?;
        for (e, (_, t)) in self.entries.iter().zip(tensors) {
            e.var.set(&t.to_dtype(e.var.dtype())?)?;
        }
        Ok(())
    }

    /// Splits a flat f64 vector (length P) into named f64 tensors shaped like the parameters,
    /// on the parameters' device (the per-tensor view, like the seed's pytree).
    pub fn unflatten(&self, flat: &[f64]) -> Result<Vec<(String, Tensor)>> {
        if flat.len() != self.total {
            return Err(Error::shape(
                "flat parameter vector",
                self.total,
                flat.len(),
            ));
        }
        self.entries
            .iter()
            .map(|e| {
                let t = Tensor::from_slice(
                    &flat[e.offset..e.offset + e.numel],
                    e.dims.as_slice(),
                    e.var.device(),
                )?;
                Ok((e.name.clone(), t))
            })
            .collect()
    }
}

/// A borrowed view of a tensor's contiguous CPU data.
pub(crate) enum FloatSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// Calls `f` with the tensor's data as a contiguous f32 or f64 slice, without copying when the
/// tensor is a contiguous f32/f64 CPU tensor (the usual case for gradients); otherwise through
/// one f64 copy.
pub(crate) fn with_float_slice<R>(t: &Tensor, f: impl FnOnce(FloatSlice<'_>) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            match cpu {
                candle_core::CpuStorage::F32(v) => return Ok(f(FloatSlice::F32(&v[start..end]))),
                candle_core::CpuStorage::F64(v) => return Ok(f(FloatSlice::F64(&v[start..end]))),
                _ => {}
            }
        }
    }
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(f(FloatSlice::F64(&v)))
}

/// Copies a tensor of any float dtype into an f64 slice of the same element count.
pub(crate) fn copy_tensor_f64(t: &Tensor, dst: &mut [f64]) -> Result<()> {
    if t.elem_count() != dst.len() {
        return Err(Error::shape("tensor copy", dst.len(), t.elem_count()));
    }
    with_float_slice(t, |s| match s {
        FloatSlice::F32(v) => {
            for (d, x) in dst.iter_mut().zip(v) {
                *d = *x as f64;
            }
        }
        FloatSlice::F64(v) => dst.copy_from_slice(v),
    })
}

impl Params {
    /// Adds gᵢ² of the gradients in `grads` to `acc` (length P) without an intermediate
    /// P-vector; returns the index of a non-finite entry, if any.
    pub(crate) fn accumulate_sq_grads(
        &self,
        grads: &GradStore,
        acc: &mut [f64],
    ) -> Result<Option<usize>> {
        if acc.len() != self.total {
            return Err(Error::shape(
                "Fisher diagonal accumulator",
                self.total,
                acc.len(),
            ));
        }
        self.check_all_present(grads)?;
        let mut bad = None;
        for e in &self.entries {
            let Some(g) = grads.get(e.var.as_tensor()) else {
                continue;
            };
            if g.elem_count() != e.numel {
                return Err(Error::shape(
                    format!("gradient of '{}'", e.name),
                    e.numel,
                    g.elem_count(),
                ));
            }
            let dst = &mut acc[e.offset..e.offset + e.numel];
            let ok = with_float_slice(g, |s| match s {
                FloatSlice::F32(v) => {
                    let mut finite = true;
                    for (a, x) in dst.iter_mut().zip(v) {
                        let x = *x as f64;
                        finite &= x.is_finite();
                        *a += x * x;
                    }
                    finite
                }
                FloatSlice::F64(v) => {
                    let mut finite = true;
                    for (a, x) in dst.iter_mut().zip(v) {
                        finite &= x.is_finite();
                        *a += x * x;
                    }
                    finite
                }
            })?;
            if !ok && bad.is_none() {
                let mut tmp = vec![0.0; e.numel];
                copy_tensor_f64(g, &mut tmp)?;
                bad = tmp
                    .iter()
                    .position(|v| !v.is_finite())
                    .map(|k| e.offset + k);
            }
        }
        Ok(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_follows_torch_state_dict() {
        let mut names = vec![
            "10.bias",
            "2.weight",
            "0.bias",
            "10.weight",
            "0.weight",
            "2.bias",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec![
                "0.weight",
                "0.bias",
                "2.weight",
                "2.bias",
                "10.weight",
                "10.bias"
            ]
        );
        let mut names = vec!["enc.1.bias", "enc.0.weight", "dec.weight", "enc.0.bias"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec!["dec.weight", "enc.0.weight", "enc.0.bias", "enc.1.bias"]
        );
    }
}
