"""Kernels in physical units (mm) or voxels, as objects that volconv's filters accept wherever they accept a
kernel array.

A kernel that is a sum of outer products of 1-D factors says so (`SeparableKernel`): volconv then runs it as
1-D passes, never building the 3-D array. The Gaussian and the box are rank 1 (three passes), the Laplacian
of Gaussian rank 3. The low-rank (CP) kernels extend the same mechanism.

Sizes: `zooms` are the voxel sizes in mm (vc.io.Volume.zooms); with zooms=None every size is in voxels.
"""
import math
import os

import numpy as np


class Kernel:
    """A 3-D correlation kernel (kd, kh, kw) in voxels."""

    def to_dense(self):
        """The kernel as a float64 array (kd, kh, kw)."""
        raise NotImplementedError

    @property
    def shape(self):
        return self.to_dense().shape

    def __array__(self, dtype=None, copy=None):
        dense = self.to_dense()
        return dense if dtype is None else dense.astype(dtype)


class DenseKernel(Kernel):
    """A kernel given by its values."""

    def __init__(self, values, name="kernel"):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 3 or min(values.shape) < 1:
            raise ValueError(f"{name} must be a non-empty 3-D array, got shape {values.shape}")
        self.values = values

    def to_dense(self):
        return self.values

    @property
    def shape(self):
        return self.values.shape

    def __repr__(self):
        return f"DenseKernel(shape={self.shape})"


class SeparableKernel(Kernel):
    """sum over r of weights[r] * outer(factors[0][r], factors[1][r], factors[2][r]).

    factors: three arrays, one per axis (D, H, W), each (rank, k_axis) or (k_axis,) for rank 1."""

    def __init__(self, factors, weights=None):
        if len(factors) != 3:
            raise ValueError(f"factors must hold one array per axis (3), got {len(factors)}")
        fs = [np.atleast_2d(np.asarray(f, dtype=np.float64)) for f in factors]
        rank = fs[0].shape[0]
        if any(f.ndim != 2 or f.shape[0] != rank or f.shape[1] < 1 for f in fs):
            raise ValueError("factors must be three non-empty arrays of shape (rank, k_axis) with one rank, got "
                             f"shapes {[f.shape for f in fs]}")
        self.factors = fs
        self.weights = np.ones(rank) if weights is None else np.asarray(weights, dtype=np.float64).reshape(rank)

    @property
    def rank(self):
        return self.factors[0].shape[0]

    @property
    def shape(self):
        return tuple(f.shape[1] for f in self.factors)

    def terms(self):
        """(weight, (f_d, f_h, f_w)) for each rank-1 term."""
        for r in range(self.rank):
            yield self.weights[r], tuple(f[r] for f in self.factors)

    def to_dense(self):
        return np.einsum("r,ri,rj,rk->ijk", self.weights, *self.factors)

    def __repr__(self):
        return f"SeparableKernel(shape={self.shape}, rank={self.rank})"


def as_kernel(kernel, name="kernel"):
    """A Kernel from a Kernel or anything array-like."""
    return kernel if isinstance(kernel, Kernel) else DenseKernel(kernel, name)


# ------------------------------------------------------------------------------------------------ builders


def _per_axis(value, name):
    """A positive size per axis (float or sequence of 3) -> 3 floats."""
    try:
        values = tuple(float(v) for v in value) if np.ndim(value) else (float(value),) * 3
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a sequence of 3 numbers, got {value!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"{name} must be a non-negative number or 3 of them, got {value!r}")
    return values


def in_voxels(size, zooms, name):
    """Sizes in mm (zooms given) or voxels (zooms None) -> voxels per axis."""
    size = _per_axis(size, name)
    if zooms is None:
        return size
    zooms = _per_axis(zooms, "zooms")
    if min(zooms) <= 0:
        raise ValueError(f"zooms must be positive voxel sizes in mm, got {zooms!r}")
    return tuple(s / z for s, z in zip(size, zooms))


FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# NIfTI stores voxel sizes as float32: 2.0 can come back as 2.0000000530 (a relative 3e-8). A size within this
# relative tolerance of a voxel boundary counts as on it, so float noise never drops a row of voxels.
ZOOM_TOLERANCE = 1e-6
# The longest kernel axis built (voxels): far beyond any scan's axis, and refused before anything is allocated
# (gaussian(1e7) would otherwise build an 80-million-tap kernel and fail seconds later in an iterator).
MAX_KERNEL_SIZE = 2**16 - 1
MAX_DENSE_TAPS = 2**26   # taps of a kernel built as a 3-D array (ball): 512 MiB in float64


def check_truncate(truncate):
    """truncate (sigmas kept either side of the centre) -> float, finite and positive."""
    try:
        value = float(truncate)
    except (TypeError, ValueError):
        raise TypeError(f"truncate must be a number of sigmas, got {truncate!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"truncate must be a finite number of sigmas > 0, got {truncate!r}")
    return value


def gaussian_radius(sigma, truncate, name="sigma"):
    """scipy.ndimage's Gaussian radius int(truncate * sigma + 0.5), refused (naming `name` and the size) when
    the kernel would be absurdly long."""
    truncate = check_truncate(truncate)
    radius = truncate * sigma + 0.5
    if 2 * int(min(radius, 2.0 * MAX_KERNEL_SIZE)) + 1 > MAX_KERNEL_SIZE:
        raise ValueError(f"{name} {sigma:g} voxels with truncate {truncate:g} makes a kernel of "
                         f"{2 * radius:.3g} voxels per axis (at most {MAX_KERNEL_SIZE}); is {name} in the unit you "
                         "meant (mm with zooms, voxels without)?")
    return int(radius)


def check_size(shape, name, value, *, dense=False):
    """Refuse, before building it, a kernel whose axes would exceed MAX_KERNEL_SIZE voxels (or, built as a 3-D
    array, MAX_DENSE_TAPS taps), naming the argument and the size."""
    if max(shape) > MAX_KERNEL_SIZE or (dense and math.prod(shape) > MAX_DENSE_TAPS):
        limit = f"{MAX_DENSE_TAPS} taps" if dense else f"{MAX_KERNEL_SIZE} per axis"
        raise ValueError(f"{name}={value!r} makes a kernel of {tuple(int(n) for n in shape)} voxels (at most "
                         f"{limit}); is {name} in the unit you meant (mm with zooms, voxels without)?")


def _gaussian_1d(sigma, order, truncate):
    """scipy.ndimage's 1-D Gaussian (derivative) kernel for correlation: the same radius and numbers."""
    radius = gaussian_radius(sigma, truncate)
    if sigma == 0:
        return np.ones(1) if order == 0 else np.zeros(1)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / sigma ** 2 * x ** 2)
    phi /= phi.sum()
    if order == 0:
        return phi
    if order == 2:  # d2/dx2 of the normalised Gaussian: (x^2 / s^4 - 1 / s^2) phi (symmetric: no flip needed)
        return (x ** 2 / sigma ** 4 - 1.0 / sigma ** 2) * phi
    raise ValueError(f"order must be 0 or 2, got {order}")


def _sigmas(sigma, fwhm, zooms):
    if (sigma is None) == (fwhm is None):
        raise ValueError("give exactly one of sigma and fwhm")
    if fwhm is not None:
        return tuple(f / FWHM_PER_SIGMA for f in in_voxels(fwhm, zooms, "fwhm"))
    return in_voxels(sigma, zooms, "sigma")


def gaussian(sigma=None, zooms=None, truncate=4.0, *, fwhm=None):
    """Gaussian kernel: sigma (or fwhm) per axis, in mm when zooms are given, in voxels otherwise. The same
    numbers as scipy.ndimage.gaussian_filter(volume, sigma / zooms, truncate=truncate). Separable (rank 1)."""
    sig = _sigmas(sigma, fwhm, zooms)
    return SeparableKernel([_gaussian_1d(s, 0, truncate) for s in sig])


