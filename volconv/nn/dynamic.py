"""vc.nn.DynamicConv3d: a convolution whose kernel at every voxel is produced from the input by a function (a
small network), applied by vc.dynamic_conv3d; with `tile=`, kernel field and application run tile by tile
(D slabs with the halos both need), backward recomputing each tile's field, so the whole kernel field never
exists at once."""
import torch

from .._dispatch import compiling, torch_batching
from .._torch import dynamic as torch_dynamic
from .._torch.common import compute_dtype
from .._torch.reference import no_double_backward, twice_differentiable
from .._validate import triple, workers as resolve_workers
from ..engine import dynamic
from ..ops.conv import conv3d
from ..ops.dynamic import dynamic_conv3d
from .conv import Conv3d

ACTIVATION_MODULES = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}


class DynamicConv3d(torch.nn.Module):
    """out[n, c, p] = sum_t K[n, g(c), t, p] x[n, c, p + (t - k // 2) * dilation] (involution style: the C
    channels in `groups` groups, each group one kernel per voxel), K = kernel_fn(x) of shape
    (N, groups * k^3, D, H, W), zero 'same' padding, stride 1. The default kernel_fn is the small per-patch
    network: a k^3 convolution C -> hidden, `activation`, a 1^3 convolution hidden -> groups * k^3.
    `DynamicConv3d.full(...)` gives every voxel a full out_channels x in_channels kernel instead.

    tile: None, or the output planes (along D) per tile: kernel_fn and the application run per tile on the
    input planes they need (`kernel_fn_halo`: the planes kernel_fn looks beyond a voxel, k // 2 for the
    default) and backward recomputes each tile's field: memory holds one tile's kernel field."""

    def __init__(self, in_channels, kernel_size, groups=1, kernel_fn=None, *, tile=None, hidden=None,
                 activation="relu", dilation=1, kernel_fn_halo=None, out_channels=None, workers=None, device=None,
                 dtype=None):
        super().__init__()
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be odd ('same' output), got {kernel_size!r}")
        self.dilation = triple(dilation, "dilation", minimum=1)
        if not isinstance(groups, int) or groups < 1 or in_channels % groups:
            raise ValueError(f"groups must be a positive int dividing in_channels ({in_channels}), got {groups!r}")
        if tile is not None and (not isinstance(tile, int) or tile < 1):
            raise ValueError(f"tile must be None or a positive int (output planes per tile), got {tile!r}")
        if activation not in ACTIVATION_MODULES:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATION_MODULES)}, got {activation!r}")
        self.in_channels, self.groups, self.tile, self.workers = in_channels, groups, tile, workers
        self.out_channels = out_channels   # None: the grouped (involution) layout, else the full one
        T = self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        self.taps = T
        field = groups * T if out_channels is None else out_channels * in_channels * T
        self._default_fn = kernel_fn is None   # its k^3 convolution can skip the D padding inside a volume
        if kernel_fn is None:
            hidden = hidden or max(8, in_channels)
            factory = {"device": device, "dtype": dtype}
            kernel_fn = torch.nn.Sequential(
                Conv3d(in_channels, hidden, self.kernel_size, padding=tuple(k // 2 for k in self.kernel_size),
                       workers=workers, **factory),
                ACTIVATION_MODULES[activation](),
                Conv3d(hidden, field, 1, workers=workers, **factory))
            kernel_fn_halo = self.kernel_size[0] // 2
        self.kernel_fn = kernel_fn
        self.kernel_fn_halo = 0 if kernel_fn_halo is None else int(kernel_fn_halo)

    @classmethod
    def full(cls, in_channels, out_channels, kernel_size, kernel_fn=None, **kwargs):
        """A full out_channels x in_channels kernel at every voxel (kernel_fn: (N, C, ...) -> (N, out_channels *
        in_channels * k^3, D, H, W))."""
        return cls(in_channels, kernel_size, 1, kernel_fn, out_channels=out_channels, **kwargs)

    def _field(self, kernels, n, spatial):
        lead = (n, self.groups) if self.out_channels is None else (n, self.out_channels, self.in_channels)
        expected = n * (lead[1] if len(lead) == 2 else lead[1] * lead[2]) * self.taps
        if kernels.dim() != 5 or kernels.shape[0] * kernels.shape[1] != expected or \
                tuple(kernels.shape[2:]) != tuple(spatial):
            raise ValueError(f"kernel_fn must return (N, {expected // n}, D, H, W) = (N, "
                             f"{'groups' if len(lead) == 2 else 'out_channels * in_channels'} * k^3, ...) for an "
                             f"input of spatial shape {tuple(spatial)}, got {tuple(kernels.shape)}")
        return kernels.reshape(lead + (self.taps,) + tuple(spatial))

    @torch_batching()
    def forward(self, input):
        if input.dim() != 5 or input.shape[1] != self.in_channels:
            raise ValueError(f"input must be 5-D (N, {self.in_channels}, D, H, W), got shape {tuple(input.shape)}")
        pad = tuple(k // 2 * d for k, d in zip(self.kernel_size, self.dilation))
        if self.tile is None or self.tile >= input.shape[2] or compiling():   # traced: one custom op, untiled
            field = self._field(self.kernel_fn(input), input.shape[0], input.shape[2:])
            return dynamic_conv3d(input, field, self.kernel_size, 1, pad, self.dilation, workers=self.workers)
        params = [q for q in self.kernel_fn.parameters() if q.requires_grad]
        return _TiledDynamic.apply(self, pad, input, *params)

    def _slab(self, x, a, b, halo):
        """x's planes [a - halo, b + halo), zeros beyond the volume (differentiable), and the leaf of existing
        planes it pads (for gradients)."""
        lo, hi = max(0, a - halo), min(x.shape[2], b + halo)
        leaf = x[:, :, lo:hi].detach().requires_grad_(torch.is_grad_enabled())
        return torch.nn.functional.pad(leaf, (0, 0, 0, 0, lo - (a - halo), (b + halo) - hi)), leaf, lo

    def _tile_field(self, slab, halo, planes):
        """The kernel field of `planes` output planes at the middle of a slab with `halo` planes either side.
        The default kernel_fn runs its k^3 convolution without D padding, so it computes those planes only."""
        fn = self.kernel_fn
        if self._default_fn:
            conv, act, mix = fn[0], fn[1], fn[2]
            h = conv.kernel_size[0] // 2   # its own D reach (the slab may hold more for a dilated application)
            hidden = conv3d(slab[:, :, halo - h:halo + planes + h], conv.weight, conv.bias,
                            padding=(0,) + conv.padding[1:], workers=self.workers)
            field = mix(act(hidden))
        else:
            field = fn(slab)[:, :, halo:halo + planes]
        return self._field(field, slab.shape[0], (planes,) + tuple(slab.shape[3:]))

    def extra_repr(self):
        s = f"{self.in_channels}, kernel_size={self.kernel_size}"
        if self.out_channels is not None:
            s += f", out_channels={self.out_channels} (full)"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.dilation != (1, 1, 1):
            s += f", dilation={self.dilation}"
        if self.tile is not None:
            s += f", tile={self.tile}"
        return s


class _TiledDynamic(torch.autograd.Function):
    """DynamicConv3d tile by tile (D slabs of `tile` output planes). Forward keeps nothing but the input;
    backward, per tile, recomputes the tile's kernel field with gradients, runs the dynamic convolution's
    backward (volconv's kernels) and sends the field's gradient back through kernel_fn, summing the input and
    parameter gradients tile by tile."""

    @staticmethod
    def forward(ctx, layer, pad, x, *params):
        ctx.layer, ctx.pad = layer, pad
        ctx.save_for_backward(x)
        xf = x.to(compute_dtype(x))
        out = torch.empty((x.shape[0], layer.in_channels if layer.out_channels is None else layer.out_channels)
                          + tuple(x.shape[2:]), dtype=xf.dtype, device=x.device)
        with torch.no_grad():
            for a, b, slab, _, _, halo in _tiles(layer, xf, pad):
                field = layer._tile_field(slab, halo, b - a)
                xs = slab[:, :, halo - pad[0]:halo + (b - a) + pad[0]]
                out[:, :, a:b] = dynamic_conv3d(xs, field, layer.kernel_size, 1, (0,) + pad[1:], layer.dilation,
                                                workers=layer.workers)
                del field
        return out.to(x.dtype)

    @staticmethod
    @twice_differentiable(no_double_backward("DynamicConv3d with tile=", "use tile=None, whose backward supports "
                                                                       "it"))
    def backward(ctx, grad):
        layer, pad = ctx.layer, ctx.pad
        (x,) = ctx.saved_tensors
        xf = x.detach().to(compute_dtype(x))
        params = [q for q in layer.kernel_fn.parameters() if q.requires_grad]
        need_x = ctx.needs_input_grad[2]
        gx = torch.zeros_like(xf) if need_x else None
        gparams = [torch.zeros_like(q) for q in params]
        g, r = grad.to(xf.dtype), pad[0]
        for a, b, slab, leaf, lo, halo in _tiles(layer, xf, pad, grad=need_x):
            with torch.enable_grad():
                field = layer._tile_field(slab, halo, b - a)
            xs = slab[:, :, halo - r:halo + (b - a) + r].detach()
            K = field.detach()
            lay = dynamic.Layout(tuple(xs.shape), tuple(K.shape), layer.kernel_size, 1, (0,) + pad[1:],
                                 layer.dilation)
            # the dynamic convolution's backward: the CUDA plugin's kernels for GPU tensors, else the CPU engine's
            gxs, gK = torch_dynamic.backward(xs, K, g[:, :, a:b], lay, (need_x, True), resolve_workers(layer.workers))
            grads = torch.autograd.grad(field, [leaf] * need_x + params, gK, allow_unused=True)
            if need_x:   # the application's input planes [a - r, b + r) inside the volume, and kernel_fn's
                s0, s1 = max(0, a - r), min(x.shape[2], b + r)
                gx[:, :, s0:s1] += gxs[:, :, s0 - (a - r):s1 - (a - r)]
                gx[:, :, lo:lo + leaf.shape[2]] += grads[0]
            for acc, gq in zip(gparams, grads[need_x:]):
                if gq is not None:
                    acc += gq
            del field, K, gK, gxs, grads   # this tile's field and gradients go before the next tile's come
        return (None, None, None if gx is None else gx.to(x.dtype), *gparams)


def _tiles(layer, x, pad, grad=False):
    """Per tile: output planes [a, b), the slab of x around them (zeros beyond the volume) holding the halo
    of kernel_fn and of the application, the leaf of existing planes the slab pads, its first plane, the halo."""
    halo = max(layer.kernel_fn_halo, pad[0])
    for a in range(0, x.shape[2], layer.tile):
        b = min(x.shape[2], a + layer.tile)
        with torch.set_grad_enabled(grad):
            slab, leaf, lo = layer._slab(x, a, b, halo)
        yield a, b, slab, leaf, lo, halo
