"""The `volconv` command. Subcommands call the library; tests call main([...]) directly.

    volconv filter IN OUT --gaussian 2mm     one NIfTI file (vc.io.filter_nifti), optional --preview PNG
    volconv batch IN_DIR OUT_DIR --box 3mm   every .nii / .nii.gz of a directory, one progress bar
    volconv info [IN ...]                    header summary of NIfTI files; without files: the build
    volconv bench                            sample check against scipy.ndimage, then timings

Exit codes: 0 success, 2 bad arguments (argparse's own), 1 failure, 130 / 143 interrupted (SIGINT / SIGTERM).
A failure prints one line "volconv: error: <file>: <problem>" and leaves no output file behind: the NIfTI is
written atomically by vc.io.save, the preview PNG through a temporary file that is renamed into place, and an
interrupt or SIGTERM unwinds through the same clean-up. No traceback reaches the user: an error nothing
foresaw is one line too, naming the file; VOLCONV_DEBUG=1 shows its traceback instead.

Nothing here imports torch (only `--device cuda` would need it);
matplotlib (--preview) and tqdm (progress bars) are imported only when used.
"""
import argparse
import contextlib
import os
import signal
import sys
import threading
import time
import warnings

import numpy as np

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
DEFAULT_EXTENSION = ".nii.gz"  # added to an OUT without one, as fslmaths does (FSLOUTPUTTYPE=NIFTI_GZ)
# names of other volume formats: refused rather than extended (o.img -> o.img.nii.gz is surely not meant)
OTHER_FORMATS = (".img", ".hdr", ".gz", ".mgz", ".mgh", ".nrrd", ".nhdr", ".mnc", ".npy", ".npz")
SLAB_BYTES = 2 * 2**20   # what a preview holds of a volume at a time
MODES = ("reflect", "constant", "nearest", "mirror", "wrap")
OUTPUT_DTYPES = ("float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
# Kernel options: exactly one per filter/batch call. dest -> (flag, metavar, what it is)
KERNEL_OPTIONS = {
    "gaussian": ("--gaussian", "SIGMA", "Gaussian of standard deviation SIGMA (scipy.ndimage.gaussian_filter)"),
    "fwhm": ("--fwhm", "FWHM", "Gaussian given by its full width at half maximum (FWHM = 2.3548 sigma)"),
    "sigma_vox": ("--sigma-vox", "SIGMA", "Gaussian with SIGMA in voxels (a bare number means voxels here)"),
    "box": ("--box", "SIZE", "mean over a box of SIZE: in mm, the voxels whose centres lie within SIZE/2 of the centre "
                           "(fslmaths -kernel box: odd, centred); in voxels, round(SIZE)"),
    "ball": ("--ball", "RADIUS", "mean over the voxels within RADIUS of the centre (fslmaths -kernel sphere)"),
    "kernel": ("--kernel", "FILE", "a kernel stored as .npy or NIfTI (its values, in voxels; correlated, "
                                   "not flipped)"),
    "sigma_map": ("--sigma-map", "MAP", "spatially varying Gaussian: a NIfTI map (the volume's grid) of sigma in "
                                        "mm per voxel (vc.adaptive_filter; --truncate default 3; filter only)"),
}
GAUSSIANS = ("gaussian", "fwhm", "sigma_vox", "sigma_map")
PROGRESS_DELAY_S = 1.0  # a progress bar appears only for work that lasts longer than this


class CommandError(Exception):
    """A failure to report as 'volconv: error: <file>: <problem>' (exit code 1)."""

    def __init__(self, path, problem):
        super().__init__(f"{os.fspath(path)}: {problem}" if path is not None else problem)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`timeout`, a scheduler, a container stop, a closed terminal), raised in the main thread
    so that it unwinds exactly as Ctrl-C does (temporary files removed on the way); exit 128 + the signal."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _debugging():
    return os.environ.get("VOLCONV_DEBUG", "") not in ("", "0")


def _unexpected(exc, path):
    """The CommandError for an exception no check foresaw (a bug, or an input nobody thought of): one line that
    names the file; VOLCONV_DEBUG=1 lets the traceback through instead (callers re-raise when _debugging())."""
    problem = _blame(exc, path)[1]
    return CommandError(path, f"unexpected {type(exc).__name__}: {problem} (VOLCONV_DEBUG=1 shows the "
                              f"traceback; please report it)")


# ------------------------------------------------------------------------------------------------ sizes


class Size:
    """A size per array axis (i, j, k) with its unit: "2mm", "2", "1.5vox", "2,2,3mm"."""

    def __init__(self, values, unit, text):
        self.values, self.unit, self.text = values, unit, text

    def voxels(self, zooms):
        """The size in voxels per axis for a volume with these voxel sizes (mm)."""
        if self.unit == "vox":
            return self.values
        return tuple(v / z for v, z in zip(self.values, zooms))

    def __str__(self):
        values = self.values[:1] if len(set(self.values)) == 1 else self.values
        return " x ".join(f"{v:g}" for v in values) + (" mm" if self.unit == "mm" else " voxels")


_UNITS = {"mm": "mm", "vox": "vox", "voxel": "vox", "voxels": "vox"}


