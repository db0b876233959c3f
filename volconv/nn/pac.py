"""vc.nn.PacConv3d: pixel-adaptive convolution in 3-D (Su et al., CVPR 2019): a learned kernel W[o, c, t]
modulated at every output voxel by a Gaussian of guidance-feature differences, computed tap by tap so neither
the (N, C, T, D, H, W) patches nor the (N, Cout, Cin, T, D, H, W) per-voxel kernel field is ever held.

Why not vc.dynamic_conv3d: PAC's per-voxel kernel is W[o, c, t] * K_i(t). The dynamic op's full layout would
be that field materialised (Cout * Cin * T numbers per voxel), and its grouped layout (one K per tap shared by
all channels) has no channel mixing per tap. PAC factors instead as
    out[n, o, i] = sum_t K_i(t) * y_t[n, o, i],   y_t = sum_c W[o, c, t] x[n, c, i * stride + t * dilation - pad],
so each tap is a channel mix (a 1x1x1 convolution) of a strided shifted view of x, scaled per voxel by the
one-channel factor K_i(t) and accumulated into the output: the same multiply-adds as a dense convolution plus
O(Cf) per tap-voxel for K, and memory of one tap's y_t and K_t (N * max(Cout, Cin, Cf) * Do * Ho * Wo) beyond
the padded input, guide and output. A custom autograd Function keeps only x, f and W; backward recomputes each
tap's y_t and K_t (one extra forward's worth of work), so autograd never holds T intermediates."""
import math

import torch

from .._dispatch import torch_batching
from .._validate import positive_int, triple

KERNEL_TYPES = ("gaussian",)