def log(sigma=None, zooms=None, truncate=4.0, *, fwhm=None):
    """Laplacian of Gaussian: the same numbers as scipy.ndimage.gaussian_laplace(volume, sigma / zooms).
    A sum of three separable terms (d2G x G x G + G x d2G x G + G x G x d2G). With mode="constant" and a
    non-zero cval, volconv applies it as the one 3-D kernel it is (== scipy.ndimage.correlate with
    .to_dense()), whereas scipy's gaussian_laplace pads every 1-D pass with cval."""
    sig = _sigmas(sigma, fwhm, zooms)
    g = [_gaussian_1d(s, 0, truncate) for s in sig]
    d2 = [_gaussian_1d(s, 2, truncate) for s in sig]
    return SeparableKernel([np.stack([d2[a] if a == t else g[a] for t in range(3)]) for a in range(3)])


def box(size, zooms=None, *, normalize=True):
    """A box of `size` per axis. In mm (zooms given), as fslmaths -kernel box: the voxels whose centres lie
    within size / 2 of the centre voxel's, 2 * floor(size / zoom / 2) + 1 of them, so always an odd number
    centred on the voxel (5 mm on 2 mm voxels: 3 voxels, 6 mm: 3, 6.1 mm... 7.9 mm: 3, 8 mm: 5; less than one
    zoom: 1). In voxels (zooms None): round(size) voxels, at least 1, as scipy's uniform_filter (an even size
    puts the extra voxel before the centre). Normalised to sum 1 (a mean filter) unless normalize=False.
    Separable (rank 1)."""
    voxels = in_voxels(size, zooms, "size")
    if zooms is None:
        n = [max(1, int(round(v))) for v in voxels]
    else:
        n = [2 * int(math.floor(v / 2 * (1 + ZOOM_TOLERANCE))) + 1 for v in voxels]
    check_size(n, "size", size)
    return SeparableKernel([np.full(k, 1.0 / k if normalize else 1.0) for k in n])


def ball(radius, zooms=None, *, normalize=True):
    """The voxels whose centres lie within `radius` (mm with zooms, else voxels) of the centre (an ellipsoid in
    voxels when the zooms differ), like fslmaths -kernel sphere; a voxel within a relative 1e-6 of the radius
    counts as inside (zooms read from NIfTI carry float32 noise). Normalised to sum 1 unless normalize=False."""
    rad = in_voxels(radius, zooms, "radius")
    if min(rad) <= 0:
        raise ValueError(f"radius must be positive, got {radius!r}")
    half = [int(math.floor(r * (1 + ZOOM_TOLERANCE))) for r in rad]
    check_size([2 * h + 1 for h in half], "radius", radius, dense=True)
    grids = np.meshgrid(*[np.arange(-h, h + 1) / r for h, r in zip(half, rad)], indexing="ij")
    # the distance in radii, squared: within the tolerance (relative, either side of 1) counts as on the sphere
    inside = (sum(g ** 2 for g in grids) <= 1.0 + 2 * ZOOM_TOLERANCE).astype(np.float64)
    return DenseKernel(inside / inside.sum() if normalize else inside)


def from_file(path):
    """A kernel stored as .npy or as a NIfTI image (its 3-D data, in voxels)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"kernel file {path!r} does not exist")
    if path.endswith(".npy"):
        values = np.load(path, allow_pickle=False)
    else:
        import nibabel as nib

        try:
            values = np.asanyarray(nib.load(path).dataobj, dtype=np.float64)
        except Exception as e:  # nibabel raises several types for files it cannot read
            raise ValueError(f"kernel file {path!r} is neither .npy nor a readable NIfTI image: {e}") from None
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    return DenseKernel(values, name=f"kernel in {path!r}")


__all__ = ["Kernel", "DenseKernel", "SeparableKernel", "as_kernel", "gaussian", "log", "box", "ball", "from_file"]
