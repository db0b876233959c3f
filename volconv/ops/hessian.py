"""vc.filters.hessian and hessian_eigvals: the Gaussian Hessian's six components with scikit-image's numbers
(skimage.feature.hessian_matrix), sigma in mm with zooms, and their eigenvalues from the compiled 3x3 solver.
Also the checks the ridge filters (ops/vesselness.py) share: the volume, sigmas in voxels, the taps."""
import itertools
import math

import numpy as np

from .._dispatch import Caller
from .._validate import real_number, scipy_mode, workers as resolve_workers
from ..engine import cost
from ..engine import hessian as engine
from ..engine.separable import separable_conv3d
from .._validate import ConvSpec
from ..kernels import gaussian_radius, in_voxels


def volume_arrays(op, volume):
    """(caller, x): x the checked volume as a C-ordered float array. A Fortran-ordered volume (NIfTI data) is
    copied, not transposed: scikit-image's passes run along axes 0, 1, 2 in that order and the off-diagonal
    components differ at the edges with the order (its first derivative along i, then along j)."""
    caller = Caller(op, [volume], ["volume"], promote_ints=True)
    (v,) = caller.arrays
    if v.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got {v.ndim}-D shape {v.shape}")
    x = caller.cast(v, "volume")
    if x.size and not cost.all_finite(x):
        raise ValueError(f"{op}: volume holds NaN or Inf; the Hessian of a non-finite volume is not defined "
                         "(mask or replace them first, e.g. np.nan_to_num)")
    return caller, x


def check_zooms(zooms):
    """zooms: None or 3 positive finite voxel sizes (mm) -> None or a tuple of 3 floats."""
    if zooms is None:
        return None
    z = np.asarray(zooms, np.float64).ravel()
    if z.shape != (3,) or not (np.isfinite(z).all() and (z > 0).all()):
        raise ValueError(f"zooms must be 3 positive voxel sizes (mm), got {zooms!r}")
    return tuple(float(a) for a in z)


def sigma_voxels(sigma, zooms, name="sigma"):
    """A positive sigma (number or 3) in mm with zooms, voxels without -> 3 sigmas in voxels, each > 0 and of a
    buildable kernel."""
    sig = in_voxels(sigma, zooms, name)
    if min(sig) <= 0:
        raise ValueError(f"{name} must be > 0 on every axis, got {sigma!r}")
    for s in sig:   # scipy's radius at sigma / sqrt(2), truncate 8 (the cap for small sigmas is no wider)
        gaussian_radius(s / math.sqrt(2), max(engine.TRUNCATE_CAP.values()), name)
    return sig


def taps(sig, zooms, dtype):
    """engine.skimage_taps at sig (voxels per axis), the derivative taps divided by the voxel size along their
    axis: the Hessian then comes in intensity / mm^2 (zooms None: per voxel^2)."""
    out = engine.skimage_taps(sig, dtype)
    if zooms is not None:
        out = [(g, d / z) for (g, d), z in zip(out, zooms)]
    return out


def hessian(volume, sigma=1.0, zooms=None, *, mode="reflect", cval=0.0, use_gaussian_derivatives=True,
            workers=None):
    """The Hessian of `volume` (D, H, W) smoothed by a Gaussian of `sigma`: six arrays [Hxx, Hxy, Hxz, Hyy, Hyz,
    Hzz] (axes 0, 1, 2; skimage.feature.hessian_matrix's order), each the volume's shape.

    use_gaussian_derivatives=True (the default here, the one scikit-image's Frangi / Sato / Meijering use and
    its announced future default): skimage's _hessian_matrix_with_gaussian, the same numbers to float rounding:
    first-derivative Gaussian filters at sigma / sqrt(2) applied twice (scipy's truncate 8, or 100 when a sigma
    is <= 1; here taps beyond 10 sigma, below exp(-50), are left out), each pass extending its input by `mode`.
    False: skimage's current default, a Gaussian of sigma (truncate 4) then np.gradient twice. Neither scales by
    sigma**2: scikit-image's hessian_matrix does not (of the ridge filters only Sato multiplies by sigma**2).
    skimage.feature.hessian_matrix's own defaults are mode="constant" and use_gaussian_derivatives=False (with a
    FutureWarning); pass them to get its default numbers.

    sigma: a number or one per axis, in mm when `zooms` (voxel sizes in mm) are given, else voxels; with zooms
    the components are derivatives per mm (H_ij / (zoom_i zoom_j)). mode / cval: scipy.ndimage's boundary modes.
    Integer volumes are computed in float without skimage's img_as_float rescaling. numpy arrays or CPU torch
    tensors; the caller's type and float dtype back. Named `hessian` as the issue asks; note that
    skimage.filters.hessian is a different thing (the hybrid Hessian ridge filter)."""
    caller, x = volume_arrays("hessian", volume)
    mode, cval = scipy_mode(mode), real_number(cval, "cval")
    zooms = check_zooms(zooms)
    sig = sigma_voxels(sigma, zooms, "sigma")
    nthreads = resolve_workers(workers)
    if use_gaussian_derivatives:
        hs = _with_gaussian_derivatives(x, taps(sig, zooms, x.dtype), mode, cval, nthreads)
    else:
        hs = _with_differences(x, sig, zooms, mode, cval, nthreads)
    return [caller.result(h) for h in hs]