class PacConv3d(torch.nn.Module):
    """Pixel-adaptive convolution, 3-D:

        out[n, o, i] = sum_c sum_t W[o, c, t] * K(f_i, f_{i+t}) * x[n, c, i*stride + t*dilation - padding] + b[o]

    with K(f_i, f_j) = exp(-0.5 * ||f_i - f_j||^2) over the guidance features f (N, guide_channels, D, H, W) on the
    input's grid: `forward(input, guide)`, or the input itself when guide is None (then guide_channels must be
    in_channels, its default). f_i is the feature at the window's centre tap (tap k // 2 on each axis, so the
    output voxel's own voxel for odd kernels with padding (k // 2) * dilation); zero padding (padded taps add
    nothing, whatever their K). Scale the features to set the Gaussian's width (pacnet has no learned scale
    either). A constant guide gives torch.nn.functional.conv3d with W (K = 1; to rounding).

    Arguments as torch.nn.Conv3d (padding: int or triple, zeros). tile: None, or the output planes (along D)
    per step, bounding the per-tap temporaries to a slab. Forward and backward to the weight, the bias, the
    input and the guide (float32/float64, CPU or CUDA tensors through torch ops); no double backward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, *,
                 guide_channels=None, kernel_type="gaussian", tile=None, device=None, dtype=None):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1)
        self.stride = triple(stride, "stride", minimum=1)
        self.padding = triple(padding, "padding", minimum=0)
        self.dilation = triple(dilation, "dilation", minimum=1)
        self.guide_channels = self.in_channels if guide_channels is None else \
            positive_int(guide_channels, "guide_channels")
        if kernel_type not in KERNEL_TYPES:
            raise ValueError(f"kernel_type must be one of {', '.join(KERNEL_TYPES)}, got {kernel_type!r}")
        if tile is not None and (not isinstance(tile, int) or isinstance(tile, bool) or tile < 1):
            raise ValueError(f"tile must be None or a positive int (output planes per step), got {tile!r}")
        self.kernel_type, self.tile = kernel_type, tile
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty((self.out_channels, self.in_channels) + self.kernel_size,
                                                     **factory))
        self.bias = torch.nn.Parameter(torch.empty(self.out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """torch.nn.Conv3d's initialisation."""
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            torch.nn.init.uniform_(self.bias, -bound, bound)

    @torch_batching("guide")
    def forward(self, input, guide=None):
        if not isinstance(input, torch.Tensor) or input.dim() != 5 or input.shape[1] != self.in_channels:
            raise ValueError(f"input must be a 5-D tensor (N, {self.in_channels}, D, H, W), got shape "
                             f"{tuple(getattr(input, 'shape', ()))}")
        if guide is None:
            if self.guide_channels != self.in_channels:
                raise ValueError(f"guide is required: guide_channels ({self.guide_channels}) differs from "
                                 f"in_channels ({self.in_channels}), so the input cannot guide itself")
            guide = input
        elif not isinstance(guide, torch.Tensor) or guide.dim() != 5 or guide.shape[1] != self.guide_channels \
                or guide.shape[0] != input.shape[0] or guide.shape[2:] != input.shape[2:]:
            raise ValueError(f"guide must be a 5-D tensor (N, guide_channels, D, H, W) = ({input.shape[0]}, "
                             f"{self.guide_channels}, {', '.join(map(str, input.shape[2:]))}), got shape "
                             f"{tuple(getattr(guide, 'shape', ()))}")
        if not input.is_floating_point() or input.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"input must be float32 or float64, got {input.dtype}")
        for name, t in (("guide", guide), ("weight", self.weight)):
            if t.dtype != input.dtype or t.device != input.device:
                raise TypeError(f"{name} must have the input's dtype and device ({input.dtype}, {input.device}), "
                                f"got {t.dtype}, {t.device}")
        out_shape = self.output_shape(input.shape[2:])
        geo = (self.kernel_size, self.stride, self.padding, self.dilation, out_shape, self.tile)
        return _Pac.apply(geo, input, guide, self.weight, self.bias)

    def output_shape(self, spatial):
        """(Do, Ho, Wo) for an input of spatial shape (D, H, W), as torch.nn.Conv3d's; ValueError when the
        dilated kernel is larger than the padded input."""
        out = tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
                    zip(spatial, self.kernel_size, self.stride, self.padding, self.dilation))
        if min(out) < 1:
            raise ValueError(f"kernel_size {self.kernel_size} with dilation {self.dilation} is larger than the "
                             f"padded input {tuple(s + 2 * p for s, p in zip(spatial, self.padding))}")
        return out

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, guide_channels={self.guide_channels}")
        if self.bias is None:
            s += ", bias=False"
        if self.tile is not None:
            s += f", tile={self.tile}"
        return s


def _taps(kernel_size, dilation):
    """(tap index, (offset d, h, w) in padded input voxels) in W's flattened order."""
    kd, kh, kw = kernel_size
    for td in range(kd):
        for th in range(kh):
            for tw in range(kw):
                yield (td * kh + th) * kw + tw, (td * dilation[0], th * dilation[1], tw * dilation[2])


def _view(slab, offset, planes, out_hw, stride):
    """The strided view of a padded slab that tap `offset` reads for `planes` x out_hw output voxels."""
    (a, b, c), (sd, sh, sw) = offset, stride
    return slab[:, :, a:a + (planes - 1) * sd + 1:sd, b:b + (out_hw[0] - 1) * sh + 1:sh,
                c:c + (out_hw[1] - 1) * sw + 1:sw]


def _slabs(geo):
    """Per step: output planes [a, b) and the padded input planes [s0, s1) they read."""
    ks, st, _, dil, out, tile = geo
    step = out[0] if tile is None else tile
    for a in range(0, out[0], step):
        b = min(out[0], a + step)
        yield a, b, a * st[0], (b - 1) * st[0] + dil[0] * (ks[0] - 1) + 1


def _factor(fc, fs):
    """K = exp(-0.5 ||fc - fs||^2) over the channels (N, 1, ...) and the difference fc - fs."""
    diff = fc - fs
    return torch.exp(-0.5 * (diff * diff).sum(1, keepdim=True)), diff


def _pad(t, padding):
    p = padding
    return torch.nn.functional.pad(t, (p[2], p[2], p[1], p[1], p[0], p[0])) if any(p) else t


