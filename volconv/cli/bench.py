"""`volconv bench`: a sample scan checked against scipy.ndimage, then volconv timed against torch and scipy; with
--calibrate, this machine's cost-model constants measured and stored (--calibration shows them)."""
import dataclasses
import os

import numpy as np

from .common import CommandError, Reporter, positive


def add_parser(sub):
    """The `bench` subcommand and its options."""
    s = sub.add_parser("bench", help="check a sample scan against scipy.ndimage, then time volconv against "
                                     "torch and scipy (ratios in one run); or calibrate the cost model")
    s.add_argument("--quick", action="store_true", help="smaller volumes, fewer rounds (with --calibrate: fewer "
                                                        "repeats)")
    s.add_argument("--threads", type=positive(int), help="threads for every contender (default 2; with "
                                                         "--calibrate: every thread volconv uses)")
    s.add_argument("--sample", metavar="NIFTI", help="a NIfTI volume to filter and compare with scipy.ndimage")
    what = s.add_mutually_exclusive_group()
    what.add_argument("--calibrate", action="store_true",
                      help="measure this machine's cost-model constants (the rates 'auto' picks an algorithm by) "
                           "and store them in $VOLCONV_CACHE_DIR or ~/.cache/volconv; 'auto' uses them from then on")
    what.add_argument("--calibration", action="store_true",
                      help="show this machine's stored calibration, beside the built-in constants")
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


def _table(constants, heading):
    """The constants beside the built-in defaults, one line each."""
    from ..engine import calibration

    lines = [f"  {'constant':<18} {'built-in':>10} {heading:>13} {'ratio':>7}"]
    for field in dataclasses.fields(constants):
        default, value = getattr(calibration.DEFAULTS, field.name), getattr(constants, field.name)
        lines.append(f"  {field.name:<18} {default:>10.4g} {value:>13.4g} {value / default:>6.2f}x")
    return "\n".join(lines)


def _calibrate(args):
    from .. import __version__, _cpu
    from ..engine import calibration, rates

    calibration.writable_dir()   # before the measurement, not after
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"measuring the cost model's constants on {calibration.machine_key()}"
          f"{' (quick)' if args.quick else ''} ...", flush=True)
    if load > 0.5:
        print(f"note: the machine is busy (load average {load:.1f}): the rates measured may be low; calibrate "
              f"on a quiet machine")
    threads = _cpu.threads(args.threads)
    constants = rates.measure(quick=args.quick, nthreads=threads)
    file = calibration.store(constants, version=__version__, threads=threads, quick=args.quick)
    print(_table(constants, "this machine"))
    print("  (wgrad_gflops_*: moved with direct_gflops_* of their block, not timed; torch_gflops: timed only "
          "without --quick, with torch installed)")
    print(f"stored in {file}; 'auto' uses it from now on (VOLCONV_CALIBRATION=off: the built-in constants)")
    return 0


def _show():
    from ..engine import calibration

    print(f"calibration file: {calibration.path()}\nthis machine: {calibration.machine_key()}")
    record = calibration.load()
    if record is None:
        print("nothing stored for this machine: 'auto' uses the built-in constants (`volconv bench --calibrate` "
              "measures them)")
        return 0
    print(f"measured {record.get('date')} by volconv {record.get('volconv')}, {record.get('threads')} threads"
          f"{' (quick)' if record.get('quick') else ''}")
    print(_table(record["constants"], "stored"))
    if not calibration.enabled():
        print("VOLCONV_CALIBRATION is off: 'auto' uses the built-in constants")
    return 0


def run(args):
    from .. import _benchmark

    if args.calibrate or args.calibration:
        from ..engine.calibration import CalibrationError

        try:
            return _calibrate(args) if args.calibrate else _show()
        except CalibrationError as e:   # the cache directory or the file: one line, exit 1
            Reporter(quiet=False).error(CommandError(None, f"{e} (`volconv bench --calibrate` writes it anew)"
                                                     if args.calibration else str(e)))
            return 1
    ok = True
    threads = args.threads or 2
    if args.sample:
        ok = _sample_check(args.sample, threads)
    print(_benchmark.dense(quick=args.quick, threads=threads))
    return 0 if ok else 1