def size_type(default_unit="mm", positive=False, units=("mm", "vox")):
    """argparse type: "2", "2mm", "2.5mm", "1.5vox", "2,2,3mm" -> Size (default_unit without a suffix)."""
    def parse(text):
        body = text.strip().lower()
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if body.endswith(u)), None)
        if unit is not None:
            body = body[:-len(unit)]
        unit = _UNITS.get(unit, default_unit)
        try:
            values = tuple(float(v) for v in body.split(","))
        except ValueError:
            values = ()
        if len(values) == 1:
            values *= 3
        if len(values) != 3 or not all(0 <= v < float("inf") for v in values):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected one size or three comma-separated sizes (one per array axis), each a "
                f"non-negative number, optionally followed by {' or '.join(units)}: e.g. 2mm, 1.5vox, 2,2,3mm")
        if unit not in units:
            raise argparse.ArgumentTypeError(f"{text!r}: the unit must be {' or '.join(units)}, got {unit}")
        if positive and min(values) <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: every size must be positive")
        if max(values) == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: a size of 0 on every axis does nothing")
        return Size(values, unit, text)

    parse.__name__ = "size"  # argparse names the type in its messages
    return parse


def positive(kind):
    """argparse type: a positive finite number of `kind` (float or int); --truncate inf or nan would make a
    kernel of no size, bench --threads 0 no thread."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = float("nan")
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive finite "
                                             f"{'integer' if kind is int else 'number'}")
        return value

    parse.__name__ = "number"  # argparse names the type in its messages
    return parse


def _memory_size(text):
    from .io.slabs import memory_bytes

    try:
        return memory_bytes(text, "--max-memory")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def workers_type(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a non-zero integer (threads; -1 all cores, "
                                         f"-2 all but one)")
    return value


# ------------------------------------------------------------------------------------------------ kernels


class KernelChoice:
    """The kernel the options ask for, built per file from its voxel sizes (a size in mm becomes voxels
    there), remembering the last one built so that the log can say what was applied."""

    def __init__(self, args):
        self.kind = next(k for k in KERNEL_OPTIONS if getattr(args, k) is not None)
        self.arg = getattr(args, self.kind)
        self.truncate = 4.0 if args.truncate is None else args.truncate
        self.fixed = None
        if self.kind == "kernel":
            from . import kernels

            path = self.arg
            if not os.path.exists(path):
                raise CommandError(path, "kernel file does not exist")
            try:
                self.fixed = kernels.from_file(path)
                self.fixed.to_dense()
            except Exception as e:  # np.load and nibabel raise many types for unreadable files
                problem = _blame(e, path)[1]
                raise CommandError(path, problem if path in problem else f"not a usable kernel file: {problem}"
                                   ) from None
        self.zooms = self.kernel = None

    def __call__(self, zooms):
        from . import kernels

        size = self.arg
        mm = getattr(size, "unit", None) == "mm"
        on = zooms if mm else None
        if self.kind == "gaussian":
            kernel = kernels.gaussian(size.values, on, self.truncate)
        elif self.kind == "sigma_vox":
            kernel = kernels.gaussian(size.values, None, self.truncate)
        elif self.kind == "fwhm":
            kernel = kernels.gaussian(None, on, self.truncate, fwhm=size.values)
        elif self.kind == "box":
            kernel = kernels.box(size.values, on)
        elif self.kind == "ball":
            kernel = kernels.ball(size.values, on)
        else:
            kernel = self.fixed
        self.zooms, self.kernel = tuple(zooms), kernel
        return kernel

    def describe(self):
        """What was applied to the last file: sizes in voxels per axis (the effective sigma for a Gaussian)
        and the kernel's shape."""
        from .kernels import FWHM_PER_SIGMA, SeparableKernel

        shape = "x".join(str(n) for n in self.kernel.shape)
        kind = "separable" if isinstance(self.kernel, SeparableKernel) else "dense"
        if self.kind == "kernel":
            return f"kernel from {self.arg}, shape {shape}"
        vox = self.arg.voxels(self.zooms)
        if self.kind == "fwhm":
            vox = tuple(v / FWHM_PER_SIGMA for v in vox)
        per_axis = ", ".join(f"{v:.4g}" for v in vox)
        name = {"gaussian": f"gaussian {self.arg}", "sigma_vox": f"gaussian {self.arg}",
                "fwhm": f"gaussian of FWHM {self.arg}",
                "box": f"box {self.arg}", "ball": f"ball of radius {self.arg}"}[self.kind]
        if self.kind in GAUSSIANS:
            detail = f"sigma {per_axis} voxels per axis, truncate {self.truncate:g}"
        elif self.kind == "box":
            detail = f"{per_axis} voxels per axis"
        else:
            detail = f"radius {per_axis} voxels per axis"
        return f"{name}: {detail}, kernel {shape} ({kind})"


# ------------------------------------------------------------------------------------------------ reporting


