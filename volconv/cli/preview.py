"""`volconv filter --preview PNG`: orthogonal mid-slices of the input (top row) and the output (bottom row), the
PNG written through a temporary file that is renamed into place. matplotlib is imported only here, when used."""
import os
import warnings

import numpy as np

from ..io.atomic import new_file_mode, temporary
from ..io.planes import Planes
from .common import CommandError, blame, check_output, remove

SLAB_BYTES = 2 * 2**20   # what a preview holds of a volume at a time


class Preview:
    """Orthogonal mid-slices of the input (top row) and the output (bottom row), as a PNG. The temporary file
    is made before filtering (an unwritable place fails early) and renamed over the target once complete."""

    def __init__(self, path, force):
        self.path = os.fspath(path)
        check_output(self.path, force, "preview file")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError(self.path, "--preview needs matplotlib (pip install matplotlib)") from None
        directory = os.path.dirname(os.path.abspath(self.path))
        try:   # named .<PNG's name>.<pid>@<host>.<random>.tmp.png, whatever PNG's own extension
            fd, self.tmp = temporary(directory, os.path.basename(self.path) + ".png", ".png")
        except OSError as e:
            raise CommandError(self.path, f"cannot create a file in {directory}: {e.strerror}") from None
        os.close(fd)
        os.chmod(self.tmp, new_file_mode())  # mkstemp makes it private; a PNG is as readable as the NIfTI

    def write(self, src, dst):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from nibabel import aff2axcodes

        try:
            (before, _, _), (after, zooms, affine) = _mid_slices(src), _mid_slices(dst)
            planes = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial",
                      "I": "axial"}
            codes = aff2axcodes(affine)
            fig = Figure(figsize=(10, 6.5), layout="constrained")
            FigureCanvasAgg(fig)
            axes = fig.subplots(2, 3)
            for row, (label, slices) in enumerate((("input", before), ("output", after))):
                lo, hi = _display_range(np.concatenate([plane.ravel() for _, plane in slices]))
                for axis, (mid, plane) in enumerate(slices):   # plane: the other two axes, in order
                    a, b = [i for i in range(3) if i != axis]
                    ax = axes[row, axis]
                    ax.imshow(plane.T, origin="lower", cmap="gray", vmin=lo, vmax=hi,
                              aspect=zooms[b] / zooms[a], interpolation="nearest")
                    name = planes.get(codes[axis], "") if codes[axis] else ""
                    ax.set_title(f"{label}: {name} slice {mid} of axis {axis}".replace(":  ", ": "),
                                 fontsize=9)
                    ax.set_axis_off()
            fig.suptitle(f"{os.path.basename(src)}: input (top), filtered (bottom)", fontsize=10)
            fig.savefig(self.tmp, format="png", dpi=100)
            os.replace(self.tmp, self.path)
        except Exception as e:  # OSError, and whatever matplotlib raises on odd data
            raise CommandError(self.path, (isinstance(e, OSError) and e.strerror) or blame(e, self.path)[1]
                               ) from e

    def discard(self):
        remove(self.tmp)


def _mid_slices(path):
    """([(index, plane)] for the mid-slice of each spatial axis of the file's first volume, zooms, affine). The
    file is read forward in slabs of planes along its last axis by the filter's own reader (one pass over a
    gzip stream: slicing a gzipped file across that axis would read all of it), keeping only those planes
    (the memory promise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already reported when the input was filtered
        with Planes(path) as source:
            X, Y, Z = source.shape
            mid = [n // 2 for n in source.shape]
            read = source.reader(0)
            planes = [np.empty((Y, Z), np.float32), np.empty((X, Z), np.float32), None]
            step = max(1, SLAB_BYTES // (4 * X * Y))
            for z in range(0, Z, step):
                block = np.empty((X, Y, min(step, Z - z)), np.float32, order="F")
                read(block, z)
                planes[0][:, z:z + step], planes[1][:, z:z + step] = block[mid[0]], block[:, mid[1]]
                if z <= mid[2] < z + step:
                    planes[2] = block[:, :, mid[2] - z].copy()
    return list(zip(mid, planes)), source.zooms, source.affine


def _display_range(data):
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)
