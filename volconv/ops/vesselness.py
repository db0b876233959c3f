"""vc.filters.frangi, sato, meijering: scikit-image's multi-scale Hessian ridge filters (skimage.filters.frangi /
sato / meijering: the same parameters, defaults and numbers), sigmas in mm for anisotropic voxels. Checked here,
run by engine/hessian.ridge_filter: per scale the Hessian slab by slab, its eigenvalues' measure from the
compiled kernel straight into the running maximum."""
import numbers

import numpy as np

from .._validate import real_number, scipy_mode, workers as resolve_workers
from ..engine import hessian as engine
from .hessian import check_zooms, sigma_voxels, taps, volume_arrays

DEFAULT_SIGMAS = range(1, 10, 2)   # scikit-image's


def _scales(sigmas, zooms, dtype):
    """sigmas (an iterable of positive numbers, mm with zooms) -> [(taps, sigma^2)] per scale."""
    if isinstance(sigmas, (numbers.Number, str)) or not np.iterable(sigmas):
        raise TypeError(f"sigmas must be an iterable of numbers (one per scale), got {sigmas!r}")
    values = list(sigmas)
    if not values:
        raise ValueError("sigmas must hold at least one scale")
    out = []
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0 or not np.isfinite(s):
            raise ValueError(f"sigmas must be finite numbers > 0 (one per scale), got {s!r} in {values!r}")
        out.append((taps(sigma_voxels(float(s), zooms, "sigmas"), zooms, dtype), float(s) ** 2))
    return out


def _positive(value, name):
    v = real_number(value, name)
    if not (np.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def _run(op, volume, sigmas, zooms, black_ridges, mode, cval, workers, **params):
    caller, x = volume_arrays(op, volume)
    mode, cval = scipy_mode(mode), real_number(cval, "cval")
    zooms = check_zooms(zooms)
    scales = _scales(sigmas, zooms, x.dtype)
    sign = 1.0 if black_ridges else -1.0
    out = engine.ridge_filter(x, scales, op, mode, cval, sign, resolve_workers(workers), **params)
    return caller.result(out)


_COMMON = """
    volume: (D, H, W), numpy array or CPU torch tensor (the caller's type and float dtype back; integers are
    computed in float64 or float32 as volconv promotes them). sigmas: the scales, in mm when `zooms` (voxel sizes
    in mm) are given, else voxels; with zooms the Hessian is taken per mm, so anisotropic voxels see round
    vessels round. black_ridges True (scikit-image's default): dark vessels on a bright background; False:
    bright vessels (contrast-enhanced CT / MR angiography). mode / cval: scipy.ndimage's boundary modes (cval
    applies to the volume as given, before the negation black_ridges=False implies, as in scikit-image).
    Refused: NaN / Inf in the volume, sigmas <= 0. Equal to scikit-image to float rounding (tests/
    test_vesselness.py); float32 volumes are computed and returned in float32, as scikit-image does."""


def frangi(volume, sigmas=DEFAULT_SIGMAS, zooms=None, *, alpha=0.5, beta=0.5, gamma=None, black_ridges=True,
           mode="reflect", cval=0.0, workers=None):
    """Frangi's vesselness, skimage.filters.frangi's numbers: per scale the Hessian's eigenvalues sorted by
    magnitude (l1, l2, l3), the two larger clipped at 1e-10; r_a = l2 / l3, r_b = |l1| / sqrt(l2 l3), s the
    Frobenius norm; (1 - exp(-r_a^2 / 2 alpha^2)) exp(-r_b^2 / 2 beta^2) (1 - exp(-s^2 / 2 gamma^2)); the
    maximum over scales. gamma None: half the largest s of the first scale over the whole volume (skimage's rule;
    then kept for the other scales). No sigma^2 normalisation (scikit-image has none here).""" + _COMMON
    alpha, beta = _positive(alpha, "alpha"), _positive(beta, "beta")
    gamma = None if gamma is None else _positive(gamma, "gamma")
    return _run("frangi", volume, sigmas, zooms, black_ridges, mode, cval, workers, alpha=alpha, beta=beta,
                gamma=gamma)


def sato(volume, sigmas=DEFAULT_SIGMAS, zooms=None, *, black_ridges=True, mode="reflect", cval=0.0,
         workers=None):
    """Sato's tubeness, skimage.filters.sato's numbers: per scale sigma^2 sqrt(max(l1, 0) max(l2, 0)) of the
    two largest eigenvalues (sigma in mm with zooms), the maximum over scales.""" + _COMMON
    return _run("sato", volume, sigmas, zooms, black_ridges, mode, cval, workers)


def meijering(volume, sigmas=DEFAULT_SIGMAS, zooms=None, *, alpha=None, black_ridges=True, mode="reflect",
              cval=0.0, workers=None):
    """Meijering's neuriteness, skimage.filters.meijering's numbers: per scale, of l_k + alpha (sum of the other
    two eigenvalues) the one of largest magnitude, clipped at 0 and divided by its maximum over the volume; the
    maximum over scales. alpha None: 1 / (ndim + 1) = 0.25 (what scikit-image's code uses).""" + _COMMON
    alpha = 0.25 if alpha is None else real_number(alpha, "alpha")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return _run("meijering", volume, sigmas, zooms, black_ridges, mode, cval, workers, alpha=alpha)
