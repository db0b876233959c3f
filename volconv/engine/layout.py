"""The direct kernels' geometry and resources: row layout of padded inputs, rings of planes, memory checks, and
how many threads a piece of work can feed.

The direct-style kernels (dense, sparse, nested, dynamic, separable) read the input through index maps instead
of a padded copy: row_layout builds them. Every family checks its memory here before allocating (check_memory,
check_rings) and clamps its threads here (threads_for_work)."""
import math

import numpy as np

from .. import _cpu, _memory
from .._validate import ConvSpec, pad_index

MIN_WORK_PER_THREAD = 4e6   # flops (about 40 us): below this a second thread costs more than it saves


def threads_for_work(work, nthreads):
    """No more threads than `work` (flops) can feed: a thread that finishes its share in a few microseconds then
    waits at the barrier for a sibling the OS may have descheduled (on a busy machine, a whole time slice)."""
    return int(max(1, min(nthreads, work // MIN_WORK_PER_THREAD)))


def threads_for(spec, nthreads):
    """threads_for_work of a dense convolution: its multiply-adds and a pass over its output."""
    return threads_for_work(spec.flops() + 8.0 * np.prod(spec.out_shape, dtype=np.float64), nthreads)


def row_layout(x_shape, spec):
    """The direct kernels' row layout: each input row padded along W and split into the W stride's phases
    (row_map: source column of every position, -1 for zero), so that every tap reads a contiguous run at
    offset toff[e]; and D/H maps from padded position to plane/row (-1: zeros)."""
    (dlo, dhi), (hlo, hhi), (wlo, whi) = spec.pads
    D, H, W = x_shape[2:]
    sw, dw, kw = spec.stride[2], spec.dilation[2], spec.kernel_size[2]
    map_d = pad_index(D, dlo, dhi, spec.mode).astype(np.intp)
    map_h = pad_index(H, hlo, hhi, spec.mode).astype(np.intp)
    map_w = pad_index(W, wlo, whi, spec.mode)
    phase_len = -(-map_w.size // sw)
    # row position ph * phase_len + j holds padded column j * sw + ph (-1 past the end: never read); a stride
    # longer than the padded row has a phase per column only (the others would hold nothing)
    cols = np.arange(phase_len)[None, :] * sw + np.arange(min(sw, map_w.size))[:, None]
    row_map = np.where(cols < map_w.size, map_w[np.minimum(cols, map_w.size - 1)], -1).ravel().astype(np.intp)
    taps = np.arange(kw) * dw
    toff = ((taps % sw) * phase_len + taps // sw).astype(np.intp)
    return row_map, map_d, map_h, toff


def direct_operands(x, spec, nthreads):
    """x's rows laid out by row_layout in one padded copy (the weight-gradient kernel reads it whole)."""
    copy = spec.pads[2] != (0, 0) or spec.stride[2] != 1
    check_memory(spec, x.dtype.itemsize, math.prod(x.shape[:4]) * row_length(spec) * x.dtype.itemsize * copy)
    row_map, map_d, map_h, toff = row_layout(x.shape, spec)
    if not copy:
        return x, map_d, map_h, toff
    rows = np.empty(x.shape[:4] + row_map.shape, dtype=x.dtype)
    # a copy: about two memory operations per element decide the threads (a tiny one runs on one)
    _cpu.compiled.pad_rows(x, row_map, spec.pads[2][0], spec.stride[2] == 1, rows,
                           threads_for_work(2.0 * rows.size, nthreads))
    return rows, map_d, map_h, toff


def channel_block(spec):
    """Output channels that share each input-row load in the direct kernel (its register block)."""
    Og = spec.w_shape[0] // spec.groups
    return 8 if Og % 8 == 0 else 4 if Og % 4 == 0 else 1


# bytes per position of a padded axis while its index maps are built (pad_index, row_layout: int64 maps and
# numpy's temporaries)
MAP_BYTES = 64


def row_length(spec):
    """Length of the direct kernels' padded input rows (row_layout): the padded W axis in stride phases."""
    padded, sw = spec.x_shape[4] + sum(spec.pads[2]), spec.stride[2]
    return min(sw, padded) * -(-padded // sw)


def ring_bytes(spec, itemsize):
    """One thread's ring of padded planes in the direct kernels (direct, sparse, nested): every input channel
    of a group, (kd - 1) * dd + 1 planes of H rows, each row vector-aligned."""
    vl = _cpu.compiled.vector_bytes() // itemsize
    planes = spec.w_shape[1] * ((spec.kernel_size[0] - 1) * spec.dilation[0] + 1)
    return (planes * spec.x_shape[3] * -(-row_length(spec) // vl) * vl + vl) * itemsize


def check_memory(spec, itemsize, work=0, hint=""):
    """Refuse, before anything is allocated, a convolution that would not fit in the memory this process can
    still allocate (_memory.require): its output, the index maps of its padded axes, and `work`, the bytes
    of the algorithm's own buffers (the direct kernels' rings, a padded copy). Every op family calls it
    first, so that absurd padding, strides or sizes fail at once, naming them."""
    padded = sum(n + lo + hi for n, (lo, hi) in zip(spec.x_shape[2:], spec.pads))
    need = math.prod(spec.out_shape) * itemsize + MAP_BYTES * padded + work
    _memory.require(need, f"a convolution of input {spec.x_shape} with padding {spec.pads}, stride {spec.stride} "
                          f"and dilation {spec.dilation} into an output of shape {spec.out_shape}", hint)


def check_rings(spec, itemsize, nthreads, rings=None, instead="algorithm='fft' or 'torch'"):
    """check_memory with the direct kernels' rings of nthreads threads (rings: one thread's, when not
    ring_bytes(spec)), which the kernels allocate inside their parallel region; instead: what else to use."""
    total = (ring_bytes(spec, itemsize) if rings is None else rings) * nthreads
    check_memory(spec, itemsize, total, f" ({_memory.size(total)} of it the rings of padded planes of {nthreads} "
                                        f"thread(s)); use {instead}, or fewer workers")


def plane_chunks(spec, nthreads):
    """Work units of the direct kernels are (n, group, run of output planes): enough runs for every thread
    (each unit pads its planes once, so no more than that)."""
    return int(min(spec.out_shape[2], max(1, -(-2 * nthreads // (spec.x_shape[0] * spec.groups)))))


def crop_negative_pads(x, spec):
    """(x, spec) with negative pads applied as a crop of x (the kernels pad, they do not crop)."""
    if all(lo >= 0 and hi >= 0 for lo, hi in spec.pads):
        return x, spec
    crop = tuple(slice(max(-lo, 0), n + min(hi, 0)) for n, (lo, hi) in zip(x.shape[2:], spec.pads))
    x = np.ascontiguousarray(x[(slice(None), slice(None)) + crop])
    return x, ConvSpec(x.shape, spec.w_shape, stride=spec.stride, dilation=spec.dilation, groups=spec.groups,
                       pads=tuple((max(lo, 0), max(hi, 0)) for lo, hi in spec.pads), mode=spec.mode,
                       cval=spec.cval)


def fold_padding(grad_padded, shape, pads, mode):
    """Adjoint of padding: each padded position's gradient goes back to the voxel it copied."""
    g = grad_padded
    for axis, (n, (lo, hi)) in enumerate(zip(shape, pads), start=2):
        idx = pad_index(n, lo, hi, mode)
        inner = np.take(g, np.arange(lo, lo + n), axis=axis)
        for p in np.flatnonzero((np.arange(idx.size) < lo) | (np.arange(idx.size) >= lo + n)):
            if idx[p] >= 0:
                sl = [slice(None)] * g.ndim
                sl[axis] = idx[p]
                inner[tuple(sl)] += np.take(g, p, axis=axis)
        g = inner
    return np.ascontiguousarray(g)
