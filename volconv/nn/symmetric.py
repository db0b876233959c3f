"""vc.nn.SymmetricConv3d: a 3D convolution whose kernel is tied to a symmetry (axis flips, the cube's 48
rotations/reflections, or distance from the centre), one parameter per orbit of kernel taps."""
import math
import numbers

import numpy as np
import torch

from .._validate import positive_int, torch_padding_mode, triple
from ..ops.conv import conv3d

SYMMETRIES = ("mirror", "octahedral", "radial")


def _zooms(zooms):
    """None or 3 positive finite numbers -> tuple of 3 floats (or None)."""
    if zooms is None:
        return None
    try:
        values = tuple(zooms)
    except TypeError:
        raise ValueError(f"zooms must be 3 positive numbers (voxel sizes in mm), got {zooms!r}") from None
    if len(values) != 3 or not all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                                   and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"zooms must be 3 positive numbers (voxel sizes in mm), got {zooms!r}")
    return tuple(float(v) for v in values)


def orbit_index(kernel_size, symmetry, zooms=None):
    """(kd, kh, kw) int64 array: the orbit of every kernel tap under `symmetry`, orbits numbered 0..n-1 in
    the order of their sorted keys.

    Offsets from the centre are counted in half voxels (2 i - (k - 1): exact integers, half-integer offsets of
    even kernels included). "mirror": taps share an orbit when their |offsets| are equal on every axis (any
    kernel shape). "octahedral" (kd == kh == kw): when their |offsets| are equal up to a permutation of the
    axes, the 48 rotations and reflections of the voxel grid. "radial": when their distances from the centre
    are equal (in mm with `zooms`, rounded to 1e-9 of the smallest voxel size squared; exact without)."""
    kernel_size = triple(kernel_size, "kernel_size", minimum=1)
    if symmetry not in SYMMETRIES:
        raise ValueError(f"symmetry must be one of {', '.join(map(repr, SYMMETRIES))}, got {symmetry!r}")
    zooms = _zooms(zooms)
    if zooms is not None and symmetry != "radial":
        raise ValueError(f"zooms apply to symmetry='radial' only (distances in mm); symmetry={symmetry!r} is a "
                         f"symmetry of the voxel grid, got zooms={zooms!r}")
    if symmetry == "octahedral" and len(set(kernel_size)) != 1:
        raise ValueError(f"symmetry='octahedral' needs a cubic kernel (kd == kh == kw), got kernel_size "
                         f"{kernel_size}")
    grids = np.meshgrid(*(np.abs(2 * np.arange(k) - (k - 1)) for k in kernel_size), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)          # (taps, 3) |doubled offsets|
    if symmetry == "mirror":
        keys = offsets
    elif symmetry == "octahedral":
        keys = np.sort(offsets, axis=1)
    elif zooms is None:
        keys = (offsets ** 2).sum(axis=1, keepdims=True)             # 4 r^2 in voxels: exact integers
    else:
        scale = np.asarray(zooms) / (2 * min(zooms))                  # half voxels -> units of the finest voxel
        keys = np.round(((offsets * scale) ** 2).sum(axis=1, keepdims=True), 9)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    return inverse.reshape(kernel_size).astype(np.int64)


