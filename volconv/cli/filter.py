"""`volconv filter IN OUT`: one NIfTI file through vc.io.filter_nifti (or adaptive_filter_nifti with
--sigma-map, vesselness_nifti with --frangi / --sato / --meijering), optionally with a --preview PNG; and
the per-file work that `batch` repeats."""
import os
import time
import warnings

from .. import io
from .common import EXIT_STATUS, CommandError, Reporter, blame, check_distinct, check_output, debugging, \
    remove, report_warnings, unexpected
from .options import VESSELNESS, KernelChoice, add_filter_options
from .preview import Preview


def add_parser(sub):
    """The `filter` subcommand and its options."""
    s = sub.add_parser("filter", help="filter a NIfTI volume (3-D, or 4-D volume by volume)",
                       description="Filter a NIfTI volume (3-D, or 4-D volume by volume) with a kernel in mm or "
                                   "voxels, keeping its geometry and header. Example: "
                                   "volconv filter t1.nii.gz t1_smooth.nii.gz --fwhm 4mm",
                       epilog=EXIT_STATUS)
    s.add_argument("input", metavar="IN", help="input NIfTI file (.nii or .nii.gz)")
    s.add_argument("output", metavar="OUT", help="output NIfTI file (.nii or .nii.gz; without either, .nii.gz is "
                                                 "added as fslmaths does); refused if it exists, unless --force, "
                                                 "and if it is IN, --mask, --kernel or --sigma-map")
    add_filter_options(s, preview=True)
    s.set_defaults(run=run, parser=s)


def check_device(device):
    """--device cuda needs the CUDA plugin and a GPU (a kernel and a --sigma-map both run there)."""
    if device == "cuda":
        from .. import _cuda

        try:
            _cuda.require("volconv --device cuda", has_cuda_version=True)
        except RuntimeError as e:
            raise CommandError(None, str(e)) from None


def nifti_options(options):
    """filter_nifti's keyword arguments from the parsed options (this command's, and batch's on every file);
    the volume is never read back (the memory promise)."""
    return dict(mode=options.mode, cval=options.cval, mask=options.mask, normalize=options.normalize,
                outside=options.outside, nan=options.nan, dtype=options.odt, overwrite=options.force,
                workers=options.workers, max_memory=options.max_memory, return_volume=False,
                device=None if options.device == "cpu" else options.device)


def filter_file(args, choice, src, dst, reporter, on_progress=None):
    """Filter one file with vc.io.filter_nifti; log what was done. Raises CommandError naming the file."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            io.filter_nifti(src, dst, choice, progress=on_progress, **nifti_options(args))
    except (MemoryError, OSError, ValueError) as e:  # NiftiError is a ValueError
        raise CommandError(*failure(e, src, dst, args.mask, getattr(args, "guide", None))) from e
    except Exception as e:   # one bad file must not end a batch, nor show a traceback
        if debugging():
            raise
        raise unexpected(e, src) from e
    report_warnings(reporter, caught)
    elapsed = time.perf_counter() - start
    reporter.log(f"volconv: {src} -> {dst}: {applied(choice, args, dst)}, {elapsed:.2f} s")


def _adaptive_file(args, src, dst, reporter, on_progress=None):
    """`--sigma-map`: vc.io.adaptive_filter_nifti (slabbed like filter_nifti), never read back."""
    start = time.perf_counter()
    truncate = 3.0 if args.truncate is None else args.truncate
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            io.adaptive_filter_nifti(src, dst, args.sigma_map, truncate, mode=args.mode, cval=args.cval,
                                     dtype=args.odt, overwrite=args.force, workers=args.workers,
                                     progress=on_progress, max_memory=args.max_memory, return_volume=False,
                                     device=None if args.device == "cpu" else args.device)
    except (MemoryError, OSError, ValueError) as e:   # NiftiError is a ValueError
        raise CommandError(*failure(e, src, dst, args.sigma_map)) from e
    report_warnings(reporter, caught)
    reporter.log(f"volconv: {src} -> {dst}: adaptive gaussian (sigma map {args.sigma_map}, truncate {truncate:g}), "
                 f"{time.perf_counter() - start:.2f} s")


def _vesselness_file(args, method, src, dst, reporter):
    """--frangi / --sato / --meijering: vc.io.vesselness_nifti (whole volume, the memory guard first)."""
    start = time.perf_counter()
    scales = getattr(args, method)
    black = True if args.black_ridges is None else args.black_ridges
    extra = {} if method == "sato" else dict(alpha=args.alpha)
    if method == "frangi":
        extra.update(beta=0.5 if args.beta is None else args.beta, gamma=args.gamma)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            io.vesselness_nifti(src, dst, method, scales.values, unit=scales.unit, black_ridges=black,
                                mode=args.mode, cval=args.cval, dtype=args.odt, overwrite=args.force,
                                workers=args.workers, return_volume=False, **extra)
    except (MemoryError, OSError, ValueError) as e:   # NiftiError is a ValueError
        raise CommandError(*failure(e, src, dst)) from e
    report_warnings(reporter, caught)
    reporter.log(f"volconv: {src} -> {dst}: {method} at sigmas {scales}, {'dark' if black else 'bright'} ridges, "
                 f"mode {args.mode}, {time.perf_counter() - start:.2f} s")


def run(args):
    reporter = Reporter(args.quiet)
    src, dst = args.input, args.output
    try:
        check_distinct([("IN", src), ("--mask", args.mask), ("--kernel", args.kernel),
                         ("--sigma-map", args.sigma_map), ("--guide", args.guide)],
                       [("OUT", dst), ("--preview", args.preview)])
        check_device(args.device)
        vessel = next((v for v in VESSELNESS if getattr(args, v) is not None), None)
        choice = None if args.sigma_map is not None or vessel is not None else KernelChoice(args)
        check_output(dst, args.force)
        preview = Preview(args.preview, args.force) if args.preview else None
    except CommandError as e:
        reporter.error(e)
        return 1
    try:
        reporter.start_bar(total=1, unit="plane")
        progress = (lambda done, total: _set_total(reporter, done, total)) if reporter.bar else None
        if vessel is not None:
            _vesselness_file(args, vessel, src, dst, reporter)
        elif choice is None:
            _adaptive_file(args, src, dst, reporter, progress)
        else:
            filter_file(args, choice, src, dst, reporter, progress)
        reporter.close_bar()
        if preview is not None:
            try:
                preview.write(src, dst)
            except BaseException:
                remove(dst)  # all or nothing: no NIfTI without the preview that was asked for
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


def failure(e, src, dst, *others):
    """(file to name, problem) for an exception of filter_nifti: the one wording of both batch paths. others:
    the other files read (a mask, a guide, a sigma map; None when not given)."""
    if isinstance(e, FileExistsError):
        return dst, "output file exists; use --force to overwrite it"
    if isinstance(e, MemoryError):
        return src, "not enough memory to filter it"
    culprit, problem = blame(e, src, dst, *others)
    if isinstance(e, OSError) and os.path.abspath(culprit) == os.path.dirname(os.path.abspath(dst)):
        culprit, problem = dst, f"{problem}: {os.path.dirname(os.path.abspath(dst))}"  # name the output
    return culprit, problem


def applied(choice, options, dst):
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
