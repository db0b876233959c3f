"""`volconv bench`: a sample scan checked against scipy.ndimage, then volconv timed against torch and scipy."""
import numpy as np

from .common import positive


def add_parser(sub):
    """The `bench` subcommand and its options."""
    s = sub.add_parser("bench", help="check a sample scan against scipy.ndimage, then time volconv against "
                                     "torch and scipy (ratios in one run)")
    s.add_argument("--quick", action="store_true", help="smaller volumes, fewer rounds")
    s.add_argument("--threads", type=positive(int), default=2, help="threads for every contender (default 2)")
    s.add_argument("--sample", metavar="NIFTI", help="a NIfTI volume to filter and compare with scipy.ndimage")
    s.set_defaults(run=run)


def _sample_check(path, threads):
    """Filter a real scan with vc.correlate and scipy.ndimage.correlate; print agreement and times."""
    import nibabel as nib
    import scipy.ndimage as ndi

    from .. import correlate
    from .._benchmark import best_times

    volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    kernel = np.ones((5, 5, 5), np.float32) / 125
    ours = correlate(volume, kernel, mode="reflect", workers=threads)
    ref = ndi.correlate(volume, kernel, mode="reflect")
    err = float(np.abs(ours - ref).max() / np.abs(ref).max())
    t = best_times({"volconv": lambda: correlate(volume, kernel, mode="reflect", workers=threads),
                    "ndimage": lambda: ndi.correlate(volume, kernel, mode="reflect")}, rounds=5)
    print(f"{path}: {volume.shape} 5x5x5 mean filter, volconv {1e3 * t['volconv']:.2f} ms, scipy.ndimage "
          f"{1e3 * t['ndimage']:.2f} ms ({t['ndimage'] / t['volconv']:.1f}x), max relative difference "
          f"{err:.1e}")
    return err < 1e-5


def run(args):
    from .. import _benchmark

    ok = True
    if args.sample:
        ok = _sample_check(args.sample, args.threads)
    print(_benchmark.dense(quick=args.quick, threads=args.threads))
    return 0 if ok else 1
