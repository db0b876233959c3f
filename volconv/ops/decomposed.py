"""Kernels given by factors, executed factor by factor and never rebuilt densely.

Separable kernels (a sum of rank-1 terms, `vc.kernels.SeparableKernel`: the Gaussian, the box, the LoG):
each term's three 1-D passes run fused in one pass over memory (`_cpu` separable_conv3d): input planes are
filtered along H and W into a ring of cache-sized tiles and combined along D from there, so no intermediate
volume is written. Boundary modes extend each axis on its own, so the passes are exact.
"""
import numpy as np

from .. import _cpu
from .._validate import ConvSpec
from . import dense

RING_BYTES = 384 * 2**10   # per thread: the ring of filtered tiles stays in L2 (1 MiB on Zen 4, 512 KiB on older)


def separable_conv3d(x, fd, fh, fw, spec, nthreads):
    """One rank-1 term on every channel: fd, fh, fw are (C, k) factors (row c for channel c) or (k,) for all.
    spec: the geometry of the whole 3-D kernel (stride, dilation, pads, mode with cval 0)."""
    N, C = x.shape[:2]
    fd, fh, fw = (np.ascontiguousarray(np.broadcast_to(np.asarray(f, x.dtype), (C, np.shape(f)[-1])))
                  for f in (fd, fh, fw))
    row_map, map_d, map_h, toff = dense._row_layout(x.shape, spec)
    out = np.empty(spec.out_shape, dtype=x.dtype)
    Do, Ho, Wo = spec.out_shape[2:]
    vl = _cpu.direct.vector_bytes() // x.dtype.itemsize
    ring_rows = (_cpu.direct.fir_rows_max() - 1) * spec.stride[0] + (fd.shape[1] - 1) * spec.dilation[0] + 1
    hb = int(max(1, min(Ho, RING_BYTES // (ring_rows * -(-Wo // vl) * vl * x.dtype.itemsize))))
    ntile, nchunk = _split(N * C, Ho, Do, hb, nthreads)
    hb = -(-Ho // ntile)
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    work = (2.0 * sum(f.shape[1] for f in (fd, fh, fw)) + 8.0) * np.prod(spec.out_shape, dtype=np.float64)
    nthreads = int(max(1, min(nthreads, work // dense.MIN_WORK_PER_THREAD)))
    _cpu.direct.separable_conv3d(x, fd, fh, fw, map_d, map_h, row_map, spec.pads[2][0], spec.stride[2] == 1,
                                 toff, spec.stride[2] == spec.dilation[2] == 1, sd, sh, dd, dh, out, hb, nchunk,
                                 nthreads)
    return out


def _split(volumes, Ho, Do, hb, nthreads):
    """Row tiles and plane chunks per volume: tiles of at most hb rows, and enough units that every thread has
    an equal share when there are few (a plane chunk re-reads the kernel's D halo, so tiles come first)."""
    ntile = -(-Ho // hb)
    while volumes * ntile < 4 * nthreads and (volumes * ntile) % nthreads and ntile < Ho:
        ntile += 1
    nchunk = 1
    while volumes * ntile * nchunk < nthreads and nchunk < Do:
        nchunk += 1
    return ntile, nchunk


def run_separable(x, kernel, spec, algorithm, nthreads):
    """A SeparableKernel (one 3-D kernel, applied to every channel of x), term by term. spec: the geometry of
    the whole 3-D kernel. "auto"/"direct" fuse each term's passes; "fft"/"torch" run each 1-D pass as a
    depthwise convolution by that algorithm."""
    if spec.mode == "constant" and spec.cval != 0:  # passes of zero padding, then the constant's share
        dense_sum = float(np.sum(kernel.weights * np.prod([f.sum(axis=1) for f in kernel.factors], axis=0)))
        out = run_separable(x - x.dtype.type(spec.cval), kernel, spec.with_cval(0.0), algorithm, nthreads)
        return out + x.dtype.type(spec.cval * dense_sum)
    out = None
    for weight, factors in kernel.terms():
        if algorithm in ("auto", "direct"):
            fd, fh, fw = factors
            y = separable_conv3d(x, fd * weight, fh, fw, spec, nthreads)
        else:
            y = _passes(x, factors, spec, algorithm, nthreads)
            if weight != 1:
                y *= x.dtype.type(weight)   # y is this term's own fresh array: scaled in place
        out = y if out is None else np.add(out, y, out=out)
    return out


def _passes(x, factors, spec, algorithm, nthreads):
    """One rank-1 term as three depthwise 1-D convolutions, each padding only its own axis."""
    C = x.shape[1]
    y = x
    for axis, f in enumerate(factors):
        shape = [1, 1, 1]
        shape[axis] = f.size
        w = np.ascontiguousarray(np.broadcast_to(f.reshape(shape).astype(x.dtype), (C, 1) + tuple(shape)))
        one = lambda t, v: tuple(t[a] if a == axis else v for a in range(3))  # noqa: E731
        pspec = ConvSpec(y.shape, w.shape, stride=one(spec.stride, 1), pads=one(spec.pads, (0, 0)),
                         dilation=one(spec.dilation, 1), groups=C, mode=spec.mode)
        y = dense.run(y, w, None, pspec, algorithm, nthreads)
    return y
