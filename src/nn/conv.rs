//! `Conv2d` as unfolded patches times the weight (im2col), so the capture engine sees each
//! output pixel as a use of a linear layer on its patch (capture.md).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::capture;

/// Padding, stride and dilation of a [`Conv2d`] (groups = 1). The same fields and meaning as
/// `candle_nn::Conv2dConfig` and PyTorch's `nn.Conv2d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Zero padding on each side of both spatial dimensions.
    pub padding: usize,
    /// Step between output pixels.
    pub stride: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
}

impl Default for Conv2dConfig {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            dilation: 1,
        }
    }
}

/// A convolution over `D` spatial dimensions with groups = 1, captured by the capture engine:
/// each output position is a use of a linear layer on its unfolded patch (capture.md). Use it
/// as [`Conv2d`] or [`Conv1d`].
#[derive(Debug, Clone)]
pub struct Conv<const D: usize> {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv2dConfig,
}

/// A 2-D convolution, a drop-in for `candle_nn::Conv2d` with groups = 1 (same `VarBuilder` names
/// `weight` (out, in, k, k) and `bias` (out), same initialisation). Input (B, C, H, W), output
/// (B, out, H_out, W_out).
pub type Conv2d = Conv<2>;

/// A 1-D convolution, a drop-in for `candle_nn::Conv1d` with groups = 1 (`weight` (out, in, k),
/// `bias` (out)). Input (B, C, L), output (B, out, L_out). Padding, stride and dilation as in
/// [`Conv2dConfig`].
///
/// It runs as a 2-D convolution over (B, C, 1, L): candle 0.11.1's own `conv1d` backward gives
/// wrong input gradients for every example of a batch but the first (measured, see
/// tests/capture.rs), which would corrupt the signals of every layer below it.
pub type Conv1d = Conv<1>;

impl<const D: usize> Conv<D> {
    /// From a weight (out, in, k…) with `D` kernel dimensions, an optional bias (out) and the
    /// configuration.
    pub fn new(weight: Tensor, bias: Option<Tensor>, cfg: Conv2dConfig) -> Self {
        Self { weight, bias, cfg }
    }
    /// The weight (out, in, k…).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias (out).
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// The configuration.
    pub fn config(&self) -> Conv2dConfig {
        self.cfg
    }

    /// The weight and the bias as the forward reads them: detached while capturing (the probe
    /// carries every gradient needed).
    fn live(&self, capturing: bool) -> (Tensor, Option<Tensor>) {
        let read = |t: &Tensor| if capturing { t.detach() } else { t.clone() };
        (read(&self.weight), self.bias.as_ref().map(read))
    }

    /// The probe on the convolution's output `zt` (B, positions, out) over the unfolded
    /// `patches` (B, positions, in·k…).
    fn probe(&self, zt: Tensor, patches: &Tensor) -> candle_core::Result<Tensor> {
        capture::probe_use(zt, patches, &self.weight, self.bias.as_ref())
    }
}

fn check_cfg(cfg: &Conv2dConfig) -> candle_core::Result<()> {
    if cfg.stride == 0 || cfg.dilation == 0 {
        candle_core::bail!("Conv2d: stride and dilation must be >= 1, got {cfg:?}");
    }
    Ok(())
}

impl Conv2dConfig {
    /// candle-nn's 2-D configuration with groups = 1.
    fn candle2d(&self) -> candle_nn::Conv2dConfig {
        candle_nn::Conv2dConfig {
            padding: self.padding,
            stride: self.stride,
            dilation: self.dilation,
            groups: 1,
            cudnn_fwd_algo: None,
        }
    }
    /// candle-nn's 1-D configuration with groups = 1.
    fn candle1d(&self) -> candle_nn::Conv1dConfig {
        candle_nn::Conv1dConfig {
            padding: self.padding,
            stride: self.stride,
            dilation: self.dilation,
            groups: 1,
            cudnn_fwd_algo: None,
        }
    }
}

/// `candle_nn::conv2d`'s counterpart (groups = 1): `weight` (out, in, k, k) and `bias` (out).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    check_cfg(&cfg)?;
    let c = candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg.candle2d(), vb)?;
    Ok(Conv2d::new(c.weight().clone(), c.bias().cloned(), cfg))
}

