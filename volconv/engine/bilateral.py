"""The exact windowed bilateral filter on checked arrays: the volume, the guide and the validity padded by the
window's radii, each tap's offset and spatial term, then _cpu/bilateral.pxi row by row (the weights made in
registers, one exp per tap and voxel; no weight field)."""
import numpy as np

from .. import _cpu
from .._validate import pad_array
from .layout import threads_for_work

LOG2E = 1.4426950408889634


def window(zooms, radii, sigma_spatial_mm, dtype):
    """(each tap's offset per axis, a_t) over the box of `radii` (voxels), taps in C order: a_t =
    -sum over axes of (t_a zooms_a)^2 / (2 sigma_a^2), sigma per axis in mm (an axis of sigma 0 has radius 0)."""
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radii], indexing="ij")
    a = np.zeros(grids[0].shape)
    for t, z, s in zip(grids, zooms, sigma_spatial_mm):
        if s > 0:
            a -= (t * z) ** 2 / (2.0 * s * s)
    return [g.ravel() for g in grids], np.ascontiguousarray(a.ravel(), dtype)


def bilateral(x, guide, valid, sigma_mm, zooms, radii, sigma_range, mode, cval, halo, edge_valid, nthreads):
    """x (D, H, W) C-contiguous float32/float64; guide: None (x guides itself) or an array of x's shape; valid:
    None or a bool array of x's shape (False: the voxel contributes nothing). Beyond the edges x and the guide are
    extended by the scipy `mode` (cval for "constant"); edge_valid: whether voxels beyond the edges count (False:
    they contribute nothing, as outside a mask). halo: per axis, (lo, hi) planes of x that are context, not output
    (each at most that axis' radius). Returns the output, x's shape less the halos."""
    pads = [(r - lo, r - hi) for r, (lo, hi) in zip(radii, halo)]
    out_shape = tuple(n - lo - hi for n, (lo, hi) in zip(x.shape, halo))
    xp = np.ascontiguousarray(pad_array(x, pads, mode, cval))
    gp = xp if guide is None else np.ascontiguousarray(pad_array(np.asarray(guide, x.dtype), pads, mode, cval))
    mp = None
    if valid is not None or not edge_valid:
        v = np.ones(x.shape, bool) if valid is None else valid
        mp = pad_array(v, pads, mode, True) if edge_valid else np.pad(v, pads)
        mp = np.ascontiguousarray(mp, x.dtype)
        xp = np.where(mp != 0, xp, 0)        # an invalid voxel holds 0 in both: its weight 0 times a finite value
        gp = xp if guide is None else np.where(mp != 0, gp, 0)
    out = np.empty(out_shape, x.dtype)
    if out.size == 0:
        return out
    taps, a = window(zooms, radii, sigma_mm, np.float64)
    strides = np.array(xp.strides) // xp.itemsize
    off = np.ascontiguousarray(sum(t * s for t, s in zip(taps, strides)), np.intp)
    b = 0.0 if np.isinf(sigma_range) else 1.0 / (2.0 * sigma_range * sigma_range)
    work = 30.0 * a.size * out.size   # about 30 operations per tap and voxel (the exp's polynomial among them)
    # the kernel's exponentials are in base 2: exp(a - b d^2) = 2^(a log2 e - b log2 e d^2)
    _cpu.compiled.bilateral(xp, gp, mp, off, (a * LOG2E).astype(x.dtype), x.dtype.type(b * LOG2E), out, *radii,
                            threads_for_work(work, nthreads))
    return out
