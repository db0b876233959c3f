"""The `volconv` command. Subcommands call the library; tests call main([...]) directly."""
import argparse
import sys


def _info(args):
    from . import _cpu, has_cuda

    print(f"volconv {__import__('volconv').__version__}: {_cpu.SIMD} kernels, "
          f"OpenMP {'on' if _cpu.HAVE_OPENMP else 'off'}, {_cpu.max_threads()} threads, "
          f"CUDA plugin {'ready' if has_cuda() else 'not built'}")
    return 0


def _sample_check(path, threads):
    """Filter a real scan with vc.correlate and scipy.ndimage.correlate; print agreement and times."""
    import nibabel as nib
    import numpy as np
    import scipy.ndimage as ndi

    from . import correlate

    from ._benchmark import best_times

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


def _bench(args):
    from . import _benchmark

    ok = True
    if args.sample:
        ok = _sample_check(args.sample, args.threads)
    print(_benchmark.dense(quick=args.quick, threads=args.threads))
    return 0 if ok else 1


def build_parser():
    p = argparse.ArgumentParser(prog="volconv", description="Fast 3D convolution for medical volumes.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="the kernels this machine runs (SIMD build, threads, CUDA)")
    s.set_defaults(run=_info)
    s = sub.add_parser("bench", help="check a sample scan against scipy.ndimage, then time volconv against "
                                     "torch and scipy (ratios in one run)")
    s.add_argument("--quick", action="store_true", help="smaller volumes, fewer rounds")
    s.add_argument("--threads", type=int, default=2, help="threads for every contender (default 2)")
    s.add_argument("--sample", metavar="NIFTI", help="a NIfTI volume to filter and compare with scipy.ndimage")
    s.set_defaults(run=_bench)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
