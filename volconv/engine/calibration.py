"""The cost model's machine constants: their defaults, and the per-machine file that holds this machine's
(measured by engine/rates.py, `volconv bench --calibrate`), read once per process.

The defaults were measured on the development machine (2 Zen 4 cores, AVX-512, float32): sustained rates per
thread of the direct kernel by register block (bench/bench_dense.py), of its weight-gradient kernel, of oneDNN for
channel-mixing layers, of the sparse kernel (bench_sparse.py) and of the fused separable pass, the bandwidth the
direct path streams at, a fixed cost per call, and a factor on the FFT model (engine/fft.py's fitted seconds, 1
there).

Stored as JSON in $VOLCONV_CACHE_DIR, else $XDG_CACHE_HOME/volconv, else ~/.cache/volconv (calibration.json), one
entry per machine (CPU model, logical CPUs, the SIMD build volconv runs), so that one home directory shared by
several machines keeps each one's constants. VOLCONV_CALIBRATION=off makes the cost model use the defaults."""
import dataclasses
import datetime
import errno
import json
import os
import platform
import tempfile
import warnings

import numpy as np

from .. import _cpu

FILE_NAME = "calibration.json"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Constants:
    """The cost model's constants (rates in GFLOP/s per thread, bandwidth in bytes/s for all threads)."""

    direct_gflops_1: float = 90.0     # direct kernel, one output channel per input-row load (one channel, depthwise)
    direct_gflops_4: float = 140.0    # ... 4 output channels
    direct_gflops_8: float = 220.0    # ... 8 output channels
    wgrad_gflops_1: float = 47.0      # the weight-gradient kernel (unaligned tap loads), by the same blocks
    wgrad_gflops_4: float = 55.0
    wgrad_gflops_8: float = 55.0
    torch_gflops: float = 130.0       # oneDNN, when channels mix (Cg >= 4, Og >= 4)
    sparse_gflops: float = 60.0       # a sparse tap costs ~1.4x a dense direct tap (one load per FMA)
    separable_gflops: float = 55.0    # the fused separable pass (rates.measure here, 2026-11-30)
    call_overhead: float = 20e-6      # seconds per call of a compiled kernel
    bandwidth: float = 25e9           # bytes/s the direct path streams (input and output)
    fft_scale: float = 1.0            # measured / modelled seconds of an FFT convolution

    def direct_gflops(self, block):
        return getattr(self, f"direct_gflops_{block}")

    def wgrad_gflops(self, block):
        return getattr(self, f"wgrad_gflops_{block}")


DEFAULTS = Constants()
_current = None   # what current() read, once per process


def current():
    """The constants the cost model uses: this machine's stored calibration if there is one (read at the first
    call), else the defaults. A stored file that cannot be read gives one warning and the defaults."""
    global _current
    if _current is None:
        _current = DEFAULTS
        if enabled():
            try:
                record = load()
            except CalibrationError as e:
                warnings.warn(f"volconv: {e}; the cost model uses its built-in constants (`volconv bench "
                              f"--calibrate` measures them again)", RuntimeWarning, stacklevel=2)
                record = None
            if record is not None:
                _current = record["constants"]
    return _current


def enabled():
    """Whether the cost model reads the stored calibration (VOLCONV_CALIBRATION=off: it does not)."""
    return os.environ.get("VOLCONV_CALIBRATION", "").strip().lower() not in ("off", "0", "no", "false")


def reset():
    """Forget what current() read: the next call reads the stored calibration again."""
    global _current
    _current = None


class CalibrationError(Exception):
    """A calibration file that cannot be read or written."""


# ----------------------------------------------------------------------------------------------------------------
# where: the machine and the file
# ----------------------------------------------------------------------------------------------------------------

def cache_dir():
    explicit = os.environ.get("VOLCONV_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "volconv")


def path():
    """The calibration file (it need not exist)."""
    return os.path.join(cache_dir(), FILE_NAME)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key():
    """What a calibration belongs to: the CPU model, its logical CPUs and the SIMD build volconv runs."""
    return f"{cpu_model()} | {os.cpu_count()} CPUs | {_cpu.SIMD}"


def _read_file(file):
    """The file's {machine key: record} (empty when there is no file); CalibrationError when unreadable."""
    try:
        with open(file) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot read the calibration file {file}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
        raise CalibrationError(f"the calibration file {file} is not one volconv wrote (no 'machines' table)")
    return data["machines"]


def _constants(values, file):
    """Constants from a stored {name: value}: every value a positive finite number; names it lacks (a file from
    an older volconv) keep their defaults, names it does not know are ignored."""
    if not isinstance(values, dict):
        raise CalibrationError(f"the calibration file {file} holds no constants for this machine")
    known = {f.name for f in dataclasses.fields(Constants)}
    checked = {}
    for name, value in values.items():
        if name not in known:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise CalibrationError(f"the calibration file {file} has {name} = {value!r}, not a positive number")
        checked[name] = float(value)
    return dataclasses.replace(DEFAULTS, **checked)


def load():
    """This machine's stored record ({"machine", "date", "volconv", "threads", "quick", "constants"}, the
    constants a Constants), or None when none is stored; CalibrationError when the file cannot be read."""
    file = path()
    record = _read_file(file).get(machine_key())
    if record is None:
        return None
    if not isinstance(record, dict):
        raise CalibrationError(f"the calibration file {file} has an entry for this machine that is not a table")
    return dict(record, constants=_constants(record.get("constants"), file))


def writable_dir():
    """The cache directory, created if need be; CalibrationError when it cannot be created or written."""
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied")
    except OSError as e:
        raise _unwritable(directory, e) from None
    return directory


def _unwritable(directory, e):
    return CalibrationError(f"cannot write the calibration to {directory}: {e.strerror or e} (set "
                            f"VOLCONV_CACHE_DIR to a writable directory)")


def store(constants, *, version, threads=None, quick=False):
    """Write this machine's constants into the calibration file (other machines' entries kept; an unreadable
    file replaced), atomically; the next current() reads them. Returns the file's path; CalibrationError when
    the directory cannot be written."""
    directory, file = writable_dir(), path()
    try:
        machines = _read_file(file)
    except CalibrationError:
        machines = {}
    machines[machine_key()] = {
        "machine": machine_key(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "volconv": version, "threads": threads, "quick": quick, "constants": dataclasses.asdict(constants)}
    try:
        fd, temporary = tempfile.mkstemp(prefix=".calibration-", suffix=".json", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "machines": machines}, f, indent=2, sort_keys=True)
            os.replace(temporary, file)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as e:
        raise _unwritable(directory, e) from None
    reset()
    return file
