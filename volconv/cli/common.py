"""What every subcommand shares: its failures and their one-line messages, the log and progress bar on stderr,
the argument types, and the checks of the paths a command writes before it does any work."""
import argparse
import os
import sys

PROGRESS_DELAY_S = 1.0  # a progress bar appears only for work that lasts longer than this
EXIT_STATUS = ("Exit status: 0 success, 1 failure (one line naming the file; no output left behind), 2 bad "
               "arguments.")   # every file command's epilog


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


def debugging():
    return os.environ.get("VOLCONV_DEBUG", "") not in ("", "0")


def unexpected(exc, path):
    """The CommandError for an exception no check foresaw (a bug, or an input nobody thought of): one line that
    names the file; VOLCONV_DEBUG=1 lets the traceback through instead (callers re-raise when debugging())."""
    problem = blame(exc, path)[1]
    return CommandError(path, f"unexpected {type(exc).__name__}: {problem} (VOLCONV_DEBUG=1 shows the "
                              f"traceback; please report it)")


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


def blame(exc, default, *paths):
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


def report_warnings(reporter, caught):
    for w in caught:
        reporter.log(f"volconv: warning: {w.message}")


# ------------------------------------------------------------------------------------------------ argument types


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


class Scales:
    """The scales of --frangi / --sato / --meijering: sigmas and their unit ("mm" or "vox")."""

    def __init__(self, values, unit, text):
        self.values, self.unit, self.text = values, unit, text

    def __str__(self):
        return ", ".join(f"{v:g}" for v in self.values) + (" mm" if self.unit == "mm" else " voxels")


def scales_type(text):
    """argparse type: "1:4:4mm" (FROM:TO:COUNT, evenly spaced as numpy.linspace), "1,2,3mm", "2" or "1.5vox"
    -> Scales (mm without a suffix)."""
    body = text.strip().lower()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if body.endswith(u)), None)
    if unit is not None:
        body = body[:-len(unit)]
    unit = _UNITS.get(unit, "mm")
    values = ()
    try:
        if ":" in body:
            lo, hi, count = body.split(":")
            n = int(count)
            if n >= 1:
                lo, hi = float(lo), float(hi)
                values = (lo,) if n == 1 else tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))
        else:
            values = tuple(float(v) for v in body.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected FROM:TO:COUNT (e.g. 1:4:4mm: sigmas 1, 2, 3, 4 mm) or comma-separated sigmas "
            f"(1,2,4mm), each positive, optionally followed by mm or vox")
    return Scales(values, unit, text)


scales_type.__name__ = "scales"


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


def memory_size(text):
    from ..io.slabs import memory_bytes

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


# ------------------------------------------------------------------------------------------------ paths


def check_output(path, force, what="output file"):
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


def same_file(a, b):
    """Whether two paths name one file: the same resolved path (symlinks, '..', relative to here), or, when both
    exist, the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them does not exist (yet): only the resolved paths could tell
        return False


def check_distinct(inputs, outputs):
    """Refuse, before any work and whatever --force says, an output that is the same file as an input or as
    another output: [(argument, path)] pairs, paths None when not given. The one check of filter and batch."""
    seen = [(name, path, False) for name, path in inputs if path is not None]
    for name, path in outputs:
        if path is None:
            continue
        for other, other_path, is_output in seen:
            if same_file(path, other_path):
                where = "" if os.fspath(path) == os.fspath(other_path) else f" ({other_path})"
                why = "two outputs cannot share a file" if is_output else "volconv does not write over a file " \
                                                                          "it reads"
                raise CommandError(path, f"{name} is the same file as {other}{where}; {why}")
        seen.append((name, path, True))


def remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass
