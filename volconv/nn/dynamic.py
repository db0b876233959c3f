"""vc.nn.DynamicConv3d: a convolution whose kernel at every voxel is produced from the input by a function (a
small network), applied by vc.dynamic_conv3d; with `tile=`, kernel field and application run tile by tile
(D slabs with the halos both need) under checkpointing, so the whole kernel field never exists at once."""
import torch
from torch.utils.checkpoint import checkpoint

from .._validate import triple
from ..ops.dynamic import dynamic_conv3d
from .conv import Conv3d

ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}


class DynamicConv3d(torch.nn.Module):
    """out[n, c, p] = sum_t K[n, g(c), t, p] x[n, c, p + (t - k // 2) * dilation] (involution style: the C
    channels in `groups` groups, each group one kernel per voxel), K = kernel_fn(x) of shape
    (N, groups * k^3, D, H, W), zero 'same' padding, stride 1. The default kernel_fn is the small per-patch
    network: a k^3 convolution C -> hidden, `activation`, a 1^3 convolution hidden -> groups * k^3.
    `DynamicConv3d.full(...)` gives every voxel a full out_channels x in_channels kernel instead.

    tile: None, or the output planes (along D) per tile: kernel_fn and the application run per tile on the
    input planes they need (`kernel_fn_halo`: the planes kernel_fn looks beyond a voxel, k // 2 for the
    default) and backward recomputes each tile (checkpointing): memory holds one tile's kernel field."""

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
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.in_channels, self.groups, self.tile, self.workers = in_channels, groups, tile, workers
        self.out_channels = out_channels   # None: the grouped (involution) layout, else the full one
        T = self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        self.taps = T
        field = groups * T if out_channels is None else out_channels * in_channels * T
        if kernel_fn is None:
            hidden = hidden or max(8, in_channels)
            factory = {"device": device, "dtype": dtype}
            kernel_fn = torch.nn.Sequential(
                Conv3d(in_channels, hidden, self.kernel_size, padding=tuple(k // 2 for k in self.kernel_size),
                       workers=workers, **factory),
                ACTIVATIONS[activation](),
                Conv3d(hidden, field, 1, workers=workers, **factory))
            kernel_fn_halo = self.kernel_size[0] // 2 if kernel_fn_halo is None else kernel_fn_halo
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

    def forward(self, input):
        if input.dim() != 5 or input.shape[1] != self.in_channels:
            raise ValueError(f"input must be 5-D (N, {self.in_channels}, D, H, W), got shape {tuple(input.shape)}")
        pad = tuple(k // 2 * d for k, d in zip(self.kernel_size, self.dilation))
        if self.tile is None or self.tile >= input.shape[2]:
            field = self._field(self.kernel_fn(input), input.shape[0], input.shape[2:])
            return dynamic_conv3d(input, field, self.kernel_size, 1, pad, self.dilation, workers=self.workers)
        D, outs = input.shape[2], []
        halo = max(self.kernel_fn_halo, pad[0])
        for a in range(0, D, self.tile):
            b = min(D, a + self.tile)
            lo, hi = max(0, a - halo), min(D, b + halo)
            tile = lambda x, a=a, b=b, lo=lo: self._tile(x, a - lo, b - lo, pad)  # noqa: E731
            x = input[:, :, lo:hi]
            outs.append(checkpoint(tile, x, use_reentrant=False) if torch.is_grad_enabled() else tile(x))
        return torch.cat(outs, dim=2)

    def _tile(self, x, a, b, pad):
        """Output planes [a, b) of the slab x (which holds kernel_fn's and the application's halos, or reaches
        the volume's end, where both see zeros as they would on the whole volume)."""
        field = self._field(self.kernel_fn(x), x.shape[0], x.shape[2:])[..., a:b, :, :]
        r = pad[0]
        xs = torch.nn.functional.pad(x, (0, 0, 0, 0, max(0, r - a), max(0, b + r - x.shape[2])))
        xs = xs[:, :, max(0, a - r):max(0, a - r) + (b - a) + 2 * r]
        return dynamic_conv3d(xs, field.contiguous(), self.kernel_size, 1, (0,) + pad[1:], self.dilation,
                              workers=self.workers)

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
