"""Gaussian Hessians on checked arrays, as scikit-image composes them, slab by slab of D planes, and the per-voxel
measures of their eigenvalues (_cpu/hessian.pxi: Frangi, Sato, Meijering, the eigenvalues themselves).

scikit-image (feature.hessian_matrix with use_gaussian_derivatives=True, the ridge filters' Hessian) filters twice
with scipy.ndimage.gaussian_filter at sigma / sqrt(2): G_i = first derivative along i, then H_ij = G_i's first
derivative along j (i <= j), each 1-D pass extending its own input by the boundary mode. Operators along
different axes commute, so the same result comes axis by axis: the two passes along D for every distinct D
operator (d then d, d then g, g then g) on a slab with a halo of planes, then the two fused H/W passes per
component on that slab, which needs no halo. Per scale that is 5 passes along D and 10 fused H/W passes, every
one over one slab at a time (no volume-sized intermediate), and the slab's six components go straight to the
eigenvalue kernel.

mode="constant": every pass runs with zeros outside (linear, so the order of axes is free) and the constant's
share, which scipy adds pass by pass in its own order of axes, is added as the few outer products of 1-D
vectors it is (constant_terms).

float32 volumes keep 6.5 sigmas of each Gaussian (TRUNCATE_CAP; what is left out is below float32's rounding),
float64 volumes 10, scikit-image 8 (100 at sigma <= 1)."""
import math

import numpy as np

from .. import _cpu
from .._validate import ConvSpec, pad_index
from .layout import threads_for_work
from .separable import separable_conv3d

# Hessian components in scikit-image's order (combinations_with_replacement of the axes)
PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
# the second-derivative components are never scaled: skimage's hessian_matrix returns d2/dxi dxj of the smoothed
# volume (only Sato multiplies by sigma**2)
# taps left out beyond these sigmas weigh < exp(-50) (float64) or, with the derivative's factor, about 5e-9
# (float32) of the kernel: below the type's rounding (scikit-image keeps 8 sigmas, 100 when a sigma is <= 1)
TRUNCATE_CAP = {np.dtype(np.float64): 10.0, np.dtype(np.float32): 6.5}


