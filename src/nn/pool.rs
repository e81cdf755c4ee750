//! 2-D max and average pooling with a correct backward pass (custom candle ops).
//!
//! candle 0.11.1's `max_pool2d` backward multiplies the incoming gradient by (number of
//! maxima)/k² where it should pass it to the maximum, so each 2×2 max-pool shrinks the gradient
//! 4×; its avg-pool backward needs kernel = stride and an input divisible by it. These ops send
//! the gradient of each window to its first maximum in scan order (as PyTorch does) or spread it
//! evenly over the window (average), for any kernel and stride (no padding; windows that do not
//! fit are dropped, as in PyTorch with `ceil_mode=False`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

#[derive(Debug, Clone, Copy)]
struct Pool {
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    max: bool,
}

impl Pool {
    fn out_dims(
        &self,
        dims: &[usize],
    ) -> candle_core::Result<(usize, usize, usize, usize, usize, usize)> {
        let [b, c, h, w] = dims else {
            candle_core::bail!("pool2d: input must be (B, C, H, W), got {dims:?}");
        };
        if self.kh == 0 || self.kw == 0 || self.sh == 0 || self.sw == 0 {
            candle_core::bail!("pool2d: kernel and stride must be >= 1");
        }
        if *h < self.kh || *w < self.kw {
            candle_core::bail!(
                "pool2d: input {h}×{w} is smaller than the kernel {}×{}",
                self.kh,
                self.kw
            );
        }
        Ok((
            *b,
            *c,
            *h,
            *w,
            (h - self.kh) / self.sh + 1,
            (w - self.kw) / self.sw + 1,
        ))
    }

    /// For each output element, the input index the gradient goes to (max) — or nothing (avg).
    fn forward<T: Copy + PartialOrd + Into<f64>>(
        &self,
        x: &[T],
        dims: &[usize],
        from_f64: impl Fn(f64) -> T,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (b, c, h, w, ho, wo) = self.out_dims(dims)?;
        let mut out = Vec::with_capacity(b * c * ho * wo);
        let inv = 1.0 / (self.kh * self.kw) as f64;
        for plane in 0..b * c {
            let base = plane * h * w;
            for oy in 0..ho {
                for ox in 0..wo {
                    let (y0, x0) = (oy * self.sh, ox * self.sw);
                    if self.max {
                        let mut best = x[base + y0 * w + x0];
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                let v = x[base + (y0 + ky) * w + x0 + kx];
                                if v > best {
                                    best = v;
                                }
                            }
                        }
                        out.push(best);
                    } else {
                        let mut s = 0.0f64;
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                s += x[base + (y0 + ky) * w + x0 + kx].into();
                            }
                        }
                        out.push(from_f64(s * inv));
                    }
                }
            }
        }
        Ok((out, Shape::from((b, c, ho, wo))))
    }

    fn backward<T: Copy + PartialOrd + Into<f64>>(
        &self,
        x: &[T],
        g: &[T],
        dims: &[usize],
        from_f64: impl Fn(f64) -> T,
    ) -> candle_core::Result<Vec<T>> {
        let (b, c, h, w, ho, wo) = self.out_dims(dims)?;
        let mut gx = vec![0.0f64; x.len()];
        let inv = 1.0 / (self.kh * self.kw) as f64;
        for plane in 0..b * c {
            let base = plane * h * w;
            for oy in 0..ho {
                for ox in 0..wo {
                    let gi: f64 = g[plane * ho * wo + oy * wo + ox].into();
                    let (y0, x0) = (oy * self.sh, ox * self.sw);
                    if self.max {
                        let mut at = base + y0 * w + x0;
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                let k = base + (y0 + ky) * w + x0 + kx;
                                if x[k] > x[at] {
                                    at = k;
                                }
                            }
                        }
                        gx[at] += gi;
                    } else {
                        for ky in 0..self.kh {
                            for kx in 0..self.kw {
                                gx[base + (y0 + ky) * w + x0 + kx] += gi * inv;
                            }
                        }
                    }
                }
            }
        }
        Ok(gx.into_iter().map(from_f64).collect())
    }
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        if self.max {
            "deltavar-max-pool2d"
        } else {
            "deltavar-avg-pool2d"
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("pool2d: the input must be contiguous");
        };
        let dims = layout.dims();
        match storage {
            CpuStorage::F32(v) => {
                let (o, s) = self.forward(&v[start..end], dims, |f| f as f32)?;
                Ok((CpuStorage::F32(o), s))
            }
            CpuStorage::F64(v) => {
                let (o, s) = self.forward(&v[start..end], dims, |f| f)?;
                Ok((CpuStorage::F64(o), s))
            }
            _ => candle_core::bail!("pool2d: only f32 and f64 are supported"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let arg = arg.contiguous()?;
        let grad = grad_res.contiguous()?;
        let dims = arg.dims().to_vec();
        let (sa, la) = arg.storage_and_layout();
        let (sg, lg) = grad.storage_and_layout();
        let (Some((a0, a1)), Some((g0, g1))) = (la.contiguous_offsets(), lg.contiguous_offsets())
        else {
            candle_core::bail!("pool2d backward: non-contiguous tensors");
        };
        use candle_core::Storage::Cpu;
        let out = match (&*sa, &*sg) {
            (Cpu(CpuStorage::F32(x)), Cpu(CpuStorage::F32(g))) => {
                let v = self.backward(&x[a0..a1], &g[g0..g1], &dims, |f| f as f32)?;
                Tensor::from_vec(v, dims.as_slice(), arg.device())?
            }
            (Cpu(CpuStorage::F64(x)), Cpu(CpuStorage::F64(g))) => {
                let v = self.backward(&x[a0..a1], &g[g0..g1], &dims, |f| f)?;
                Tensor::from_vec(v, dims.as_slice(), arg.device())?
            }
            _ => candle_core::bail!("pool2d backward: f32 or f64 CPU tensors of one dtype only"),
        };
        Ok(Some(out))
    }
}

/// Max pooling over (kernel, kernel) windows with the given stride (PyTorch's
/// `F.max_pool2d(x, kernel, stride)`), input (B, C, H, W). The gradient of each window goes to
/// its first maximum.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Pool {
        kh: kernel,
        kw: kernel,
        sh: stride,
        sw: stride,
        max: true,
    })
}

/// Average pooling over (kernel, kernel) windows with the given stride (PyTorch's
/// `F.avg_pool2d(x, kernel, stride)`), input (B, C, H, W).
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Pool {
        kh: kernel,
        kw: kernel,
        sh: stride,
        sw: stride,
        max: false,
    })
}
