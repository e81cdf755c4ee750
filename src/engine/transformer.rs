//! The native transformer engine: per-example gradients of a [`Transformer`] (pre-LN encoder
//! classifier) from one native batched forward and backward pass per batch, without candle's
//! autograd.
//!
//! The Linear layers run as one matmul over all B·T positions of a batch; attention per example
//! and head. The pass keeps each layer's input rows X (T per example) and output signals Δ, so
//! example i's gradient is Δᵢᵀ Xᵢ for every Linear (one T-row matmul), Σₜ δ∘x̂ for the norms, the
//! signals of its positions for the position table and, scattered by token id, for the token
//! table. Memory per worker: one batch of activations (B·T·(9d + 2·hidden) + B·H·T² values per
//! block) and an O(P) accumulator.

use candle_core::{DType, Tensor};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::batch::{rayon_threads, Batch, FactoredOptions, Rows, Target};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::likelihood::Likelihood;
use crate::model::{Transformer, TransformerConfig};
use crate::qoi::Qoi;
use crate::scalar::Scalar;

/// Columns `off .. off + w` of the rows (stride `stride`) of `src` into `dst` (rows × w).
fn gather<T: Copy>(src: &[T], stride: usize, off: usize, w: usize, dst: &mut [T]) {
    for (r, row) in dst.chunks_exact_mut(w).enumerate() {
        row.copy_from_slice(&src[r * stride + off..r * stride + off + w]);
    }
}

/// The rows of `src` (width w) into columns `off .. off + w` of the rows of `dst` (stride).
fn scatter<T: Copy>(src: &[T], w: usize, dst: &mut [T], stride: usize, off: usize) {
    for (r, row) in src.chunks_exact(w).enumerate() {
        dst[r * stride + off..r * stride + off + w].copy_from_slice(row);
    }
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

/// A Linear layer: W (out × in), b (out), and the offset of W in the flat layout (b follows).
#[derive(Debug, Clone)]
struct Lin<T> {
    w: Vec<T>,
    b: Vec<T>,
    inp: usize,
    out: usize,
    off: usize,
}

/// A layer norm: γ, β and the offset of γ (β follows).
#[derive(Debug, Clone)]
struct Ln<T> {
    g: Vec<T>,
    b: Vec<T>,
    off: usize,
}

#[derive(Debug, Clone)]
struct NBlock<T> {
    ln1: Ln<T>,
    qkv: Lin<T>,
    proj: Lin<T>,
    ln2: Ln<T>,
    fc1: Lin<T>,
    fc2: Lin<T>,
}

#[derive(Debug, Clone)]
struct Native<T> {
    cfg: TransformerConfig,
    emb: Vec<T>,
    pos: Vec<T>,
    blocks: Vec<NBlock<T>>,
    lnf: Ln<T>,
    head: Lin<T>,
    p: usize,
}

/// One block's saved values for a batch.
#[derive(Debug, Default)]
struct BlockWs<T> {
    xh1: Vec<T>,
    inv1: Vec<T>,
    a: Vec<T>,
    qkv: Vec<T>,
    att: Vec<T>,
    o: Vec<T>,
    xh2: Vec<T>,
    inv2: Vec<T>,
    c: Vec<T>,
    /// fc1's output z, overwritten by gelu'(z) once u = gelu(z) is computed.
    z: Vec<T>,
    u: Vec<T>,
    // signals (∂u/∂ output of each Linear; for the norms ∂u/∂ their output)
    d_fc2: Vec<T>,
    d_fc1: Vec<T>,
    d_ln2: Vec<T>,
    d_proj: Vec<T>,
    d_qkv: Vec<T>,
    d_ln1: Vec<T>,
}

#[derive(Debug, Default)]
struct Ws<T> {
    ids: Vec<usize>,
    b: usize,
    t: usize,
    x: Vec<T>,
    blocks: Vec<BlockWs<T>>,
    xhf: Vec<T>,
    invf: Vec<T>,
    g: Vec<T>,
    out: Vec<T>,
    d_out: Vec<T>,
    d_lnf: Vec<T>,
    d_x0: Vec<T>,
    tmp: Vec<T>,
    tmp2: Vec<T>,
}

fn copy_vec<T: Scalar>(t: &Tensor, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    super::batch::copy_rows(&t.flatten_all()?, &mut v, what, 0)?;
    Ok(v)
}

/// y = x̂∘γ + β per row of width d; keeps x̂ and 1/σ (mean and variance summed in f64).
fn ln_forward<T: Scalar>(
    x: &[T],
    d: usize,
    eps: f64,
    ln: &Ln<T>,
    xh: &mut Vec<T>,
    inv: &mut Vec<T>,
    y: &mut Vec<T>,
) {
    let rows = x.len() / d;
    xh.resize(x.len(), T::default());
    y.resize(x.len(), T::default());
    inv.resize(rows, T::default());
    for (((xr, hr), yr), iv) in x
        .chunks_exact(d)
        .zip(xh.chunks_exact_mut(d))
        .zip(y.chunks_exact_mut(d))
        .zip(inv.iter_mut())
    {
        let mean = xr.iter().map(|v| v.f64()).sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v.f64() - mean).powi(2)).sum::<f64>() / d as f64;
        let (m, s) = (T::of(mean), T::of(1.0 / (var + eps).sqrt()));
        *iv = s;
        for ((h, o), (v, (g, b))) in hr
            .iter_mut()
            .zip(yr.iter_mut())
            .zip(xr.iter().zip(ln.g.iter().zip(&ln.b)))
        {
            *h = (*v - m) * s;
            *o = *h * *g + *b;
        }
    }
}

