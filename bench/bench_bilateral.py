"""3-D bilateral and joint bilateral filtering (issue 18 part 1) of the 1 mm brain, float32, --threads threads
(default 2), ratios measured in ONE run against the anchors: SimpleITK's BilateralImageFilter (exact window,
range Gaussian from a lookup table), MONAI's BilateralFilter (permutohedral lattice: approximate; and its
brute-force `fast_approx=False` path), MONAI's TrainableJointBilateralFilter (the joint case) and scikit-image's
denoise_bilateral (2-D only: run slice by slice). Every result is also compared with a brute-force numpy
reference of volconv's formula (float64, loop over taps, vectorised over voxels) on 64^3 crops.

    python bench/bench_bilateral.py [--threads 2] [--out FILE] [--volume PATH] [--sigma 2] [--range-fraction 0.1]

The filtering step only (the volume already in memory). Anchors that are not installed become a note. MONAI's
filters need its compiled extension `monai._C` (a source build: BUILD_MONAI=1); without it they are skipped.
"""
import os
import time

import numpy as np

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times

HERE = os.path.dirname(os.path.abspath(__file__))
BRAIN = os.path.join(HERE, "..", "sample_volumes", "mni_icbm152_t1_tal_nlin_sym_09a.nii.gz")

# SimpleITK sizes its window radius[a] = ceil(DomainMu * sigma / spacing[a]) with DomainMu fixed at 2.5 (not
# settable from SimpleITK); volconv's radius is int(truncate * sigma / zooms[a] + 0.5): truncate 2.5 gives the same
# box (radius 5, 11^3 = 1331 taps, at sigma 2 mm on 1 mm voxels; checked at run time).
TRUNCATE = 2.5
# SimpleITK's range Gaussian is a table of this many samples over [0, 4 sigma_range), read at floor(|d| / step);
# differences >= 4 sigma_range are dropped. The default (100) is a 4 %-of-sigma staircase; 10^5 makes the table
# error negligible (the time does not depend on it).
ITK_SAMPLES = 100_000
CROP = 64          # side of the crops on which the numpy reference is computed
NOISE = 0.05       # joint case: Gaussian noise of this fraction of the intensity range (seed 0)
JOINT_PART = 0.5   # joint case: the central sub-volume of this fraction of each axis (MONAI's joint filter takes
                   # ~4 min on the whole brain on 2 threads; every voxel costs it and volconv the same)
SLOW_SECONDS = 180  # SimpleITK slower than this on the whole brain: every contender runs on a sub-volume

# scipy.ndimage's boundary modes as numpy.pad names
_PAD = {"reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap", "constant": "constant"}


def radii(sigma, zooms, truncate):
    return tuple(int(truncate * sigma / z + 0.5) for z in zooms)


def with_halo(a, region, r):
    """(a's voxels of `region` plus up to r beyond it inside a, where `region` lies in that block)."""
    outer = tuple(slice(max(0, s.start - ri), min(n, s.stop + ri)) for s, ri, n in zip(region, r, a.shape))
    return a[outer], tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(region, outer))


def reference(volume, sigma_spatial, sigma_range, zooms, region, *, guide=None, truncate=TRUNCATE,
              mode="nearest", cval=0.0):
    """Brute-force bilateral filter of volconv's formula at the voxels of `region` (three slices) of the
    whole-volume result: float64, one pass over the box's taps, each vectorised over the region's voxels."""
    r = radii(sigma_spatial, zooms, truncate)
    pad = dict(mode=_PAD[mode], **({"constant_values": cval} if mode == "constant" else {}))

    def padded(a):   # the region plus a halo of r, the volume extended by `mode` beyond its edges
        block, inner = with_halo(a, region, r)
        width = [(ri - s.start, ri - (b - s.stop)) for ri, s, b in zip(r, inner, block.shape)]
        return np.pad(block.astype(np.float64), width, **pad)
    x = padded(volume)
    g = x if guide is None else padded(guide)
    shape = tuple(s.stop - s.start for s in region)
    centre = g[tuple(slice(ri, ri + n) for ri, n in zip(r, shape))]
    num, den = np.zeros(shape), np.zeros(shape)
    for dz in range(-r[0], r[0] + 1):
        for dy in range(-r[1], r[1] + 1):
            for dx in range(-r[2], r[2] + 1):
                d2 = (dz * zooms[0]) ** 2 + (dy * zooms[1]) ** 2 + (dx * zooms[2]) ** 2
                tap = tuple(slice(ri + t, ri + t + n) for ri, t, n in zip(r, (dz, dy, dx), shape))
                w = np.exp(-d2 / (2 * sigma_spatial**2) - (g[tap] - centre) ** 2 / (2 * sigma_range**2))
                num += w * x[tap]
                den += w
    return num / den


