"""vc.restoration.richardson_lucy: scikit-image's Richardson-Lucy deconvolution of a 3-D (or 2-D) image, its
arguments checked, the direct or FFT algorithm chosen per PSF by the cost model, and its memory refused
before anything is allocated."""
import numbers

import numpy as np

from .. import _memory
from .._dispatch import Caller, torch_module
from .._validate import positive_int
from .._validate import workers as resolve_workers
from ..engine import deconvolution as engine


def richardson_lucy(image, psf, num_iter=50, clip=True, filter_epsilon=None, *, workers=None, algorithm="auto"):
    """Richardson-Lucy deconvolution, with the results of ``skimage.restoration.richardson_lucy``.

    Parameters
    ----------
    image : (D, H, W) or (H, W) array (numpy or a CPU torch tensor)
        The degraded image. Computed in scikit-image's float type: float32 for float16 and float32, float64
        for float64, integers and booleans; the result has that type (as scikit-image's), a tensor for a tensor.
    psf : array of the image's number of dimensions
        The point-spread function, in voxels of the image's grid, no larger than the image along any axis;
        cast to the image's float type. Not normalised (as in scikit-image): a PSF that sums to 1 keeps the
        image's total intensity.
    num_iter : int >= 1
        Iterations (scikit-image's default 50); fewer regularise more.
    clip : bool
        Clip the result to [-1, 1] as scikit-image does (default): scale the image into [0, 1] first, or pass
        False to keep its intensity scale (Richardson-Lucy is otherwise linear in the image's scale).
    filter_epsilon : None or a number >= 0
        Where the blurred estimate is below it, the ratio image / blurred is set to 0 instead (no division by
        tiny values); None or 0: no filtering (scikit-image's ``if filter_epsilon:``).
    workers : int or None
        Threads, as vc.correlate's (scipy.fft's meaning; None: every thread OpenMP allows).
    algorithm : "auto", "direct" or "fft"
        How the two convolutions of each iteration run: "direct" (volconv's direct kernel, exact sums, best
        for small PSFs), "fft" (real FFTs on one box, the PSF's spectrum made once; best for large PSFs);
        "auto" asks the cost model for this image and PSF size.

    Each iteration is scikit-image's: ``c = convolve(u, psf, 'same') + 1e-12``, ``u *= convolve(image / c,
    flip(psf), 'same')`` from ``u = 0.5``, with scipy.signal.convolve's zero-padded 'same' convolution (an
    even PSF side centred as scipy does). The results agree to the float type's rounding (see
    tests/test_deconvolution.py for the tolerances).

    Raises
    ------
    ValueError
        An image that is not 2-D or 3-D, a PSF of another number of dimensions or larger than the image
        (naming both shapes), an empty image or PSF, NaN or Inf in either, a PSF with a negative value or
        summing to 0 (scikit-image does not check; Richardson-Lucy assumes a non-negative PSF, and one that
        sums to 0 divides by 1e-12), num_iter < 1, a negative or non-finite filter_epsilon, an unknown
        algorithm.
    TypeError
        A complex or non-numeric image or PSF, a clip that is not a bool.
    MemoryError
        The working arrays would not fit in the memory this process can still allocate (the message names the
        sizes: the image, the PSF and the FFT box). The volume is processed whole: there are no slabs.
    """
    caller = Caller("richardson_lucy", [image, psf], ["image", "psf"], promote_ints=True)
    img, kernel = caller.arrays
    for a, name in ((img, "image"), (kernel, "psf")):
        if a.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    dtype = np.dtype(np.float32 if img.dtype.kind == "f" and img.dtype.itemsize <= 4 else np.float64)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be 3-D (D, H, W) or 2-D (H, W), got {img.ndim}-D shape {img.shape}")
    if kernel.ndim != img.ndim:
        raise ValueError(f"psf must have the image's {img.ndim} dimensions, got psf shape {kernel.shape} for "
                         f"image shape {img.shape}")
    if min(img.shape) < 1 or min(kernel.shape) < 1:
        raise ValueError(f"image and psf must not be empty, got image shape {img.shape} and psf shape "
                         f"{kernel.shape}")
    if any(k > n for k, n in zip(kernel.shape, img.shape)):
        raise ValueError(f"psf shape {kernel.shape} is larger than image shape {img.shape} along an axis; crop "
                         "the PSF (or pad the image)")
    num_iter = positive_int(num_iter, "num_iter")
    if not isinstance(clip, (bool, np.bool_)):
        raise TypeError(f"clip must be True or False, got {clip!r}")
    if filter_epsilon is not None:
        if isinstance(filter_epsilon, (bool, np.bool_)) or not isinstance(filter_epsilon, numbers.Real) or \
                not 0 <= filter_epsilon < np.inf:
            raise ValueError(f"filter_epsilon must be None or a finite number >= 0, got {filter_epsilon!r}")
        filter_epsilon = float(filter_epsilon)
    if algorithm != "auto" and algorithm not in engine.ALGORITHMS:
        raise ValueError(f"algorithm must be 'auto', 'direct' or 'fft', got {algorithm!r}")
    nthreads = resolve_workers(workers)
    with np.errstate(over="ignore"):   # a value beyond float32's range becomes Inf: refused just below
        img = img.astype(dtype, copy=False)   # as scikit-image: the PSF in the image's float type
        kernel = kernel.astype(dtype, copy=False)
    for a, name in ((img, "image"), (kernel, "psf")):
        bad = a.size - np.count_nonzero(np.isfinite(a))
        if bad:
            raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or Inf, or beyond {dtype}'s range); "
                             "Richardson-Lucy needs finite values")
    if (kernel < 0).any():
        raise ValueError(f"psf has negative values (minimum {kernel.min():g}); a point-spread function is "
                         "non-negative")
    if not kernel.any():
        raise ValueError("psf sums to 0 (every value is 0)")
    flat = img.ndim == 2
    if flat:   # a 2-D image is a volume of one plane
        img, kernel = img[None], kernel[None]
    shape = img.shape
    if algorithm == "auto":
        algorithm = engine.choose_algorithm(shape, kernel.shape, dtype.itemsize, nthreads)
    need = engine.working_bytes(shape, kernel.shape, dtype.itemsize, algorithm, nthreads)
    box = f", FFT box {'x'.join(map(str, engine.fft_box(shape, kernel.shape)))}" if algorithm == "fft" else ""
    _memory.require(need, f"richardson_lucy of a {'x'.join(map(str, shape))} {dtype} image with a "
                          f"{'x'.join(map(str, kernel.shape))} PSF (algorithm {algorithm!r}{box})",
                    "; the volume is processed whole (no slabs): crop it" +
                    (", or deconvolve it in float32" if dtype == np.float64 else ""))
    out = engine.richardson_lucy(img, kernel, num_iter, bool(clip), filter_epsilon, algorithm, nthreads)
    if flat:
        out = out[0]
    return torch_module().from_numpy(out) if caller.is_tensor else out