class _Pac(torch.autograd.Function):
    """PAC tap by tap (see the module's doc); saves x, f and W only, backward recomputes each tap."""

    @staticmethod
    def forward(ctx, geo, x, f, weight, bias):
        ctx.geo = geo
        ctx.has_bias, ctx.self_guided = bias is not None, f is x
        ctx.save_for_backward(x, f, weight)
        ks, st, pad, dil, out_shape, _ = geo
        xp = _pad(x, pad)
        fp = xp if ctx.self_guided else _pad(f, pad)   # (the input guiding itself: padded once)
        W = weight.reshape(weight.shape[0], weight.shape[1], -1)
        out = torch.zeros((x.shape[0], weight.shape[0]) + tuple(out_shape), dtype=x.dtype, device=x.device)
        centre = tuple((k // 2) * d for k, d in zip(ks, dil))
        for a, b, s0, s1 in _slabs(geo):
            xs, fs, acc = xp[:, :, s0:s1], fp[:, :, s0:s1], out[:, :, a:b]
            fc = _view(fs, centre, b - a, out_shape[1:], st)
            for t, off in _taps(ks, dil):
                K, _ = _factor(fc, _view(fs, off, b - a, out_shape[1:], st))
                y = torch.einsum("oc,ncdhw->nodhw", W[:, :, t], _view(xs, off, b - a, out_shape[1:], st))
                acc.addcmul_(K, y)
        if bias is not None:
            out += bias.reshape(1, -1, 1, 1, 1)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, f, weight = ctx.saved_tensors
        ks, st, pad, dil, out_shape, _ = ctx.geo
        need_x, need_f, need_w = ctx.needs_input_grad[1:4]
        xp = _pad(x, pad)
        fp = xp if ctx.self_guided else _pad(f, pad)
        W = weight.reshape(weight.shape[0], weight.shape[1], -1)
        gxp = torch.zeros_like(xp) if need_x else None
        gfp = torch.zeros_like(fp) if need_f else None
        gW = torch.zeros_like(W) if need_w else None
        g = grad.to(x.dtype)
        centre = tuple((k // 2) * d for k, d in zip(ks, dil))
        hw = out_shape[1:]
        for a, b, s0, s1 in _slabs(ctx.geo):
            xs, fs, gt, n = xp[:, :, s0:s1], fp[:, :, s0:s1], g[:, :, a:b], b - a
            fc = _view(fs, centre, n, hw, st)
            gfc = torch.zeros_like(fc) if need_f else None
            for t, off in _taps(ks, dil):
                xv = _view(xs, off, n, hw, st)
                K, diff = _factor(fc, _view(fs, off, n, hw, st))
                gy = gt * K
                if need_w:
                    gW[:, :, t] += torch.einsum("nodhw,ncdhw->oc", gy, xv)
                if need_x:
                    _view(gxp[:, :, s0:s1], off, n, hw, st).add_(torch.einsum("oc,nodhw->ncdhw", W[:, :, t], gy))
                if need_f:   # dK/dfc = -K diff, dK/dfs = K diff
                    y = torch.einsum("oc,ncdhw->nodhw", W[:, :, t], xv)
                    h = (gt * y).sum(1, keepdim=True).mul_(K) * diff
                    _view(gfp[:, :, s0:s1], off, n, hw, st).add_(h)
                    gfc.sub_(h)
            if need_f:
                _view(gfp[:, :, s0:s1], centre, n, hw, st).add_(gfc)
        D, H, Wd = x.shape[2:]
        crop = (slice(None), slice(None), slice(pad[0], pad[0] + D), slice(pad[1], pad[1] + H),
                slice(pad[2], pad[2] + Wd))
        gb = g.sum(dim=(0, 2, 3, 4)) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return (None, gxp[crop] if need_x else None, gfp[crop] if need_f else None,
                gW.reshape(weight.shape) if need_w else None, gb)
