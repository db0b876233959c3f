"""Gaussian smoothing of a 1 mm brain volume (issue: NIfTI volumes and physical-unit kernels), float32, one
run, ratios against scipy.ndimage.gaussian_filter and SimpleITK's SmoothingRecursiveGaussian (when installed:
`pip install SimpleITK`), both with sigma in mm over the voxel sizes and 2 threads.

    python bench/bench_gaussian.py [--sigma 2] [--threads 2] [--volume PATH]

The filtering step only (the volume already in memory); the whole `volconv filter` command is timed by the
CLI benchmark once the command exists.
"""
import argparse
import os

import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times

HERE = os.path.dirname(os.path.abspath(__file__))
BRAIN = os.path.join(HERE, "..", "sample_volumes", "mni_icbm152_t1_tal_nlin_sym_09a.nii.gz")


def load(path):
    """The 1 mm brain if present, else a random volume of its shape and voxel size."""
    if path and os.path.exists(path):
        import nibabel as nib

        img = nib.load(path)
        return np.asarray(img.dataobj, dtype=np.float32), tuple(float(z) for z in img.header.get_zooms()[:3]), path
    return np.random.default_rng(0).random((193, 229, 193), dtype=np.float32), (1.0, 1.0, 1.0), "random 193x229x193"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigma", type=float, default=2.0, help="sigma in mm (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--volume", default=BRAIN)
    p.add_argument("--out", help="also write the markdown table to this file")
    a = p.parse_args(argv)
    import scipy.ndimage as ndi

    volume, zooms, name = load(a.volume)
    sigma_vox = tuple(a.sigma / z for z in zooms)
    kernel = vc.kernels.gaussian(a.sigma, zooms)
    c = {"volconv": lambda: vc.correlate(volume, kernel, mode="reflect", workers=a.threads),
         "scipy.ndimage": lambda: ndi.gaussian_filter(volume, sigma_vox, mode="reflect")}
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(a.threads)
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing(tuple(reversed(zooms)))
        smoother = sitk.SmoothingRecursiveGaussianImageFilter()
        smoother.SetSigma(a.sigma)
        c["SimpleITK"] = lambda: smoother.Execute(image)
    except ImportError:
        pass
    err = float(np.abs(c["volconv"]() - c["scipy.ndimage"]()).max())
    table = Table(f"Gaussian sigma {a.sigma} mm on {name} {volume.shape}, zooms {zooms}, float32, "
                  f"{a.threads} threads; max |volconv - scipy| = {err:.1e}")
    flops = 2.0 * volume.size * sum(f.shape[1] for f in kernel.factors)   # three 1-D passes
    table.add("gaussian", best_times(c, rounds=5), ["volconv"], [k for k in c if k != "volconv"], flops=flops)
    text = table.markdown() + "\n\nTarget (issue 3): the filtering step >= 8x scipy.ndimage and >= 8x SimpleITK."
    _benchmark.emit(text, a.out)


if __name__ == "__main__":
    main()