def _with_gaussian_derivatives(x, t, mode, cval, nthreads):
    hs = [np.empty(x.shape, x.dtype) for _ in range(6)]
    if x.size == 0:
        return hs
    for z0, z1, parts in engine.scale_slabs(x, t, mode, cval, nthreads):
        for h, part in zip(hs, parts):
            h[z0:z1] = part
        del parts
    return hs


def _with_differences(x, sig, zooms, mode, cval, nthreads):
    """skimage's use_gaussian_derivatives=False: skimage.filters.gaussian (truncate 4, one 3-D pass: the
    constant's share as scipy adds it, a Gaussian's passes sum to 1) then np.gradient twice."""
    if x.size == 0:
        return [np.empty(x.shape, x.dtype) for _ in range(6)]
    fs = [engine.gaussian_taps(s, 4.0)[0] for s in sig]
    r = [len(f) // 2 for f in fs]
    spec = ConvSpec((1, 1) + x.shape, (1, 1) + tuple(len(f) for f in fs), stride=(1, 1, 1),
                    pads=tuple((a, a) for a in r), dilation=(1, 1, 1), groups=1, mode=mode, cval=0.0)
    y = separable_conv3d(x[None, None], *fs, spec, nthreads)[0, 0]
    if mode == "constant" and cval != 0:   # cval times the taps outside: 1 - the product of the taps inside
        inside = [np.correlate(np.pad(np.ones(n), a), f, mode="valid") for n, a, f in zip(x.shape, r, fs)]
        y += (cval * (1.0 - inside[0][:, None, None] * inside[1][None, :, None] * inside[2])).astype(y.dtype)
    z = (1.0, 1.0, 1.0) if zooms is None else zooms
    grads = np.gradient(y)
    return [np.gradient(grads[i], axis=j) / np.asarray(z[i] * z[j], y.dtype) if zooms is not None
            else np.gradient(grads[i], axis=j) for i, j in itertools.combinations_with_replacement(range(3), 2)]


def hessian_eigvals(H_elems, *, workers=None):
    """The eigenvalues of the symmetric 3x3 matrices given by their six upper-diagonal components (as `hessian`
    returns them), largest first, stacked on a leading axis of 3 (skimage.feature.hessian_matrix_eigvals'
    layout). Computed in float64 per voxel (trigonometric solution, about 1.5e-8 of the matrix's norm at worst,
    below a float32 rounding) and returned in the components' dtype."""
    if len(H_elems) != 6:
        raise ValueError(f"H_elems must hold the 6 upper-diagonal components of 3-D Hessians, got {len(H_elems)}")
    caller = Caller("hessian_eigvals", list(H_elems), [f"H_elems[{i}]" for i in range(6)], promote_ints=True)
    shapes = {a.shape for a in caller.arrays}
    if len(shapes) != 1:
        raise ValueError(f"H_elems must share one shape, got {sorted(shapes)}")
    hs = [np.ascontiguousarray(caller.cast(a, "H_elems").reshape(-1, 1, 1) if a.ndim != 3 else
                               caller.cast(a, "H_elems")) for a in caller.arrays]
    shape = caller.arrays[0].shape
    out = np.empty((3,) + hs[0].shape, caller.dtype)
    if out[0].size:
        engine.measure(hs, engine.EIGVALS, out[0], out[1], out[2], nthreads=resolve_workers(workers))
    return caller.result(out.reshape((3,) + shape))
