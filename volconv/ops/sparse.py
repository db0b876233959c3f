"""Sparse kernels: vc.SparseKernel and vc.sparse_conv3d, 3D convolution whose cost grows with the non-zero taps.

`SparseKernel` holds the non-zeros of a conv weight (Cout, Cin/groups, kd, kh, kw) or of a single 3-D kernel
(kd, kh, kw) as coordinates and values. `sparse_conv3d` runs it with torch.conv3d semantics through the
direct kernel's machinery (engine/sparse.py, _cpu/sparse.pxi): the same ring of padded planes, and per output row one
register-blocked pass per non-zero tap (a tap's W offset is a pointer offset into the padded row), so a
structured shape (a ball, a shell, a dilated kernel) is just a sparse kernel. Duplicate coordinates are summed,
as torch's coalesce() does. CUDA tensors run on the CUDA plugin's sparse kernels (cuda_plugin/sparse.cu), also by
the non-zeros, forward and backward.
"""
import math
import numbers

import numpy as np

from .. import _cuda
from .._dispatch import Caller, check_devices, check_tensors, compiling, is_tensor, torch_batching, wants_autograd
from .._validate import conv_spec, five_d, workers as resolve_workers
from ..engine import sparse
from ..engine.sparse import dense_weight
from ..kernels import Kernel


class SparseKernel(Kernel):
    """The non-zeros of a conv weight (Cout, Cin/groups, kd, kh, kw) or of a 3-D kernel (kd, kh, kw).

    indices: (nnz, ndim) integer coordinates (torch's (ndim, nnz) layout is accepted from `from_torch`);
    values: (nnz,) reals; shape: the dense shape. Duplicates are summed; explicit zeros are kept (they are
    part of the pattern a SparseConv3d trains)."""

    def __init__(self, indices, values, shape):
        shape = tuple(int(n) for n in shape)
        if len(shape) not in (3, 5) or min(shape) < 1:
            raise ValueError(f"shape must be 3-D (kd, kh, kw) or 5-D (out, in/groups, kd, kh, kw) with positive "
                             f"sizes, got {shape}")
        indices = np.asarray(indices)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if indices.size == 0:
            indices = indices.reshape(0, len(shape))
        if indices.ndim != 2 or indices.shape[1] != len(shape):
            raise ValueError(f"indices must have shape (nnz, {len(shape)}) for a {len(shape)}-D kernel, got "
                             f"{indices.shape}")
        if indices.dtype.kind not in "iu":
            if not np.all(np.isfinite(indices)) or not np.array_equal(indices, np.round(indices)):
                raise ValueError("indices must be integers")
        indices = indices.astype(np.int64)
        if values.size != indices.shape[0]:
            raise ValueError(f"values has {values.size} entries but indices has {indices.shape[0]} coordinates")
        bad = np.flatnonzero(((indices < 0) | (indices >= np.array(shape))).any(axis=1))
        if bad.size:
            raise ValueError(f"indices out of range for shape {shape}: entry {int(bad[0])} is "
                             f"{tuple(int(v) for v in indices[bad[0]])}")
        if not np.all(np.isfinite(values)):
            raise ValueError("values must be finite")
        flat = np.ravel_multi_index(indices.T, shape) if indices.size else np.zeros(0, np.int64)
        unique, inverse = np.unique(flat, return_inverse=True)   # sorted: (o, c, a, b, e) order
        self.values = np.bincount(inverse, weights=values, minlength=unique.size) if unique.size else values
        self.indices = np.stack(np.unravel_index(unique, shape), axis=1).astype(np.int64) if unique.size else \
            indices
        self._shape = shape

    @classmethod
    def from_dense(cls, weight, threshold=None, density=None):
        """Magnitude pruning of a dense weight (numpy or torch): keep |w| > threshold, or the largest
        ceil(density * size) entries, or (neither given) every non-zero."""
        w = weight.detach().cpu().numpy() if is_tensor(weight) else np.asarray(weight, dtype=np.float64)
        if threshold is not None and density is not None:
            raise ValueError("give threshold or density, not both")
        if threshold is not None:
            if not isinstance(threshold, numbers.Real) or threshold < 0:
                raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
            keep = np.abs(w) > threshold
        elif density is not None:
            if not isinstance(density, numbers.Real) or not 0 < density <= 1:
                raise ValueError(f"density must be in (0, 1], got {density!r}")
            k = int(math.ceil(density * w.size))
            order = np.argsort(-np.abs(w), axis=None, kind="stable")[:k]
            keep = np.zeros(w.size, bool)
            keep[order] = True
            keep = keep.reshape(w.shape) & (w != 0)
        else:
            keep = w != 0
        idx = np.argwhere(keep)
        return cls(idx, w[keep], w.shape)

    @classmethod
    def from_torch(cls, t):
        """A torch.sparse_coo_tensor (coalesced or not) of the weight's shape."""
        t = t.detach().cpu().coalesce()
        return cls(t.indices().numpy().T, t.values().double().numpy(), tuple(t.shape))

    @property
    def shape(self):
        return self._shape

    @property
    def nnz(self):
        return int(self.values.size)

    @property
    def density(self):
        return self.nnz / float(np.prod(self._shape))

    def to_dense(self):
        return dense_weight(self.indices, self.values, self._shape)

    def as_weight(self, channels=None):
        """(indices, values, shape) of the 5-D weight: itself, or a 3-D kernel as (1, 1, ...) or, given
        `channels`, repeated for a depthwise weight (channels, 1, ...)."""
        if len(self._shape) == 5:
            return self.indices, self.values, self._shape
        c = 1 if channels is None else channels
        n = self.nnz
        idx = np.concatenate([np.repeat(np.arange(c), n)[:, None], np.zeros((c * n, 1), np.int64),
                              np.tile(self.indices, (c, 1))], axis=1)
        return idx, np.tile(self.values, c), (c, 1) + self._shape

    def __repr__(self):
        return f"SparseKernel(shape={self._shape}, nnz={self.nnz}, density={self.density:.3g})"