/// dx += ∂/∂x of a layer norm given dy (its output signal).
fn ln_backward<T: Scalar>(dy: &[T], d: usize, ln: &Ln<T>, xh: &[T], inv: &[T], dx: &mut [T]) {
    let dn = T::of(1.0 / d as f64);
    for (((g, h), s), out) in dy
        .chunks_exact(d)
        .zip(xh.chunks_exact(d))
        .zip(inv)
        .zip(dx.chunks_exact_mut(d))
    {
        let (mut m1, mut m2) = (T::default(), T::default());
        for ((gj, hj), wj) in g.iter().zip(h).zip(&ln.g) {
            let a = *gj * *wj;
            m1 += a;
            m2 += a * *hj;
        }
        let (m1, m2) = (m1 * dn, m2 * dn);
        for (((o, gj), hj), wj) in out.iter_mut().zip(g).zip(h).zip(&ln.g) {
            *o += *s * (*gj * *wj - m1 - *hj * m2);
        }
    }
}

/// y = x Wᵀ + b over all rows.
fn lin_forward<T: Scalar>(x: &[T], l: &Lin<T>, y: &mut Vec<T>) {
    let rows = x.len() / l.inp;
    y.resize(rows * l.out, T::default());
    gemm(
        rm_mut(y, rows, l.out),
        Accum::Replace,
        rm(x, rows, l.inp),
        rm(&l.w, l.out, l.inp).transpose(),
    );
    for row in y.chunks_exact_mut(l.out) {
        row.iter_mut().zip(&l.b).for_each(|(v, c)| *v += *c);
    }
}

/// dx = dy W (overwrites).
fn lin_backward<T: Scalar>(dy: &[T], l: &Lin<T>, dx: &mut Vec<T>) {
    let rows = dy.len() / l.out;
    dx.resize(rows * l.inp, T::default());
    gemm(
        rm_mut(dx, rows, l.inp),
        Accum::Replace,
        rm(dy, rows, l.out),
        rm(&l.w, l.out, l.inp),
    );
}

