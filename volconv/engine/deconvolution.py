"""Richardson-Lucy deconvolution of checked numpy volumes: scikit-image's iteration with its two 'same'-mode
convolutions (by the PSF, then by its mirror) run by real FFTs on one fixed box or by the direct kernel; the
per-iteration cost of each (the 'auto' choice) and the bytes each holds (the memory guard).

The iteration (skimage.restoration.richardson_lucy, operation for operation, in the image's float type):

    u = 0.5 everywhere
    repeat: c = convolve(u, psf, 'same') + 1e-12
            r = image / c                          (0 where c < filter_epsilon, when it is given and not 0)
            u *= convolve(r, flip(psf), 'same')
    clip u to [-1, 1] (clip)

'same' is scipy.signal.convolve's: the full linear convolution (zeros outside the volume) cropped to the
image's shape starting at (k - 1) // 2 per axis. As a correlation (what volconv's kernels compute) both
convolutions read (k // 2, (k - 1) // 2) voxels below and above each output: u with the flipped PSF, r with the
PSF itself.

FFT path: circular convolution on a box of length L per axis equals the linear one on the kept outputs when
the PSF is placed with its tap (k - 1) // 2 at the origin (the others wrapped to the end) and L >= n + k // 2:
the reads that fall below the volume wrap into the box's zero tail instead of the data (the textbook L >=
n + k - 1 is not needed, as in engine/fft.py). So each convolution is one rfftn of a zero-padded box (the
estimate u and the ratio r live in the leading corner of two boxes allocated once, whose zero tails are never
written), one in-place product with a spectrum made once (the mirror's is the conjugate when every PSF side is
odd, else its own transform), and one inverse pruned to the corner that is kept (along D in place, along H on
the kept planes in place, along W on the kept rows only: about 10% less work than irfftn on a 31^3 PSF and a
128^3 image), read in place. scipy.fft has no output argument: the forward transform and the last inverse
stage allocate their results (the same sizes every iteration, which the allocator reuses).
Direct path: dense.run's direct kernel, two calls per iteration.
"""
import numpy as np

from .. import _memory
from .._validate import ConvSpec
from . import cost, dense, layout

EPS = 1e-12   # scikit-image's "small regularization parameter used to avoid 0 divisions"
ALGORITHMS = ("direct", "fft")