@torch_batching()
def sparse_conv3d(input, kernel, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros",
                  workers=None):
    """3D convolution (torch.nn.functional.conv3d semantics) with a sparse weight: a vc.SparseKernel of shape
    (Cout, Cin/groups, kd, kh, kw), or a 3-D one applied to every channel (depthwise, groups ignored), or a
    torch.sparse_coo_tensor weight. The cost grows with the number of non-zeros. Differentiable on torch
    tensors (input, bias, and the values of a sparse torch weight that requires grad)."""
    values_tensor = None
    if is_tensor(kernel) and kernel.is_sparse:
        if kernel.requires_grad:
            values_tensor = kernel
        kernel = SparseKernel.from_torch(kernel)
    if not isinstance(kernel, SparseKernel):
        raise TypeError(f"kernel must be a vc.SparseKernel or a torch sparse COO tensor, got "
                        f"{type(kernel).__name__}")
    five_d(input)
    if len(kernel.shape) == 3:
        groups = input.shape[1]
        indices, values, shape = kernel.as_weight(groups)
    else:
        indices, values, shape = kernel.as_weight()
    return pattern_conv3d(input, indices, values if values_tensor is None else values_tensor, shape, bias, stride,
                          padding, dilation, groups, padding_mode, workers)


def pattern_conv3d(input, indices, values, shape, bias=None, stride=1, padding=0, dilation=1, groups=1,
                   padding_mode="zeros", workers=None):
    """sparse_conv3d of a fixed pattern: coalesced indices (nnz, 5) sorted by output channel, of a weight of this
    shape, and their values (an array, a tensor such as vc.nn.SparseConv3d's trainable values, or a torch sparse
    weight whose coalesced values they are). Differentiable in input, bias and values. CUDA tensors run on the
    CUDA plugin (`workers` does not apply there)."""
    if _cuda.is_cuda(input) or wants_autograd(input, bias, values):
        from .._torch import sparse as torch_sparse

        if not compiling():
            check_tensors("sparse_conv3d", [input, bias], ["input", "bias"], cuda=True)
            if is_tensor(values):
                check_devices("sparse_conv3d", [input, values], ["input", "values"], cuda=True)
        spec = conv_spec(tuple(input.shape), tuple(shape), bias, stride, padding, dilation, groups, padding_mode)
        return torch_sparse.sparse_conv3d(input, indices, values, bias, spec, workers)
    if is_tensor(values) and values.is_sparse:
        values = values.coalesce().values()
    caller = Caller("sparse_conv3d", [input, bias, values], ["input", "bias", "values"])
    x, b, v = caller.arrays
    spec = conv_spec(x.shape, shape, b, stride, padding, dilation, groups, padding_mode)
    x = caller.cast(x, "input")
    b = caller.cast(b, "bias", same_dtype=True)
    out = sparse.run(x, np.asarray(indices), caller.cast(v, "values"), b, spec, resolve_workers(workers))
    return caller.result(out)
