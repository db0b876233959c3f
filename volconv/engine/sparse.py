"""The sparse direct kernel on checked arrays: per output row one register-blocked pass per non-zero tap, in the
direct kernels' ring of padded planes (_cpu/sparse.pxi), so the cost grows with the non-zeros, not the box."""
import numpy as np

from .. import _cpu
from .border import DenseTaps, add_constant_share
from .layout import check_rings, crop_negative_pads, plane_chunks, row_layout, threads_for_work


def run(x, indices, values, b, spec, nthreads):
    """The sparse direct kernel on checked, contiguous arrays (x: compute dtype; indices (nnz, 5) sorted by
    output channel, values in x's dtype). Negative pads crop first; the kernel computes with zeros outside and a
    constant cval's share is added after, on the border (border.add_constant_share)."""
    check_rings(spec, x.dtype.itemsize, nthreads)
    x, spec = crop_negative_pads(x, spec)
    O = spec.w_shape[0]
    bias = np.zeros(O, x.dtype) if b is None else np.asarray(b, x.dtype)
    row_map, map_d, map_h, toff = row_layout(x.shape, spec)
    tap_ptr = np.searchsorted(indices[:, 0], np.arange(O + 1)).astype(np.intp)
    c, a, bb, e = (np.ascontiguousarray(indices[:, i], dtype=np.intp) for i in range(1, 5))
    out = np.empty(spec.out_shape, dtype=x.dtype)
    Cg, kd = spec.w_shape[1], spec.kernel_size[0]
    N, G = x.shape[0], spec.groups
    work = 2.0 * values.size * N * np.prod(spec.out_shape[2:], dtype=np.float64) / max(O // G, 1) + \
        8.0 * np.prod(spec.out_shape, dtype=np.float64)
    nthreads = threads_for_work(work, nthreads)
    nchunk = plane_chunks(spec, nthreads)
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    _cpu.compiled.sparse_conv3d_direct(x, row_map, spec.pads[2][0], spec.stride[2] == 1, tap_ptr, c, a, bb,
                                     np.ascontiguousarray(toff[e]), np.ascontiguousarray(values, x.dtype),
                                     bias, out, map_d, map_h, Cg, kd, sd, sh, dd, dh, nchunk, nthreads)
    return add_constant_share(out, spec, DenseTaps(lambda: dense_weight(indices, values, spec.w_shape)))


def dense_weight(indices, values, shape):
    """The dense weight (in the values' dtype) that coalesced indices (nnz, ndim) and their values fill."""
    values = np.asarray(values)
    w = np.zeros(shape, values.dtype)
    w[tuple(np.asarray(indices).T)] = values
    return w