def load(path):
    import nibabel as nib

    img = nib.load(path)   # nibabel's array is Fortran-ordered: every contender gets the same C-ordered copy
    return (np.ascontiguousarray(img.dataobj, dtype=np.float32),
            tuple(float(z) for z in img.header.get_zooms()[:3]))


def timed_once(fn, warm=None):
    """(seconds, result) of one call, after one call of `warm` (the same filter on a small crop: libraries,
    thread pools and tables set up), for the contenders that take minutes."""
    if warm is not None:
        warm()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def keep(results, name, fn):
    """fn, storing its last result under `name` (errors are computed on the very outputs that were timed)."""
    def run():
        results[name] = fn()
    return run


def crops(shape, side):
    """The crop at the centre (tissue, edges of grey and white matter) and one touching the first voxel of the
    last axis (the volume's edge: boundary mode)."""
    c = [slice(max(0, n // 2 - side // 2), max(0, n // 2 - side // 2) + min(side, n)) for n in shape]
    edge = [slice(max(0, n // 2 - side // 4), max(0, n // 2 - side // 4) + min(side // 2, n)) for n in shape[:2]]
    return {"centre": tuple(c), "edge": (edge[0], edge[1], slice(0, min(side // 2, shape[2])))}


def main(argv=None):
    def configure(p):
        p.add_argument("--volume", default=BRAIN)
        p.add_argument("--sigma", type=float, default=2.0, help="sigma_spatial in mm (default 2)")
        p.add_argument("--range-fraction", type=float, default=0.1,
                       help="sigma_range as a fraction of the volume's intensity range (default 0.1)")
    a = _benchmark.arguments(__doc__, argv, configure)
    import torch

    t = a.threads
    load_before = os.getloadavg()[0]
    volume, zooms = load(a.volume)
    lo, hi = float(volume.min()), float(volume.max())
    span = hi - lo
    sigma_s, sigma_r = a.sigma, a.range_fraction * span
    r = radii(sigma_s, zooms, TRUNCATE)
    notes = []
    itk_r = tuple(int(np.ceil(2.5 * sigma_s / z)) for z in zooms)
    if itk_r != r:
        notes.append(f"SimpleITK's window radius {itk_r} differs from volconv's {r} at these voxel sizes.")

    try:
        import SimpleITK as sitk
    except ImportError:
        sitk = None
        notes.append("SimpleITK is not installed (`pip install SimpleITK`): its row is missing.")
    try:
        from monai.networks.layers.filtering import BilateralFilter, TrainableJointBilateralFilter
        from monai.utils import optional_import

        monai_c, has_c = optional_import("monai._C")
        if not has_c:
            notes.append("MONAI is installed without its compiled extension monai._C (the PyPI wheel has none; "
                         "a source build with BUILD_MONAI=1 makes it): its filters are skipped.")
            BilateralFilter = None
    except ImportError:
        BilateralFilter = None
        notes.append("MONAI is not installed (`pip install monai`, then its extension: BUILD_MONAI=1 source "
                     "build): its filters are skipped.")
    try:
        from skimage.restoration import denoise_bilateral
    except ImportError:
        denoise_bilateral = None
        notes.append("scikit-image is not installed: its row is missing.")

    def itk_filter(samples=ITK_SAMPLES):
        f = sitk.BilateralImageFilter()
        f.SetDomainSigma(sigma_s)
        f.SetRangeSigma(sigma_r)
        f.SetNumberOfRangeGaussianSamples(samples)
        f.SetNumberOfThreads(t)
        return f

    def itk_run(v, samples=ITK_SAMPLES):
        image = sitk.GetImageFromArray(v)
        image.SetSpacing(tuple(reversed(zooms)))
        return sitk.GetArrayFromImage(itk_filter(samples).Execute(image))

    def ours(v, **kw):
        return vc.bilateral_filter(v, sigma_s, sigma_r, zooms, truncate=TRUNCATE, mode="nearest", workers=t, **kw)

    def bracketed(fn, mine):
        """One call of the slow anchor fn between two calls of volconv's `mine` (the same job): (anchor seconds,
        its result, volconv's mean seconds beside it, anchor CPU seconds, volconv's mean CPU seconds). On this
        shared machine other sessions' load drifts over minutes: volconv's best of rounds beside one anchor call
        taken at another moment would flatter either side; CPU seconds (all threads of this process) are the work
        done, which other processes do not stretch."""
        c0, w0 = time.process_time(), time.perf_counter()
        mine()
        c1, w1 = time.process_time(), time.perf_counter()
        result = fn()
        c2, w2 = time.process_time(), time.perf_counter()
        mine()
        c3, w3 = time.process_time(), time.perf_counter()
        return w2 - w1, result, (w1 - w0 + w3 - w2) / 2, c2 - c1, (c1 - c0 + c3 - c2) / 2

    slow = {}   # anchor: (its seconds, volconv's mean seconds beside it, its CPU s, volconv's CPU s)
    # Sub-volume rule: SimpleITK on the whole brain once; over SLOW_SECONDS, every contender gets a sub-volume.
    full_itk = None
    if sitk is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(t)
        itk_run(volume[:24, :24, :24])
        ours(np.ascontiguousarray(volume[:24, :24, :24]))
        itk_seconds, full_itk, *rest = bracketed(lambda: itk_run(volume), lambda: ours(volume))
        slow["SimpleITK"] = (itk_seconds, *rest)
        if itk_seconds > SLOW_SECONDS:
            n = [int(s * (SLOW_SECONDS / itk_seconds / 2) ** (1 / 3)) for s in volume.shape]
            sub = tuple(slice((s - m) // 2, (s - m) // 2 + m) for s, m in zip(volume.shape, n))
            notes.append(f"SimpleITK took {itk_seconds:.0f} s on the whole brain (> {SLOW_SECONDS} s): every "
                         f"contender runs on the central sub-volume {tuple(n)}.")
            volume = np.ascontiguousarray(volume[sub])
            full_itk = None
    shape = volume.shape
    name = os.path.basename(a.volume)
    regions = crops(shape, CROP)

    # ---------------------------------------------------------------------------------------- self-guided
    out, times, anchors = {}, {}, []
    default = "volconv, default truncate 3.0"   # a bigger box than SimpleITK's: what a user gets without truncate=
    r3 = radii(sigma_s, zooms, 3.0)
    fast = {"volconv": keep(out, "volconv", lambda: ours(volume)),
            default: lambda: vc.bilateral_filter(volume, sigma_s, sigma_r, zooms, mode="nearest", workers=t)}
    isotropic = len(set(zooms)) == 1
    volume_t = torch.from_numpy(volume)[None, None]
    if BilateralFilter is not None and isotropic:
        fast["MONAI permutohedral"] = keep(out, "MONAI permutohedral", lambda: BilateralFilter.apply(
            volume_t, sigma_s / zooms[0], sigma_r, True)[0, 0].numpy())
    if denoise_bilateral is not None and zooms[1] == zooms[2]:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(t)

        def skimage_slices():   # its Cython releases the GIL: --threads slices at a time
            def one(s):
                return denoise_bilateral(s, win_size=2 * r[1] + 1, sigma_color=sigma_r,
                                         sigma_spatial=sigma_s / zooms[1], mode="edge")
            return np.stack(list(pool.map(one, volume)))
        fast["scikit-image 2-D slices"] = keep(out, "scikit-image 2-D slices", skimage_slices)
    times.update(best_times(fast, rounds=3, repeat=1))
    anchors += [k for k in fast if not k.startswith("volconv")]
    if sitk is not None:
        if full_itk is None:
            itk_seconds, full_itk, *rest = bracketed(lambda: itk_run(volume), lambda: ours(volume))
            slow["SimpleITK"] = (itk_seconds, *rest)
        out["SimpleITK"] = full_itk
    if BilateralFilter is not None and isotropic:
        BilateralFilter.apply(volume_t[..., :16, :16, :16].contiguous(), sigma_s, sigma_r, False)   # warm-up
        seconds, out["MONAI exact"], *rest = bracketed(
            lambda: BilateralFilter.apply(volume_t, sigma_s / zooms[0], sigma_r, False)[0, 0].numpy(),
            lambda: ours(volume))
        slow["MONAI exact"] = (seconds, *rest)
    exact_anchors = list(slow)

    refs = {k: reference(volume, sigma_s, sigma_r, zooms, reg) for k, reg in regions.items()}

    def errors(result, refs_, regions_):
        """|result - reference| relative to the intensity range: max on each crop, mean over both."""
        d = {k: np.abs(result[reg].astype(np.float64) - refs_[k]) / span for k, reg in regions_.items()}
        return [d[k].max() for k in regions_] + [np.concatenate([v.ravel() for v in d.values()]).mean()]

    def error_row(label, e):
        return f"| {label} | " + " | ".join(f"{v:.1e}" for v in e) + " |"

    def add_slow(table, k):
        seconds, beside, cpu_anchor, cpu_ours = slow[k]
        table.add(f"vs {k}: one call, volconv timed just before and after it (CPU seconds of all threads: "
                  f"{k} {cpu_anchor:.1f}, volconv {cpu_ours:.2f}, **{cpu_anchor / cpu_ours:.1f}x**)",
                  {"volconv": beside, k: seconds}, ["volconv"], [k])
    error_head = ["| contender | max, centre crop | max, edge crop | mean, both |", "|---|---:|---:|---:|"]
    errs = {k: errors(out[k], refs, regions) for k in ["volconv", *exact_anchors, *anchors]}
    taps = int(np.prod([2 * ri + 1 for ri in r]))
    table = Table(f"Bilateral filter, {name} {shape}, zooms {zooms}, float32, {t} threads: sigma_spatial "
                  f"{sigma_s} mm, sigma_range {sigma_r:g} ({a.range_fraction:g} of the intensity range "
                  f"{lo:g}..{hi:g}), box radius {r} ({taps} taps), mode nearest")
    for k in exact_anchors:
        add_slow(table, k)
    table.add("approximate / 2-D anchors, best of 3 rounds round-robin", times, ["volconv"], anchors)
    err_lines = [error_row(k, e) for k, e in errs.items()]
    if sitk is not None:   # the table's default: the same crops (plus their halo) through a 100-sample table
        itk_default = np.zeros(shape, np.float32)
        for k, reg in regions.items():   # a filter of the crop plus its halo is the whole filter on the crop
            block, inner = with_halo(volume, reg, r)
            itk_default[reg] = itk_run(np.ascontiguousarray(block), 100)[inner]
        err_lines.append(error_row("SimpleITK, its default 100-sample range table",
                                   errors(itk_default, refs, regions)))
    if "scikit-image 2-D slices" in out:   # against the exact 2-D filter of each slice (no taps across slices)
        refs2d = {k: reference(volume, sigma_s, sigma_r, (1e9, zooms[1], zooms[2]), reg) for k, reg in regions.items()}
        err_lines.append(error_row("scikit-image against the exact 2-D filter of each slice",
                                   errors(out["scikit-image 2-D slices"], refs2d, regions)))
    worst = max(errs["volconv"][:-1])
    goal = ("Goal (issue 18): volconv equal to the numpy reference to float32 rounding (taken as a max error < 1e-5 "
            f"of the range for a {taps}-term float32 sum): {worst:.1e} ({'met' if worst < 1e-5 else 'NOT met'}); "
            ">= 20x SimpleITK on the 1 mm brain with sigma 2 mm: ")
    if "SimpleITK" in slow:
        seconds, beside, cpu_anchor, cpu_ours = slow["SimpleITK"]
        ratio = seconds / beside
        goal += (f"**{ratio:.1f}x** against volconv's calls beside it ({'met' if ratio >= 20 else 'NOT met'}); "
                 f"in CPU seconds {cpu_anchor / cpu_ours:.1f}x; against volconv's best of 3 rounds at another moment "
                 f"{seconds / times['volconv']:.1f}x (flattering when the machine is busier during SimpleITK's call)")
    else:
        goal += "SimpleITK not installed"
    rate = volume.size * taps / times["volconv"] / 1e9
    goal += (f". volconv's best rate: {rate:.2f} G voxel-taps/s on {t} threads ({1 / rate * t:.2f} ns per "
             f"voxel-tap per thread). volconv at its default truncate 3.0 (radius {r3}, "
             f"{int(np.prod([2 * x + 1 for x in r3]))} taps): {times[default] * 1e3:.0f} ms, "
             f"{times[default] / times['volconv']:.2f}x its time at truncate {TRUNCATE}: the ratios above divide by "
             "that much when volconv's default window meets SimpleITK's.")
    text = [table.markdown(), "",
            f"Error against the brute-force numpy reference (float64) on the {CROP}^3 crop at the centre and the "
            f"{CROP // 2}^3 crop on the volume's edge (last axis index 0), relative to the intensity range {span:g}:",
            "", *error_head, *err_lines, "", goal]

    # ---------------------------------------------------------------------------------------- joint
    part = tuple(slice(n // 2 - int(n * JOINT_PART) // 2, n // 2 - int(n * JOINT_PART) // 2 + int(n * JOINT_PART))
                 for n in shape)
    clean = np.ascontiguousarray(volume[part])
    rng = np.random.default_rng(0)
    noisy = (clean + rng.normal(0.0, NOISE * span, clean.shape)).astype(np.float32)
    jregions = crops(clean.shape, CROP)
    jout = {}
    jtimes = best_times({"volconv": keep(jout, "volconv", lambda: ours(noisy, guide=clean))}, rounds=3, repeat=1)
    jtable = Table(f"Joint bilateral: the central {clean.shape} of {name} plus Gaussian noise (sd {NOISE:g} of the "
                   f"range, seed 0) filtered with the clean volume as guide, same sigmas and box, {t} threads")
    if BilateralFilter is not None:
        jbf = TrainableJointBilateralFilter(tuple(sigma_s / z for z in zooms), sigma_r)
        noisy_t, clean_t = torch.from_numpy(noisy)[None, None], torch.from_numpy(clean)[None, None]

        def monai_joint(x=noisy_t, g=clean_t):
            with torch.no_grad():
                return jbf(x, g)[0, 0].numpy()
        monai_joint(noisy_t[..., :16, :16, :16].contiguous(), clean_t[..., :16, :16, :16].contiguous())
        seconds, jout["MONAI joint"], *rest = bracketed(monai_joint, lambda: ours(noisy, guide=clean))
        slow["MONAI joint"] = (seconds, *rest)
        add_slow(jtable, "MONAI joint")
    else:
        jtable.add("volconv alone (no joint anchor installed)", jtimes, ["volconv"], [])
    jrefs = {k: reference(noisy, sigma_s, sigma_r, zooms, reg, guide=clean) for k, reg in jregions.items()}
    jerrs = {k: errors(v, jrefs, jregions) for k, v in jout.items()}
    jrate = clean.size * taps / jtimes["volconv"] / 1e9
    text += ["", jtable.markdown(), "", f"volconv's best of 3: {jtimes['volconv'] * 1e3:.0f} ms, {jrate:.2f} G "
             "voxel-taps/s. Error against the numpy reference (joint, guide = the clean volume) on the same two kinds "
             "of crop of the sub-volume:", "", *error_head, *[error_row(k, e) for k, e in jerrs.items()]]

    notes += [
        f"volconv: vc.bilateral_filter(x, {sigma_s}, {sigma_r:g}, zooms, truncate={TRUNCATE}, mode='nearest', "
        f"workers={t}): the exact formula over the box of radius int(truncate sigma / zoom + 0.5) = {r}, weights "
        "exp(-|t zooms|^2 / 2 sigma_s^2 - (g[i+t] - g[i])^2 / 2 sigma_r^2) normalised per voxel. "
        f"'default truncate 3.0': the same call without truncate=, radius {r3}, a bigger box than the anchors'.",
        f"SimpleITK BilateralImageFilter (DomainSigma {sigma_s} mm, RangeSigma {sigma_r:g}, "
        f"NumberOfRangeGaussianSamples {ITK_SAMPLES}, {t} threads): radius ceil(2.5 sigma / spacing) (DomainMu 2.5, "
        "fixed in SimpleITK) = the same box; edges: zero-flux Neumann (= nearest); range Gaussian from a table over "
        "[0, 4 sigma_range), read at the floor of the difference, differences >= 4 sigma_range dropped (weight < "
        "e^-8). One call (warmed on a 24^3 crop). No joint (guided) form: absent from the joint table.",
        f"MONAI permutohedral: BilateralFilter.apply(x, {sigma_s / zooms[0]:g}, {sigma_r:g}, fast_approx=True), "
        "Adams et al.'s permutohedral lattice, a global approximation with no window; single-threaded C++ (no "
        "OpenMP in that path). Isotropic spatial sigma in voxels only. It assumes a C-contiguous tensor without "
        "checking: on nibabel's Fortran-ordered array (torch.from_numpy keeps the strides) it returns wrong values.",
        "MONAI exact: the same call with fast_approx=False: brute force over a window ceil(5 sigma) | 1 = "
        f"{(int(np.ceil(5 * sigma_s / zooms[0])) | 1)} voxels wide, clamped edges (= nearest), exp per tap, "
        "single-threaded; one call.",
        f"MONAI joint: TrainableJointBilateralFilter({tuple(sigma_s / z for z in zooms)}, {sigma_r:g}) under "
        "torch.no_grad(): brute force over a window max(ceil(5 sigma) | 1, 5) per axis, OpenMP over one axis, and its "
        "forward also computes the five derivative fields for its backward; taps beyond the edge are DROPPED (not "
        "nearest), so it differs from the others only within the radius of the volume's edge. One call.",
        f"scikit-image: denoise_bilateral is 2-D only: a 3-D array is refused with channel_axis=None, and with "
        "channel_axis=-1 the last axis is taken as colour channels (a warning; a 2-D filter whose range distance is "
        "the Euclidean norm over all the last axis' voxels), not a 3-D filter. Timed as its 2-D filter on each "
        f"axial slice (win_size {2 * r[1] + 1}, sigma_spatial {sigma_s / zooms[1]:g}, sigma_color {sigma_r:g}, "
        f"mode 'edge', default 10000-bin colour table), {t} slices at a time (its loop releases the GIL): a "
        "different (2-D) filter, so its first error row is the difference from the 3-D result; the second compares it "
        "with the exact 2-D filter of each slice, and its size is scikit-image's own: its spatial table is built on "
        "np.arange(-win_size // 2, win_size // 2 + 1), 12 offsets -6..5 for win_size 11, then read as an 11 x 11 "
        "table (row stride win_size), so the spatial kernel is skewed (with a centred table the difference falls to "
        "the colour table's ~3e-5, checked by hand on 0.26.0).",
        "Ratios = anchor time / volconv time (> 1: volconv is faster), all measured in this one process: the fast "
        "contenders best of 3 rounds round-robin; each slow one in one call, against the mean of volconv's calls "
        "just before and after it (the same job). 1-minute load average of this machine "
        f"({os.cpu_count()} CPUs) at the start {load_before:.1f}, at the end {os.getloadavg()[0]:.1f}.",
    ]
    text += ["", "Notes:", *[f"- {n}" for n in notes]]
    _benchmark.emit("\n".join(text), a.out)


if __name__ == "__main__":
    main()
