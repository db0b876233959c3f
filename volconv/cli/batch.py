"""`volconv batch IN_DIR OUT_DIR`: every NIfTI file of a directory through `filter`'s per-file work, in this
process or as tasks on a dask.distributed cluster (--scheduler), past the files that fail."""
import argparse
import os
import threading
import time
import warnings

from .. import io
from ..io import NiftiWarning
from ..io.writer import NIFTI_EXTENSIONS
from .common import CommandError, Reporter, blame, check_distinct, same_file
from .filter import applied, check_device, failure, filter_file, nifti_options
from .options import KernelChoice, add_filter_options


def add_parser(sub):
    """The `batch` subcommand and its options."""
    s = sub.add_parser("batch", help="filter every .nii / .nii.gz of a directory into another",
                       description="Filter every .nii / .nii.gz file of IN_DIR into OUT_DIR (created if needed) "
                                   "under the same name, with one progress bar. A file that fails is reported "
                                   "and the batch goes on; the failed files are listed at the end and the exit "
                                   "status is then 1. Hidden files and folders are skipped.")
    s.add_argument("input_dir", metavar="IN_DIR")
    s.add_argument("output_dir", metavar="OUT_DIR")
    add_filter_options(s, preview=False)
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
    s.set_defaults(run=run, parser=s)


def _nifti_files(directory, recursive=False, skip=None):
    """The NIfTI files of a directory as paths relative to it, sorted; hidden files and folders skipped
    (interrupted temporaries, .git). With `recursive`, nested folders too (a BIDS layout), except the folder
    `skip` (the output directory, which BIDS puts inside the input as derivatives/...)."""
    names = []
    for folder, folders, files in os.walk(directory):
        folders[:] = [f for f in folders if not f.startswith(".") and
                      not (skip is not None and same_file(os.path.join(folder, f), skip))] if recursive else []
        for name in files:
            path = os.path.join(folder, name)
            if not name.startswith(".") and name.lower().endswith(NIFTI_EXTENSIONS) and os.path.isfile(path):
                names.append(os.path.relpath(path, directory))
    return sorted(names)


def run(args):
    reporter = Reporter(args.quiet)
    in_dir, out_dir = args.input_dir, args.output_dir
    try:
        check_device(args.device)
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
        if same_file(in_dir, out_dir):
            raise CommandError(out_dir, "the output directory is the input directory")
        existing = [name for name in names if os.path.lexists(os.path.join(out_dir, name))]
        if existing and not args.force and not args.skip_existing:
            raise CommandError(os.path.join(out_dir, existing[0]), "output file exists; use --force to overwrite "
                                                                   "it, or --skip-existing to keep it")
        if args.skip_existing:   # resuming: every output there is whole (written atomically)
            existing_names = set(existing)
            names = [name for name in names if name not in existing_names]
        for name in names:
            check_distinct([("input file", os.path.join(in_dir, name)), ("--mask", args.mask),
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
                filter_file(args, choice, src, dst, reporter, progress)
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
    from .. import dask as vdask

    pairs = [(os.path.join(in_dir, name), os.path.join(out_dir, name)) for name in names]
    as_given = {os.path.abspath(p): p for pair in pairs for p in pair}
    if args.mask is not None:
        as_given[os.path.abspath(args.mask)] = args.mask
    # the options a worker needs (the parsed arguments also hold the parser); one thread per file by default:
    # dask runs a file on every worker thread
    options = argparse.Namespace(mode=args.mode, cval=args.cval, normalize=args.normalize, outside=args.outside,
                                 mask=None if args.mask is None else os.path.abspath(args.mask), odt=args.odt,
                                 force=args.force, workers=1 if args.workers is None else args.workers,
                                 nan=args.nan, max_memory=args.max_memory, device=args.device)

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
        reporter.error(CommandError(args.scheduler, f"cannot connect to the dask scheduler: {blame(e, None)[1]}"))
        return None
    failed, done = [], 0
    tasks = vdask.run_files(client, _filter_scheduled_file, pairs, options, choice)
    reporter.start_bar(total=len(names), unit="file")
    try:
        for i, outcome, exc in tasks:
            src, dst = pairs[i]
            if exc is not None:  # the task itself failed: volconv missing on a worker, a worker lost, ...
                outcome = ("failed", src, f"on the dask cluster: {blame(exc, None)[1]}")
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
    """One file of `volconv batch --scheduler` on a dask worker (absolute paths), as filter_file does it
    here: ("done", warnings, what was applied, seconds) or ("failed", file, problem). Failures come back as
    values (CommandError does not survive pickling); warnings are caught per thread, since catch_warnings
    swaps process-wide state and a dask worker filters several files at once."""
    import copy

    choice = copy.copy(choice)  # it remembers the kernel it built, and a worker may share it between threads
    start = time.perf_counter()
    try:
        with _ThreadWarnings() as caught:
            io.filter_nifti(src, dst, choice, **nifti_options(options))
    except (MemoryError, OSError, ValueError) as e:  # NiftiError is a ValueError
        return ("failed",) + failure(e, src, dst, options.mask)
    return "done", [str(w.message) for w in caught], applied(choice, options, dst), time.perf_counter() - start


class _ThreadWarnings:
    """warnings.catch_warnings(record=True) for the calling thread only. Installs once per process a
    showwarning that hands each warning to the list of the thread that issued it (others go where they went
    before), and lets volconv's NiftiWarnings through every time (as filter_file's "always"), not once."""

    _local = None
    _lock = None

    def __enter__(self):
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
