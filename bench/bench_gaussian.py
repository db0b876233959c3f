"""Gaussian smoothing of the 1 mm ICBM brain (float32), held against this machine's limit and against the filtering
tools users run, all in ONE run (compare ratios; the machine is shared and noisy).

    python bench/bench_gaussian.py [--sigma 2] [--threads 2] [--volume PATH] [--quick] [--out FILE]

1. The limit: the least time the 1-D passes' multiply-adds take at the FMA peak, or one read of the volume and
   one write of the result at the copy bandwidth, whichever is longer (both measured now, volconv._benchmark.Machine).
   volconv's time as a multiple of it, for several sigmas, anisotropic voxels and every boundary mode: returning
   a new array (the default: the system zeroes its fresh pages first, page fault by page fault) and into an
   existing one (output=, as scipy's). The flops are the plain count (2 x taps per axis x 3 per voxel): volconv's
   symmetric passes do half the multiplies, so less than 1x is possible in principle.
2. The anchors, sigma in mm over the voxel sizes, the same threads (when installed; each is skipped otherwise):
   scipy.ndimage.gaussian_filter, SimpleITK's SmoothingRecursiveGaussian, ANTs' smooth_image (antspyx, ITK's
   discrete Gaussian), TorchIO's Blur, MONAI's GaussianSmooth (torch), and niimath's `-s` (the open fslmaths,
   OpenMP C; a command, so its filtering step is its `-s` run minus a load-and-save run on the same
   uncompressed file, best of the rounds each).
Targets (issue 20): within 2x of the limit; >= 10x niimath, ANTs, TorchIO and MONAI for the filtering step.
"""
import argparse
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Machine, best_times

HERE = os.path.dirname(os.path.abspath(__file__))
BRAIN = os.path.join(HERE, "..", "sample_volumes", "mni_icbm152_t1_tal_nlin_sym_09a.nii.gz")


def load(path):
    """The 1 mm brain if present, else a random volume of its shape and voxel size."""
    if path and os.path.exists(path):
        import nibabel as nib

        img = nib.load(path)
        return np.asarray(img.dataobj, dtype=np.float32), tuple(float(z) for z in img.header.get_zooms()[:3]), path
    return np.random.default_rng(0).random((193, 229, 193), dtype=np.float32), (1.0, 1.0, 1.0), "random 193x229x193"


def volconv_case(volume, sigma, zooms, mode, threads):
    kernel = vc.kernels.gaussian(sigma, zooms)
    flops = 2.0 * volume.size * sum(f.shape[1] for f in kernel.factors)
    return (lambda: vc.correlate(volume, kernel, mode=mode, workers=threads)), flops, kernel


def limit_table(volume, zooms, machine, threads, quick):
    """volconv against the limit on several Gaussians (sigma in mm, zooms, mode)."""
    cases = [(2.0, zooms, "reflect"), (1.0, zooms, "reflect"), (2.0, zooms, "constant"), (2.0, zooms, "nearest"),
             (2.0, zooms, "wrap"), (2.0, (1.0, 1.0, 2.5), "reflect")]
    if not quick:
        cases += [(4.0, zooms, "reflect"), (0.8, zooms, "mirror")]
    lines = ["| sigma mm | zooms | mode | taps per axis | limit ms | new array ms | x limit | output= ms | x limit |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    buf = np.empty_like(volume)
    for sigma, z, mode in cases:
        fn, flops, kernel = volconv_case(volume, sigma, z, mode, threads)
        t = best_times({"new": fn, "output": lambda: vc.correlate(volume, kernel, mode=mode, workers=threads,
                                                                  output=buf)}, rounds=3 if quick else 7)
        limit = machine.limit(flops, 2 * volume.nbytes)
        taps = "x".join(str(f.shape[1]) for f in kernel.factors)
        lines.append(f"| {sigma:g} | {'x'.join(f'{v:g}' for v in z)} | {mode} | {taps} | {limit * 1e3:.2f} | "
                     f"{t['new'] * 1e3:.2f} | **{t['new'] / limit:.2f}x** | {t['output'] * 1e3:.2f} | "
                     f"**{t['output'] / limit:.2f}x** |")
    return "\n".join(lines)


def anchors(volume, zooms, sigma, threads):
    """{name: fn} of the installed in-process anchors, each smoothing `volume` with sigma mm."""
    import scipy.ndimage as ndi

    sigma_vox = tuple(sigma / z for z in zooms)
    c = {"scipy.ndimage": lambda: ndi.gaussian_filter(volume, sigma_vox, mode="reflect")}
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        image = sitk.GetImageFromArray(volume)
        image.SetSpacing(tuple(reversed(zooms)))
        smoother = sitk.SmoothingRecursiveGaussianImageFilter()
        smoother.SetSigma(sigma)
        c["SimpleITK"] = lambda: smoother.Execute(image)
    except ImportError:
        pass
    try:
        os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(threads))
        import ants

        ants_image = ants.from_numpy(volume, spacing=zooms)
        c["ANTs"] = lambda: ants.smooth_image(ants_image, sigma, sigma_in_physical_coordinates=True)
    except ImportError:
        pass
    try:
        import torch

        torch.set_num_threads(threads)
        tensor = torch.from_numpy(volume)[None]
        try:
            import torchio as tio

            subject = tio.ScalarImage(tensor=tensor, affine=np.diag(list(zooms) + [1.0]))
            blur = tio.Blur(std=sigma)
            c["TorchIO"] = lambda: blur(subject)
        except ImportError:
            pass
        try:
            from monai.transforms import GaussianSmooth

            smooth = GaussianSmooth(sigma=sigma_vox)
            c["MONAI"] = lambda: smooth(tensor)
        except ImportError:
            pass
    except ImportError:
        pass
    return c


def niimath_filter_seconds(volume, zooms, sigma, threads, rounds):
    """niimath's filtering step: `niimath IN -s SIGMA OUT` minus `niimath IN OUT` (load and save), best of the
    rounds each, alternating, on an uncompressed copy of the volume. None when niimath is not installed."""
    exe = shutil.which("niimath")
    if exe is None:
        return None
    import nibabel as nib

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.nii")
        nib.save(nib.Nifti1Image(volume, np.diag(list(zooms) + [1.0])), src)
        runs = {"smooth": [exe, src, "-s", str(sigma), os.path.join(tmp, "s.nii")],
                "copy": [exe, src, os.path.join(tmp, "c.nii")]}
        best = {name: float("inf") for name in runs}
        for r in range(rounds):
            for name in runs if r % 2 == 0 else reversed(list(runs)):
                t0 = time.perf_counter()
                subprocess.run(runs[name], check=True, env=env, stdout=subprocess.DEVNULL)
                best[name] = min(best[name], time.perf_counter() - t0)
    return max(best["smooth"] - best["copy"], 1e-6)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigma", type=float, default=2.0, help="sigma in mm of the anchors' case (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--volume", default=BRAIN)
    p.add_argument("--quick", action="store_true", help="fewer cases and rounds")
    p.add_argument("--out", help="also write the markdown to this file")
    a = p.parse_args(argv)
    volume, zooms, name = load(a.volume)
    machine = Machine(a.threads)
    text = [f"### Gaussian smoothing of {os.path.basename(name)} {volume.shape}, zooms {zooms}, float32, "
            f"{a.threads} threads; this machine now: {machine.describe()}", "",
            limit_table(volume, zooms, machine, a.threads, a.quick), ""]

    ours, flops, _ = volconv_case(volume, a.sigma, zooms, "reflect", a.threads)
    contenders = {"volconv": ours, **anchors(volume, zooms, a.sigma, a.threads)}
    times = best_times(contenders, rounds=3 if a.quick else 5)
    niimath = niimath_filter_seconds(volume, zooms, a.sigma, a.threads, 3 if a.quick else 5)
    if niimath is not None:
        times["niimath -s (filtering step)"] = niimath
    err = float(np.abs(ours() - contenders["scipy.ndimage"]()).max())
    text += [f"Sigma {a.sigma:g} mm, reflect; max |volconv - scipy.ndimage| = {err:.1e}", "",
             "| tool | ms | volconv faster by |", "|---|---:|---:|"]
    for tool, t in sorted(times.items(), key=lambda kv: kv[1]):
        ratio = "" if tool == "volconv" else f"**{t / times['volconv']:.1f}x**"
        text.append(f"| {tool} | {t * 1e3:.1f} | {ratio} |")
    text += ["", "Targets (issue 20): within 2x of the limit; >= 10x niimath, ANTs, TorchIO and MONAI (the filtering "
             "step)."]
    _benchmark.emit("\n".join(text), a.out)


if __name__ == "__main__":
    main()
