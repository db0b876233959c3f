"""Separable passes on checked arrays: sums of rank-1 terms (the Gaussian, the box, the LoG, CP components) run
as their 1-D factors in one fused pass over memory, forward and backward, never as the dense kernel.

Each term's three 1-D passes run fused (_cpu/separable.pxi): input planes are filtered along H and W into a ring
of cache-sized tiles and combined along D from there, so no intermediate volume is written. Boundary modes
extend each axis on its own, so the passes are exact."""
import numpy as np

from .. import _cpu
from .._validate import ConvSpec
from . import dense
from .border import add_constant_share
from .layout import check_memory, fold_padding, row_layout, threads_for_work


RING_BYTES = 384 * 2**10   # per thread: the ring of filtered tiles stays in L2 (1 MiB on Zen 4, 512 KiB on older)


def separable_conv3d(x, fd, fh, fw, spec, nthreads, out=None):
    """Sums of rank-1 terms on every channel, in one fused pass: fd, fh, fw are (T, C, k) factors (term t of
    channel c: fd[t, c] x fh[t, c] x fw[t, c], the terms summed), or (C, k) for one term per channel, or (k,)
    for one term on every channel. spec: the geometry of the whole 3-D kernel (stride, dilation, pads, mode
    with cval 0). out: a C-contiguous array of the output's shape and x's dtype to write into (else a new one)."""
    N, C = x.shape[:2]
    fd, fh, fw = (np.asarray(f, x.dtype).reshape((1,) * (3 - np.ndim(f)) + np.shape(f)) for f in (fd, fh, fw))
    T = max(fd.shape[0], fh.shape[0], fw.shape[0])
    Do, Ho, Wo = spec.out_shape[2:]
    vl = _cpu.compiled.vector_bytes() // x.dtype.itemsize
    ring_rows = T * ((_cpu.compiled.fir_rows_max() - 1) * spec.stride[0] + (fd.shape[2] - 1) * spec.dilation[0] + 1)
    row_bytes = -(-Wo // vl) * vl * x.dtype.itemsize
    hb = int(max(1, min(Ho, RING_BYTES // (ring_rows * row_bytes))))
    ntile, nchunk = _split(N * C, Ho, Do, hb, nthreads)
    hb = -(-Ho // ntile)
    work = (2.0 * T * sum(f.shape[2] for f in (fd, fh, fw)) + 8.0) * np.prod(spec.out_shape, dtype=np.float64)
    nthreads = threads_for_work(work, nthreads)
    # the ring: RING_BYTES, or more for a kernel whose D extent alone does not fit in it
    check_memory(spec, x.dtype.itemsize, ring_rows * hb * row_bytes * nthreads)
    fd, fh, fw = (np.ascontiguousarray(np.broadcast_to(f, (T, C, f.shape[2]))).reshape(T * C, -1)
                  for f in (fd, fh, fw))
    row_map, map_d, map_h, toff = row_layout(x.shape, spec)
    if out is None:
        out = np.empty(spec.out_shape, dtype=x.dtype)
    elif out.shape != tuple(spec.out_shape) or out.dtype != x.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {x.dtype} array of shape {spec.out_shape}")
    (sd, sh, _), (dd, dh, _) = spec.stride, spec.dilation
    sym, halves = _symmetric_halves((fd, fh, fw), spec)
    _cpu.compiled.separable_conv3d(x, fd, fh, fw, map_d, map_h, row_map, spec.pads[2][0], spec.stride[2] == 1,
                                 toff, spec.stride[2] == spec.dilation[2] == 1, sd, sh, dd, dh, out, hb, nchunk,
                                 nthreads, sym, *halves)
    return out


def _symmetric_halves(factors, spec):
    """(bit mask, half taps) of the axes whose every factor row is symmetric (f == f[::-1]) at unit stride and
    dilation, 2 <= k <= 129: bit a set for axis a, half taps (rows, (k + 1) // 2) with an odd k's centre halved
    (the kernels add the centre to itself: exact). Those passes take half the multiplies."""
    sym, halves = 0, []
    for axis, f in enumerate(factors):
        k = f.shape[1]
        if spec.stride[axis] == spec.dilation[axis] == 1 and 2 <= k <= 129 and np.array_equal(f, f[:, ::-1]):
            h = np.array(f[:, :(k + 1) // 2])
            if k % 2:
                h[:, -1] *= 0.5
            sym |= 1 << axis
            halves.append(h)
        else:
            halves.append(None)
    return sym, halves


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


def run_separable(x, kernel, spec, algorithm, nthreads, out=None):
    """A SeparableKernel (one 3-D kernel, applied to every channel of x), term by term. spec: the geometry of
    the whole 3-D kernel. "auto"/"direct" run every term in one fused pass (into out when given: see
    separable_conv3d); "fft"/"torch" run each 1-D pass as a depthwise convolution by that algorithm."""
    if algorithm in ("auto", "direct"):   # every term in one fused pass
        fd, fh, fw = kernel.factors
        out = separable_conv3d(x, (fd * kernel.weights[:, None])[:, None], fh[:, None], fw[:, None],
                               spec.with_cval(0.0), nthreads, out=out)
    else:
        out = None
        for weight, factors in kernel.terms():
            y = _passes(x, factors, spec.with_cval(0.0), algorithm, nthreads)
            if weight != 1:
                y *= x.dtype.type(weight)   # y is this term's own fresh array: scaled in place
            out = y if out is None else np.add(out, y, out=out)
    # computed with zeros outside; a constant cval's share is added on the border (the 3-D kernel's, as
    # scipy.ndimage.correlate with kernel.to_dense(): not a constant per 1-D pass)
    return add_constant_share(out, spec, SeparableTaps(kernel, x.shape[1]))


class SeparableTaps:
    """border.add_constant_share's view of a SeparableKernel applied to each of C channels (depthwise): the
    contractions by the factors, never the dense kernel (built only for an infinite cval's signs)."""

    def __init__(self, kernel, channels):
        self.kernel, self.channels = kernel, channels

    def dense(self):
        k = self.kernel.to_dense()
        return np.broadcast_to(k, (self.channels, 1) + k.shape)

    def contract(self, md, mh, mw):
        fd, fh, fw = (np.asarray(f, np.float64) for f in self.kernel.factors)
        v = np.einsum("t,it,jt,lt->ijl", self.kernel.weights, md @ fd.T, mh @ fh.T, mw @ fw.T)
        return np.broadcast_to(v, (self.channels,) + v.shape)


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


def project(x, m):
    """Channels of x (N, C, ...) combined by m (C', C): out[n, i] = sum_c m[i, c] x[n, c] (a 1x1x1 convolution,
    as one matrix product per batch item)."""
    N, C = x.shape[:2]
    out = np.matmul(m, x.reshape(N, C, -1))
    return out.reshape((N, m.shape[0]) + x.shape[2:])


def separable_backward_input(g, fd, fh, fw, spec, nthreads):
    """d loss / d input of separable_conv3d with one term per channel (fd, fh, fw: (C, k)) at stride 1: the
    transposed convolution is the correlation of g with the reversed factors, so it is one fused pass too.
    Zero padding: the padding's share is never computed; other modes: computed over the padded domain and
    folded back (the padding's adjoint). None at other strides (the caller falls back to the dense path)."""
    if spec.stride != (1, 1, 1):
        return None
    pads = spec.transposed_pads()
    zero_pad = spec.mode == "constant" and min(min(p) for p in pads) >= 0
    if not zero_pad:   # the whole padded domain, folded back below
        pads = tuple((r, r) for r in spec.reach())
    tspec = ConvSpec(g.shape, spec.w_shape, stride=(1, 1, 1), pads=pads, dilation=spec.dilation, groups=spec.groups,
                     mode="constant")
    gx = separable_conv3d(g, fd[:, ::-1], fh[:, ::-1], fw[:, ::-1], tspec, nthreads)
    return gx if zero_pad else fold_padding(gx, spec.x_shape[2:], spec.pads, spec.mode)


def separable_backward_factors(z, g, fd, fh, fw, spec, nthreads):
    """d loss / d (fd, fh, fw), each (C, k): along each axis, the other two factors filter z (that axis padded
    but not filtered, at unit stride), and a 1-D weight gradient along the axis correlates the result with g.
    Three cheap passes instead of the k^3 weight gradient of the kernel they make."""
    C = z.shape[1]
    grads = []
    factors = (fd, fh, fw)
    for axis in range(3):
        one = lambda t, v: tuple(v if a == axis else t[a] for a in range(3))  # noqa: E731
        fs = [np.ones((C, 1)) if a == axis else f for a, f in enumerate(factors)]
        ks = one(spec.kernel_size, 1)
        pspec = ConvSpec(z.shape, (C, 1) + ks, stride=one(spec.stride, 1), pads=spec.pads,
                         dilation=one(spec.dilation, 1), groups=C, mode=spec.mode)
        y = separable_conv3d(z, *fs, pspec, nthreads)
        wk = tuple(spec.kernel_size[a] if a == axis else 1 for a in range(3))
        wspec = ConvSpec(y.shape, (C, 1) + wk, stride=tuple(spec.stride[a] if a == axis else 1 for a in range(3)),
                         pads=((0, 0),) * 3, dilation=tuple(spec.dilation[a] if a == axis else 1 for a in range(3)),
                         groups=C, mode="constant")
        grads.append(dense.backward_weight(y, g, wspec, nthreads).reshape(C, -1))
    return grads


def backward(z, g, fd, fh, fw, spec, nthreads, need_input, need_factors):
    """(input, fd, fh, fw) gradients of the separable depthwise pass, numpy (None where not needed): the input
    gradient a separable pass with the reversed factors (at stride 1; the dense depthwise weight's transposed
    convolution otherwise), each factor's a 1-D weight gradient."""
    gz = gd = gh = gw = None
    if need_input:
        gz = separable_backward_input(g, fd, fh, fw, spec, nthreads)
        if gz is None:   # strided
            W = np.einsum("ra,rb,re->rabe", fd, fh, fw)[:, None].astype(g.dtype)
            gz = dense.backward_input(g, W, spec, "auto", nthreads)
    if need_factors:
        gd, gh, gw = (np.ascontiguousarray(t) for t in
                      separable_backward_factors(z, g, fd, fh, fw, spec, nthreads))
    return gz, gd, gh, gw