def gaussian_taps(sigma, truncate):
    """scipy.ndimage.gaussian_filter1d's correlation weights (smoothing, first derivative) at `sigma` voxels:
    radius int(truncate * sigma + 0.5), normalised Gaussian phi, derivative x / sigma^2 * phi (scipy convolves
    with -x / sigma^2 phi)."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x * x)
    phi /= phi.sum()
    return phi, x / (sigma * sigma) * phi


def skimage_taps(sigma, dtype=np.float64):
    """Per axis (smoothing, derivative) taps of skimage's Hessian at sigma (voxels, per axis): scipy at
    sigma / sqrt(2), truncate 8 when every sigma > 1 else 100 (skimage's rule), capped at TRUNCATE_CAP."""
    truncate = min(8.0 if all(s > 1 for s in sigma) else 100.0, TRUNCATE_CAP[np.dtype(dtype)])
    return [gaussian_taps(s / math.sqrt(2), truncate) for s in sigma]


def _pass(x, fd, fh, fw, mode, nthreads):
    """One fused separable correlation of x (planes, H, W): valid along D (x carries its context planes),
    'same' along H and W under `mode` (zeros outside for "constant")."""
    rh, rw = len(fh) // 2, len(fw) // 2
    spec = ConvSpec((1, 1) + x.shape, (1, 1, len(fd), len(fh), len(fw)), stride=(1, 1, 1),
                    pads=((0, 0), (rh, rh), (rw, rw)), dilation=(1, 1, 1), groups=1, mode=mode, cval=0.0)
    return separable_conv3d(np.ascontiguousarray(x)[None, None], fd, fh, fw, spec, nthreads)[0, 0]


def _shifted_rows(x, first, stop, mode, shift):
    """Planes first..stop-1 of x - shift, extended beyond the ends by `mode` (zeros for "constant"), a copy."""
    if first >= 0 and stop <= x.shape[0]:
        return np.subtract(x[first:stop], x.dtype.type(shift))
    src = pad_index(x.shape[0], -first, stop - x.shape[0], mode)
    out = np.subtract(x[np.maximum(src, 0)], x.dtype.type(shift))
    out[src < 0] = 0
    return out


def first_passes(x, taps, z0, z1, mode, shift, nthreads):
    """The first passes along D, (derivative, smoothing), of x - shift on planes z0 - r .. z1 + r - 1 as the
    second pass reads them: beyond the ends extended by `mode` (zeros for "constant"), as scipy extends its
    input. Computed from x's planes with their own halo, slab by slab (a pass along D is one of the 25 per
    scale: recomputing its halo costs less than two volumes kept), over the planes the extension reads.
    x - shift: the Hessian ignores a constant, and float32 sums of a volume centred on 0 keep the accuracy of
    its structure, not of its offset (CT's -1000, MR's bright background)."""
    g0, d0 = taps[0]
    D, r, one = x.shape[0], len(g0) // 2, np.ones(1)
    if mode == "wrap":   # periodic: the passes over the periodic extension are the extended result
        block = _shifted_rows(x, z0 - 2 * r, z1 + 2 * r, mode, shift)
        return [_pass(block, k, one, one, mode, nthreads) for k in (d0, g0)]
    src = pad_index(D, r - z0, z1 + r - D, mode)
    used = src[src >= 0]
    lo, hi = int(used.min()), int(used.max()) + 1
    block = _shifted_rows(x, lo - r, hi + r, mode, shift)
    out = []
    for k in (d0, g0):
        t = _pass(block, k, one, one, mode, nthreads)
        if k is d0:
            _mirror_zeros(t, 0, lo == 0, hi == D, mode)
        if not np.array_equal(src, np.arange(z0 - r, z1 + r)):
            t = t[np.maximum(src - lo, 0)]
            t[src < 0] = 0
        out.append(t)
    return out


def centre(x):
    """The shift first_passes subtracts: x's mean (most voxels are background near it), in x's dtype."""
    return float(x.dtype.type(np.mean(x, dtype=np.float64))) if x.size else 0.0


def _mirror_zeros(y, axis, lo, hi, mode):
    """mode="mirror": a derivative pass's output is exactly 0 on the axis' end samples (an odd kernel on an
    input extended evenly about them), as scipy computes it (tap pairs x[i+t] - x[i-t]); volconv's sums leave
    1e-17 there, which Frangi's absolute clip at 1e-10 can tell apart from 0 on a flat corner. lo / hi: whether
    y holds the axis' first / last sample."""
    if mode == "mirror" and y.shape[axis]:
        index = [slice(None)] * 3
        for end, here in ((0, lo), (-1, hi)):
            if here:
                index[axis] = end
                y[tuple(index)] = 0
    return y


def centre(x):
    """The shift first_passes subtracts: x's mean (most voxels are background near it), in x's dtype."""
    return float(x.dtype.type(np.mean(x, dtype=np.float64))) if x.size else 0.0


def hessian_slab(x, taps, z0, z1, mode, cval, nthreads, terms=None, shift=0.0):
    """The six components (PAIRS order) on planes z0..z1-1 of x, skimage's arithmetic (see the module
    docstring), the passes run on x - shift; taps: skimage_taps per axis; terms: constant_terms(...) when mode
    is "constant" (None: computed)."""
    (g0, d0), (g1, d1), (g2, d2) = taps
    one = np.ones(1)
    td, tg = first_passes(x, taps, z0, z1, mode, shift, nthreads)
    y_dd, y_dg = _pass(td, d0, one, one, mode, nthreads), _pass(td, g0, one, one, mode, nthreads)
    _mirror_zeros(y_dd, 0, z0 == 0, z1 == x.shape[0], mode)
    y_gg = _pass(tg, g0, one, one, mode, nthreads)
    del td, tg

    def hw(y, a, b):   # the H / W passes; a derivative along H (W) leaves the mirror's zeros on its ends
        return _mirror_zeros(_mirror_zeros(_pass(y, one, a, b, mode, nthreads), 1, a is d1, a is d1, mode),
                             2, b is d2, b is d2, mode)
    a1 = hw(y_dd, g1, g2)
    del y_dd
    h00 = hw(a1, g1, g2)
    del a1
    b1 = hw(y_dg, g1, g2)
    del y_dg
    h01, h02 = hw(b1, d1, g2), hw(b1, g1, d2)
    del b1
    c1, c2 = hw(y_gg, d1, g2), hw(y_gg, g1, d2)
    del y_gg
    h11, h12 = hw(c1, d1, g2), hw(c1, g1, d2)
    del c1
    h22 = hw(c2, g1, d2)
    del c2
    hs = [h00, h01, h02, h11, h12, h22]
    if mode == "constant" and (cval != 0 or shift != 0):
        if terms is None:
            terms = constant_terms(x.shape, taps)
        for h, comp in zip(hs, terms):
            for cc, cs, v0, v1, v2 in comp:
                if cc * cval + cs * shift != 0:
                    h += ((cc * cval + cs * shift) * v0[z0:z1, None, None] * (v1[:, None] * v2[None, :])
                          ).astype(h.dtype)
    return hs


def _zero_padded(v, k):
    """1-D correlation of v with taps k, zeros outside ('same' size), float64."""
    r = len(k) // 2
    return np.correlate(np.pad(v, r), k, mode="valid")


def constant_terms(shape, taps):
    """mode="constant": per component, the share of cval and of the shift first_passes subtracted, as
    (coefficient of cval, coefficient of the shift, v0, v1, v2) outer products. scipy's pass along axis a with
    taps k maps y to B y + c (sum(k) - B 1), B the correlation with zeros outside; unrolled over skimage's six
    passes (axes 0, 1, 2 for the first derivative, again for the second), the result is B...B x plus c times
    the sum over passes t of the later passes' B applied to (sum(k_t) - B_t 1). volconv's passes give
    B...B (x - shift): the shift comes back as shift times B...B 1, one more outer product."""
    out = []
    for i, j in PAIRS:
        passes = [(a, taps[a][1] if a == i else taps[a][0]) for a in range(3)] + \
                 [(a, taps[a][1] if a == j else taps[a][0]) for a in range(3)]
        comp = []
        for t, (a, k) in enumerate(passes):
            vs = [np.ones(n) for n in shape]
            vs[a] = k.sum() - _zero_padded(np.ones(shape[a]), k)
            for b, kb in passes[t + 1:]:
                vs[b] = _zero_padded(vs[b], kb)
            comp.append((1.0, 0.0, *vs))
        vs = [np.ones(n) for n in shape]
        for b, kb in passes:
            vs[b] = _zero_padded(vs[b], kb)
        comp.append((0.0, 1.0, *vs))
        out.append(comp)
    return out


def slab_rows(shape):
    """Planes per slab: an eighth of the volume, at least 16 (or the whole volume). A slab holds about eight
    buffers of its size at once, and the first passes' halos: about a volume in all."""
    return int(min(shape[0], max(16, shape[0] // 8)))


def slabs(shape, rows):
    """(z0, z1) of each slab of `rows` planes."""
    return [(z0, min(shape[0], z0 + rows)) for z0 in range(0, shape[0], rows)]


# per-voxel measures of the eigenvalues (_cpu/hessian.pxi); FRANGI_PARTS: plate * blob and the norm s apart
FRANGI, FRANGI_PARTS, SATO, MEIJERING, EIGVALS, NORM = 0, 1, 2, 3, 4, 5


def measure(hs, kind, out, out2=None, out3=None, *, sign=1.0, a=0.0, b=0.0, c=0.0, nthreads=1):
    """The compiled per-voxel kernel over one slab: hs the six components (contiguous, the slab's shape);
    sign multiplies them first (-1: white ridges). kind FRANGI: out = max(out, vesselness) with a=alpha,
    b=beta, c=gamma; FRANGI_PARTS: out = plate * blob, out2 = the norm s; SATO: out = max(out, c * sqrt(l1 l2)
    of the two largest, clipped at 0) with c=sigma^2; MEIJERING: out2 = max(0, the largest-magnitude of
    l_k + a (sum of the others)); EIGVALS: out, out2, out3 = the eigenvalues, largest first; NORM: out = the
    Frobenius norm (the root of the eigenvalues' squares)."""
    hs = [np.ascontiguousarray(h) for h in hs]
    dummy = out if out2 is None else out2
    work = 150.0 * out.size
    _cpu.compiled.hessian_measure(*hs, out, dummy if out2 is None else out2, dummy if out3 is None else out3,
                                  kind, sign, a, b, c, threads_for_work(work, nthreads))


def scale_slabs(x, t, mode, cval, nthreads, shift=None):
    """(z0, z1, the six components on planes z0..z1-1) of x at one scale (taps t), slab after slab.
    shift: centre(x) (None: computed)."""
    shift = centre(x) if shift is None else shift
    terms = constant_terms(x.shape, t) if mode == "constant" else None
    for z0, z1 in slabs(x.shape, slab_rows(x.shape)):
        yield z0, z1, hessian_slab(x, t, z0, z1, mode, cval, nthreads, terms, shift)


def ridge_filter(x, scales, method, mode, cval, sign, nthreads, *, alpha=0.5, beta=0.5, gamma=None):
    """scikit-image's Frangi / Sato / Meijering on x (D, H, W, C-contiguous float), the maximum over scales of
    the per-scale measure, each slab reduced into it as it is made. scales: (taps per axis, Sato's factor
    sigma^2) per scale. sign: -1 filters -x (bright ridges); cval applies to -x as in scikit-image (the Hessian
    of -x with cval c is minus that of x with cval -c). gamma None (Frangi): half the largest Hessian norm of
    the first scale over the whole volume, skimage's rule: a first pass over that scale (the smallest, usually,
    so the cheapest) finds it, rather than a volume of norms kept. Meijering divides each scale by its own
    maximum over the volume: each scale goes to a scratch volume first."""
    out = np.zeros(x.shape, x.dtype)
    if x.size == 0:
        return out
    dtype = x.dtype.type
    c, shift = sign * cval, centre(x)
    if method == "frangi" and gamma is None:
        peak = dtype(0)
        for z0, z1, hs in scale_slabs(x, scales[0][0], mode, c, nthreads, shift):
            norm = np.empty_like(hs[0])
            measure(hs, NORM, norm, nthreads=nthreads)
            peak = max(peak, norm.max())
            del hs, norm   # before the next slab is made
        gamma = float(peak / dtype(2)) or 1.0   # in the volume's dtype, as skimage's s.max() / 2
    scratch = np.empty(x.shape, x.dtype) if method == "meijering" else None
    for t, sato_c in scales:
        for z0, z1, hs in scale_slabs(x, t, mode, c, nthreads, shift):
            o = out[z0:z1]
            if method == "frangi":
                measure(hs, FRANGI, o, sign=sign, a=alpha, b=beta, c=gamma, nthreads=nthreads)
            elif method == "sato":
                measure(hs, SATO, o, sign=sign, c=sato_c, nthreads=nthreads)
            else:
                measure(hs, MEIJERING, o, scratch[z0:z1], sign=sign, a=alpha, nthreads=nthreads)
            del hs   # before the next slab is made
        if method == "meijering":
            peak = scratch.max()
            if peak > 0:
                scratch /= peak
            np.maximum(out, scratch, out=out)
    return out