impl<T: Scalar> Native<T> {
    fn from_model(m: &Transformer) -> Result<Self> {
        let cfg = *m.config();
        let mut off = 0usize;
        let mut offs = std::collections::HashMap::new();
        for (name, shape) in cfg.param_shapes() {
            offs.insert(name, off);
            off += shape.iter().product::<usize>();
        }
        let v = |name: &str| -> Result<Vec<T>> { copy_vec(&m.tensor(name)?, name) };
        let off_of = |name: String| -> Result<usize> {
            offs.get(&name)
                .copied()
                .ok_or_else(|| Error::Parameter(format!("no parameter '{name}' in the layout")))
        };
        let lin = |name: &str, inp: usize, out: usize| -> Result<Lin<T>> {
            Ok(Lin {
                w: v(&format!("{name}.weight"))?,
                b: v(&format!("{name}.bias"))?,
                inp,
                out,
                off: off_of(format!("{name}.weight"))?,
            })
        };
        let ln = |name: &str| -> Result<Ln<T>> {
            Ok(Ln {
                g: v(&format!("{name}.weight"))?,
                b: v(&format!("{name}.bias"))?,
                off: off_of(format!("{name}.weight"))?,
            })
        };
        let (d, h) = (cfg.d, cfg.hidden);
        let blocks = (0..cfg.layers)
            .map(|i| {
                let p = |n: &str| format!("blocks.{i}.{n}");
                Ok(NBlock {
                    ln1: ln(&p("ln1"))?,
                    qkv: lin(&p("qkv"), d, 3 * d)?,
                    proj: lin(&p("proj"), d, d)?,
                    ln2: ln(&p("ln2"))?,
                    fc1: lin(&p("fc1"), d, h)?,
                    fc2: lin(&p("fc2"), h, d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            emb: v("emb.weight")?,
            pos: v("pos.weight")?,
            blocks,
            lnf: ln("ln_f")?,
            head: lin("head", d, cfg.classes)?,
            p: off,
            cfg,
        })
    }

    /// Token ids of a batch, checked to be integers in 0..V; T' ≤ max_len columns.
    fn read_ids(&self, x: Rows<'_>, ws: &mut Ws<T>, first_row: usize) -> Result<()> {
        let (b, t) = x.dims();
        if t == 0 || t > self.cfg.max_len {
            return Err(Error::shape(
                "token ids (positions per example)",
                format!("1..={}", self.cfg.max_len),
                t,
            ));
        }
        let mut raw: Vec<f64> = Vec::new();
        match x {
            // integer tensors: through f64 (ids are far below 2^53)
            Rows::Tensor(tt) if !tt.dtype().is_float() => {
                raw = tt.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            }
            _ => x.copy_into(&mut raw, "token ids", first_row)?,
        }
        ws.ids.clear();
        for (k, v) in raw.iter().enumerate() {
            if v.fract() != 0.0 || *v < 0.0 || *v >= self.cfg.vocab as f64 {
                return Err(Error::invalid(
                    format!("token id (row {}, position {})", first_row + k / t, k % t),
                    v,
                    format!("must be an integer in 0..{}", self.cfg.vocab),
                ));
            }
            ws.ids.push(*v as usize);
        }
        ws.b = b;
        ws.t = t;
        Ok(())
    }

    fn forward(&self, ws: &mut Ws<T>) {
        let (b, t, d) = (ws.b, ws.t, self.cfg.d);
        let (heads, hd) = (self.cfg.heads, self.cfg.d / self.cfg.heads);
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = self.cfg.eps;
        ws.x.resize(b * t * d, T::default());
        for (r, &id) in ws.ids.iter().enumerate() {
            let p = r % t;
            for j in 0..d {
                ws.x[r * d + j] = self.emb[id * d + j] + self.pos[p * d + j];
            }
        }
        ws.blocks.resize_with(self.blocks.len(), BlockWs::default);
        for (blk, bw) in self.blocks.iter().zip(ws.blocks.iter_mut()) {
            ln_forward(
                &ws.x,
                d,
                eps,
                &blk.ln1,
                &mut bw.xh1,
                &mut bw.inv1,
                &mut bw.a,
            );
            lin_forward(&bw.a, &blk.qkv, &mut bw.qkv);
            // attention per example and head: P = softmax(Q Kᵀ·s), O = P V
            bw.att.resize(b * heads * t * t, T::default());
            bw.o.resize(b * t * d, T::default());
            // (faer 0.24's matmul writes past a strided destination view, measured with
            // valgrind: every operand here is gathered into a contiguous t×hd buffer)
            let mut qh = vec![T::default(); t * hd];
            let mut kh = vec![T::default(); t * hd];
            let mut vh = vec![T::default(); t * hd];
            let mut oh = vec![T::default(); t * hd];
            for i in 0..b {
                let q_rows = &bw.qkv[i * t * 3 * d..(i + 1) * t * 3 * d];
                for h in 0..heads {
                    gather(q_rows, 3 * d, h * hd, hd, &mut qh);
                    gather(q_rows, 3 * d, d + h * hd, hd, &mut kh);
                    gather(q_rows, 3 * d, 2 * d + h * hd, hd, &mut vh);
                    let pa = &mut bw.att[(i * heads + h) * t * t..(i * heads + h + 1) * t * t];
                    matmul(
                        rm_mut(pa, t, t),
                        Accum::Replace,
                        rm(&qh, t, hd),
                        rm(&kh, t, hd).transpose(),
                        T::of(scale),
                        Par::Seq,
                    );
                    // softmax per row: the exponentials in one pass (vectorises), then the sum
                    for row in pa.chunks_exact_mut(t) {
                        let m = row.iter().fold(row[0], |a, v| if *v > a { *v } else { a });
                        T::exp_shift(row, m);
                        let s = row.iter().fold(T::default(), |a, v| a + *v);
                        let inv = T::of(1.0) / s;
                        row.iter_mut().for_each(|v| *v *= inv);
                    }
                    gemm(
                        rm_mut(&mut oh, t, hd),
                        Accum::Replace,
                        rm(pa, t, t),
                        rm(&vh, t, hd),
                    );
                    scatter(&oh, hd, &mut bw.o[i * t * d..(i + 1) * t * d], d, h * hd);
                }
            }
            lin_forward(&bw.o, &blk.proj, &mut ws.tmp);
            ws.x.iter_mut().zip(&ws.tmp).for_each(|(x, y)| *x += *y);
            ln_forward(
                &ws.x,
                d,
                eps,
                &blk.ln2,
                &mut bw.xh2,
                &mut bw.inv2,
                &mut bw.c,
            );
            lin_forward(&bw.c, &blk.fc1, &mut bw.z);
            // GELU in the model's precision, u = z·Φ(z); z is replaced by gelu'(z) = Φ(z) + z·φ(z)
            // for the backward pass (one erf and one exp per entry)
            bw.u.resize(bw.z.len(), T::default());
            T::gelu_slice(&mut bw.z, &mut bw.u);
            lin_forward(&bw.u, &blk.fc2, &mut ws.tmp);
            ws.x.iter_mut().zip(&ws.tmp).for_each(|(x, y)| *x += *y);
        }
        let mut f = std::mem::take(&mut ws.tmp);
        ln_forward(&ws.x, d, eps, &self.lnf, &mut ws.xhf, &mut ws.invf, &mut f);
        ws.g.clear();
        ws.g.resize(b * d, T::default());
        let inv_t = T::of(1.0 / t as f64);
        for i in 0..b {
            for p in 0..t {
                let r = i * t + p;
                for j in 0..d {
                    ws.g[i * d + j] += f[r * d + j] * inv_t;
                }
            }
        }
        ws.tmp = f;
        lin_forward(&ws.g, &self.head, &mut ws.out);
    }

    /// Back-propagates `ws.d_out` (B × C) through the network, filling every signal.
    fn backward(&self, ws: &mut Ws<T>) {
        let (b, t, d) = (ws.b, ws.t, self.cfg.d);
        let (heads, hd) = (self.cfg.heads, self.cfg.d / self.cfg.heads);
        let scale = T::of(1.0 / (hd as f64).sqrt());
        // head and mean over positions: ∂/∂(ln_f output) = (δ_out W_head)/T at every position
        lin_backward(&ws.d_out, &self.head, &mut ws.tmp2);
        let inv_t = T::of(1.0 / t as f64);
        ws.d_lnf.resize(b * t * d, T::default());
        for i in 0..b {
            for p in 0..t {
                for j in 0..d {
                    ws.d_lnf[(i * t + p) * d + j] = ws.tmp2[i * d + j] * inv_t;
                }
            }
        }
        // dx: ∂/∂(residual stream)
        let mut dx = std::mem::take(&mut ws.d_x0);
        dx.clear();
        dx.resize(b * t * d, T::default());
        ln_backward(&ws.d_lnf, d, &self.lnf, &ws.xhf, &ws.invf, &mut dx);
        for (blk, bw) in self.blocks.iter().zip(ws.blocks.iter_mut()).rev() {
            // x_out = x1 + fc2(gelu(fc1(ln2(x1))))
            bw.d_fc2.clear();
            bw.d_fc2.extend_from_slice(&dx);
            lin_backward(&bw.d_fc2, &blk.fc2, &mut ws.tmp);
            bw.d_fc1.resize(ws.tmp.len(), T::default());
            // bw.z holds gelu'(z) (forward pass)
            for ((g, du), dz) in bw.d_fc1.iter_mut().zip(&ws.tmp).zip(&bw.z) {
                *g = *du * *dz;
            }
            lin_backward(&bw.d_fc1, &blk.fc1, &mut ws.tmp);
            bw.d_ln2.clear();
            bw.d_ln2.extend_from_slice(&ws.tmp);
            ln_backward(&bw.d_ln2, d, &blk.ln2, &bw.xh2, &bw.inv2, &mut dx);
            // x1 = x + proj(attention(qkv(ln1(x))))
            bw.d_proj.clear();
            bw.d_proj.extend_from_slice(&dx);
            lin_backward(&bw.d_proj, &blk.proj, &mut ws.tmp); // δo (B·T × d)
            bw.d_qkv.clear();
            bw.d_qkv.resize(b * t * 3 * d, T::default());
            ws.tmp2.resize(t * t, T::default());
            let buf = || vec![T::default(); t * hd];
            let (mut qh, mut kh, mut vh, mut doh, mut out) = (buf(), buf(), buf(), buf(), buf());
            for i in 0..b {
                let qkv_i = &bw.qkv[i * t * 3 * d..(i + 1) * t * 3 * d];
                let do_i = &ws.tmp[i * t * d..(i + 1) * t * d];
                for h in 0..heads {
                    gather(qkv_i, 3 * d, h * hd, hd, &mut qh);
                    gather(qkv_i, 3 * d, d + h * hd, hd, &mut kh);
                    gather(qkv_i, 3 * d, 2 * d + h * hd, hd, &mut vh);
                    gather(do_i, d, h * hd, hd, &mut doh);
                    let pa = &bw.att[(i * heads + h) * t * t..(i * heads + h + 1) * t * t];
                    let dq_i = &mut bw.d_qkv[i * t * 3 * d..(i + 1) * t * 3 * d];
                    // δV = Pᵀ δO
                    gemm(
                        rm_mut(&mut out, t, hd),
                        Accum::Replace,
                        rm(pa, t, t).transpose(),
                        rm(&doh, t, hd),
                    );
                    scatter(&out, hd, dq_i, 3 * d, 2 * d + h * hd);
                    // δP = δO Vᵀ, then δS = P∘(δP − rowsum(δP∘P))·scale
                    let ds = &mut ws.tmp2;
                    gemm(
                        rm_mut(ds, t, t),
                        Accum::Replace,
                        rm(&doh, t, hd),
                        rm(&vh, t, hd).transpose(),
                    );
                    for (drow, prow) in ds.chunks_exact_mut(t).zip(pa.chunks_exact(t)) {
                        let dot: f64 = drow.iter().zip(prow).map(|(a, p)| a.f64() * p.f64()).sum();
                        let dot = T::of(dot);
                        for (dv, p) in drow.iter_mut().zip(prow) {
                            *dv = *p * (*dv - dot) * scale;
                        }
                    }
                    // δQ = δS K, δK = δSᵀ Q
                    gemm(
                        rm_mut(&mut out, t, hd),
                        Accum::Replace,
                        rm(ds, t, t),
                        rm(&kh, t, hd),
                    );
                    scatter(&out, hd, dq_i, 3 * d, h * hd);
                    gemm(
                        rm_mut(&mut out, t, hd),
                        Accum::Replace,
                        rm(ds, t, t).transpose(),
                        rm(&qh, t, hd),
                    );
                    scatter(&out, hd, dq_i, 3 * d, d + h * hd);
                }
            }
            lin_backward(&bw.d_qkv, &blk.qkv, &mut ws.tmp);
            bw.d_ln1.clear();
            bw.d_ln1.extend_from_slice(&ws.tmp);
            ln_backward(&bw.d_ln1, d, &blk.ln1, &bw.xh1, &bw.inv1, &mut dx);
        }
        ws.d_x0 = dx;
    }

    /// Example i's gradient, layer by layer: `f(offset, values)` for every dense part (Linear
    /// weights and biases, norms, the position table's first T' rows) and `emb(token, row)` for
    /// each distinct token's row of the token table. `g` is scratch.
    fn example_grad(
        &self,
        ws: &Ws<T>,
        i: usize,
        g: &mut Vec<T>,
        f: &mut dyn FnMut(usize, &[T]),
        emb: &mut dyn FnMut(usize, &[T]),
    ) {
        let (t, d) = (ws.t, self.cfg.d);
        let rows = |w: usize| i * t * w..(i + 1) * t * w;
        // embeddings: the position rows 0..t, and the token rows summed per distinct id
        let dx0 = &ws.d_x0[rows(d)];
        let ids = &ws.ids[i * t..(i + 1) * t];
        let emb_len = self.cfg.vocab * d;
        f(emb_len, dx0);
        let mut order: Vec<usize> = (0..t).collect();
        order.sort_by_key(|&p| ids[p]);
        let mut k = 0;
        let mut row = vec![T::default(); d];
        while k < t {
            let v = ids[order[k]];
            row.fill(T::default());
            while k < t && ids[order[k]] == v {
                let p = order[k];
                row.iter_mut()
                    .zip(&dx0[p * d..(p + 1) * d])
                    .for_each(|(a, x)| *a += *x);
                k += 1;
            }
            emb(v, &row);
        }
        let h = self.cfg.hidden;
        for (blk, bw) in self.blocks.iter().zip(&ws.blocks) {
            let r1 = rows(d);
            ln_grad(
                &blk.ln1,
                &bw.xh1[r1.clone()],
                &bw.d_ln1[r1.clone()],
                d,
                g,
                f,
            );
            lin_grad(&blk.qkv, &bw.a[r1.clone()], &bw.d_qkv[rows(3 * d)], t, g, f);
            lin_grad(
                &blk.proj,
                &bw.o[r1.clone()],
                &bw.d_proj[r1.clone()],
                t,
                g,
                f,
            );
            ln_grad(
                &blk.ln2,
                &bw.xh2[r1.clone()],
                &bw.d_ln2[r1.clone()],
                d,
                g,
                f,
            );
            lin_grad(&blk.fc1, &bw.c[r1.clone()], &bw.d_fc1[rows(h)], t, g, f);
            lin_grad(&blk.fc2, &bw.u[rows(h)], &bw.d_fc2[r1.clone()], t, g, f);
        }
        let r1 = rows(d);
        ln_grad(&self.lnf, &ws.xhf[r1.clone()], &ws.d_lnf[r1], d, g, f);
        let c = self.cfg.classes;
        lin_grad(
            &self.head,
            &ws.g[i * d..(i + 1) * d],
            &ws.d_out[i * c..(i + 1) * c],
            1,
            g,
            f,
        );
    }
}

/// A Linear layer's gradient over n rows, Δᵀ X and Σ δ, handed to `f` at the layer's offset.
fn lin_grad<T: Scalar>(
    l: &Lin<T>,
    x: &[T],
    dy: &[T],
    n: usize,
    g: &mut Vec<T>,
    f: &mut dyn FnMut(usize, &[T]),
) {
    g.resize(l.out * l.inp + l.out, T::default());
    let (gw, gb) = g.split_at_mut(l.out * l.inp);
    gemm(
        rm_mut(gw, l.out, l.inp),
        Accum::Replace,
        rm(dy, n, l.out).transpose(),
        rm(x, n, l.inp),
    );
    gb.fill(T::default());
    for r in dy.chunks_exact(l.out) {
        gb.iter_mut().zip(r).for_each(|(a, v)| *a += *v);
    }
    f(l.off, g);
}

/// A layer norm's gradient, Σ δ∘x̂ and Σ δ, handed to `f` at its offset.
fn ln_grad<T: Scalar>(
    ln: &Ln<T>,
    xh: &[T],
    dy: &[T],
    d: usize,
    g: &mut Vec<T>,
    f: &mut dyn FnMut(usize, &[T]),
) {
    g.resize(2 * d, T::default());
    g.fill(T::default());
    let (gg, gb) = g.split_at_mut(d);
    for (r, h) in dy.chunks_exact(d).zip(xh.chunks_exact(d)) {
        for j in 0..d {
            gg[j] += r[j] * h[j];
            gb[j] += r[j];
        }
    }
    f(ln.off, g);
}

#[derive(Debug, Clone)]
enum Inner {
    F32(Native<f32>),
    F64(Native<f64>),
}

macro_rules! dispatch {
    ($self:expr, $m:ident => $body:expr) => {
        match &$self.inner {
            Inner::F32($m) => $body,
            Inner::F64($m) => $body,
        }
    };
}

/// The native engine for a [`Transformer`]: a snapshot of its weights in the model's precision
/// (f64 for f64 models, f32 otherwise). Inputs are token ids (B, T'), T' ≤ max_len, as integers
/// (int64 `.npy` files, or float tensors holding integers).
///
/// Its flat parameter layout is the model's state-dict order ([`Transformer::param_names`]).
#[derive(Debug, Clone)]
pub struct FactoredTransformer {
    inner: Inner,
}

impl FactoredTransformer {
    /// Snapshots the model's weights.
    pub fn new(model: &Transformer) -> Result<Self> {
        let dtype = model
            .named_tensors()
            .first()
            .map(|(_, t)| t.dtype())
            .unwrap_or(DType::F32);
        Ok(Self {
            inner: match dtype {
                DType::F64 => Inner::F64(Native::from_model(model)?),
                _ => Inner::F32(Native::from_model(model)?),
            },
        })
    }

    /// P.
    pub fn num_params(&self) -> usize {
        dispatch!(self, m => m.p)
    }

    fn pool<R: Send>(opts: &FactoredOptions, f: impl FnOnce() -> R + Send) -> Result<R> {
        super::batch::run_in_pool(opts, f)
    }

    fn pass<T: Scalar>(
        m: &Native<T>,
        ws: &mut Ws<T>,
        x: Rows<'_>,
        target: Target<'_>,
        first_row: usize,
    ) -> Result<Vec<f64>> {
        m.read_ids(x, ws, first_row)?;
        m.forward(ws);
        let (values, signal) = target.signal(&ws.out, ws.b, m.cfg.classes, first_row)?;
        ws.d_out.clear();
        ws.d_out.extend(signal.iter().map(|v| T::of(*v)));
        m.backward(ws);
        Ok(values)
    }

    /// Σᵢ gᵢ∘gᵢ of the log-likelihood over `data` (length P), in f64.
    pub fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        let s = dispatch!(self, m => Self::sum_sq_t(m, lik, data, opts))?;
        crate::error::check_finite("Fisher diagonal sums (transformer engine)", &s)?;
        Ok(s)
    }

    fn sum_sq_t<T: Scalar>(
        m: &Native<T>,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        let n = data.len();
        let p = m.p;
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let threads = rayon_threads(opts);
        let per = starts.len().div_ceil(threads.max(1)).max(1);
        let runs: Vec<&[usize]> = starts.chunks(per).collect();
        let d = m.cfg.d;
        Self::pool(opts, || {
            runs.par_iter()
                .map(|run| {
                    let mut ws = Ws::default();
                    let mut acc = vec![0.0f64; p];
                    let mut g = vec![];
                    for &start in run.iter() {
                        let len = bs.min(n - start);
                        let batch = Batch::load(data, start, len)?;
                        let (x, y) = batch.rows();
                        Self::pass(m, &mut ws, x, Target::Likelihood(lik, y), start)?;
                        drop(batch);
                        data.release(start, len);
                        for i in 0..ws.b {
                            let acc_ref = &mut acc;
                            let mut dense = |off: usize, v: &[T]| {
                                T::add_squares(&mut acc_ref[off..off + v.len()], v);
                            };
                            let mut emb_rows: Vec<(usize, Vec<T>)> = vec![];
                            m.example_grad(&ws, i, &mut g, &mut dense, &mut |v, row| {
                                emb_rows.push((v, row.to_vec()))
                            });
                            for (v, row) in emb_rows {
                                T::add_squares(&mut acc[v * d..(v + 1) * d], &row);
                            }
                        }
                    }
                    Ok::<_, Error>(acc)
                })
                .try_reduce(
                    || vec![0.0; p],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                        Ok(a)
                    },
                )
        })?
    }

    #[allow(clippy::too_many_arguments)]
    fn gradient_block<'d, T: Scalar>(
        m: &Native<T>,
        n: usize,
        opts: &FactoredOptions,
        get: impl Fn(usize, usize) -> Result<Batch<'d>> + Sync,
        lik: Option<&Likelihood>,
        qoi: Option<&Qoi>,
        offset: usize,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        let p = m.p;
        let d = m.cfg.d;
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let mut out = Mat::<f64>::zeros(p, n);
        let mut blocks = Vec::with_capacity(starts.len());
        let mut rest = out.as_mut();
        for &start in &starts {
            let (block, tail) = rest.split_at_col_mut(bs.min(n - start));
            blocks.push(block);
            rest = tail;
        }
        let values = Self::pool(opts, || {
            blocks
                .into_par_iter()
                .zip(starts.par_iter())
                .map_init(Ws::<T>::default, |ws, (mut block, &start)| {
                    let len = bs.min(n - start);
                    let batch = get(start, len)?;
                    let (x, y) = batch.rows();
                    let target = match (lik, qoi) {
                        (Some(l), _) => Target::Likelihood(l, y),
                        (_, Some(q)) => Target::Qoi(q),
                        _ => return Err(Error::Unsupported("a pass without an objective".into())),
                    };
                    let v = Self::pass(m, ws, x, target, offset + start)?;
                    let mut col = vec![0.0f64; p];
                    let mut g = vec![];
                    for j in 0..len {
                        col.fill(0.0);
                        let mut rows: Vec<(usize, Vec<T>)> = vec![];
                        m.example_grad(
                            ws,
                            j,
                            &mut g,
                            &mut |off, vals| {
                                col[off..off + vals.len()]
                                    .iter_mut()
                                    .zip(vals)
                                    .for_each(|(a, x)| *a = x.f64());
                            },
                            &mut |tok, row| rows.push((tok, row.to_vec())),
                        );
                        for (tok, row) in rows {
                            col[tok * d..(tok + 1) * d]
                                .iter_mut()
                                .zip(&row)
                                .for_each(|(a, x)| *a = x.f64());
                        }
                        crate::error::check_finite(
                            "per-example gradients (transformer engine)",
                            &col,
                        )?;
                        block
                            .as_mut()
                            .col_mut(j)
                            .iter_mut()
                            .zip(&col)
                            .for_each(|(a, v)| *a = *v);
                    }
                    Ok(v)
                })
                .collect::<Result<Vec<_>>>()
        })??;
        Ok((out, values.into_iter().flatten().collect()))
    }

