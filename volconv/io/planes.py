"""A NIfTI file read plane by plane (`Planes`), as the slab filters of io.filtering and the command's preview read it.

Planes are read in increasing order along the last spatial axis (NIfTI's slowest): one contiguous run of the
file per slab, which suits a memory map and a gzip stream alike, scaled exactly as `load` scales the whole
volume.
"""
import contextlib

import numpy as np
from nibabel.affines import voxel_sizes

from .volume import NiftiError, open_source, reading, warn_geometry


class Planes:
    """A NIfTI file open for reading plane by plane (a context manager): shape (X, Y, Z), nt volumes, and
    reader(t) -> read_into(view, a), which fills a Fortran-ordered (X, Y, m) float32 view with planes
    [a, a + m) of volume t, scaled as load() scales (straight from the file when the stored bytes are the
    values)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        with self._stack:
            self.img, self.finish = self._stack.enter_context(open_source(self.path))
            self.affine, self.header = self.img.affine, self.img.header
            warn_geometry(self.path, self.affine, self.header)
            shape = tuple(self.img.shape) + (1,) * (3 - len(self.img.shape))
            if len(shape) > 4 and any(n != 1 for n in shape[4:]):
                raise NiftiError(f"{self.path}: {len(shape)}-D data of shape {shape}; volconv reads 3-D and 4-D "
                                 f"volumes")
            self.img_shape = shape[:4] if len(self.img.shape) >= 4 else shape[:3]   # the output's data shape
            self.shape, self.nt = shape[:3], shape[3] if len(shape) >= 4 else 1
            self.zooms = tuple(float(z) for z in voxel_sizes(self.affine))
            self.raw = _raw_float32(self.path, self.img)
            if self.raw is not None:
                self._stack.enter_context(self.raw)
            self._stack = self._stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def reader(self, t):
        img, path, shape = self.img, self.path, self.shape
        plane_bytes = shape[0] * shape[1] * 4

        def read_into(view, a):
            m = view.shape[2]
            if self.raw is not None:   # the stored bytes are the values: read them straight into the block
                self.raw.seek(img.dataobj.offset + (t * shape[2] + a) * plane_bytes)
                if self.raw.readinto(memoryview(view.T).cast("B")) != m * plane_bytes:
                    raise NiftiError(f"{path}: truncated data (the file ended inside volume {t})")
                return
            index = (slice(None),) * min(len(img.shape), 2) + (slice(a, a + m),) * (len(img.shape) >= 3)
            index += (t,) * (len(img.shape) >= 4) + (0,) * max(0, len(img.shape) - 4)
            with reading(path):
                view[...] = np.asarray(_scaled(img.dataobj, index, np.float32),
                                       dtype=np.float32).reshape(view.shape, order="F")
        return read_into


class ArrayPlanes:
    """An array mask given in memory, read like a Planes (3-D, or 4-D with one volume)."""

    def __init__(self, array):
        a = np.asarray(array)
        self.array = a[..., 0] if a.ndim == 4 and a.shape[3] == 1 else a
        self.img_shape, self.shape, self.nt = a.shape, self.array.shape, 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def finish(self):
        pass

    def reader(self, t):
        def read_into(view, a):
            view[...] = self.array[..., a:a + view.shape[2]]
        return read_into


def _raw_float32(path, img):
    """An open binary file of `path` when its data are stored as native float32 without scaling in a plain
    (uncompressed) file: the bytes are then the values load() gives, and slabs are read straight into place.
    None otherwise (nibabel reads and scales them)."""
    proxy = img.dataobj
    plain = isinstance(getattr(proxy, "file_like", None), str) and not path.lower().endswith((".gz", ".bz2", ".zst"))
    native = proxy.dtype == np.dtype(np.float32) and proxy.dtype.isnative
    unscaled = getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0
    return open(path, "rb") if plain and native and unscaled and proxy.order == "F" else None


def _scaled(proxy, slicer, dtype):
    """Planes of a nibabel array proxy scaled exactly as np.asarray(proxy, dtype) scales the whole array
    (what `load` does), so that slabs and the whole volume give the same numbers."""
    if hasattr(proxy, "_get_scaled"):   # nibabel's own path for __array__(dtype), restricted to the slicer
        return proxy._get_scaled(dtype=dtype, slicer=slicer)
    return np.asarray(proxy[slicer], dtype=dtype)