/// `candle_nn::conv2d_no_bias`'s counterpart (groups = 1).
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    check_cfg(&cfg)?;
    let c = candle_nn::conv2d_no_bias(in_channels, out_channels, kernel_size, cfg.candle2d(), vb)?;
    Ok(Conv2d::new(c.weight().clone(), None, cfg))
}

/// `x` zero-padded along `dim` and cropped to the span the convolution reads, (o − 1)·s +
/// d·(k − 1) + 1. Trailing positions no output reads get a zero gradient either way; cropping
/// them keeps candle 0.11.1's conv backward exact (it derives one output padding from the height
/// and applies it to both spatial dimensions, so an uneven remainder in the width fails).
fn padded_used(
    x: &Tensor,
    dim: usize,
    k: usize,
    cfg: &Conv2dConfig,
) -> candle_core::Result<Tensor> {
    let n = x.dim(dim)?;
    let o = out_size(n, k, cfg, "input")?;
    let p = cfg.padding;
    let xp = if p > 0 {
        x.pad_with_zeros(dim, p, p)?
    } else {
        x.clone()
    };
    let used = (o - 1) * cfg.stride + cfg.dilation * (k - 1) + 1;
    if used < n + 2 * p {
        xp.narrow(dim, 0, used)
    } else {
        Ok(xp)
    }
}

/// The output size of a convolution along one dimension, or an error when the kernel does not
/// fit.
fn out_size(n: usize, k: usize, cfg: &Conv2dConfig, what: &str) -> candle_core::Result<usize> {
    let span = cfg.dilation * (k - 1) + 1;
    let padded = n + 2 * cfg.padding;
    if k == 0 || padded < span {
        candle_core::bail!(
            "Conv2d: the {what} {n} (padded {padded}) is smaller than the kernel's span {span}"
        );
    }
    Ok((padded - span) / cfg.stride + 1)
}

/// The unfolded patches of `x` (B, C, H, W): (B, T, C·kh·kw), T = H_out·W_out, patch entries
/// in the weight's flat order (c, ky, kx). Dilation 1: strided views (`unfold`) and one copy;
/// otherwise a gather. Used on detached inputs (the capture records them), so no backward is
/// needed through it.
pub(crate) fn unfold2d(
    x: &Tensor,
    kh: usize,
    kw: usize,
    cfg: &Conv2dConfig,
) -> candle_core::Result<(Tensor, usize, usize)> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (
        out_size(h, kh, cfg, "height")?,
        out_size(w, kw, cfg, "width")?,
    );
    let p = cfg.padding;
    let x = if p > 0 {
        x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
    } else {
        x.clone()
    };
    let ckk = c * kh * kw;
    if cfg.dilation == 1 {
        // (B, C, Ho, Wo, kh, kw) as strided views, then (B, Ho, Wo, C, kh, kw) in one copy
        let v = x
            .unfold(2, kh, cfg.stride)?
            .unfold(3, kw, cfg.stride)?
            .narrow(2, 0, ho)?
            .narrow(3, 0, wo)?;
        let v = v.permute((0, 2, 3, 1, 4, 5))?.contiguous()?;
        return Ok((v.reshape((b, ho * wo, ckk))?, ho, wo));
    }
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let mut idx = Vec::with_capacity(ho * wo * ckk);
    for oy in 0..ho {
        for ox in 0..wo {
            for ci in 0..c {
                for ky in 0..kh {
                    for kx in 0..kw {
                        let y = oy * cfg.stride + ky * cfg.dilation;
                        let xx = ox * cfg.stride + kx * cfg.dilation;
                        idx.push((ci * hp * wp + y * wp + xx) as u32);
                    }
                }
            }
        }
    }
    let n = idx.len();
    let idx = Tensor::from_vec(idx, n, x.device())?;
    let flat = x.reshape((b, c * hp * wp))?;
    let patches = flat.index_select(&idx, 1)?.reshape((b, ho * wo, ckk))?;
    Ok((patches, ho, wo))
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (out, cin, kh, kw) = self.weight.dims4()?;
        let (_b, c, _, _) = x.dims4()?;
        if c != cin {
            candle_core::bail!("Conv2d: input has {c} channels, the layer takes {cin}");
        }
        if kh != kw {
            candle_core::bail!("Conv2d: square kernels only, got {kh}×{kw}");
        }
        let capturing = capture::active();
        let (w, bias) = self.live(capturing);
        let xp = padded_used(&padded_used(x, 2, kh, &self.cfg)?, 3, kw, &self.cfg)?;
        let mut z = xp.conv2d(&w, 0, self.cfg.stride, self.cfg.dilation, 1)?;
        if let Some(bias) = bias {
            z = z.broadcast_add(&bias.reshape((1, out, 1, 1))?)?;
        }
        if !capturing {
            return Ok(z);
        }
        // the probe in the (B, T, out) layout of the patches, seen as (B, out, Ho, Wo)
        let (b, _, ho, wo) = z.dims4()?;
        let (patches, _, _) = unfold2d(&x.detach(), kh, kw, &self.cfg)?;
        let zt = z.permute((0, 2, 3, 1))?.reshape((b, ho * wo, out))?;
        let zt = self.probe(zt, &patches)?;
        zt.reshape((b, ho, wo, out))?.permute((0, 3, 1, 2))
    }
}