class Reporter:
    """Log lines and an optional progress bar on stderr. The bar (tqdm) appears only on a terminal, without
    --quiet, once the work has lasted PROGRESS_DELAY_S; log lines go above it."""

    def __init__(self, quiet):
        self.quiet = quiet
        self.bar = None

    def log(self, text):
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def error(self, text):
        line = f"volconv: error: {text}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def start_bar(self, total, unit):
        if self.quiet or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:  # progress bars are a convenience
            return
        self.bar = tqdm(total=total, unit=unit, delay=PROGRESS_DELAY_S, file=sys.stderr, leave=False,
                        dynamic_ncols=True)

    def set_progress(self, value):
        if self.bar is not None:
            self.bar.n = value
            self.bar.refresh()

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _blame(exc, default, *paths):
    """(file, problem) for an exception: the file it names (an OSError's filename, or one of `paths` that its
    message starts with), else `default`; the problem on one line, without that leading '<file>: '."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return os.fspath(exc.filename), exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    for path in (default,) + paths:
        prefix = f"{os.fspath(path)}: " if path is not None else None
        if prefix and text.startswith(prefix):
            return os.fspath(path), text[len(prefix):]
    return default, text


def _report_warnings(reporter, caught):
    for w in caught:
        reporter.log(f"volconv: warning: {w.message}")


# ------------------------------------------------------------------------------------------------ filter


def _check_output(path, force, what="output file"):
    """Refuse before any work: an existing output without --force, a missing or non-directory parent."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CommandError(path, f"{what} is a directory")
    if os.path.lexists(path) and not force:
        raise CommandError(path, f"{what} exists; use --force to overwrite it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        problem = "does not exist" if not os.path.exists(directory) else "is not a directory"
        raise CommandError(path, f"output directory {directory} {problem}")


def _same_file(a, b):
    """Whether two paths name one file: the same resolved path (symlinks, '..', relative to here), or, when both
    exist, the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them does not exist (yet): only the resolved paths could tell
        return False


def _check_distinct(inputs, outputs):
    """Refuse, before any work and whatever --force says, an output that is the same file as an input or as
    another output: [(argument, path)] pairs, paths None when not given. The one check of filter and batch."""
    seen = [(name, path, False) for name, path in inputs if path is not None]
    for name, path in outputs:
        if path is None:
            continue
        for other, other_path, is_output in seen:
            if _same_file(path, other_path):
                where = "" if os.fspath(path) == os.fspath(other_path) else f" ({other_path})"
                why = "two outputs cannot share a file" if is_output else "volconv does not write over a file " \
                                                                          "it reads"
                raise CommandError(path, f"{name} is the same file as {other}{where}; {why}")
        seen.append((name, path, True))


def _check_device(device):
    if device == "cuda":
        from . import _cuda

        if not _cuda.has_cuda():
            try:
                _cuda.require("volconv --device cuda")
            except RuntimeError as e:
                raise CommandError(None, str(e)) from None
        raise CommandError(None, "--device cuda: the CUDA plugin does not filter NIfTI files yet")


def _filter_file(args, choice, src, dst, reporter, on_progress=None):
    """Filter one file with vc.io.filter_nifti; log what was done. Raises CommandError naming the file."""
    from . import io

    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            io.filter_nifti(src, dst, choice, mode=args.mode, cval=args.cval, mask=args.mask,
                            normalize=args.normalize, outside=args.outside, nan=args.nan, dtype=args.odt,
                            overwrite=args.force, workers=args.workers, progress=on_progress,
                            max_memory=args.max_memory, return_volume=False)   # never read back (memory)
    except (MemoryError, OSError, ValueError) as e:  # NiftiError is a ValueError
        raise CommandError(*_failure(e, src, dst, args.mask)) from e
    except Exception as e:   # one bad file must not end a batch, nor show a traceback
        if _debugging():
            raise
        raise _unexpected(e, src) from e
    _report_warnings(reporter, caught)
    elapsed = time.perf_counter() - start
    reporter.log(f"volconv: {src} -> {dst}: {_applied(choice, args, dst)}, {elapsed:.2f} s")


def _adaptive_file(args, src, dst, reporter, on_progress=None):
    """`--sigma-map`: vc.io.adaptive_filter_nifti (slabbed like filter_nifti), never read back."""
    from . import io

    start = time.perf_counter()
    truncate = 3.0 if args.truncate is None else args.truncate
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            io.adaptive_filter_nifti(src, dst, args.sigma_map, truncate, mode=args.mode, cval=args.cval,
                                     dtype=args.odt, overwrite=args.force, workers=args.workers,
                                     progress=on_progress, max_memory=args.max_memory, return_volume=False)
    except (MemoryError, OSError, ValueError) as e:   # NiftiError is a ValueError
        raise CommandError(*_failure(e, src, dst, args.sigma_map)) from e
    _report_warnings(reporter, caught)
    reporter.log(f"volconv: {src} -> {dst}: adaptive gaussian (sigma map {args.sigma_map}, truncate {truncate:g}), "
                 f"{time.perf_counter() - start:.2f} s")


def _filter(args):
    reporter = Reporter(args.quiet)
    src, dst = args.input, args.output
    try:
        _check_distinct([("IN", src), ("--mask", args.mask), ("--kernel", args.kernel),
                         ("--sigma-map", args.sigma_map)], [("OUT", dst), ("--preview", args.preview)])
        _check_device(args.device)
        choice = None if args.sigma_map is not None else KernelChoice(args)
        _check_output(dst, args.force)
        preview = _Preview(args.preview, args.force) if args.preview else None
    except CommandError as e:
        reporter.error(e)
        return 1
    try:
        reporter.start_bar(total=1, unit="plane")
        progress = (lambda done, total: _set_total(reporter, done, total)) if reporter.bar else None
        if choice is None:
            _adaptive_file(args, src, dst, reporter, progress)
        else:
            _filter_file(args, choice, src, dst, reporter, progress)
        reporter.close_bar()
        if preview is not None:
            try:
                preview.write(src, dst)
            except BaseException:
                _remove(dst)  # all or nothing: no NIfTI without the preview that was asked for
                raise
            reporter.log(f"volconv: preview {args.preview}")
    except CommandError as e:
        reporter.close_bar()
        reporter.error(e)
        return 1
    finally:
        if preview is not None:
            preview.discard()
    return 0


def _set_total(reporter, done, total):
    reporter.bar.total = total
    reporter.set_progress(done)


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ preview


class _Preview:
    """Orthogonal mid-slices of the input (top row) and the output (bottom row), as a PNG. The temporary file
    is made before filtering (an unwritable place fails early) and renamed over the target once complete."""

    def __init__(self, path, force):
        self.path = os.fspath(path)
        _check_output(self.path, force, "preview file")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError(self.path, "--preview needs matplotlib (pip install matplotlib)") from None
        directory = os.path.dirname(os.path.abspath(self.path))
        from .io.atomic import new_file_mode, temporary

        try:   # named .<PNG's name>.<pid>@<host>.<random>.tmp.png, whatever PNG's own extension
            fd, self.tmp = temporary(directory, os.path.basename(self.path) + ".png", ".png")
        except OSError as e:
            raise CommandError(self.path, f"cannot create a file in {directory}: {e.strerror}") from None
        os.close(fd)

        os.chmod(self.tmp, new_file_mode())  # mkstemp makes it private; a PNG is as readable as the NIfTI

    def write(self, src, dst):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from nibabel import aff2axcodes

        try:
            (before, _, _), (after, zooms, affine) = _mid_slices(src), _mid_slices(dst)
            planes = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial",
                      "I": "axial"}
            codes = aff2axcodes(affine)
            fig = Figure(figsize=(10, 6.5), layout="constrained")
            FigureCanvasAgg(fig)
            axes = fig.subplots(2, 3)
            for row, (label, slices) in enumerate((("input", before), ("output", after))):
                lo, hi = _display_range(np.concatenate([plane.ravel() for _, plane in slices]))
                for axis, (mid, plane) in enumerate(slices):   # plane: the other two axes, in order
                    a, b = [i for i in range(3) if i != axis]
                    ax = axes[row, axis]
                    ax.imshow(plane.T, origin="lower", cmap="gray", vmin=lo, vmax=hi,
                              aspect=zooms[b] / zooms[a], interpolation="nearest")
                    name = planes.get(codes[axis], "") if codes[axis] else ""
                    ax.set_title(f"{label}: {name} slice {mid} of axis {axis}".replace(":  ", ": "),
                                 fontsize=9)
                    ax.set_axis_off()
            fig.suptitle(f"{os.path.basename(src)}: input (top), filtered (bottom)", fontsize=10)
            fig.savefig(self.tmp, format="png", dpi=100)
            os.replace(self.tmp, self.path)
        except Exception as e:  # OSError, and whatever matplotlib raises on odd data
            raise CommandError(self.path, (isinstance(e, OSError) and e.strerror) or _blame(e, self.path)[1]
                               ) from e

    def discard(self):
        _remove(self.tmp)


def _mid_slices(path):
    """([(index, plane)] for the mid-slice of each spatial axis of the file's first volume, zooms, affine). The
    file is read forward in slabs of planes along its last axis by the filter's own reader (one pass over a
    gzip stream: slicing a gzipped file across that axis would read all of it), keeping only those planes
    (the memory promise)."""
    from .io.planes import Planes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already reported when the input was filtered
        with Planes(path) as source:
            X, Y, Z = source.shape
            mid = [n // 2 for n in source.shape]
            read = source.reader(0)
            planes = [np.empty((Y, Z), np.float32), np.empty((X, Z), np.float32), None]
            step = max(1, SLAB_BYTES // (4 * X * Y))
            for z in range(0, Z, step):
                block = np.empty((X, Y, min(step, Z - z)), np.float32, order="F")
                read(block, z)
                planes[0][:, z:z + step], planes[1][:, z:z + step] = block[mid[0]], block[:, mid[1]]
                if z <= mid[2] < z + step:
                    planes[2] = block[:, :, mid[2] - z].copy()
    return list(zip(mid, planes)), source.zooms, source.affine


def _display_range(data):
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.5)))
    return (lo, hi) if hi > lo else (lo - 0.5, lo + 0.5)


# ------------------------------------------------------------------------------------------------ batch


def _nifti_files(directory, recursive=False, skip=None):
    """The NIfTI files of a directory as paths relative to it, sorted; hidden files and folders skipped
    (interrupted temporaries, .git). With `recursive`, nested folders too (a BIDS layout), except the folder
    `skip` (the output directory, which BIDS puts inside the input as derivatives/...)."""
    names = []
    for folder, folders, files in os.walk(directory):
        folders[:] = [f for f in folders if not f.startswith(".") and
                      not (skip is not None and _same_file(os.path.join(folder, f), skip))] if recursive else []
        for name in files:
            path = os.path.join(folder, name)
            if not name.startswith(".") and name.lower().endswith(NIFTI_EXTENSIONS) and os.path.isfile(path):
                names.append(os.path.relpath(path, directory))
    return sorted(names)


def _batch(args):
    reporter = Reporter(args.quiet)
    in_dir, out_dir = args.input_dir, args.output_dir
    try:
        _check_device(args.device)
        choice = KernelChoice(args)
        if not os.path.isdir(in_dir):
            raise CommandError(in_dir, "input directory does not exist" if not os.path.exists(in_dir)
                               else "not a directory")
        names = _nifti_files(in_dir, args.recursive, skip=out_dir)
        if not names:
            raise CommandError(in_dir, "no .nii or .nii.gz files in this directory" +
                               ("" if args.recursive else " (--recursive looks into its folders)"))
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise CommandError(out_dir, "output directory is not a directory")
        if _same_file(in_dir, out_dir):
            raise CommandError(out_dir, "the output directory is the input directory")
        existing = [name for name in names if os.path.lexists(os.path.join(out_dir, name))]
        if existing and not args.force and not args.skip_existing:
            raise CommandError(os.path.join(out_dir, existing[0]), "output file exists; use --force to overwrite "
                                                                   "it, or --skip-existing to keep it")
        if args.skip_existing:   # resuming: every output there is whole (written atomically)
            existing_names = set(existing)
            names = [name for name in names if name not in existing_names]
        for name in names:
            _check_distinct([("input file", os.path.join(in_dir, name)), ("--mask", args.mask),
                             ("--kernel", args.kernel)], [("output file", os.path.join(out_dir, name))])
        try:
            for folder in sorted({os.path.dirname(os.path.join(out_dir, name)) for name in names} | {out_dir}):
                os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise CommandError(e.filename or out_dir, f"cannot create the output directory: {e.strerror}"
                               ) from None
    except CommandError as e:
        reporter.error(e)
        return 1

    if args.skip_existing and existing:
        reporter.log(f"volconv: skipped {len(existing)} existing output files in {out_dir}")
    if args.scheduler is not None:
        failed = _batch_on_cluster(args, choice, in_dir, out_dir, names, reporter)
        if failed is None:
            return 1
    else:
        failed = _batch_here(args, choice, in_dir, out_dir, names, reporter)
    if failed:
        reporter.error(f"{in_dir}: {len(failed)} of {len(names)} files failed: {', '.join(failed)}")
        return 1
    reporter.log(f"volconv: {len(names)} files filtered into {out_dir}")
    return 0


def _batch_here(args, choice, in_dir, out_dir, names, reporter):
    """The batch in this process, file after file, past the files that fail; returns those (names)."""
    failed = []
    reporter.start_bar(total=len(names), unit="file")
    try:
        for i, name in enumerate(names):
            src, dst = os.path.join(in_dir, name), os.path.join(out_dir, name)
            progress = (lambda done, total, i=i: reporter.set_progress(i + done / total)) if reporter.bar else None
            try:
                _filter_file(args, choice, src, dst, reporter, progress)
            except CommandError as e:
                reporter.error(e)
                failed.append(name)
            reporter.set_progress(i + 1)
    finally:
        reporter.close_bar()
    return failed


def _batch_on_cluster(args, choice, in_dir, out_dir, names, reporter):
    """The batch as dask.distributed tasks, one per file (vc.dask), with --scheduler ADDRESS or 'local'.
    Reports each file as it finishes, as the batch in this process does; returns the files that failed (names),
    or None (error reported) when the cluster cannot be used at all. The workers see absolute paths
    (their working directory is not ours); messages name the files as given."""
    from . import dask as vdask

    pairs = [(os.path.join(in_dir, name), os.path.join(out_dir, name)) for name in names]
    as_given = {os.path.abspath(p): p for pair in pairs for p in pair}
    if args.mask is not None:
        as_given[os.path.abspath(args.mask)] = args.mask
    # the options a worker needs (the parsed arguments also hold the parser); one thread per file by default:
    # dask runs a file on every worker thread
    options = argparse.Namespace(mode=args.mode, cval=args.cval, normalize=args.normalize, outside=args.outside,
                                 mask=None if args.mask is None else os.path.abspath(args.mask), odt=args.odt,
                                 force=args.force, workers=1 if args.workers is None else args.workers,
                                 nan=args.nan, max_memory=args.max_memory)

    def given(text):
        for path in sorted(as_given, key=len, reverse=True):
            text = text.replace(path, as_given[path])
        return text

    cluster = vdask.Cluster(None if args.scheduler == "local" else args.scheduler)
    try:
        client = cluster.__enter__()
    except ImportError as e:
        reporter.error(CommandError(None, f"--scheduler: {e}"))
        return None
    except Exception as e:  # OSError (unreachable, timed out), ValueError (malformed address), ...
        reporter.error(CommandError(args.scheduler, f"cannot connect to the dask scheduler: {_blame(e, None)[1]}"))
        return None
    failed, done = [], 0
    tasks = vdask.run_files(client, _filter_scheduled_file, pairs, options, choice)
    reporter.start_bar(total=len(names), unit="file")
    try:
        for i, outcome, exc in tasks:
            src, dst = pairs[i]
            if exc is not None:  # the task itself failed: volconv missing on a worker, a worker lost, ...
                outcome = ("failed", src, f"on the dask cluster: {_blame(exc, None)[1]}")
            if outcome[0] == "failed":
                reporter.error(given(f"{outcome[1]}: {outcome[2]}"))
                failed.append(names[i])
            else:
                _, caught, how, elapsed = outcome
                for text in caught:
                    reporter.log(f"volconv: warning: {given(text)}")
                reporter.log(f"volconv: {src} -> {dst}: {given(how)}, {elapsed:.2f} s")
            done += 1
            reporter.set_progress(done)
    finally:
        reporter.close_bar()
        tasks.close()  # cancels what has not run (Ctrl-C), before the client goes
        cluster.__exit__(None, None, None)
    return failed


def _filter_scheduled_file(src, dst, options, choice):
    """One file of `volconv batch --scheduler` on a dask worker (absolute paths), as _filter_file does it
    here: ("done", warnings, what was applied, seconds) or ("failed", file, problem). Failures come back as
    values (CommandError does not survive pickling); warnings are caught per thread, since catch_warnings
    swaps process-wide state and a dask worker filters several files at once."""
    import copy

    from . import io

    choice = copy.copy(choice)  # it remembers the kernel it built, and a worker may share it between threads
    start = time.perf_counter()
    try:
        with _ThreadWarnings() as caught:
            io.filter_nifti(src, dst, choice, mode=options.mode, cval=options.cval, mask=options.mask,
                            normalize=options.normalize, outside=options.outside, nan=options.nan, dtype=options.odt,
                            overwrite=options.force, workers=options.workers, max_memory=options.max_memory,
                            return_volume=False)
    except (MemoryError, OSError, ValueError) as e:  # NiftiError is a ValueError
        return ("failed",) + _failure(e, src, dst, options.mask)
    return "done", [str(w.message) for w in caught], _applied(choice, options, dst), time.perf_counter() - start


def _failure(e, src, dst, mask):
    """(file to name, problem) for an exception of filter_nifti: the one wording of both batch paths."""
    if isinstance(e, FileExistsError):
        return dst, "output file exists; use --force to overwrite it"
    if isinstance(e, MemoryError):
        return src, "not enough memory to filter it"
    culprit, problem = _blame(e, src, dst, mask)
    if isinstance(e, OSError) and os.path.abspath(culprit) == os.path.dirname(os.path.abspath(dst)):
        culprit, problem = dst, f"{problem}: {os.path.dirname(os.path.abspath(dst))}"  # name the output
    return culprit, problem


def _applied(choice, options, dst):
    """What was done to a file, for the log line (the written file's header gives its shape)."""
    import nibabel

    how = [choice.describe(), "normalized" if options.normalize else f"mode {options.mode}"]
    if options.mask is not None:
        how.append(f"mask {options.mask} ({options.outside} outside)")
    if options.nan != "propagate":
        how.append(f"non-finite voxels: {options.nan}")
    shape = nibabel.load(dst).shape
    if len(shape) == 4:
        how.append(f"{shape[3]} volumes")
    return ", ".join(how)


class _ThreadWarnings:
    """warnings.catch_warnings(record=True) for the calling thread only. Installs once per process a
    showwarning that hands each warning to the list of the thread that issued it (others go where they went
    before), and lets volconv's NiftiWarnings through every time (as _filter_file's "always"), not once."""

    _local = None
    _lock = None

    def __enter__(self):
        import threading

        from .io import NiftiWarning

        if _ThreadWarnings._lock is None:
            _ThreadWarnings._lock, _ThreadWarnings._local = threading.Lock(), threading.local()
        with _ThreadWarnings._lock:
            if not getattr(warnings.showwarning, "volconv_per_thread", False):
                previous, local = warnings.showwarning, _ThreadWarnings._local

                def showwarning(message, category, filename, lineno, file=None, line=None):
                    sink = getattr(local, "sink", None)
                    if sink is None:
                        return previous(message, category, filename, lineno, file, line)
                    sink.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

                showwarning.volconv_per_thread = True
                warnings.showwarning = showwarning
                warnings.filterwarnings("always", category=NiftiWarning)
        self.caught = _ThreadWarnings._local.sink = []
        return self.caught

    def __exit__(self, *exc):
        _ThreadWarnings._local.sink = None
        return False


# ------------------------------------------------------------------------------------------------ info


def _build_info():
    from . import __version__, _cpu, has_cuda

    print(f"volconv {__version__}: {_cpu.SIMD} kernels, "
          f"OpenMP {'on' if _cpu.HAVE_OPENMP else 'off'}, {_cpu.max_threads()} threads, "
          f"CUDA plugin {'ready' if has_cuda() else 'not built'}")


def _file_info(path):
    import nibabel as nib
    import numpy as np
    from nibabel.affines import voxel_sizes
    from ._memory import size
    from .io.volume import open_header, pixdim_disagreement

    path = os.fspath(path)
    with open_header(path, mmap=False) as (img, stream):   # the header only: the data are not read
        gzipped = stream is not None
    header, proxy = img.header, img.dataobj
    shape = tuple(int(n) for n in proxy.shape)
    zooms = voxel_sizes(img.affine)
    space, time_unit = header.get_xyzt_units()
    dtype = proxy.dtype
    order = {"<": "little-endian", ">": "big-endian"}.get(dtype.byteorder, "")
    if dtype.byteorder == "=":
        order = "little-endian" if sys.byteorder == "little" else "big-endian"
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    scaled = (slope, inter) != (1.0, 0.0)
    codes = nib.nifti1.xform_codes.label
    voxels = int(np.prod(shape[:4] if len(shape) > 3 else shape))
    lines = [
        f"{path}",
        f"  format       {'NIfTI-2' if isinstance(img, nib.Nifti2Image) else 'NIfTI-1'}"
        f"{', gzip' if gzipped else ''}",
        f"  shape        {' x '.join(str(n) for n in shape)}",
        f"  zooms        {' x '.join(f'{z:g}' for z in zooms)} mm (from the affine)",
    ]
    pixdim = pixdim_disagreement(img.affine, header)
    if pixdim is not None:
        lines.append(f"  pixdim       {' x '.join(f'{z:g}' for z in pixdim)} (disagrees with the affine)")
    if len(shape) > 3:
        lines.append(f"  TR           {float(header['pixdim'][4]):g} {time_unit}")
    lines += [
        f"  dtype        {dtype.name}{', ' + order if dtype.itemsize > 1 and order else ''} (on disk)",
        f"  orientation  {''.join(c or '?' for c in nib.aff2axcodes(img.affine))}",
        "  scaling      " + (f"slope {slope:g}, intercept {inter:g}" if scaled else "none"),
        f"  sform        code {int(header['sform_code'])} ({codes[int(header['sform_code'])]})",
        f"  qform        code {int(header['qform_code'])} ({codes[int(header['qform_code'])]})",
        f"  units        {space}, {time_unit}",
        f"  memory       {size(voxels * 4)} as float32",
    ]
    return "\n".join(lines)


def _info(args):
    if not args.files:
        _build_info()
        return 0
    reporter = Reporter(quiet=False)
    failed = 0
    for i, path in enumerate(args.files):
        try:
            text = _file_info(path)
        except (OSError, ValueError) as e:
            reporter.error("{}: {}".format(*_blame(e, path)))
            failed += 1
            continue
        except Exception as e:   # a header nobody foresaw: one line, and on to the next file
            if _debugging():
                raise
            reporter.error(_unexpected(e, path))
            failed += 1
            continue
        print(("\n" if i else "") + text)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ bench


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


# ------------------------------------------------------------------------------------------------ parser


def _add_filter_options(p, preview):
    k = p.add_argument_group("kernel (exactly one; sizes in mm unless suffixed vox: 2mm, 2, 1.5vox, 2,2,3mm "
                             "for array axes i,j,k)")
    group = k.add_mutually_exclusive_group(required=True)
    for dest, (flag, metavar, help_text) in KERNEL_OPTIONS.items():
        if dest in ("kernel", "sigma_map"):
            kind = str
        elif dest == "sigma_vox":
            kind = size_type(default_unit="vox", units=("vox",))
        else:
            kind = size_type(positive=dest in ("box", "ball"))
        group.add_argument(flag, dest=dest, metavar=metavar, type=kind, help=help_text)
    k.add_argument("--truncate", type=positive(float), metavar="T",
                   help="Gaussian radius in sigmas, as scipy.ndimage (default 4)")
    o = p.add_argument_group("filtering")
    o.add_argument("--mode", choices=MODES, default="reflect",
                   help="how the volume extends beyond its edges, as scipy.ndimage (default reflect)")
    o.add_argument("--cval", type=float, default=0.0, help="value outside the volume for --mode constant")
    o.add_argument("--mask", metavar="MASK",
                   help="NIfTI mask of the same grid (non-zero = inside): voxels outside do not contribute")
    o.add_argument("--normalize", action="store_true",
                   help="divide by the filtered mask, renormalising at the volume edge and the mask border "
                        "(fslmaths -fmean; --mode then plays no part)")
    o.add_argument("--outside", choices=("keep", "zero"), default=None,
                   help="voxels outside --mask: keep their input value (default) or set them to 0")
    from .io import NAN_RULES

    o.add_argument("--nan", choices=NAN_RULES, default=None,
                   help="non-finite input voxels (NaN, Inf): spread through the kernel (propagate, default; a "
                        "warning says when they did), read as 0 (zero, as fslmaths -nan), or left out as if "
                        "outside the mask (mask; --outside then says what they become)")
    o.add_argument("--max-memory", type=_memory_size, metavar="SIZE", default=None,
                   help="working memory per file (512MiB, 1GB, 2G; default 512MiB): larger volumes are "
                        "filtered in slabs")
    o.add_argument("--odt", choices=OUTPUT_DTYPES, default="float32",
                   help="output data type (default float32; integers are rounded and clipped)")
    o.add_argument("--workers", type=workers_type, metavar="N",
                   help="threads (default: all OpenMP allows; -1 all cores, -2 all but one)")
    o.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to filter (default cpu)")
    o.add_argument("--force", action="store_true", help="overwrite existing output files")
    if preview:
        o.add_argument("--preview", metavar="PNG",
                       help="also write orthogonal mid-slices of the input and the output as a PNG")
    o.add_argument("--quiet", "-q", action="store_true", help="no log lines or progress bar on stderr")


def build_parser():
    from . import __version__

    p = argparse.ArgumentParser(prog="volconv", description="Fast 3D convolution for medical volumes.",
                                epilog="VOLCONV_DEBUG=1 shows the traceback of an unexpected error.")
    p.add_argument("--version", action="version", version=f"volconv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("filter", help="filter a NIfTI volume (3-D, or 4-D volume by volume)",
                       description="Filter a NIfTI volume (3-D, or 4-D volume by volume) with a kernel in mm or "
                                   "voxels, keeping its geometry and header. Example: "
                                   "volconv filter t1.nii.gz t1_smooth.nii.gz --fwhm 4mm",
                       epilog="Exit status: 0 success, 1 failure (one line naming the file; no output left "
                              "behind), 2 bad arguments.")
    s.add_argument("input", metavar="IN", help="input NIfTI file (.nii or .nii.gz)")
    s.add_argument("output", metavar="OUT", help="output NIfTI file (.nii or .nii.gz; without either, .nii.gz is "
                                                 "added as fslmaths does); refused if it exists, unless --force, "
                                                 "and if it is IN, --mask, --kernel or --sigma-map")
    _add_filter_options(s, preview=True)
    s.set_defaults(run=_filter, parser=s)

    s = sub.add_parser("batch", help="filter every .nii / .nii.gz of a directory into another",
                       description="Filter every .nii / .nii.gz file of IN_DIR into OUT_DIR (created if needed) "
                                   "under the same name, with one progress bar. A file that fails is reported "
                                   "and the batch goes on; the failed files are listed at the end and the exit "
                                   "status is then 1. Hidden files and folders are skipped.")
    s.add_argument("input_dir", metavar="IN_DIR")
    s.add_argument("output_dir", metavar="OUT_DIR")
    _add_filter_options(s, preview=False)
    s.add_argument("--recursive", "-r", action="store_true",
                   help="also the files in IN_DIR's folders, at any depth (a BIDS layout), each written under the "
                        "same relative path in OUT_DIR (which may lie inside IN_DIR: it is not read)")
    s.add_argument("--skip-existing", action="store_true",
                   help="leave the output files that exist as they are and filter the others: resumes an "
                        "interrupted batch (outputs are written atomically, so an existing one is complete)")
    s.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the files as tasks on a dask.distributed cluster: its scheduler's ADDRESS "
                        "(tcp://host:8786; the workers need volconv and the same paths), or 'local' for a "
                        "local cluster; --workers then counts threads per file (default 1). Needs volconv[dask]")
    s.set_defaults(run=_batch, parser=s)

    s = sub.add_parser("info", help="NIfTI header summary; without files, the kernels this machine runs "
                                    "(SIMD build, threads, CUDA)")
    s.add_argument("files", metavar="IN", nargs="*", help="NIfTI files to describe")
    s.set_defaults(run=_info)

    s = sub.add_parser("bench", help="check a sample scan against scipy.ndimage, then time volconv against "
                                     "torch and scipy (ratios in one run)")
    s.add_argument("--quick", action="store_true", help="smaller volumes, fewer rounds")
    s.add_argument("--threads", type=positive(int), default=2, help="threads for every contender (default 2)")
    s.add_argument("--sample", metavar="NIFTI", help="a NIfTI volume to filter and compare with scipy.ndimage")
    s.set_defaults(run=_bench)
    return p


def _check_filter_args(sub, args):
    """Combinations argparse cannot express (exit 2 like its own errors); `sub` is the subcommand's parser."""
    if args.truncate is not None and not any(getattr(args, k) is not None for k in GAUSSIANS):
        sub.error("--truncate applies to a Gaussian (--gaussian, --fwhm, --sigma-vox, --sigma-map)")
    if getattr(args, "skip_existing", False) and args.force:
        sub.error("--skip-existing keeps existing outputs, --force replaces them: give one")
    if args.outside is not None and args.mask is None and args.nan != "mask":
        sub.error("--outside needs --mask (or --nan mask)")
    if getattr(args, "sigma_map", None) is not None:
        if args.command != "filter":
            sub.error("--sigma-map applies to `volconv filter` (one map for one volume's grid)")
        if args.mask is not None or args.normalize or args.nan is not None:
            sub.error("--sigma-map does not combine with --mask, --normalize or --nan")
    args.outside = args.outside or "keep"
    args.nan = args.nan or "propagate"
    out = getattr(args, "output", None)
    if out is not None and not out.lower().endswith(NIFTI_EXTENSIONS):
        if out.lower().endswith(OTHER_FORMATS):
            sub.error(f"{out}: the output file name must end in .nii or .nii.gz (or have no extension: "
                      f"{DEFAULT_EXTENSION} is added)")
        args.output = out + DEFAULT_EXTENSION


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread while the command runs, so
    that they clean up as Ctrl-C does. Signals someone chose to ignore (nohup) stay ignored; the previous
    handlers come back afterwards (tests call main() in their own process)."""
    def terminate(signum, frame):
        raise Terminated(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():   # only it may set handlers
        for name in ("SIGTERM", "SIGHUP"):
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is signal.SIG_DFL:
                previous[number] = signal.signal(number, terminate)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stdout_gone():
    """The reader of stdout went away (`volconv info F | head`): say nothing more. Python's documentation's
    recipe: point stdout at devnull, so that the interpreter's last flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):   # a stdout without a descriptor (a test's capture)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv=None):
    args = None
    try:
        with _signals_interrupt():
            p = build_parser()
            args = p.parse_args(argv)   # --help and argparse's errors (exit 2) leave through SystemExit
            if args.command is None:
                p.print_help()
                return 2
            if args.command in ("filter", "batch"):
                _check_filter_args(args.parser, args)
            return args.run(args)
    except Terminated as e:
        print("volconv: terminated", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("volconv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_gone()
        return 1
    except Exception as e:
        if _debugging():
            raise
        Reporter(quiet=False).error(_unexpected(e, getattr(args, "input", getattr(args, "input_dir", None))))
        return 1


if __name__ == "__main__":
    sys.exit(main())