def same_spec(shape, psf_shape):
    """The ConvSpec of scipy's 'same' convolution of a (D, H, W) volume by a PSF, as a correlation with the
    flipped PSF (and of the mirror's convolution, as a correlation with the PSF)."""
    return ConvSpec((1, 1) + tuple(shape), (1, 1) + tuple(psf_shape), stride=(1, 1, 1),
                    pads=tuple((k // 2, (k - 1) // 2) for k in psf_shape), dilation=(1, 1, 1), groups=1,
                    mode="constant")


def fft_box(shape, psf_shape):
    """Transform lengths: per axis the smallest length >= n + k // 2 (see the module's docstring) that is a
    product of 2, 3 and 5 and a multiple of 4 (1 for an axis of one voxel and a PSF of one tap). pocketfft's
    float32 transforms of odd lengths are slower per point: on this machine one 3-D transform of 135^3 (3^3 * 5,
    what next_fast_len gives for 133) takes 1.1-1.3x as long as one of 144^3 (2^4 * 3^2), and an iteration's
    two convolutions on one thread ~1.05x (best of 25, interleaved)."""
    import scipy.fft

    def length(need):
        if need == 1:
            return 1
        n = scipy.fft.next_fast_len(need, real=True)
        while n % 4:
            n = scipy.fft.next_fast_len(n + 1, real=True)
        return n

    return tuple(length(n + k // 2) for n, k in zip(shape, psf_shape))


def iteration_costs(shape, psf_shape, nthreads):
    """Predicted seconds of one iteration by each algorithm (the cost model of engine/cost.py and engine/fft.py):
    two direct convolutions, or four transforms of the box and two spectrum products. The element-wise work
    (division, products) is the same for both and left out."""
    from . import fft   # scipy.fft takes 0.3 s to import: not at `import volconv`

    spec = same_spec(shape, psf_shape)
    return {"direct": 2 * cost.direct_cost(spec, nthreads),
            "fft": fft.box_cost(fft_box(shape, psf_shape), 4, 2) * 2 / min(nthreads, 2)}


def choose_algorithm(shape, psf_shape, itemsize, nthreads):
    """The cheaper algorithm by the cost model; fft when the direct kernel's rings of padded planes would not
    fit in memory."""
    costs = iteration_costs(shape, psf_shape, nthreads)
    if not _memory.fits(layout.ring_bytes(same_spec(shape, psf_shape), itemsize) * nthreads):
        return "fft"
    return min(costs, key=costs.get)


def working_bytes(shape, psf_shape, itemsize, algorithm, nthreads):
    """Bytes a run holds at its peak beside the caller's image: the result and, for fft, two real boxes (the
    estimate and the ratio), the PSF's two spectra, one transform's spectrum and one inverse's real box; for
    direct, the estimate, the ratio, the two convolutions' outputs and the kernel's rings of padded planes."""
    volume = int(np.prod(shape, dtype=np.int64)) * itemsize
    if algorithm == "fft":
        box = fft_box(shape, psf_shape)
        real = int(np.prod(box, dtype=np.int64)) * itemsize
        spectrum = int(np.prod(box[:-1], dtype=np.int64)) * (box[-1] // 2 + 1) * 2 * itemsize
        return volume + 3 * real + 3 * spectrum
    return 5 * volume + layout.ring_bytes(same_spec(shape, psf_shape), itemsize) * nthreads


class _FFTPath:
    """The two convolutions by real FFTs on one box; the estimate and the ratio are views of the boxes' corners."""

    def __init__(self, shape, psf, nthreads):
        import scipy.fft

        self.fft, self.workers = scipy.fft, nthreads
        self.box = fft_box(shape, psf.shape)
        self.corner = tuple(slice(0, n) for n in shape)
        self.spectrum = self._spectrum(psf)
        if all(k % 2 for k in psf.shape):   # the mirror of an odd PSF, placed the same way: the conjugate
            self.mirror_spectrum = np.conjugate(self.spectrum)
        else:   # an even side puts the mirror's centre one voxel off the conjugate's: its own transform
            self.mirror_spectrum = self._spectrum(psf[::-1, ::-1, ::-1])
        self.estimate_box = np.zeros(self.box, psf.dtype)
        self.ratio_box = np.zeros(self.box, psf.dtype)
        self.estimate = self.estimate_box[self.corner]
        self.ratio = self.ratio_box[self.corner]

    def _spectrum(self, psf):
        """rfftn of the PSF on the box, its tap (k - 1) // 2 at the origin and the taps before it wrapped to the
        box's end; pruned as the PSF is small: along W over its k0 * k1 rows, along H over its k0 planes, along
        D over everything (placed straight where the taps go, never rolled)."""
        fft, workers, box = self.fft, self.workers, self.box
        where = [(np.arange(k) - (k - 1) // 2) % n for k, n in zip(psf.shape, box)]
        rows = np.zeros(psf.shape[:2] + (box[2],), psf.dtype)
        rows[:, :, where[2]] = psf
        rows = fft.rfft(rows, axis=2, workers=workers)
        planes = np.zeros((psf.shape[0], box[1], rows.shape[2]), rows.dtype)
        planes[:, where[1]] = rows
        planes = fft.fft(planes, axis=1, overwrite_x=True, workers=workers)
        spectrum = np.zeros(box[:2] + (rows.shape[2],), rows.dtype)
        spectrum[where[0]] = planes
        return fft.fft(spectrum, axis=0, overwrite_x=True, workers=workers)

    def _convolve(self, source, spectrum):
        """The corner of irfftn(rfftn(source) * spectrum); the inverse pruned to what is kept: along D over the
        whole spectrum (in place), along H over the kept planes (in place), along W over the kept rows."""
        fft, workers, (n0, n1, n2) = self.fft, self.workers, self.estimate.shape
        x = fft.rfftn(source, workers=workers)
        np.multiply(x, spectrum, out=x)
        x = fft.ifft(x, axis=0, overwrite_x=True, workers=workers)
        x = fft.ifft(x[:n0], axis=1, overwrite_x=True, workers=workers)
        return fft.irfft(x[:, :n1], n=self.box[2], axis=2, workers=workers)[:, :, :n2]

    def blurred(self):
        """convolve(estimate, psf, 'same'): a view of a new array."""
        return self._convolve(self.estimate_box, self.spectrum)

    def correction(self):
        """convolve(ratio, flip(psf), 'same'): a view of a new array."""
        return self._convolve(self.ratio_box, self.mirror_spectrum)


class _DirectPath:
    """The two convolutions by the direct kernel (dense.run): u correlated with the flipped PSF, r with the PSF."""

    def __init__(self, shape, psf, nthreads):
        self.spec, self.nthreads = same_spec(shape, psf.shape), nthreads
        self.flipped = np.ascontiguousarray(psf[::-1, ::-1, ::-1])[None, None]
        self.psf = np.ascontiguousarray(psf)[None, None]
        self.estimate = np.empty(shape, psf.dtype)
        self.ratio = np.empty(shape, psf.dtype)

    def blurred(self):
        return dense.run(self.estimate[None, None], self.flipped, None, self.spec, "direct", self.nthreads,
                         allow_torch=False)[0, 0]

    def correction(self):
        return dense.run(self.ratio[None, None], self.psf, None, self.spec, "direct", self.nthreads,
                         allow_torch=False)[0, 0]


class _Slabs:
    """The element-wise work of an iteration cut into slabs of planes that fit in cache (the add, the division
    and the filter run on a slab while it is there), the slabs shared among nthreads threads (numpy's ufuncs
    release the GIL). The arithmetic is element by element: the same bits as whole-array operations."""

    def __init__(self, shape, itemsize, nthreads):
        step = max(1, SLAB_BYTES // (shape[1] * shape[2] * itemsize))
        slabs = [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]
        nthreads = min(nthreads, len(slabs))
        self.groups = [slabs[len(slabs) * i // nthreads:len(slabs) * (i + 1) // nthreads] for i in range(nthreads)]
        self.pool = None
        if nthreads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(nthreads, thread_name_prefix="volconv-rl")

    def run(self, fn, *arrays):
        """fn(*(a[slab] for a in arrays)) for every slab."""
        def group(slabs):
            for slab in slabs:
                fn(*(a[slab] for a in arrays))
        if self.pool is None:
            group(self.groups[0])
        else:
            for future in [self.pool.submit(group, g) for g in self.groups]:
                future.result()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


SLAB_BYTES = 256 * 2**10   # per array and slab: the three arrays of the division stay in a core's L2


def richardson_lucy(image, psf, num_iter, clip, filter_epsilon, algorithm, nthreads):
    """skimage.restoration.richardson_lucy on checked arrays: image (D, H, W) and psf (kd, kh, kw), one float
    dtype, finite, the PSF no larger than the image along any axis; image in any memory layout (only read).
    filter_epsilon: None or a number (0 and None: no filtering, as scikit-image's `if filter_epsilon:`).
    algorithm: 'direct' or 'fft'. Returns a new C-contiguous array of the image's dtype."""
    path = (_FFTPath if algorithm == "fft" else _DirectPath)(image.shape, psf, nthreads)
    slabs = _Slabs(image.shape, image.dtype.itemsize, nthreads)

    def ratio(blurred, image, out):
        blurred += EPS   # rounded to the dtype, as skimage's `+ eps` on a float32 array
        np.divide(image, blurred, out=out)
        if filter_epsilon:   # np.where(conv < filter_epsilon, 0, image / conv): the comparison in the dtype too
            np.copyto(out, 0, where=blurred < filter_epsilon)

    try:
        path.estimate[...] = 0.5
        for _ in range(num_iter):
            slabs.run(ratio, path.blurred(), image, path.ratio)
            slabs.run(np.multiply, path.estimate, path.correction(), path.estimate)   # u *= correction
    finally:
        slabs.close()
    out = np.array(path.estimate, order="C")
    if clip:
        np.clip(out, -1, 1, out=out)   # NaN stays NaN, as with skimage's masked assignments
    return out
