"""Multi-scale Hessian vesselness (issue 19 part 4), float32, one run: vc.filters.frangi on a 256^3 volume with 4
scales (sigmas 1, 2, 3, 4 voxels) against skimage.filters.frangi (the same numbers; one round, it takes minutes)
and, when installed (`pip install itk`), ITK's multi-scale HessianToObjectnessMeasure (a different formula,
timed as a speed anchor only); the peak resident memory each adds beyond its input and output (Linux VmHWM),
in volumes. --methods frangi,sato,meijering adds the other two filters (on --size-other, default 128^3: each
scikit-image run of them at 256^3 is minutes more). The volume: a few random tubes of Gaussian profile in noise.

    python bench/bench_vesselness.py [--threads 2] [--size 256] [--methods frangi] [--out FILE]
"""
import time

import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times, peak_extra_bytes

SIGMAS = [1.0, 2.0, 3.0, 4.0]


def vessels(n, seed=0):
    """n^3 float32: ten straight tubes of radius 1.5-4 voxels in random directions, plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij"), -1)
    v = np.zeros((n, n, n), np.float32)
    for _ in range(10):
        p, d = rng.uniform(0, n, 3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
        d /= np.linalg.norm(d)
        rel = grid - p
        r2 = (rel ** 2).sum(-1) - (rel @ d) ** 2
        np.maximum(v, np.exp(-r2 / (2 * rng.uniform(1.5, 4.0) ** 2)), out=v)
    return v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)


def timed_once(fn):
    """(seconds, peak bytes beyond the result) of one call: for a contender too slow to run twice."""
    box = {}

    def run():
        t0 = time.perf_counter()
        box["out"] = fn()
        box["t"] = time.perf_counter() - t0
        return np.asarray(box["out"])
    mem = peak_extra_bytes(run)
    return box["t"], mem, box["out"]


def itk_objectness(volume, threads):
    """ITK's multi-scale Hessian objectness (Frangi-like, bright tubes), or None when itk is not installed."""
    try:
        import itk
    except ImportError:
        return None
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    image = itk.image_view_from_array(volume)
    ImageType = type(image)
    HessianType = itk.Image[itk.SymmetricSecondRankTensor[itk.D, 3], 3]
    objectness = itk.HessianToObjectnessMeasureImageFilter[HessianType, ImageType].New()
    objectness.SetBrightObject(True)
    objectness.SetScaleObjectnessMeasure(False)
    objectness.SetAlpha(0.5)
    objectness.SetBeta(0.5)
    objectness.SetGamma(5.0)
    multi = itk.MultiScaleHessianBasedMeasureImageFilter[ImageType, HessianType, ImageType].New()
    multi.SetInput(image)
    multi.SetHessianToMeasureFilter(objectness)
    multi.SetSigmaStepMethodToEquispaced()
    multi.SetSigmaMinimum(SIGMAS[0])
    multi.SetSigmaMaximum(SIGMAS[-1])
    multi.SetNumberOfSigmaSteps(len(SIGMAS))

    def run():
        multi.Modified()
        multi.Update()
        return itk.array_from_image(multi.GetOutput())
    return run


def configure(p):
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--size-other", type=int, default=128)
    p.add_argument("--methods", default="frangi")


def main(argv=None):
    a = _benchmark.arguments(__doc__, argv, configure)
    import skimage.filters as sf

    texts = []
    for method in a.methods.split(","):
        n = a.size if method == "frangi" else a.size_other
        volume = vessels(n)
        vbytes = volume.nbytes
        ours = lambda: getattr(vc.filters, method)(volume, SIGMAS, black_ridges=False, workers=a.threads)  # noqa
        theirs = lambda: getattr(sf, method)(volume, sigmas=SIGMAS, black_ridges=False)  # noqa: E731
        t_sk, mem_sk, ref = timed_once(theirs)
        times = best_times({"volconv": ours}, rounds=2, repeat=1)
        times["scikit-image"] = t_sk
        mem_ours = peak_extra_bytes(ours)
        err = float(np.abs(ours() - ref).max())
        mems = f"volconv {mem_ours / vbytes:.2f}, scikit-image {mem_sk / vbytes:.2f}"
        itk_run = itk_objectness(volume, a.threads) if method == "frangi" else None
        if itk_run is not None:
            t_itk, mem_itk, _ = timed_once(itk_run)
            times["ITK objectness"] = t_itk
            mems += f", ITK {mem_itk / vbytes:.2f}"
        table = Table(f"{method}, {n}^3 float32, sigmas {SIGMAS} voxels, bright ridges, {a.threads} threads; "
                      f"max |volconv - scikit-image| = {err:.1e}; peak memory beyond input and output, in "
                      f"volumes: {mems}")
        table.add(method, times, ["volconv"], [k for k in times if k != "volconv"])
        texts.append(table.markdown())
    text = "\n\n".join(texts) + ("\n\nGoals (issue 19): Frangi on 256^3 with 4 scales >= 10x scikit-image, at <= 3 "
                                 "volumes of memory beyond input and output.")
    _benchmark.emit(text, a.out)


if __name__ == "__main__":
    main()
