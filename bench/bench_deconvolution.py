"""Richardson-Lucy deconvolution (issue 19 part 2), float32, one run (ratios in one process):
vc.restoration.richardson_lucy against skimage.restoration.richardson_lucy (scipy.signal.convolve, which picks
fftconvolve here, one thread) on a 128^3 volume (blurred beads, a background and noise), 20 iterations, with
PSFs of 31^3 (the issue's case; goal >= 5x), 11^3 (near the direct / FFT crossover) and 5^3 (the direct
path's case): volconv's 'auto' choice and each algorithm forced (and, for 31^3, volconv on one thread, as
scikit-image runs); the max |volconv - skimage| of each; peak resident memory beyond the result (Linux VmHWM) of
volconv and of scikit-image.

    python bench/bench_deconvolution.py [--threads 2] [--iterations 20] [--size 128] [--out FILE]
"""
import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times, peak_extra_bytes
from volconv.engine import deconvolution as engine


def psf_of(k):
    """A non-separable microscopy-like PSF: an anisotropic Gaussian (wider along the first axis) with a faint
    cone of side lobes, normalised to sum 1."""
    g = np.meshgrid(*[np.arange(k) - (k - 1) / 2] * 3, indexing="ij")
    r = k / 6
    core = np.exp(-(g[0] ** 2 / (2 * (1.8 * r) ** 2) + (g[1] ** 2 + g[2] ** 2) / (2 * r**2)))
    lobes = 0.05 * np.exp(-((np.hypot(g[1], g[2]) - np.abs(g[0]) * 0.5) ** 2) / (2 * (0.5 * r) ** 2))
    psf = core + lobes
    return (psf / psf.sum()).astype(np.float32)


def beads(n, psf, rng):
    truth = np.zeros((n, n, n), np.float32)
    idx = rng.integers(4, n - 4, (200, 3))
    truth[tuple(idx.T)] = rng.uniform(0.3, 1.0, 200)
    from scipy.signal import fftconvolve

    blurred = fftconvolve(truth, psf, mode="same")
    return (blurred + 0.01 + 0.002 * rng.random(truth.shape)).astype(np.float32)


def main(argv=None):
    a = _benchmark.arguments(__doc__, argv, configure=lambda p: (
        p.add_argument("--iterations", type=int, default=20),
        p.add_argument("--size", type=int, default=128)))
    from skimage.restoration import richardson_lucy as skimage_rl

    t, n, it = a.threads, a.size, a.iterations
    rng = np.random.default_rng(0)
    parts = []
    for k in (31, 11, 5):
        psf = psf_of(k)
        image = beads(n, psf, rng)
        auto = engine.choose_algorithm(image.shape, psf.shape, 4, t)
        c = {f"volconv auto ({auto})": lambda: vc.restoration.richardson_lucy(image, psf, it, workers=t)}
        for name in ("fft", "direct"):
            if name != auto and not (name == "direct" and k > 11):   # direct at 31^3 would take minutes
                c[f"volconv {name}"] = (lambda name=name: vc.restoration.richardson_lucy(
                    image, psf, it, workers=t, algorithm=name))
        if k == 31 and t > 1:   # per core: scikit-image runs on one thread
            c[f"volconv auto ({auto}), 1 thread"] = lambda: vc.restoration.richardson_lucy(image, psf, it, workers=1)
        c["scikit-image"] = lambda: skimage_rl(image, psf, num_iter=it)
        ref = c["scikit-image"]()
        errs = {name: float(np.abs(fn() - ref).max()) for name, fn in c.items() if name != "scikit-image"}
        table = Table(f"Richardson-Lucy, {it} iterations, {n}^3 float32 beads, PSF {k}^3, {t} threads")
        ours = [name for name in c if name != "scikit-image"]
        table.add(f"PSF {k}^3", best_times(c, rounds=2, repeat=1), ours, ["scikit-image"])
        mib = 2**20
        mem = {name: peak_extra_bytes(c[name]) / mib for name in (ours[0], "scikit-image")}
        parts.append(table.markdown() + "\n\nmax |volconv - scikit-image|: " +
                     ", ".join(f"{name} {e:.1e}" for name, e in errs.items()) +
                     f" (result max {float(ref.max()):.2f}). Peak memory beyond the result: {ours[0]} "
                     f"{mem[ours[0]]:.0f} MiB, scikit-image {mem['scikit-image']:.0f} MiB (the input: "
                     f"{image.nbytes / mib:.0f} MiB).")
    text = "\n\n".join(parts) + "\n\nTarget (issue 19): >= 5x scikit-image for 20 iterations, PSF 31^3 on 128^3."
    _benchmark.emit(text, a.out)


if __name__ == "__main__":
    main()
