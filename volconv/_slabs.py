"""Filtering a volume slab by slab along its last spatial axis (NIfTI's slowest, so each slab is one
contiguous run of the file): every slab is read with the planes the kernel reaches beyond it (its halo),
filtered with those planes as context only (ops.dense._filter's `halo`: not padded, not output), and its
output planes are streamed to the writer. Halos at the volume's ends are the boundary mode's own padding
(read from the other end for 'wrap'), so the result equals filtering the whole volume at once.

Planes are read in increasing order, each once (a slab's halo is kept from the previous read), which suits
a memory map and a gzip stream alike.
"""
import numpy as np

from ._validate import pad_index

WORK_BYTES = 512 * 2**20   # working memory a slab may use (its input with halo, output, and temporaries)

def copies(masked):
    """Float arrays of a slab's size alive at once while it is filtered: its input and output; with a mask or
    normalisation also the weights, weighted input, numerator and denominator."""
    return 5 if masked else 2


def thickness(shape, reach, itemsize, budget, copies):
    """Output planes per slab: as many as the budget holds once the halo is counted, but at least twice the
    halo (the H and W passes run on the halo planes too: at most 50% more work) and one plane."""
    plane = int(shape[0]) * int(shape[1]) * itemsize * copies
    return int(max(1, min(shape[2], max(budget // max(plane, 1) - sum(reach), 2 * sum(reach)))))


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
    """Planes [a, b) of one volume via read(a, b) -> (X, Y, b - a) array, read forward: a request that
    continues the previous one reads only the new planes (the overlap, a slab's halo, is kept)."""

    def __init__(self, read):
        self.read = read
        self.a = self.b = 0
        self.block = None

    def get(self, a, b):
        if self.block is not None and self.a <= a < self.b <= b:
            new = self.read(self.b, b) if b > self.b else None
            block = np.concatenate([self.block[..., a - self.a:]] + ([new] if new is not None else []), axis=2)
        else:
            block = self.read(a, b)
        self.a, self.b, self.block = a, b, block
        return block


def gather(planes, read, reader=None):
    """The block (X, Y, len(planes)) of these source planes, Fortran-ordered (the layout of a NIfTI volume in
    memory, so that the filter sees the same problem as for the whole volume). The longest run of consecutive
    planes is read as one block (through `reader`, forward); the planes the halo adds are copied from it when
    it holds them and read one by one when not (the far end, for 'wrap')."""
    a, b = _main_run(planes)
    block = reader.get(a, b) if reader is not None else read(a, b)
    out = np.empty(block.shape[:2] + (planes.size,), block.dtype, order="F")
    j = 0
    while j < planes.size:
        i, e = int(planes[j]), j + 1
        if a <= i < b:
            while e < planes.size and planes[e] == planes[e - 1] + 1 and planes[e] < b:
                e += 1
            out[..., j:e] = block[..., i - a:i - a + e - j]
        else:
            out[..., j] = read(i, i + 1)[..., 0]
        j = e
    return out


def _main_run(planes):
    """The longest run of consecutive increasing planes: read as one block, forward."""
    best, start = (int(planes[0]), int(planes[0]) + 1), 0
    for j in range(1, planes.size + 1):
        if j == planes.size or planes[j] != planes[j - 1] + 1:
            if planes[j - 1] + 1 - planes[start] > best[1] - best[0]:
                best = (int(planes[start]), int(planes[j - 1]) + 1)
            start = j
    return best


def filter_volume(read, n, reach, slab, mode, filter_slab, write, progress=None):
    """One volume of n planes: read(a, b) gives source planes [a, b), filter_slab(block, planes, halo)
    filters a slab's extended block, write(out) takes its output planes in order. progress(k1) after each."""
    reader = PlaneReader(read)
    for k0, k1, planes, halo in plan(n, slab, reach, mode):
        write(filter_slab(gather(planes, read, reader), planes, halo))
        if progress is not None:
            progress(k1)
