"""vc.nn.SparseConv3d: a 3D convolution layer with a fixed sparsity pattern and trainable values."""
import math

import numpy as np
import torch

from .._dispatch import compiling, torch_batching
from .._validate import triple
from ..ops.sparse import SparseKernel, pattern_conv3d


class SparseConv3d(torch.nn.Module):
    """torch.nn.Conv3d's arguments, a weight that is zero outside a fixed pattern of taps. The pattern is
    `kernel=` (a vc.SparseKernel of shape (out, in/groups, kd, kh, kw), whose values initialise the layer) or
    `density=` (a random pattern of that fraction of the taps, values initialised as torch.nn.Conv3d's are,
    scaled to the taps kept). Parameters: `values` (nnz,) and `bias`; buffer `indices` (nnz, 5).
    Forward and backward run volconv's kernels; `to_dense()` gives the equivalent dense weight."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, kernel=None, density=None, workers=None, device=None,
                 dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible "
                             f"by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1)
        self.stride, self.dilation = triple(stride, "stride", minimum=1), triple(dilation, "dilation", minimum=1)
        self.padding = padding if isinstance(padding, str) else triple(padding, "padding")
        self.padding_mode, self.workers = padding_mode, workers
        shape = (out_channels, in_channels // groups) + self.kernel_size
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        if (kernel is None) == (density is None):
            raise ValueError("give the pattern as kernel= (a vc.SparseKernel) or density= (a fraction), one of them")
        if kernel is not None:
            if not isinstance(kernel, SparseKernel) or kernel.shape != shape:
                raise ValueError(f"kernel must be a vc.SparseKernel of shape {shape}, got "
                                 f"{getattr(kernel, 'shape', type(kernel).__name__)}")
            indices, values = kernel.indices, kernel.values
        else:
            if not 0 < density <= 1:
                raise ValueError(f"density must be in (0, 1], got {density!r}")
            size = int(np.prod(shape))
            keep = np.sort(torch.randperm(size)[:max(1, int(math.ceil(density * size)))].numpy())
            indices = np.stack(np.unravel_index(keep, shape), axis=1)
            bound = 1 / math.sqrt(max(1, keep.size // out_channels))   # fan-in: the taps an output sees
            values = ((torch.rand(keep.size, dtype=torch.float64) * 2 - 1) * bound).numpy()   # torch's RNG
        self.register_buffer("indices", torch.as_tensor(np.asarray(indices), dtype=torch.long))
        self.values = torch.nn.Parameter(torch.as_tensor(values, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None
        self.weight_shape = shape

    @classmethod
    def from_conv(cls, conv, *, density=None, threshold=None, workers=None):
        """The layer of a trained torch.nn.Conv3d with its weight pruned by magnitude (vc.SparseKernel
        .from_dense: density= keeps that fraction, threshold= the entries above it, neither: the non-zeros)."""
        if not isinstance(conv, torch.nn.Conv3d):
            raise TypeError(f"conv must be a torch.nn.Conv3d, got {type(conv).__name__}")
        kernel = SparseKernel.from_dense(conv.weight, threshold=threshold, density=density)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, kernel=kernel, workers=workers,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        if conv.bias is not None:
            new.bias = torch.nn.Parameter(conv.bias.detach().clone())
        return new

    @property
    def nnz(self):
        return int(self.values.numel())

    def to_dense(self):
        """The dense weight (out, in/groups, kd, kh, kw) these values make (differentiable)."""
        w = torch.zeros(self.weight_shape, dtype=self.values.dtype, device=self.values.device)
        return w.index_put((*self.indices.T,), self.values, accumulate=True)

    def _host_indices(self):
        """The pattern as a numpy array, copied from the device once per change of the buffer (not at every
        forward: a copy to the host waits for the GPU)."""
        if self.indices.is_inference():   # (no version counter to tell a change by)
            return self.indices.cpu().numpy()
        cached = getattr(self, "_host_cache", None)
        if cached is None or cached[0] is not self.indices or cached[1] != self.indices._version:
            cached = self._host_cache = (self.indices, self.indices._version, self.indices.cpu().numpy())
        return cached[2]

    @torch_batching()
    def forward(self, input):
        indices = self.indices if compiling() else self._host_indices()   # traced: a tensor for the operator
        return pattern_conv3d(input, indices, self.values, self.weight_shape, self.bias, self.stride, self.padding,
                              self.dilation, self.groups, self.padding_mode, self.workers)

    def extra_repr(self):
        density = self.nnz / float(np.prod(self.weight_shape))
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nnz={self.nnz} (density {density:.3g})"
                + (f", groups={self.groups}" if self.groups != 1 else "")
                + ("" if self.bias is not None else ", bias=False")
                + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""))