class SymmetricConv3d(torch.nn.Module):
    """A 3D convolution (torch.nn.Conv3d's arguments and semantics) whose kernel is invariant under a symmetry:
    weight[o, c, a, b, e] = orbit_weight[o, c, orbit_index[a, b, e]].

    symmetry: "mirror" (the kernel equals its flips along D, H and W: the layer commutes with axis flips),
    "octahedral" (the 48 rotations/reflections of the cube; needs kd == kh == kw; with anisotropic voxels it is
    the symmetry of the voxel grid, not of space) or "radial" (the kernel depends only on the distance from its
    centre; in mm when `zooms`, the voxel sizes (d, h, w), are given: anisotropic voxels make an ellipsoid in
    voxels). With odd kernels and symmetric padding the layer is exactly equivariant: conv(T x) = T conv(x) for
    every T of the symmetry (radial: every symmetry of the voxel grid that keeps the zooms).

    Parameters: `orbit_weight` (O, C/groups, orbits) and `bias` (O,); the buffer `orbit_index` (kd, kh, kw)
    maps taps to orbits. `weight` builds the dense kernel by a gather (differentiable: gradients accumulate onto
    the orbit parameters). The forward runs vc.conv3d (volconv's CPU engine, or the CUDA plugin).
    Initialisation: every tap has torch.nn.Conv3d's distribution, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, symmetry="mirror", zooms=None, algorithm="auto",
                 workers=None, device=None, dtype=None):
        super().__init__()
        in_channels, out_channels = positive_int(in_channels, "in_channels"), positive_int(out_channels,
                                                                                           "out_channels")
        groups = positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        torch_padding_mode(padding_mode)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1)
        self.stride, self.dilation = triple(stride, "stride", minimum=1), triple(dilation, "dilation", minimum=1)
        self.padding = padding if isinstance(padding, str) else triple(padding, "padding", minimum=0)
        self.padding_mode, self.algorithm, self.workers = padding_mode, algorithm, workers
        index = orbit_index(self.kernel_size, symmetry, zooms)
        self.symmetry, self.zooms = symmetry, _zooms(zooms)
        self.register_buffer("orbit_index", torch.as_tensor(index, device=device), persistent=False)
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        n_orbits = int(index.max()) + 1
        self.orbit_weight = torch.nn.Parameter(torch.empty(out_channels, in_channels // groups, n_orbits,
                                                           **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """Each tap (so each orbit parameter) uniform in +-1/sqrt(fan_in), as torch.nn.Conv3d's weight (its
        kaiming_uniform with a=sqrt(5)) and bias."""
        bound = 1 / math.sqrt(self.in_channels // self.groups * math.prod(self.kernel_size))
        with torch.no_grad():
            self.orbit_weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @property
    def orbits(self):
        """The number of orbits of kernel taps: free weight parameters per (output, input) channel pair."""
        return self.orbit_weight.shape[-1]

    @property
    def weight(self):
        """The dense kernel (O, C/groups, kd, kh, kw) gathered from the orbit parameters (differentiable)."""
        return self.orbit_weight[:, :, self.orbit_index]

    @classmethod
    def from_conv(cls, conv, symmetry, zooms=None, *, algorithm="auto", workers=None):
        """A SymmetricConv3d with a trained torch.nn.Conv3d's geometry and bias and its weight projected onto
        the symmetry: each orbit parameter is the mean of the weight over the orbit's taps (the orthogonal
        projection onto the symmetric kernels). `.projection_error` keeps ||W - P(W)|| / ||W|| (0 for W = 0)."""
        if not isinstance(conv, torch.nn.Conv3d):
            raise TypeError(f"conv must be a torch.nn.Conv3d, got {type(conv).__name__}")
        w = conv.weight.detach()
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, symmetry=symmetry, zooms=zooms, algorithm=algorithm,
                  workers=workers, device=w.device, dtype=w.dtype)
        index = new.orbit_index.reshape(-1)
        flat = w.reshape(w.shape[0], w.shape[1], -1)
        sums = torch.zeros_like(new.orbit_weight).index_add_(2, index, flat)
        counts = torch.bincount(index, minlength=new.orbits).to(w.dtype)
        with torch.no_grad():
            new.orbit_weight.copy_(sums / counts)
            if conv.bias is not None:
                new.bias.copy_(conv.bias.detach())
            norm = torch.linalg.vector_norm(w)
            residual = torch.linalg.vector_norm(w - new.weight)
        new.projection_error = float(residual / norm) if float(norm) > 0 else 0.0
        return new

    def forward(self, input):
        return conv3d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                      padding_mode=self.padding_mode, algorithm=self.algorithm, workers=self.workers)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding!r}, symmetry={self.symmetry!r}, orbits={self.orbits}")
        if self.zooms is not None:
            s += f", zooms={self.zooms}"
        if self.dilation != (1, 1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s
