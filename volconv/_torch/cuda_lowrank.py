"""volconv::separable_conv3d on the CUDA plugin (separable.cu): the fused forward, the input gradient (the same
pass with the reversed factors) and the factors' gradients (deterministic 1-D reductions), zero padding (the
caller pads other modes first)."""
import itertools
import math

import torch

from .. import _cuda
from . import cuda

TX, SMEM_CAP = 32, 160 * 1024   # separable.cu's tile width and the most shared memory its forward takes


def fits(spec, itemsize):
    """Whether the forward's ring of filtered planes (one column of a 32 x 1 tile at the least) fits in shared
    memory: a reach (kd - 1) * dd + 1 below about 1280 planes (float32) / 640 (float64)."""
    (kd, kh, kw), (dd, dh, _) = spec.kernel_size, spec.dilation
    return (((kd - 1) * dd + 1) * TX + ((kh - 1) * dh + 1) * TX + kd + kh + kw) * itemsize <= SMEM_CAP


def _pass(z, fd, fh, fw, stride, pads_lo, dilation, out3):
    """out (N, C, *out3): each channel of z correlated with fd (x) fh (x) fw (zero padding; a negative pad
    crops)."""
    N, C = z.shape[:2]
    k = (fd.shape[1], fh.shape[1], fw.shape[1])
    params = _cuda.params(N, C, *z.shape[2:], C, C, *k, *out3, *stride, *pads_lo, *dilation)
    return cuda.launch("separable_conv3d", "vc_separable_forward", params, (N, C) + tuple(out3), z, fd, fh, fw)


def _lo(spec):
    return tuple(lo for lo, _ in spec.pads)


def forward(z, fd, fh, fw, spec):
    """The depthwise rank-1 pass of ConvSpec spec (mode "constant", cval 0) on contiguous tensors."""
    if not fits(spec, z.element_size()):
        return cuda.conv3d_forward(z, _dense(fd, fh, fw), None, spec)
    return _pass(z, fd, fh, fw, spec.stride, _lo(spec), spec.dilation, spec.out_shape[2:])


def backward(g, z, fd, fh, fw, spec, need_input, need_factors):
    """(gz, gfd, gfh, gfw), None where not needed, of forward's pass for the output gradient g (contiguous)."""
    if not fits(spec, z.element_size()):   # the dense depthwise weight's kernels, its gradient contracted
        w = _dense(fd, fh, fw)
        gz = cuda.conv3d_grad_input(g, w, spec) if need_input else None
        if not need_factors:
            return gz, None, None, None
        gw = cuda.conv3d_grad_weight(z, g, spec)[:, 0]
        return (gz, torch.einsum("cabe,cb,ce->ca", gw, fh, fw), torch.einsum("cabe,ca,ce->cb", gw, fd, fw),
                torch.einsum("cabe,ca,cb->ce", gw, fd, fh))
    gz = _grad_input(g, fd, fh, fw, spec) if need_input else None
    return (gz,) + (_grad_factors(g, z, (fd, fh, fw), spec) if need_factors else (None,) * 3)


def _dense(fd, fh, fw):
    return torch.einsum("ca,cb,ce->cabe", fd, fh, fw)[:, None].contiguous()


def _grad_input(g, fd, fh, fw, spec):
    """The transposed pass, phase by phase: the input positions i = phase + stride * j of each axis are reached
    by the taps a0, a0 + t, ... (t = stride / gcd(stride, dilation)) from g[j + c0], [j + c0 - dilation / gcd]...,
    so each combination of phases is one stride-1 pass of g with those taps reversed, written to its strided
    slice of the gradient (no zeros between g's values: the work of the forward, not stride^3 times it). At
    stride 1: one pass, the reversed factors padded by the reach less the forward's padding (negative: a crop)."""
    axes = [_phases(n, f, s, d, lo) for n, f, s, d, (lo, _) in
            zip(spec.x_shape[2:], (fd, fh, fw), spec.stride, spec.dilation, spec.pads)]
    if spec.stride == (1, 1, 1):   # every tap reaches the one phase
        _, taps, pads, dil, n = zip(*(a[0] for a in axes))
        return _pass(g, *taps, (1, 1, 1), pads, dil, n)
    gz = g.new_zeros(spec.x_shape)   # (positions no tap reaches stay zero)
    sd, sh, sw = spec.stride
    for phases in itertools.product(*axes):
        first, taps, pads, dil, n = zip(*phases)
        gz[:, :, first[0]::sd, first[1]::sh, first[2]::sw] = _pass(g, *taps, (1, 1, 1), pads, dil, n)
    return gz


def _phases(n, f, s, d, lo):
    """Per phase of an axis of n input positions at stride s, dilation d, before-pad lo, the phases some tap of
    factor f (C, k) reaches: (first position, the taps reversed, the pass's before-pad, dilation, length)."""
    k, t, step = f.shape[1], s // math.gcd(s, d), d // math.gcd(s, d)
    found = []
    for first in range(min(s, n)):
        a0 = next((a for a in range(min(t, k)) if (first + lo - a * d) % s == 0), None)
        if a0 is not None:   # taps a0, a0 + t, ... read g[j + c0 - m * step] for position first + s * j
            taps = f[:, a0::t].flip(1).contiguous()
            c0 = (first + lo - a0 * d) // s
            found.append((first, taps, (taps.shape[1] - 1) * step - c0, step, -(-(n - first) // s)))
    return found


def _grad_factors(g, z, factors, spec):
    """Per axis: z filtered along the other two axes (this one whole: a unit factor, stride 1, no padding),
    then the plugin's 1-D weight gradient along the axis against g. One intermediate of about z's size at a
    time."""
    N, C = z.shape[:2]
    ones = factors[0].new_ones(C, 1)
    grads = []
    for axis in range(3):
        def one(t, v):
            return tuple(v if a == axis else t[a] for a in range(3))
        out3 = one(spec.out_shape[2:], z.shape[2 + axis])
        y = _pass(z, *(ones if a == axis else f for a, f in enumerate(factors)), one(spec.stride, 1),
                  one(_lo(spec), 0), one(spec.dilation, 1), out3)
        P, L, M, Lo = math.prod(out3[:axis]), out3[axis], math.prod(out3[axis + 1:]), spec.out_shape[2 + axis]
        k = factors[axis].shape[1]
        chunks = max(1, min(256, -(-N * P * Lo * M // (256 * 16))))   # >= 16 elements a thread
        params = _cuda.params(N, C, P, L, M, Lo, k, spec.stride[axis], _lo(spec)[axis], spec.dilation[axis], chunks)
        grads.append(cuda.launch("separable_conv3d backward (factors)", "vc_separable_grad_factor", params,
                                 [(C, k, chunks), (C, k)], y, g)[1])
    return tuple(grads)
