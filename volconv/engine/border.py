"""mode="constant" with a cval: the constant's share of the convolution, added on the border shell only.

out = corr(x with zeros outside, w) + sum of c * w[t] over the taps t whose voxel lies outside the volume. Which
taps fall outside depends, along each axis, only on the output position's distance to that axis' ends: a few
classes per axis (the kernel's reach on each side, and the interior, where every tap is inside). The second term
is computed per class triple, in float64, from the weights, and added on the border shell only: the interior gets
nothing (no cancellation against a large c, no NaN or Inf from a non-finite c), the border gets what
scipy.ndimage computes (c * w[t] per non-zero tap, so NaN / Inf as scipy has them). The share's weight gradient
is in dense.backward_weight."""
import itertools
import math

import numpy as np


class DenseTaps:
    """add_constant_share's view of a dense weight (O, Cg, kd, kh, kw), given or built on demand:
    contract(mD, mH, mW) -> (O, cD, cH, cW), the sum over taps of w[o, c, a, b, e] * mD[i, a] * mH[j, b] * mW[l, e]
    (input channels summed: each is padded with the constant); dense() the weights in float64, whose signs
    decide an infinite cval."""

    def __init__(self, w):
        self.w = w

    def dense(self):
        return np.asarray(self.w() if callable(self.w) else self.w, np.float64)

    def contract(self, md, mh, mw):
        return np.einsum("ocabe,ia,jb,le->oijl", self.dense(), md, mh, mw, optimize=True)


def _axis_classes(n, n_out, k, d, s, lo):
    """Along one axis: (inside (classes, k) 0/1 float64: which taps of a class land inside the volume, class of
    every output position, the slice of output positions whose taps are all inside)."""
    src = np.arange(n_out)[:, None] * s + np.arange(k)[None, :] * d - lo
    classes, index = np.unique((src >= 0) & (src < n), axis=0, return_inverse=True)
    interior = np.flatnonzero(classes[index].all(axis=1))
    inner = slice(int(interior[0]), int(interior[-1]) + 1) if interior.size else slice(0, 0)
    return classes.astype(np.float64), index.reshape(-1), inner


def constant_share(spec, taps):
    """(share (O, cD, cH, cW) in float64, class index per output position per axis, interior slice per axis):
    the constant's contribution by class triple, exactly 0 where every tap is inside."""
    axes = [_axis_classes(n, n_out, k, d, s, lo) for n, n_out, k, d, s, (lo, _) in
            zip(spec.x_shape[2:], spec.out_shape[2:], spec.kernel_size, spec.dilation, spec.stride, spec.pads)]
    (iD, _, _), (iH, _, _), (iW, _, _) = axes
    ones = [np.ones_like(m) for m in (iD, iH, iW)]

    def outside(contract):   # sum over the taps outside: outside D, or inside D and outside H, or inside both and W
        return contract(1 - iD, ones[1], ones[2]) + contract(iD, 1 - iH, ones[2]) + contract(iD, iH, 1 - iW)

    border = ~(iD.all(axis=1)[:, None, None] & iH.all(axis=1)[None, :, None] & iW.all(axis=1)[None, None, :])
    c = spec.cval
    with np.errstate(invalid="ignore", over="ignore"):
        if math.isfinite(c):
            share = c * outside(taps.contract)
        else:   # c * w[t] over the outside taps of non-zero weight (scipy's footprint: a zero weight is no tap):
            w = taps.dense()   # NaN for a NaN c or for weights of both signs, else c times their sign
            pos, neg = (outside(DenseTaps(m.astype(np.float64)).contract) for m in (w > 0, w < 0))
            share = np.where((pos > 0) & (neg > 0) | (math.isnan(c) & ((pos > 0) | (neg > 0))), np.nan,
                             np.where(pos > 0, c, np.where(neg > 0, -c, 0.0)))
    return np.where(border, share, 0.0), [a[1] for a in axes], [a[2] for a in axes]


def add_constant_share(out, spec, taps):
    """out (computed with zeros outside) += the constant cval's share, on the border shell only."""
    if spec.mode != "constant" or spec.cval == 0 or out.size == 0:
        return out
    share, index, inner = constant_share(spec, taps)
    parts = [(slice(0, s.start), slice(s.start, s.stop), slice(s.stop, n)) if s.stop > s.start else (slice(0, n),)
             for s, n in zip(inner, out.shape[2:])]
    for block in itertools.product(*parts):
        if all(b == s for b, s in zip(block, inner)) or any(b.stop <= b.start for b in block):
            continue   # the interior block (nothing to add) or an empty one
        i, j, k = (idx[b] for idx, b in zip(index, block))
        out[(slice(None), slice(None)) + block] += share[:, i[:, None, None], j[None, :, None], k[None, None, :]]
    return out
