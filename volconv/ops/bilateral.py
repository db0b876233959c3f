"""vc.bilateral_filter: the exact windowed 3-D bilateral filter (a spatial Gaussian in mm times a range Gaussian on
intensity, normalised at every voxel), and the joint (cross) bilateral, whose range term reads a guide volume on
the same grid (a T1 guiding a noisy PET or DWI volume). vc.Bilateral carries the same settings to
vc.io.filter_nifti and the command. Checked here, run by engine/bilateral.py (CPU) or _torch/cuda_bilateral.py
(CUDA tensors)."""
import math

import numpy as np

from .. import _cuda
from .._dispatch import Caller, check_devices, check_tensors
from .._validate import real_number, scipy_mode, workers as resolve_workers
from ..engine import bilateral as engine
from ..kernels import check_truncate, gaussian_radius, in_voxels


class Bilateral:
    """The bilateral filter's settings, checked once: sigma_spatial (a number or 3, in mm when the volume's voxel
    sizes are known, else voxels), sigma_range (intensity units; math.inf: no range term, the normalised
    Gaussian), truncate (sigmas of the spatial Gaussian kept either side, per axis: a box window of radius
    int(truncate * sigma / zoom + 0.5) voxels, scipy.ndimage.gaussian_filter's rule). guide: for vc.filter_nifti,
    a NIfTI path or an array on the file's grid (None: the volume guides itself)."""

    def __init__(self, sigma_spatial, sigma_range, *, guide=None, truncate=3.0):
        self.sigma_spatial = in_voxels(sigma_spatial, None, "sigma_spatial")
        self.sigma_range = real_number(sigma_range, "sigma_range")
        if not self.sigma_range > 0:   # NaN included
            raise ValueError(f"sigma_range must be > 0 (intensity units; math.inf for none), got {sigma_range!r}")
        self.truncate = check_truncate(truncate)
        self.guide = guide

    def radii(self, zooms):
        """The window's radius per axis, in voxels, for voxel sizes `zooms` (mm) or None (sigma in voxels)."""
        sig = in_voxels(self.sigma_spatial, zooms, "sigma_spatial")
        return tuple(gaussian_radius(s, self.truncate, "sigma_spatial") if s > 0 else 0 for s in sig)

    def __repr__(self):
        guide = "" if self.guide is None else f", guide={self.guide!r}"
        return (f"Bilateral(sigma_spatial={self.sigma_spatial}, sigma_range={self.sigma_range:g}{guide}, "
                f"truncate={self.truncate:g})")


def bilateral_filter(volume, sigma_spatial, sigma_range, zooms=None, *, guide=None, truncate=3.0, mode="reflect",
                     cval=0.0, workers=None):
    """The exact 3-D bilateral filter of `volume` (D, H, W): at every voxel i,

        out[i] = sum_t k_t(i) volume[i + t] / sum_t k_t(i),
        k_t(i) = exp(-|t * zooms|^2 / (2 sigma_spatial^2) - (g[i + t] - g[i])^2 / (2 sigma_range^2)),

    over every offset t of the box window of radius int(truncate * sigma_spatial / zoom + 0.5) voxels per axis;
    g is `guide` (the joint / cross bilateral: an array of the volume's shape whose edges steer the smoothing)
    or the volume itself. sigma_spatial: a number or one per axis, in mm when `zooms` (the voxel sizes) are
    given, in voxels otherwise; 0 on an axis: no smoothing along it. sigma_range: in the guide's intensity units
    (math.inf: the plain normalised Gaussian, scipy.ndimage.gaussian_filter's numbers).

    mode / cval: how the volume and the guide extend beyond their edges, scipy.ndimage's names (the guide takes
    cval too under "constant"). NaN / Inf: as in any convolution, a non-finite voxel of the volume or of the guide
    makes every output whose window holds it non-finite; vc.io.filter_nifti's nan="mask" leaves them out instead.
    Each voxel's weights are made inside the kernel (one exp per tap and voxel), never stored.

    numpy arrays or torch tensors (CPU: volconv's engine; CUDA: cuda_plugin/bilateral.cu); float32 / float64
    (integers computed in float); the caller's type back. Not differentiable: a result without gradient."""
    params = Bilateral(sigma_spatial, sigma_range, truncate=truncate)
    return run(params, volume, guide, None, zooms, scipy_mode(mode), real_number(cval, "cval"), workers)


def run(params, volume, guide, valid, zooms, mode, cval, workers, *, halo=None, edge_valid=True):
    """bilateral_filter with a Bilateral's settings; valid (None or bool, the volume's shape): False voxels
    contribute nothing; edge_valid False: nor do voxels beyond the edges (vc.io.filter_nifti's normalize); halo:
    per axis (lo, hi) planes that are context, not output (a slab of a larger volume)."""
    on_gpu = _cuda.is_cuda(volume) or _cuda.is_cuda(guide)
    names = ["volume", "guide"]
    if on_gpu:
        check_tensors("bilateral_filter", [volume], ["volume"], cuda=True)
        check_devices("bilateral_filter", [volume, guide], names, cuda=True)
        v, g = volume, guide
    else:
        caller = Caller("bilateral_filter", [volume, guide], names, optional=("guide",), promote_ints=True)
        v, g = caller.arrays
    if np.ndim(v) != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got shape {tuple(np.shape(v))}")
    if g is not None and tuple(np.shape(g)) != tuple(np.shape(v)):
        raise ValueError(f"guide must have the volume's shape {tuple(np.shape(v))}, got {tuple(np.shape(g))}")
    if zooms is not None:
        z = np.asarray(zooms, np.float64).ravel()
        if z.shape != (3,) or not (np.isfinite(z).all() and (z > 0).all()):
            raise ValueError(f"zooms must be 3 positive voxel sizes (mm), got {zooms!r}")
        zooms = tuple(float(a) for a in z)
    radii, z = params.radii(zooms), (1.0, 1.0, 1.0) if zooms is None else zooms
    sig_mm = params.sigma_spatial   # the unit of z: mm with zooms, voxels without
    halo = ((0, 0),) * 3 if halo is None else tuple(tuple(h) for h in halo)
    if on_gpu:
        from .._torch import cuda_bilateral

        return cuda_bilateral.bilateral(volume, guide, valid, sig_mm, z, radii, params.sigma_range, mode, cval,
                                        halo, edge_valid)
    x = v
    valid = None if valid is None else np.asarray(valid, bool)   # (a CPU tensor from filter_nifti(device="cpu"))
    # NIfTI data arrive in Fortran order: the transposed volume with reversed axes (no copy)
    fortran = x.flags.f_contiguous and not x.flags.c_contiguous
    if fortran:
        x, g = x.T, None if g is None else g.T
        valid = None if valid is None else valid.T
        radii, z, sig_mm, halo = radii[::-1], z[::-1], sig_mm[::-1], halo[::-1]
    x = caller.cast(x, "volume")
    g = caller.cast(g, "guide")
    valid = None if valid is None else np.ascontiguousarray(valid)
    out = engine.bilateral(x, g, valid, sig_mm, z, radii, params.sigma_range, mode, cval, halo, edge_valid,
                           resolve_workers(workers))
    return caller.result(out.T if fortran else out)