/// `candle_nn::conv1d`'s counterpart (groups = 1): `weight` (out, in, k) and `bias` (out).
pub fn conv1d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<Conv1d> {
    check_cfg(&cfg)?;
    let c = candle_nn::conv1d(in_channels, out_channels, kernel_size, cfg.candle1d(), vb)?;
    Ok(Conv1d::new(c.weight().clone(), c.bias().cloned(), cfg))
}

/// The unfolded patches of `x` (B, C, L): (B, L_out, C·k), entries in the weight's order (c, j).
fn unfold1d(x: &Tensor, k: usize, cfg: &Conv2dConfig) -> candle_core::Result<(Tensor, usize)> {
    let (b, c, l) = x.dims3()?;
    let lo = out_size(l, k, cfg, "length")?;
    let p = cfg.padding;
    let x = if p > 0 {
        x.pad_with_zeros(2, p, p)?
    } else {
        x.clone()
    };
    let lp = l + 2 * p;
    let mut idx = Vec::with_capacity(lo * c * k);
    for o in 0..lo {
        for ci in 0..c {
            for j in 0..k {
                idx.push((ci * lp + o * cfg.stride + j * cfg.dilation) as u32);
            }
        }
    }
    let n = idx.len();
    let idx = Tensor::from_vec(idx, n, x.device())?;
    let patches = x
        .reshape((b, c * lp))?
        .index_select(&idx, 1)?
        .reshape((b, lo, c * k))?;
    Ok((patches, lo))
}

impl Module for Conv1d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (out, cin, k) = self.weight.dims3()?;
        let (_b, c, _) = x.dims3()?;
        if c != cin {
            candle_core::bail!("Conv1d: input has {c} channels, the layer takes {cin}");
        }
        let capturing = capture::active();
        let (w, bias) = self.live(capturing);
        // through conv2d on (B, C, 1, L): candle 0.11.1's conv1d backward gives wrong input
        // gradients for every example but the first of a batch (its conv_transpose1d)
        let xp = padded_used(x, 2, k, &self.cfg)?;
        let mut z = xp
            .unsqueeze(2)?
            .conv2d(&w.unsqueeze(2)?, 0, self.cfg.stride, self.cfg.dilation, 1)?
            .squeeze(2)?;
        if let Some(bias) = bias {
            z = z.broadcast_add(&bias.reshape((1, out, 1))?)?;
        }
        if !capturing {
            return Ok(z);
        }
        let (b, _, lo) = z.dims3()?;
        let (patches, _) = unfold1d(&x.detach(), k, &self.cfg)?;
        let zt = z.transpose(1, 2)?.contiguous()?;
        let zt = self.probe(zt, &patches)?;
        zt.reshape((b, lo, out))?.transpose(1, 2)
    }
}
