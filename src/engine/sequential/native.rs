//! A native batched forward and backward pass of a [`Sequential`] model over faer matmuls, and
//! the per-example gradient of every layer with parameters from what the pass kept.
//!
//! Buffers are example-major (one example's activations contiguous, in PyTorch's C order:
//! (C, H, W) for images). Kept per layer for the backward pass and the per-example gradients:
//! its input; for a convolution the unfolded patches (K×L per example, K = C·kh·kw,
//! L = output pixels); for max pooling the index of each window's maximum; for a layer norm x̂ and
//! 1/σ per row.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use crate::engine::factored::{Rows, Scalar};
use crate::error::{Error, Result};
use crate::model::{Activation, SeqLayer, Sequential};

/// Geometry of a 2-D convolution (a 1-D one has kh = 1, h = 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub dh: usize,
    pub dw: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    /// K = C·kh·kw: rows of an example's patch matrix.
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    /// L = output pixels: columns of an example's patch matrix.
    pub fn l(&self) -> usize {
        self.ho * self.wo
    }

    /// Unfolds one example's input (C, H, W) into its patches P (K×L): row (c, i, j), column
    /// (oh, ow) holds x[c, oh·sh − ph + i·dh, ow·sw − pw + j·dw] or 0. Row r is written at
    /// `p[r·stride + off ..][..L]` (the batch's patches are K × (B·L), example i at off = i·L).
    fn im2col<T: Scalar>(&self, x: &[T], p: &mut [T], stride: usize, off: usize) {
        let l = self.l();
        let mut r = 0;
        for c in 0..self.cin {
            let xc = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut p[r * stride + off..r * stride + off + l];
                    let (lo, hi) = self.valid_cols(j);
                    for oh in 0..self.ho {
                        let dst = &mut row[oh * self.wo..(oh + 1) * self.wo];
                        let ih = (oh * self.sh + i * self.dh) as isize - self.ph as isize;
                        if ih < 0 || ih as usize >= self.h || lo >= hi {
                            dst.fill(T::default());
                            continue;
                        }
                        let src = &xc[ih as usize * self.w..(ih as usize + 1) * self.w];
                        dst[..lo].fill(T::default());
                        dst[hi..].fill(T::default());
                        let base = j * self.dw;
                        if self.sw == 1 {
                            let s0 = lo + base - self.pw;
                            dst[lo..hi].copy_from_slice(&src[s0..s0 + (hi - lo)]);
                        } else {
                            for (ow, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[(lo + ow) * self.sw + base - self.pw];
                            }
                        }
                    }
                    r += 1;
                }
            }
        }
    }

    /// Adds the patch gradients dP (K×L, row r at `dp[r·stride + off ..]`) back onto the input
    /// gradient (C, H, W).
    fn col2im<T: Scalar>(&self, dp: &[T], dx: &mut [T], stride: usize, off: usize) {
        let l = self.l();
        let mut r = 0;
        for c in 0..self.cin {
            let xc = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &dp[r * stride + off..r * stride + off + l];
                    let (lo, hi) = self.valid_cols(j);
                    for oh in 0..self.ho {
                        let ih = (oh * self.sh + i * self.dh) as isize - self.ph as isize;
                        if ih < 0 || ih as usize >= self.h || lo >= hi {
                            continue;
                        }
                        let src = &row[oh * self.wo..(oh + 1) * self.wo];
                        let dst = &mut xc[ih as usize * self.w..(ih as usize + 1) * self.w];
                        let base = j * self.dw;
                        if self.sw == 1 {
                            let d0 = lo + base - self.pw;
                            for (d, v) in dst[d0..d0 + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                                *d += *v;
                            }
                        } else {
                            for (ow, v) in src.iter().enumerate().take(hi).skip(lo) {
                                dst[ow * self.sw + base - self.pw] += *v;
                            }
                        }
                    }
                    r += 1;
                }
            }
        }
    }

    /// The output columns ow whose input column ow·sw − pw + j·dw lies inside 0..w.
    fn valid_cols(&self, j: usize) -> (usize, usize) {
        let base = j * self.dw;
        // ow·sw + base >= pw
        let lo = if base >= self.pw {
            0
        } else {
            (self.pw - base).div_ceil(self.sw)
        };
        // ow·sw + base − pw <= w − 1
        let hi = if self.w + self.pw > base {
            ((self.w + self.pw - base - 1) / self.sw + 1).min(self.wo)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// One layer of the native network.
#[derive(Debug, Clone)]
pub(crate) enum NOp<T> {
    /// y = x Wᵀ + b on the last dimension; `rows` rows per example.
    Linear {
        w: Vec<T>,
        b: Option<Vec<T>>,
        inp: usize,
        out: usize,
        rows: usize,
    },
    /// W (cout × K).
    Conv {
        w: Vec<T>,
        b: Option<Vec<T>>,
        g: ConvGeom,
    },
    Pool {
        max: bool,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        s: usize,
        ho: usize,
        wo: usize,
    },
    /// Flatten, dropout: the data is unchanged.
    Same,
    Act(Activation),
    LayerNorm {
        w: Vec<T>,
        b: Vec<T>,
        d: usize,
        eps: f64,
        rows: usize,
    },
    /// Eval mode: inv = 1/sqrt(var + eps) per channel.
    BatchNorm {
        w: Vec<T>,
        b: Vec<T>,
        mean: Vec<T>,
        inv: Vec<T>,
        c: usize,
        hw: usize,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct NLayer<T> {
    pub op: NOp<T>,
    /// Elements per example in and out.
    pub n_in: usize,
    pub n_out: usize,
    /// Offset of the layer's parameters (weight, then bias) in the flat layout, and their count.
    pub off: usize,
    pub np: usize,
}

/// The network in the engine's precision (a snapshot of the model's weights).
#[derive(Debug, Clone)]
pub(crate) struct NativeSeq<T> {
    pub layers: Vec<NLayer<T>>,
    pub num_params: usize,
    /// Index of the first layer with parameters (the backward pass stops there).
    pub first_param: usize,
}

/// Per-thread buffers of one batch.
#[derive(Debug)]
pub(crate) struct SeqWorkspace<T> {
    /// acts[l]: input of layer l (B×n_in); acts[L]: the output.
    pub acts: Vec<Vec<T>>,
    /// Conv: patches (B×K×L, example-major); LayerNorm: x̂ (B×n).
    pub aux: Vec<Vec<T>>,
    /// LayerNorm: 1/σ per row.
    pub inv: Vec<Vec<T>>,
    /// MaxPool: the input index of each output's maximum (per example).
    pub arg: Vec<Vec<u32>>,
    /// deltas[l]: ∂u/∂(output of layer l) (B×n_out).
    pub deltas: Vec<Vec<T>>,
    /// ∂u/∂(input of the network), when asked (rollouts).
    pub d_input: Vec<T>,
    /// Scratch for one example's patch gradients (K×L).
    scratch: Vec<T>,
    pub rows: usize,
}

impl<T> Default for SeqWorkspace<T> {
    fn default() -> Self {
        Self {
            acts: vec![],
            aux: vec![],
            inv: vec![],
            arg: vec![],
            deltas: vec![],
            d_input: vec![],
            scratch: vec![],
            rows: 0,
        }
    }
}

fn tensor_vec<T: Scalar>(t: &candle_core::Tensor, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    crate::engine::factored::copy_rows(&t.flatten_all()?, &mut v, what, 0)?;
    Ok(v)
}

/// Whether `v` holds a NaN, by Σ x·0 over 8 lanes (vectorises; NaN or ±Inf make it NaN).
fn has_nan<T: Scalar>(v: &[T]) -> bool {
    let mut lanes = [T::default(); 8];
    let zero = T::default();
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in lanes.iter_mut().zip(c) {
            *a += *x * zero;
        }
    }
    let tail = chunks.remainder().iter().fold(zero, |a, x| a + *x * zero);
    lanes.iter().fold(tail, |a, x| a + *x).nan() && v.iter().any(|x| x.nan())
}

fn gemm<T: Scalar>(dst: MatMut<'_, T>, accum: Accum, a: MatRef<'_, T>, b: MatRef<'_, T>) {
    matmul(dst, accum, a, b, T::of(1.0), Par::Seq);
}

fn rm<T>(s: &[T], r: usize, c: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice(s, r, c)
}

fn rm_mut<T>(s: &mut [T], r: usize, c: usize) -> MatMut<'_, T> {
    MatMut::from_row_major_slice_mut(s, r, c)
}

impl<T: Scalar> NativeSeq<T> {
    pub fn from_model(m: &Sequential) -> Result<Self> {
        let shapes = m.shapes();
        let mut layers = Vec::with_capacity(m.spec().layers.len());
        let mut off = 0;
        let mut first_param = usize::MAX;
        for (i, (l, t)) in m.spec().layers.iter().zip(m.tensors()).enumerate() {
            let (si, so) = (&shapes[i], &shapes[i + 1]);
            let n_in: usize = si.iter().product();
            let n_out: usize = so.iter().product();
            let name = |p: &str| format!("module {i} {p}");
            let w = || -> Result<Vec<T>> {
                let v = t
                    .weight
                    .as_ref()
                    .ok_or_else(|| Error::Parameter(format!("module {i} ({l}) has no weight")))?;
                tensor_vec(v.as_tensor(), &name("weight"))
            };
            let b = || -> Result<Option<Vec<T>>> {
                t.bias
                    .as_ref()
                    .map(|v| tensor_vec(v.as_tensor(), &name("bias")))
                    .transpose()
            };
            let conv = |a: &crate::model::ConvArgs, two_d: bool| ConvGeom {
                cin: a.inp,
                cout: a.out,
                h: if two_d { si[1] } else { 1 },
                w: si[si.len() - 1],
                kh: if two_d { a.k } else { 1 },
                kw: a.k,
                sh: if two_d { a.stride } else { 1 },
                sw: a.stride,
                ph: if two_d { a.padding } else { 0 },
                pw: a.padding,
                dh: if two_d { a.dilation } else { 1 },
                dw: a.dilation,
                ho: if two_d { so[1] } else { 1 },
                wo: so[so.len() - 1],
            };
            let op = match l {
                SeqLayer::Linear { inp, out, .. } => NOp::Linear {
                    w: w()?,
                    b: b()?,
                    inp: *inp,
                    out: *out,
                    rows: n_in / inp,
                },
                SeqLayer::Conv2d(a) => NOp::Conv {
                    w: w()?,
                    b: b()?,
                    g: conv(a, true),
                },
                SeqLayer::Conv1d(a) => NOp::Conv {
                    w: w()?,
                    b: b()?,
                    g: conv(a, false),
                },
                SeqLayer::MaxPool2d { k, stride } | SeqLayer::AvgPool2d { k, stride } => {
                    NOp::Pool {
                        max: matches!(l, SeqLayer::MaxPool2d { .. }),
                        c: si[0],
                        h: si[1],
                        w: si[2],
                        k: *k,
                        s: *stride,
                        ho: so[1],
                        wo: so[2],
                    }
                }
                SeqLayer::Flatten | SeqLayer::Dropout => NOp::Same,
                SeqLayer::Act(a) => NOp::Act(*a),
                SeqLayer::LayerNorm { d, eps } => NOp::LayerNorm {
                    w: w()?,
                    b: b()?.unwrap_or_else(|| vec![T::default(); *d]),
                    d: *d,
                    eps: *eps,
                    rows: n_in / d,
                },
                SeqLayer::BatchNorm2d { c, eps } => {
                    let (mean, var) = t.stats.as_ref().ok_or_else(|| {
                        Error::Parameter(format!("module {i} ({l}) has no running statistics"))
                    })?;
                    let var: Vec<f64> = tensor_vec::<f64>(var, &name("running_var"))?;
                    NOp::BatchNorm {
                        w: w()?,
                        b: b()?.unwrap_or_else(|| vec![T::default(); *c]),
                        mean: tensor_vec(mean, &name("running_mean"))?,
                        inv: var.iter().map(|v| T::of(1.0 / (v + eps).sqrt())).collect(),
                        c: *c,
                        hw: n_in / c,
                    }
                }
            };
            let np: usize = l
                .param_shapes()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            if np > 0 && first_param == usize::MAX {
                first_param = i;
            }
            layers.push(NLayer {
                op,
                n_in,
                n_out,
                off,
                np,
            });
            off += np;
        }
        Ok(Self {
            layers,
            num_params: off,
            first_param: first_param.min(m.spec().layers.len()),
        })
    }

    pub fn num_inputs(&self) -> usize {
        self.layers.first().map(|l| l.n_in).unwrap_or(0)
    }

    pub fn num_outputs(&self) -> usize {
        self.layers.last().map(|l| l.n_out).unwrap_or(0)
    }

    /// The batched forward pass of input rows `x` (B × n_in) into `ws`.
    pub fn forward(&self, x: Rows<'_>, ws: &mut SeqWorkspace<T>, first_row: usize) -> Result<()> {
        let (b, cols) = x.dims();
        if cols != self.num_inputs() {
            return Err(Error::shape(
                "inputs of the sequential model (elements per example)",
                self.num_inputs(),
                cols,
            ));
        }
        let mut input = ws.acts.first_mut().map(std::mem::take).unwrap_or_default();
        x.copy_into(&mut input, "input data x", first_row)?;
        self.forward_from(input, b, ws);
        Ok(())
    }

    /// The forward pass from an input buffer already in the engine's precision.
    pub fn forward_from(&self, input: Vec<T>, b: usize, ws: &mut SeqWorkspace<T>) {
        let nl = self.layers.len();
        ws.acts.resize_with(nl + 1, Vec::new);
        ws.aux.resize_with(nl, Vec::new);
        ws.inv.resize_with(nl, Vec::new);
        ws.arg.resize_with(nl, Vec::new);
        ws.deltas.resize_with(nl, Vec::new);
        ws.rows = b;
        ws.acts[0] = input;
        for (l, layer) in self.layers.iter().enumerate() {
            let (lo, hi) = ws.acts.split_at_mut(l + 1);
            let x = &lo[l];
            let y = &mut hi[0];
            // every layer overwrites all of its output: no zero fill
            y.resize(b * layer.n_out, T::default());
            match &layer.op {
                NOp::Linear {
                    w,
                    b: bias,
                    inp,
                    out,
                    rows,
                } => {
                    gemm(
                        rm_mut(y, b * rows, *out),
                        Accum::Replace,
                        rm(x, b * rows, *inp),
                        rm(w, *out, *inp).transpose(),
                    );
                    if let Some(bias) = bias {
                        for row in y.chunks_exact_mut(*out) {
                            row.iter_mut().zip(bias).for_each(|(v, c)| *v += *c);
                        }
                    }
                }
                NOp::Conv { w, b: bias, g } => {
                    // per example: its patches Pᵢ (K×L, contiguous, still in cache) and W·Pᵢ
                    let (k, ll) = (g.k(), g.l());
                    let p = &mut ws.aux[l];
                    // im2col writes every entry
                    p.resize(b * k * ll, T::default());
                    for ((xi, pi), yi) in x
                        .chunks_exact(layer.n_in)
                        .zip(p.chunks_exact_mut(k * ll))
                        .zip(y.chunks_exact_mut(layer.n_out))
                    {
                        g.im2col(xi, pi, ll, 0);
                        gemm(
                            rm_mut(yi, g.cout, ll),
                            Accum::Replace,
                            rm(w, g.cout, k),
                            rm(pi, k, ll),
                        );
                        if let Some(bias) = bias {
                            for (row, c) in yi.chunks_exact_mut(ll).zip(bias) {
                                row.iter_mut().for_each(|v| *v += *c);
                            }
                        }
                    }
                }
                NOp::Pool {
                    max,
                    c,
                    h,
                    w,
                    k,
                    s,
                    ho,
                    wo,
                } => {
                    let arg = &mut ws.arg[l];
                    if *max {
                        arg.resize(b * layer.n_out, 0);
                        // a NaN would lose every comparison and vanish: make it visible instead
                        if has_nan(x) {
                            let nan = T::of(f64::NAN);
                            y.fill(nan);
                            continue;
                        }
                    }
                    let inv = T::of(1.0 / (k * k) as f64);
                    for (i, (xi, yi)) in x
                        .chunks_exact(layer.n_in)
                        .zip(y.chunks_exact_mut(layer.n_out))
                        .enumerate()
                    {
                        let ai = if *max {
                            &mut arg[i * layer.n_out..(i + 1) * layer.n_out]
                        } else {
                            &mut arg[..0]
                        };
                        for ch in 0..*c {
                            for oh in 0..*ho {
                                for ow in 0..*wo {
                                    let o = (ch * ho + oh) * wo + ow;
                                    let top = (ch * h + oh * s) * w + ow * s;
                                    if *max {
                                        // the first maximum in scan order (PyTorch)
                                        let (mut acc, mut best) = (xi[top], top);
                                        for di in 0..*k {
                                            let row = top + di * w;
                                            for (dj, &v) in xi[row..row + k].iter().enumerate() {
                                                if v > acc {
                                                    acc = v;
                                                    best = row + dj;
                                                }
                                            }
                                        }
                                        yi[o] = acc;
                                        ai[o] = best as u32;
                                    } else {
                                        let mut acc = T::default();
                                        for di in 0..*k {
                                            let row = top + di * w;
                                            for &v in &xi[row..row + k] {
                                                acc += v;
                                            }
                                        }
                                        yi[o] = acc * inv;
                                    }
                                }
                            }
                        }
                    }
                }
                NOp::Same => y.copy_from_slice(x),
                NOp::Act(a) => match a {
                    Activation::Relu => y
                        .iter_mut()
                        .zip(x.iter())
                        .for_each(|(o, v)| *o = if *v > T::default() { *v } else { T::default() }),
                    Activation::Identity => y.copy_from_slice(x),
                    a => y
                        .iter_mut()
                        .zip(x.iter())
                        .for_each(|(o, v)| *o = T::of(a.value(v.f64()))),
                },
                NOp::LayerNorm {
                    w,
                    b: beta,
                    d,
                    eps,
                    rows,
                } => {
                    let xh = &mut ws.aux[l];
                    xh.clear();
                    xh.resize(b * layer.n_in, T::default());
                    let inv = &mut ws.inv[l];
                    inv.clear();
                    inv.resize(b * rows, T::default());
                    for (r, ((xr, hr), yr)) in x
                        .chunks_exact(*d)
                        .zip(xh.chunks_exact_mut(*d))
                        .zip(y.chunks_exact_mut(*d))
                        .enumerate()
                    {
                        let mean = xr.iter().map(|v| v.f64()).sum::<f64>() / *d as f64;
                        let var =
                            xr.iter().map(|v| (v.f64() - mean).powi(2)).sum::<f64>() / *d as f64;
                        let s = 1.0 / (var + eps).sqrt();
                        inv[r] = T::of(s);
                        for j in 0..*d {
                            let h = T::of((xr[j].f64() - mean) * s);
                            hr[j] = h;
                            yr[j] = h * w[j] + beta[j];
                        }
                    }
                }
                NOp::BatchNorm {
                    w,
                    b: beta,
                    mean,
                    inv,
                    c,
                    hw,
                } => {
                    for (xe, ye) in x
                        .chunks_exact(layer.n_in)
                        .zip(y.chunks_exact_mut(layer.n_in))
                    {
                        for ch in 0..*c {
                            let (m, s, g, bb) = (mean[ch], inv[ch], w[ch], beta[ch]);
                            for (o, v) in ye[ch * hw..(ch + 1) * hw]
                                .iter_mut()
                                .zip(&xe[ch * hw..(ch + 1) * hw])
                            {
                                *o = (*v - m) * s * g + bb;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The model output of the last forward pass (B × n_out).
    pub fn output<'a>(&self, ws: &'a SeqWorkspace<T>) -> &'a [T] {
        &ws.acts[self.layers.len()]
    }

    /// Back-propagates the output signal in `ws.deltas[L-1]` down to the first layer with
    /// parameters, or to the network input (into `ws.d_input`) when `to_input`.
    pub fn backward(&self, ws: &mut SeqWorkspace<T>, to_input: bool) {
        let b = ws.rows;
        for l in (0..self.layers.len()).rev() {
            // the signal below layer l is needed by a layer with parameters below it, or asked
            if !(l > self.first_param || to_input) {
                break;
            }
            let layer = &self.layers[l];
            let mut dx = if l == 0 {
                std::mem::take(&mut ws.d_input)
            } else {
                std::mem::take(&mut ws.deltas[l - 1])
            };
            dx.resize(b * layer.n_in, T::default());
            if matches!(layer.op, NOp::Conv { .. } | NOp::Pool { .. }) {
                // these scatter-add into the input gradient; the others overwrite it
                dx.fill(T::default());
            }
            let dy = &ws.deltas[l];
            let x = &ws.acts[l];
            let y = &ws.acts[l + 1];
            match &layer.op {
                NOp::Linear {
                    w, inp, out, rows, ..
                } => gemm(
                    rm_mut(&mut dx, b * rows, *inp),
                    Accum::Replace,
                    rm(dy, b * rows, *out),
                    rm(w, *out, *inp),
                ),
                NOp::Conv { w, g, .. } => {
                    // per example: dPᵢ = Wᵀ Δᵢ (K×L, stays in cache), then col2im
                    let (k, ll) = (g.k(), g.l());
                    let dp = &mut ws.scratch;
                    dp.resize(k * ll, T::default());
                    for (di, dxi) in dy
                        .chunks_exact(layer.n_out)
                        .zip(dx.chunks_exact_mut(layer.n_in))
                    {
                        gemm(
                            rm_mut(dp, k, ll),
                            Accum::Replace,
                            rm(w, g.cout, k).transpose(),
                            rm(di, g.cout, ll),
                        );
                        g.col2im(dp, dxi, ll, 0);
                    }
                }
                NOp::Pool {
                    max,
                    c,
                    h,
                    w,
                    k,
                    s,
                    ho,
                    wo,
                } => {
                    if *max {
                        let arg = &ws.arg[l];
                        for i in 0..b {
                            let dxi = &mut dx[i * layer.n_in..(i + 1) * layer.n_in];
                            for o in 0..layer.n_out {
                                dxi[arg[i * layer.n_out + o] as usize] += dy[i * layer.n_out + o];
                            }
                        }
                    } else {
                        let inv = T::of(1.0 / (k * k) as f64);
                        for i in 0..b {
                            let dxi = &mut dx[i * layer.n_in..(i + 1) * layer.n_in];
                            for ch in 0..*c {
                                for oh in 0..*ho {
                                    for ow in 0..*wo {
                                        let v =
                                            dy[i * layer.n_out + (ch * ho + oh) * wo + ow] * inv;
                                        for di in 0..*k {
                                            let row = (ch * h + oh * s + di) * w + ow * s;
                                            for dj in 0..*k {
                                                dxi[row + dj] += v;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                NOp::Same => dx.copy_from_slice(dy),
                NOp::Act(a) => match a {
                    Activation::Identity => dx.copy_from_slice(dy),
                    Activation::Relu => {
                        for ((d, g), o) in dx.iter_mut().zip(dy).zip(y) {
                            *d = if *o > T::default() { *g } else { T::default() };
                        }
                    }
                    a => {
                        for (((d, g), z), o) in dx.iter_mut().zip(dy).zip(x).zip(y) {
                            *d = T::of(g.f64() * a.derivative(z.f64(), o.f64()));
                        }
                    }
                },
                NOp::LayerNorm { w, d, .. } => {
                    let xh = &ws.aux[l];
                    let inv = &ws.inv[l];
                    let dn = *d as f64;
                    for (r, ((dr, gr), hr)) in dx
                        .chunks_exact_mut(*d)
                        .zip(dy.chunks_exact(*d))
                        .zip(xh.chunks_exact(*d))
                        .enumerate()
                    {
                        let mut m1 = 0.0;
                        let mut m2 = 0.0;
                        for j in 0..*d {
                            let gj = gr[j].f64() * w[j].f64();
                            m1 += gj;
                            m2 += gj * hr[j].f64();
                        }
                        m1 /= dn;
                        m2 /= dn;
                        let s = inv[r].f64();
                        for j in 0..*d {
                            let gj = gr[j].f64() * w[j].f64();
                            dr[j] = T::of(s * (gj - m1 - hr[j].f64() * m2));
                        }
                    }
                }
                NOp::BatchNorm { w, inv, c, hw, .. } => {
                    for (de, ge) in dx
                        .chunks_exact_mut(layer.n_in)
                        .zip(dy.chunks_exact(layer.n_in))
                    {
                        for ch in 0..*c {
                            let f = w[ch] * inv[ch];
                            for (d, g) in de[ch * hw..(ch + 1) * hw]
                                .iter_mut()
                                .zip(&ge[ch * hw..(ch + 1) * hw])
                            {
                                *d = *g * f;
                            }
                        }
                    }
                }
            }
            if l == 0 {
                ws.d_input = dx;
            } else {
                ws.deltas[l - 1] = dx;
            }
        }
    }

    /// Example `i`'s gradient of layer `l`'s parameters (weight, then bias) into `g` (length
    /// `np`), from the last forward and backward pass.
    pub fn example_grad(&self, ws: &SeqWorkspace<T>, l: usize, i: usize, g: &mut [T]) {
        let layer = &self.layers[l];
        let dy = &ws.deltas[l][i * layer.n_out..(i + 1) * layer.n_out];
        let x = &ws.acts[l][i * layer.n_in..(i + 1) * layer.n_in];
        match &layer.op {
            NOp::Linear {
                b, inp, out, rows, ..
            } => {
                let (gw, gb) = g.split_at_mut(inp * out);
                gemm(
                    rm_mut(gw, *out, *inp),
                    Accum::Replace,
                    rm(dy, *rows, *out).transpose(),
                    rm(x, *rows, *inp),
                );
                if b.is_some() {
                    gb.fill(T::default());
                    for r in dy.chunks_exact(*out) {
                        gb.iter_mut().zip(r).for_each(|(a, v)| *a += *v);
                    }
                }
            }
            NOp::Conv { b, g: geo, .. } => {
                let (k, ll) = (geo.k(), geo.l());
                let p = rm(&ws.aux[l][i * k * ll..(i + 1) * k * ll], k, ll);
                let (gw, gb) = g.split_at_mut(geo.cout * k);
                gemm(
                    rm_mut(gw, geo.cout, k),
                    Accum::Replace,
                    rm(dy, geo.cout, ll),
                    p.transpose(),
                );
                if b.is_some() {
                    for (a, r) in gb.iter_mut().zip(dy.chunks_exact(ll)) {
                        *a = r.iter().fold(T::default(), |s, v| s + *v);
                    }
                }
            }
            NOp::LayerNorm { d, .. } => {
                let xh = &ws.aux[l][i * layer.n_in..(i + 1) * layer.n_in];
                let (gw, gb) = g.split_at_mut(*d);
                gw.fill(T::default());
                gb.fill(T::default());
                for (r, h) in dy.chunks_exact(*d).zip(xh.chunks_exact(*d)) {
                    for j in 0..*d {
                        gw[j] += r[j] * h[j];
                        gb[j] += r[j];
                    }
                }
            }
            NOp::BatchNorm {
                mean, inv, c, hw, ..
            } => {
                let (gw, gb) = g.split_at_mut(*c);
                for ch in 0..*c {
                    let (m, s) = (mean[ch], inv[ch]);
                    let mut sw = T::default();
                    let mut sb = T::default();
                    for (d, v) in dy[ch * hw..(ch + 1) * hw]
                        .iter()
                        .zip(&x[ch * hw..(ch + 1) * hw])
                    {
                        sw += *d * (*v - m) * s;
                        sb += *d;
                    }
                    gw[ch] = sw;
                    gb[ch] = sb;
                }
            }
            NOp::Pool { .. } | NOp::Same | NOp::Act(_) => {}
        }
    }

    /// Layer `l`'s Σᵢ gᵢ∘gᵢ over the batch, added into `acc` (the layer's `np` entries, f64).
    /// A Linear layer used once per example takes the one-matmul route (Δ∘Δ)ᵀ(X∘X).
    pub fn add_sum_sq(
        &self,
        ws: &SeqWorkspace<T>,
        l: usize,
        acc: &mut [f64],
        scratch: &mut Vec<T>,
        scratch2: &mut Vec<T>,
        prod: &mut Vec<T>,
    ) {
        let layer = &self.layers[l];
        let b = ws.rows;
        if let NOp::Linear {
            b: bias,
            inp,
            out,
            rows: 1,
            ..
        } = &layer.op
        {
            let x = &ws.acts[l];
            let dy = &ws.deltas[l];
            scratch.clear();
            scratch.extend(x.iter().map(|v| *v * *v));
            scratch2.clear();
            scratch2.extend(dy.iter().map(|v| *v * *v));
            prod.resize(inp * out, T::default());
            gemm(
                rm_mut(prod, *out, *inp),
                Accum::Replace,
                rm(scratch2, b, *out).transpose(),
                rm(scratch, b, *inp),
            );
            acc[..inp * out]
                .iter_mut()
                .zip(prod.iter())
                .for_each(|(a, v)| *a += v.f64());
            if bias.is_some() {
                let accb = &mut acc[inp * out..inp * out + out];
                for r in scratch2.chunks_exact(*out) {
                    accb.iter_mut().zip(r).for_each(|(a, v)| *a += v.f64());
                }
            }
            return;
        }
        scratch.clear();
        scratch.resize(layer.np, T::default());
        for i in 0..b {
            self.example_grad(ws, l, i, scratch);
            T::add_squares(acc, scratch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_probe_finds_nan_anywhere_and_ignores_infinities() {
        let mut v = vec![1.0f32; 37];
        assert!(!has_nan(&v));
        v[36] = f32::INFINITY;
        assert!(!has_nan(&v));
        for k in [0, 5, 33, 36] {
            let mut w = vec![0.5f64; 37];
            w[k] = f64::NAN;
            assert!(has_nan(&w), "{k}");
        }
    }

    #[test]
    fn im2col_and_col2im_are_adjoint() {
        // ⟨im2col(x), p⟩ = ⟨x, col2im(p)⟩ for strides, padding and dilation
        for (sw, pw, dw) in [(1, 0, 1), (2, 1, 1), (1, 2, 2), (3, 0, 1)] {
            let g = ConvGeom {
                cin: 2,
                cout: 1,
                h: 5,
                w: 7,
                kh: 3,
                kw: 2,
                sh: sw,
                sw,
                ph: pw,
                pw,
                dh: dw,
                dw,
                ho: (5 + 2 * pw - dw * 2 - 1) / sw + 1,
                wo: (7 + 2 * pw - dw - 1) / sw + 1,
            };
            let x: Vec<f64> = (0..70).map(|i| ((i * 37) % 11) as f64 - 5.0).collect();
            let n = g.k() * g.l();
            let q: Vec<f64> = (0..n).map(|i| ((i * 13) % 7) as f64 - 3.0).collect();
            let mut p = vec![0.0; n];
            g.im2col(&x, &mut p, g.l(), 0);
            let mut dx = vec![0.0; 70];
            g.col2im(&q, &mut dx, g.l(), 0);
            let a: f64 = p.iter().zip(&q).map(|(a, b)| a * b).sum();
            let b: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
            assert!((a - b).abs() < 1e-9, "{sw} {pw} {dw}: {a} vs {b}");
        }
    }
}
