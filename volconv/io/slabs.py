"""Filtering a volume slab by slab along its last spatial axis (NIfTI's slowest, so each slab is one
contiguous run of the file): every slab is read with the planes the kernel reaches beyond it (its halo),
filtered with those planes as context only (ops.filtering.filter_volume's `halo`: not padded, not output), and its
output planes are streamed to the writer. Halos at the volume's ends are the boundary mode's own padding
(read from the other end for 'wrap'), so the result equals filtering the whole volume at once.

Planes are read in increasing order, each once (a slab's halo is kept from the previous read), which suits
a memory map and a gzip stream alike.
"""
import numbers
import re

import numpy as np

from .._validate import pad_index

WORK_BYTES = 512 * 2**20   # working memory a slab may use (its input with halo, output, and temporaries)

# Size units: IEC (KiB, MiB, ...) and the bare letters are powers of 1024, as GNU sort -S and docker read "2G";
# SI (kB, MB, GB, ...) are powers of 1000.
_UNITS = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgt", start=1):
    _UNITS.update({_letter: 1024**_i, _letter + "ib": 1024**_i, _letter + "b": 1000**_i})
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def memory_bytes(value, name="max_memory"):
    """A memory size in bytes: an int (bytes), or a string with a unit ("512MiB", "1GB", "2G", "1.5 GiB",
    "100" bytes). One parser for filter_nifti's max_memory and the command's --max-memory."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = int(value)
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name} must be a number of bytes or a size with a unit (512MiB, 1GB, 2G), got "
                             f"{value!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise TypeError(f"{name} must be an int (bytes) or a size string such as '512MiB', got "
                        f"{type(value).__name__}")
    if size < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {value!r}")
    return size


def copies(masked):
    """Float arrays of a slab's size alive at once while it is filtered: its input, output and the filter's
    two work arrays (a separable kernel's passes); with a mask, non-finite voxels masked or normalisation
    also the mask, weights, weighted input and denominator (measured: tests/test_robust_nifti.py)."""
    return 8 if masked else 4


def thickness(shape, reach, itemsize, budget, copies):
    """Output planes per slab: as many as the budget holds once the halo is counted (the memory promise), and
    at least one. A budget that holds the halo many times over also keeps the extra work small: the H and W
    passes run on the halo planes too."""
    plane = int(shape[0]) * int(shape[1]) * itemsize * copies
    return int(max(1, min(shape[2], budget // max(plane, 1) - sum(reach))))


def plan(n, slab, reach, mode):
    """For each slab of output planes [k0, k1): (k0, k1, planes, halo). planes: the source plane of every
    plane of the slab's extended block; halo: the (lo, hi) planes of context it adds. mode None: the context
    stops at the volume's ends, where the filter pads (constant padding, normalisation); otherwise the halo
    is the boundary mode's padding of the whole volume (scipy mode: 'reflect', 'mirror', 'nearest', 'wrap'),
    so that a slab at the end pads exactly as the whole volume does."""
    lo, hi = reach
    padded = None if mode is None else pad_index(n, lo, hi, mode)
    for k0 in range(0, n, slab):
        k1 = min(n, k0 + slab)
        if padded is None:
            a, b = max(k0 - lo, 0), min(k1 + hi, n)
            yield k0, k1, np.arange(a, b), (k0 - a, b - k1)
        else:
            yield k0, k1, padded[k0:k1 + lo + hi], (lo, hi)


class PlaneReader:
    """Fills blocks with planes of one volume, read forward: read_into(view, a) fills an (X, Y, m) view with
    planes [a, a + m); the planes a block shares with the previous one (a slab's halo, at most `keep` planes
    at its end) are copied from there instead of being read again."""

    def __init__(self, read_into, plane_shape, dtype, keep=None):
        self.read_into, self.plane_shape, self.dtype, self.keep = read_into, tuple(plane_shape), dtype, keep
        self.held = None   # (first plane, array): the previous block's last planes

    def hold(self, a, run):
        """Keep the planes of `run` (planes [a, ...)) a next block may share: a copy of its last `keep`
        planes, so that the previous block itself is freed (the memory promise counts one block)."""
        if self.keep is not None:
            tail = min(self.keep, run.shape[2])
            a, run = a + run.shape[2] - tail, run[..., run.shape[2] - tail:].copy(order="F")
        self.held = (a, run)

    def fill(self, out, i):
        """out (X, Y, n) <- planes [i, i + n)."""
        n = out.shape[2]
        lo = hi = i
        if self.held is not None:
            s, block = self.held
            lo, hi = max(i, s), min(i + n, s + block.shape[2])
            if lo < hi:
                out[..., lo - i:hi - i] = block[..., lo - s:hi - s]
            else:
                lo = hi = i
        if lo > i:
            self.read_into(out[..., :lo - i], i)
        if i + n > hi:
            self.read_into(out[..., hi - i:], hi)


def gather(planes, reader):
    """The block (X, Y, len(planes)) of these source planes, Fortran-ordered (the layout of a NIfTI volume in
    memory, so that the filter sees the same problem as for the whole volume). Its longest run of consecutive
    planes is filled through `reader` (forward, keeping the halo); the planes the halo adds are copied from
    that run when it holds them and read one by one when not (the far end, for 'wrap')."""
    start, length = _main_run(planes)
    a, b = int(planes[start]), int(planes[start]) + length
    out = np.empty(reader.plane_shape + (planes.size,), reader.dtype, order="F")
    run = out[..., start:start + b - a]
    reader.fill(run, a)
    for j, i in enumerate(planes):
        if not start <= j < start + length:
            if a <= i < b:
                out[..., j] = run[..., i - a]
            else:
                reader.read_into(out[..., j:j + 1], int(i))
    reader.hold(a, run)
    return out


def _main_run(planes):
    """(position, length) of the longest run of consecutive increasing planes (the first, on a tie)."""
    breaks = np.flatnonzero(np.diff(planes) != 1) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [planes.size]]))
    k = int(np.argmax(lengths))
    return int(starts[k]), int(lengths[k])


def filter_volume(read_into, plane_shape, dtype, n, reach, slab, mode, filter_slab, write, progress=None):
    """One volume of n planes: read_into(view, a) fills a view with source planes from a, filter_slab(block,
    planes, halo) filters a slab's extended block, write(out) takes its output planes in order. progress(k1)
    after each slab."""
    reader = PlaneReader(read_into, plane_shape, dtype, keep=sum(reach))
    for k0, k1, planes, halo in plan(n, slab, reach, mode):
        write(filter_slab(gather(planes, reader), planes, halo))
        if progress is not None:
            progress(k1)