    /// The log-likelihood gradients of examples `start .. start + len` of `data` as a P×len
    /// matrix. O(P·len) memory.
    pub fn per_example_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        start: usize,
        len: usize,
        opts: &FactoredOptions,
    ) -> Result<Mat<f64>> {
        crate::data::check_range(data.len(), start, len)?;
        let (g, _) = dispatch!(self, m => Self::gradient_block(m, len, opts, |s, l| {
            Batch::load(data, start + s, l)
        }, Some(lik), None, start))?;
        Ok(g)
    }

    /// The gradients of a QoI at the M token sequences (rows of `queries`, (M, T')) as a P×M
    /// block, and the QoI values.
    pub fn query_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        opts: &FactoredOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        let (m_rows, _) = queries.dims2().map_err(|_| {
            Error::shape(
                "token-id queries (M, T)",
                "rank 2",
                format!("{:?}", queries.dims()),
            )
        })?;
        dispatch!(self, m => Self::gradient_block(m, m_rows, opts, |s, l| {
            Ok(Batch::Inputs(queries.narrow(0, s, l)?))
        }, None, Some(qoi), 0))
    }
}

impl super::ExampleGradients for FactoredTransformer {
    fn num_params(&self) -> usize {
        FactoredTransformer::num_params(self)
    }
    fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        FactoredTransformer::sum_sq(self, lik, data, opts)
    }
    fn per_example_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        start: usize,
        len: usize,
        opts: &FactoredOptions,
    ) -> Result<Mat<f64>> {
        FactoredTransformer::per_example_gradients(self, lik, data, start, len, opts)
    }
}

impl super::gradients::QueryGradients for FactoredTransformer {
    fn num_params(&self) -> usize {
        FactoredTransformer::num_params(self)
    }
    fn num_outputs(&self, _queries: &Tensor) -> Result<usize> {
        Ok(dispatch!(self, m => m.cfg.classes))
    }
    fn query_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &FactoredOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        super::gradients::single_step(steps, "transformer engine")?;
        FactoredTransformer::query_gradients(self, qoi, queries, opts)
    }
}
