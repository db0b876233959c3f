"""NIfTI volumes in and out: `load`, `save` and the `Volume` they exchange.

nibabel does the format work; this module adds what a filtering tool needs around it:

- load: NIfTI-1 and NIfTI-2, plain or gzipped (recognised by content, not by file name), scl_slope/scl_inter
  applied, float32 unless another dtype is asked for, memory-mapped when nibabel can (plain file, no scaling),
  and every broken input (not NIfTI, corrupt gzip, truncated data) refused at load time with the file's name.
- the voxel sizes (`Volume.zooms`) come from the affine, as every resampling or kernel in mm must; a
  `NiftiWarning` says when pixdim disagrees with the affine or when xyzt_units name a spatial unit other than mm.
- save: the source header's geometry and metadata are kept (affine, qform and sform with their codes, xyzt
  units, TR, dim_info), float32 unless another dtype is asked for, never a new scale factor, and the file appears
  atomically: it is written to a temporary file beside the target and renamed into place, so a failure leaves
  neither a partial output nor a temporary file.
"""
import contextlib
import errno
import gzip
import os
import re
import socket
import stat
import tempfile
import warnings
import zlib

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from . import _gzip, _slabs
from ._gzip import ParallelGzipWriter
from ._validate import filter_pads, scipy_mode, workers as resolve_workers

__all__ = ["NiftiError", "NiftiWarning", "Volume", "load", "save"]

# pixdim and the affine's voxel sizes may differ by float32 rounding of the sform rows (about 1e-7); anything
# beyond this relative difference is a real disagreement.
ZOOM_RTOL = 1e-4

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")
_SAVE_DTYPES = tuple(np.dtype(t) for t in ("float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                           "uint32", "int64", "uint64"))
# Unit names as nibabel's Nifti1Header.get_xyzt_units spells them -> words for the warning, and the factor to mm.
_SPATIAL_UNITS = {"meter": ("meters", 1000.0), "micron": ("micrometres (microns)", 0.001)}


class NiftiError(ValueError):
    """An input file that is not a readable NIfTI volume; the message names the file and the problem."""


class NiftiWarning(UserWarning):
    """A readable NIfTI file with doubtful geometry (pixdim vs affine, spatial unit other than mm)."""


class Volume:
    """A NIfTI volume.

    Attributes
    ----------
    data : numpy.ndarray
        3-D (x, y, z) or 4-D (x, y, z, t) array; float32 from `load` unless another dtype was asked for.
    affine : numpy.ndarray
        4x4 float64 voxel -> world (mm) transform.
    header : nibabel.Nifti1Header or nibabel.Nifti2Header
        The source's header (a fresh Nifti1Header when none was given); `save` keeps its geometry and metadata.
    zooms : tuple of 3 floats
        Voxel sizes in mm, from the affine (``nibabel.affines.voxel_sizes``), not from pixdim.
    """

    def __init__(self, data, affine, header=None):
        if hasattr(data, "detach"):  # a torch tensor handed back by a filter
            data = data.detach().cpu().numpy()
        data = np.asanyarray(data)
        if data.ndim not in (3, 4):
            raise ValueError(f"Volume data must be 3-D (x, y, z) or 4-D (x, y, z, t), got shape {data.shape}")
        affine = np.array(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"Volume affine must be a finite 4x4 matrix, got {affine.shape}")
        if header is None:  # geometry from the affine alone: both forms 'aligned', units mm and s
            header = nib.Nifti1Header()
            header.set_sform(affine, code="aligned")
            header.set_qform(affine, code="aligned")
            header.set_xyzt_units("mm", "sec")
        elif not isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
            raise TypeError(f"Volume header must be a nibabel Nifti1Header or Nifti2Header, "
                            f"got {type(header).__name__}")
        self.data = data
        self.affine = affine
        self.header = header

    @property
    def zooms(self):
        return tuple(float(z) for z in voxel_sizes(self.affine))

    @property
    def shape(self):
        return self.data.shape

    def with_data(self, data):
        """A Volume with the same affine and (a copy of the) header holding `data`, e.g. a filtered copy.

        The spatial shape must stay the same (the affine describes it); the 4th dimension may change."""
        new = Volume(data, self.affine.copy(), self.header.copy())
        if new.data.shape[:3] != self.data.shape[:3]:
            raise ValueError(f"with_data: new data has spatial shape {new.data.shape[:3]}, the volume's "
                             f"geometry is for {self.data.shape[:3]}")
        return new

    def __repr__(self):
        zooms = "x".join(f"{z:g}" for z in self.zooms)
        return f"Volume(shape={self.data.shape}, dtype={self.data.dtype}, zooms={zooms} mm)"


# --------------------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------------------

def load(path, *, dtype=np.float32, mmap=True):
    """Read a NIfTI-1 or NIfTI-2 volume (.nii or .nii.gz) into a `Volume`.

    Parameters
    ----------
    path : str, bytes or os.PathLike
    dtype : numpy dtype or None
        Type of ``Volume.data`` (default float32; scl_slope/scl_inter are applied in it). An integer dtype is
        accepted only when every stored value is a whole number in its range (no silent rounding). None gives
        what nibabel's array proxy gives, without a copy when possible: the stored type and byte order when the
        file is unscaled (memory-mapped for a plain file), nibabel's float type when it is scaled.
    mmap : bool or {"c", "r"}
        Passed to nibabel: memory-map an uncompressed, unscaled file instead of reading it (True means
        copy-on-write, "c"). Gzipped files are always read whole.

    Raises
    ------
    FileNotFoundError
        `path` does not exist.
    NiftiError
        `path` is not a NIfTI file, its gzip stream is corrupt, its data is truncated, or its data is not a
        3-D or 4-D array of numbers.

    Warns
    -----
    NiftiWarning (a UserWarning)
        pixdim disagrees with the affine's voxel sizes, or xyzt_units give a spatial unit other than mm
        (meters, microns) or none at all.
    """
    path = os.fsdecode(path)   # str, bytes (as os.listdir(bytes) gives) or os.PathLike, as nibabel takes
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind not in "fiu":
            raise ValueError(f"load: dtype must be a real floating or integer numpy dtype, or None; got {dtype}")
    with _source(path, mmap, real=dtype is not None) as (img, finish), _reading(path):
        data = _read_data(path, img, dtype)
        finish()
    vol = Volume(data, img.affine, img.header)
    _warn_geometry(path, vol.affine, vol.header)
    return vol


@contextlib.contextmanager
def _source(path, mmap=True, real=True):
    """(image, finish): the nibabel image of a NIfTI file, its data not read yet, the file open in the block;
    finish() reads a gzip stream to its end, so that gzip checks its CRC and length (done on leaving the block
    at the latest: call it before committing anything made from the data). Errors as `load` documents; `real`
    refuses data that are not real numbers (RGB, complex), which every filter would misread."""
    if os.path.isdir(path):
        raise NiftiError(f"{path}: is a directory, not a NIfTI file")
    with open(path, "rb") as f:  # FileNotFoundError / PermissionError name the file themselves
        block = f.read(548)
    with contextlib.ExitStack() as stack:
        with _reading(path):
            if block[:2] == _GZIP_MAGIC:
                f = stack.enter_context(gzip.open(path, "rb"))
                img_class = _nifti_class(path, f.read(548))
                f.seek(0)
                img = img_class.from_file_map({"image": nib.FileHolder(fileobj=f)}, mmap=False)
            else:
                img_class = _nifti_class(path, block)
                if path.lower().endswith((".gz", ".bz2", ".zst")):  # nibabel would decompress by the name
                    f = stack.enter_context(open(path, "rb"))
                    img = img_class.from_file_map({"image": nib.FileHolder(fileobj=f)}, mmap=False)
                else:
                    f = None
                    img = img_class.from_file_map({"image": nib.FileHolder(filename=path)}, mmap=mmap)
                _check_size(path, img, os.path.getsize(path))
        if real:
            _check_real(path, img.dataobj.dtype)
        finished = []

        def finish():
            if f is not None and block[:2] == _GZIP_MAGIC and not finished:
                with _reading(path):
                    f.read()
                finished.append(True)

        yield img, finish
        finish()


@contextlib.contextmanager
def _reading(path):
    """Errors of nibabel and gzip while reading `path` -> NiftiError naming the file and the problem."""
    try:
        yield
    except (NiftiError, PermissionError):
        raise
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise NiftiError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    except (OSError, ValueError, HeaderDataError, ImageFileError) as e:
        reason = " ".join(str(e).split())
        if "Expected" in reason and "bytes" in reason:  # nibabel's array_from_file: stream shorter than data
            raise NiftiError(f"{path}: truncated data: {reason}") from e
        raise NiftiError(f"{path}: unreadable NIfTI file: {reason}") from e


def _nifti_class(path, block):
    """The nibabel image class for a header's first bytes, or NiftiError saying what the file is instead."""
    if len(block) < 348:
        raise NiftiError(f"{path}: not a NIfTI file (only {len(block)} bytes, a NIfTI-1 header alone is 348)")
    sizes = {int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")}
    if 540 in sizes and block[4:8] == b"n+2\0":
        return nib.Nifti2Image
    if 348 in sizes and block[344:348] == b"n+1\0":
        return nib.Nifti1Image
    if 540 in sizes and block[4:8] == b"ni2\0" or 348 in sizes and block[344:348] == b"ni1\0":
        raise NiftiError(f"{path}: a NIfTI header of a .hdr/.img pair; only single-file NIfTI (.nii, .nii.gz) "
                         f"is supported")
    if 348 in sizes:
        raise NiftiError(f"{path}: not a NIfTI file (an Analyze 7.5 header without the NIfTI magic)")
    raise NiftiError(f"{path}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header: sizeof_hdr is neither 348 nor "
                     f"540)")


def _check_size(path, img, file_size):
    proxy = img.dataobj
    needed = proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize
    if file_size < needed:
        raise NiftiError(f"{path}: truncated data: the header describes {proxy.shape} {proxy.dtype} voxels "
                         f"ending at byte {needed}, the file has {file_size} bytes")


def _check_real(path, stored):
    """NiftiError unless the stored voxels are real numbers: numpy would take the real part of complex data
    silently, and cannot convert RGB at all."""
    if stored.kind not in "fiub":
        what = "RGB" if stored.fields is not None else "complex" if stored.kind == "c" else str(stored)
        raise NiftiError(f"{path}: {what} voxels ({8 * stored.itemsize} bits each); "
                         f"expected real numbers (integer or float): convert them first, e.g. to a magnitude "
                         f"or luminance image (vc.io.load(path, dtype=None) reads them as stored)")


def _read_data(path, img, dtype):
    proxy = img.dataobj
    if dtype is None or dtype.kind == "f":
        data = np.asarray(proxy, dtype=dtype)
    else:
        data = _as_integers(path, np.asarray(proxy), dtype)
    if isinstance(data, np.memmap):  # astype of a memmap is an np.memmap that maps nothing: say what it is
        data = data.view(np.ndarray)
    shape = data.shape
    if data.ndim < 3:  # a single slice or line: still a volume in the affine's 3-D space
        data = data.reshape(shape + (1,) * (3 - data.ndim))
    elif data.ndim > 4:
        if any(n != 1 for n in shape[4:]):
            raise NiftiError(f"{path}: {data.ndim}-D data of shape {shape}; volconv reads 3-D and 4-D volumes")
        data = data.reshape(shape[:4])
    return data


def _as_integers(path, values, dtype):
    """Stored (scaled) values -> an integer dtype, refused unless every value is a whole number in range."""
    info = np.iinfo(dtype)
    if values.dtype.kind in "iub":
        lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        exact = True
    else:
        finite = np.isfinite(values).all()
        lo, hi = (np.nanmin(values), np.nanmax(values)) if values.size and finite else (0, 0)
        exact = finite and bool(np.all(values == np.round(values)))
    if not exact or lo < info.min or hi > info.max:
        raise NiftiError(f"{path}: stored values (range {lo:g} to {hi:g}{'' if exact else ', not all whole'}) "
                         f"do not fit {dtype} exactly; load as float and convert")
    return values.astype(dtype, copy=False)


def _warn_geometry(path, affine, header):
    zooms = voxel_sizes(affine)
    pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64))
    if not np.allclose(zooms, pixdim, rtol=ZOOM_RTOL, atol=0):
        form = "sform" if header["sform_code"] > 0 else "qform"
        warnings.warn(f"{path}: voxel sizes from the affine ({form}) are {_fmt(zooms)} but pixdim says "
                      f"{_fmt(pixdim)}; volconv uses the affine's", NiftiWarning, stacklevel=3)
    unit = header.get_xyzt_units()[0]
    if unit == "mm":
        return
    if unit in _SPATIAL_UNITS:
        words, to_mm = _SPATIAL_UNITS[unit]
        warnings.warn(f"{path}: xyzt_units say the spatial unit is {words}, not mm: the voxel sizes "
                      f"{_fmt(zooms)} are in {words} ({_fmt(zooms * to_mm)} mm), but volconv reads zooms and "
                      f"the affine as mm", NiftiWarning, stacklevel=3)
    else:
        warnings.warn(f"{path}: xyzt_units give no spatial unit ({unit}); volconv assumes mm "
                      f"(voxel sizes {_fmt(zooms)})", NiftiWarning, stacklevel=3)


def _fmt(values):
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# --------------------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------------------

def save(vol, path, *, dtype=None, overwrite=True, workers=None):
    """Write `vol` to `path` (.nii or .nii.gz; NIfTI-2 when the volume's header is a Nifti2Header).

    The output keeps the source header's affine, qform and sform (values and codes), xyzt units, TR
    (pixdim[4]), dim_info and other metadata; a changed ``vol.affine`` goes into both forms with their codes
    (sform 'aligned' when it had none). A Volume without a source header gets sform and qform code 'aligned'
    and units mm/s. The file is written in the machine's byte order, with scl_slope 1 and scl_inter 0, and
    cal_min = cal_max = 0 (the source's display range is stale once the data changed; 0/0 tells viewers to use
    the data range).

    Parameters
    ----------
    dtype : numpy dtype or None
        On-disk type; None means float32. Integer dtypes are written only when asked: values are rounded to
        the nearest integer (halves to even, as numpy.rint), clipped to the dtype's range and NaN becomes 0,
        with a NiftiWarning counting clipped and NaN voxels.
    overwrite : bool
        False refuses to replace an existing `path` (FileExistsError).
    workers : int or None
        Threads that gzip a .nii.gz output (as vc.correlate's `workers`; None: all). The blocks form one
        ordinary gzip stream (volconv._gzip), the same data whatever the thread count.

    The data goes to a temporary file in the target directory, which is renamed over `path` once complete
    (os.replace): on any failure `path` is left as it was and the temporary file is removed.

    Raises
    ------
    FileExistsError
        `path` exists and overwrite is False.
    FileNotFoundError, NotADirectoryError, PermissionError, OSError
        The output directory does not exist, is not a directory or cannot be written (naming the directory);
        writing failed, e.g. disk full (naming `path`).
    ValueError
        `path` does not end in .nii or .nii.gz, or `dtype` is not a NIfTI number type.
    """
    if not isinstance(vol, Volume):
        raise TypeError(f"save: expected a volconv.io.Volume, got {type(vol).__name__}")
    data = np.asarray(vol.data)
    with NiftiWriter(path, vol, data.shape, dtype=dtype, overwrite=overwrite, workers=workers) as out:
        out.write(data)


class NiftiWriter:
    """An output NIfTI file written as a stream: the header, then the data in file order (x fastest) in as
    many `write` calls as the caller likes (slabs along the last axes), into a temporary file in the target
    directory that becomes `path` only when the `with` block ends without error (see `save`, which is one
    write of the whole array; `filter_nifti` writes slab by slab). `like`: a Volume whose affine and header
    the output keeps; `shape`: the output's data shape."""

    def __init__(self, path, like, shape, *, dtype=None, overwrite=True, workers=None, gzip_bytes=None):
        path = os.fspath(path)
        self.ext = next((e for e in _NIFTI_EXTENSIONS if path.lower().endswith(e)), None)
        if self.ext is None:
            raise ValueError(f"{path}: output file name must end in .nii or .nii.gz")
        out_dtype = np.dtype(np.float32 if dtype is None else dtype)
        if out_dtype not in _SAVE_DTYPES:
            raise ValueError(f"save: dtype must be one of {', '.join(str(d) for d in _SAVE_DTYPES)}; got "
                             f"{out_dtype}")
        if len(shape) not in (3, 4):
            raise ValueError(f"{path}: Volume data must be 3-D or 4-D, got shape {tuple(shape)}")
        self.directory = os.path.dirname(os.path.abspath(path))
        if not os.path.exists(self.directory):
            raise FileNotFoundError(errno.ENOENT, "output directory does not exist", self.directory)
        if not os.path.isdir(self.directory):
            raise NotADirectoryError(errno.ENOTDIR, "output directory is not a directory", self.directory)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "output path is a directory", path)
        if not overwrite and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "output file exists (overwrite=False)", path)
        self.path, self.dtype, self.overwrite, self.workers = path, out_dtype, overwrite, workers
        self.gzip_bytes = gzip_bytes   # the gzip threads' data in flight at most (bytes; None: their default)
        self.header = _output_header(like, tuple(shape), out_dtype)
        img_class = nib.Nifti2Image if isinstance(self.header, nib.Nifti2Header) else nib.Nifti1Image
        # nibabel fills the header as its own writer would (magic, forms from the affine); a zero-stride
        # stand-in gives it the shape without any data
        img = img_class(np.broadcast_to(np.zeros((), out_dtype), tuple(shape)), like.affine, header=self.header,
                        dtype=out_dtype)
        img.update_header()
        self.header = img.header
        self.header.set_slope_inter(1.0, 0.0)   # the image reset them (nibabel's writer would set these)
        self.expected = int(np.prod(shape)) * out_dtype.itemsize
        self.clipped = self.n_nan = 0

    def __enter__(self):
        self.mode = stat.S_IMODE(os.stat(self.path).st_mode) if os.path.exists(self.path) else 0o666 & ~_umask()
        base = os.path.basename(self.path)
        try:
            fd, self.tmp = _temporary(self.directory, base, self.ext)
        except OSError as e:
            raise OSError(e.errno, f"cannot create a file in the output directory (for {base}): {e.strerror}",
                          self.directory) from e
        try:
            self.raw = _open_temp(fd)
            # our own gzip stream: its header names the final file, not the temporary one
            self.stream = ParallelGzipWriter(self.raw, name=base[:-3], level=_GZIP_LEVEL,
                                             threads=resolve_workers(self.workers),
                                             max_in_flight=self.gzip_bytes) \
                if self.ext == ".nii.gz" else self.raw
            self.header.write_to(self.stream)
            self.stream.write(bytes(self.header.get_data_offset() - self.stream.tell()))
            self.start = self.stream.tell()
        except BaseException as e:
            self._abandon(e)
        return self

    def write(self, block, keep=False):
        """The next voxels in file order: an array whose Fortran-order elements continue the data. keep: also
        return them as written (in the output dtype, Fortran-ordered), e.g. to hand back in memory."""
        block = np.asarray(block)
        if block.dtype.kind not in "fiub":
            raise ValueError(f"{self.path}: cannot save {block.dtype} data; take the real part or the magnitude "
                             "first")
        planes = block.reshape(block.shape[:2] + (-1,), order="F") if block.ndim > 2 else \
            block.reshape((-1, 1), order="F")
        written = np.empty(block.shape, self.dtype, order="F") if keep else None
        try:
            for k in range(planes.shape[-1]):  # plane by plane: never a converted copy of a whole volume
                out, clipped, n_nan = _cast(planes[..., k], self.dtype)
                self.clipped += clipped
                self.n_nan += n_nan
                self.stream.write(memoryview(np.ascontiguousarray(out.T)).cast("B"))
                if keep:
                    written.reshape(planes.shape, order="F")[..., k] = out
        except BaseException as e:
            self._abandon(e)
        return written

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self._abandon(value, reraise=False)
            return False
        try:
            written = self.stream.tell() - self.start
            if written != self.expected:
                raise RuntimeError(f"NiftiWriter: {written} bytes of data written, the header describes "
                                   f"{self.expected}")
            if self.stream is not self.raw:
                self.stream.close()
            self.raw.flush()
            os.fsync(self.raw.fileno())
            self.raw.close()
            os.chmod(self.tmp, self.mode)
            if self.overwrite:
                os.replace(self.tmp, self.path)
            else:
                _link_no_clobber(self.tmp, self.path)
        except BaseException as e:
            self._abandon(e)
        _fsync_directory(self.directory)
        _warn_cast(self.path, self.dtype, self.clipped, self.n_nan)
        return False

    def _abandon(self, error, reraise=True):
        """Remove the temporary file; an OSError is re-raised naming the output path."""
        if isinstance(getattr(self, "stream", None), ParallelGzipWriter):
            self.stream.abort()
        try:
            if getattr(self, "raw", None) is not None:
                self.raw.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
        if not reraise:
            return
        if isinstance(error, OSError) and not isinstance(error, FileExistsError) and error.errno is not None:
            raise OSError(error.errno, f"{error.strerror or error}: could not write (nothing was left behind)",
                          self.path) from error
        raise error


_GZIP_LEVEL = 1  # nibabel's own default: 3-4x faster than zlib's 6, output ~10% larger


# A temporary output is hidden and says which process made it: .<name>.<pid>@<host>.<mkstemp's 8>.tmp<ext>
_TEMPORARY = re.compile(r"\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.[a-z0-9_]{8}\.tmp(\.nii|\.nii\.gz|\.png)$")
_swept = set()   # directories whose stale temporaries this process has removed already


def _temporary_tag(pid=None):
    """'<pid>@<host>' for a temporary file's name (the host name reduced to letters, digits and '-')."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"
    return f"{os.getpid() if pid is None else pid}@{host}"


def _temporary(directory, name, ext):
    """(fd, path) of a new hidden temporary file in `directory` for the output `name` (ending in `ext`), named so
    that a later run can recognise it. First removes, once per directory per process, the temporaries that
    processes of this host left behind when they were killed outright (SIGKILL, power loss): the pid in their
    name is no longer running. Another host's pid means nothing here, so its temporaries are left alone (and
    every reader of a directory skips hidden files)."""
    key = os.path.realpath(directory)
    if key not in _swept and os.name == "posix":   # os.kill(pid, 0) only asks on POSIX (Windows would kill)
        _swept.add(key)
        _remove_stale_temporaries(directory, _temporary_tag().split("@", 1)[1])
    return tempfile.mkstemp(prefix=f".{name[:-len(ext)]}.{_temporary_tag()}.", suffix=f".tmp{ext}",
                            dir=directory)


def _remove_stale_temporaries(directory, host):
    try:
        entries = [e.name for e in os.scandir(directory) if e.name.startswith(".")]
    except OSError:
        return
    for entry in entries:
        found = _TEMPORARY.search(entry)
        if found is None or found["host"] != host or _running(int(found["pid"])):
            continue
        try:
            os.unlink(os.path.join(directory, entry))
        except OSError:
            pass


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: it runs, as another user
        return True
    return True


def _open_temp(fd):
    """The writable file object for the temporary output (a seam for tests that simulate a full disk)."""
    return os.fdopen(fd, "wb")


def _link_no_clobber(tmp, path):
    """Move tmp to path unless path exists, atomically where the file system has hard links."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "output file exists (overwrite=False)", path) from None
    except OSError:  # no hard links here (some network / FAT file systems): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "output file exists (overwrite=False)", path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (briefly)
    os.umask(mask)
    return mask


def _fsync_directory(directory):
    """Make the rename durable; not every platform can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cast(data, out_dtype):
    """data -> out_dtype for writing: floats as they are; integers rounded (halves to even) and clipped to the
    type's range, NaN as 0. Returns (array, clipped count, NaN count)."""
    if out_dtype.kind == "f" or data.dtype.kind == "b":
        return data.astype(out_dtype, copy=False), 0, 0  # also native byte order
    info = np.iinfo(out_dtype)
    if data.dtype.kind in "iu":
        src = np.iinfo(data.dtype)
        lo, hi = max(info.min, src.min), min(info.max, src.max)
        clipped = int(np.count_nonzero((data < lo) | (data > hi))) if (lo, hi) != (src.min, src.max) else 0
        return np.clip(data, np.array(lo, data.dtype), np.array(hi, data.dtype)).astype(out_dtype), clipped, 0
    # float32 holds every 8/16-bit integer exactly; wider outputs (and other floats) round in float64
    work = np.rint(data, dtype=np.float32 if data.dtype == np.float32 and info.bits < 32 else np.float64)
    lo, hi = (_float_bound(info.min, work.dtype, +1), _float_bound(info.max, work.dtype, -1))
    nan = np.isnan(work)
    n_nan = int(np.count_nonzero(nan))
    work[nan] = 0
    clipped = int(np.count_nonzero((work < lo) | (work > hi)))
    return np.clip(work, lo, hi, out=work).astype(out_dtype), clipped, n_nan


def _warn_cast(path, out_dtype, clipped, n_nan):
    if clipped or n_nan:
        info = np.iinfo(out_dtype)
        what = []
        if clipped:
            what.append(f"{clipped} voxels outside {out_dtype}'s range [{info.min}, {info.max}] clipped")
        if n_nan:
            what.append(f"{n_nan} NaN voxels written as 0")
        warnings.warn(f"{path}: saving as {out_dtype}: {'; '.join(what)}", NiftiWarning, stacklevel=4)


def _float_bound(limit, ftype, direction):
    """The float of type ftype nearest to the integer `limit` that does not overshoot it (towards direction)."""
    bound = ftype.type(limit)
    if (direction < 0 and int(bound) > limit) or (direction > 0 and int(bound) < limit):
        bound = np.nextafter(bound, ftype.type(direction * np.inf))
    return bound


def _output_header(vol, shape, out_dtype):
    header = vol.header.copy()
    native = "<" if np.little_endian else ">"
    if header.endianness != native:
        header = header.as_byteswapped(native)
    pixdim = header["pixdim"].copy()  # set_data_shape resets pixdim beyond ndim (TR among them)
    header.set_data_shape(shape)
    header["pixdim"] = pixdim
    header.set_data_dtype(out_dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    affine = vol.affine
    if not np.allclose(affine, header.get_best_affine()):  # the caller changed the geometry
        header.set_sform(affine, code=int(header["sform_code"]) or "aligned")
        header.set_qform(affine, code=int(header["qform_code"]))
    return header



# ------------------------------------------------------------------------------------------- filtering files

NAN_RULES = ("propagate", "zero", "mask")


def filter_nifti(src, dst, kernel, *, mode="reflect", cval=0.0, mask=None, normalize=False, outside="keep",
                 nan="propagate", dtype=None, overwrite=False, workers=None, progress=None, max_memory=None,
                 return_volume=True):
    """Filter the NIfTI file `src` into `dst`, keeping its geometry and header (written as vc.io.save does:
    atomically, gzip on several threads).

    kernel: a vc.kernels object, an array (voxels), or a callable zooms -> kernel (so that a size in mm is
    resolved against this file's voxel sizes); it may be larger than the volume (scipy.ndimage's rule, as
    vc.correlate: a single slice or a small patch is filtered through the boundary mode). mode/cval:
    scipy.ndimage boundary handling. mask: a NIfTI path or an array (non-zero = inside): voxels outside it do
    not contribute at all (whatever their value, NaN included). normalize: divide by the filtered mask (ones
    without a mask), which renormalises at the volume edge and at the mask border (fslmaths -fmean; the
    boundary mode then plays no part). outside: "keep" or "zero" the voxels outside the mask. 4-D volumes are
    filtered volume by volume over their three spatial axes. dtype: of the output (float32 by default).
    progress: callable(done, total) as the work advances.

    nan: what non-finite input voxels (NaN, +-Inf) do. "propagate" (default): they spread through the kernel
    as in vc.correlate and torch (a NiftiWarning says so when the output has more non-finite voxels than the
    input); "zero": they are read as 0 (fslmaths -nan); "mask": they join the outside of the mask, so they
    contribute nothing (with normalize the weights renormalise around them) and `outside` says what they
    become.

    max_memory: working memory, as bytes (int) or a size with a unit ("512MiB", "1GB", "2G"; default
    volconv._slabs.WORK_BYTES, 512 MiB). A volume whose float copies do not fit is filtered in slabs along its
    last spatial axis, each read with the planes the kernel reaches beyond it (from the memory map of an
    uncompressed file, or as the gzip stream goes), the mask read with it, and written out before the next:
    peak memory stays near max_memory plus one output slab whatever the volume's size, and the result is the
    one of the whole volume at once (bit for bit when the kernel runs directly, as separable and small dense
    kernels do; within FFT rounding for a large dense kernel the cost model sends to the FFT).

    Returns the written Volume (its data as written: in the output dtype, integers rounded and clipped), or
    None when return_volume is False. A volume filtered in slabs is returned memory-mapped from an
    uncompressed output, and read back whole from a compressed one: pass return_volume=False to keep the
    memory promise there."""
    from .kernels import Kernel, as_kernel

    if outside not in ("keep", "zero"):
        raise ValueError(f"outside must be 'keep' or 'zero', got {outside!r}")
    if nan not in NAN_RULES:
        raise ValueError(f"nan must be one of {', '.join(NAN_RULES)}, got {nan!r}")
    job = _FileJob(src, dst, overwrite, max_memory)
    with _Planes(job.src) as source, contextlib.ExitStack() as stack:
        if callable(kernel) and not isinstance(kernel, Kernel):
            kernel = kernel(source.zooms)
        kernel = as_kernel(kernel)
        mask_planes = None
        if mask is not None:
            mask_planes = stack.enter_context(_Planes(os.fspath(mask)) if isinstance(mask, (str, os.PathLike))
                                              else _ArrayPlanes(mask))
            if mask_planes.shape[:3] != source.shape[:3] or mask_planes.nt != 1:
                raise ValueError(f"mask has shape {mask_planes.img_shape} but {job.src} has spatial shape "
                                 f"{source.shape[:3]}")
        masked = mask is not None or normalize or nan == "mask"
        reach = filter_pads(kernel.shape, (0, 0, 0))[2]
        counts = np.zeros(2, np.int64)   # non-finite voxels in the input and in the output
        planes_shape = source.shape[:2]

        def for_volume(t):
            mask_reader = None if mask_planes is None else \
                _slabs.PlaneReader(mask_planes.reader(0), planes_shape, np.float32, keep=sum(reach))

            def filter_slab(block, planes, halo):
                counts[0] += _non_finite(block[..., halo[0]:block.shape[2] - halo[1]])   # the output's planes
                inside = None if mask_reader is None else _slabs.gather(planes, mask_reader) != 0
                if nan == "zero":
                    block = np.where(np.isfinite(block), block, np.float32(0))
                elif nan == "mask":
                    inside = np.isfinite(block) if inside is None else inside & np.isfinite(block)
                out = _filter_volume(block, kernel, mode, cval, inside, normalize, outside, workers, halo=halo)
                counts[1] += _non_finite(out)
                return out
            return filter_slab

        # the slabs' halos at the volume's ends: the boundary mode's padding, read from the volume (zeros and
        # constants are the filter's own padding; normalising pads with zeros whatever the mode)
        pad_mode = None if mode == "constant" or normalize else scipy_mode(mode)
        result = job.run(source, reach, _slabs.copies(masked), pad_mode, for_volume, dtype, workers, progress,
                         return_volume, also_read=[mask_planes] if mask_planes is not None else [])
    if counts[1] > counts[0]:
        warnings.warn(f"{job.src}: NaN/Inf spread through the kernel: {counts[1]} non-finite output voxels from "
                      f"{counts[0]} in the input; nan='mask' leaves them out, nan='zero' reads them as 0 "
                      f"(--nan mask|zero)", NiftiWarning, stacklevel=2)
    return result


def adaptive_filter_nifti(src, dst, sigma_map, truncate=3.0, *, mode="reflect", cval=0.0, dtype=None,
                          overwrite=False, workers=None, progress=None, max_memory=None, return_volume=True):
    """vc.adaptive_filter (a Gaussian whose sigma, in mm, varies voxel by voxel) of the NIfTI file `src` into
    `dst`, every 3-D volume of a 4-D file with the same map. sigma_map: a 3-D NIfTI file on src's grid (same
    shape and affine). Slabbed with a halo under max_memory like filter_nifti (same arguments, same return)."""
    from .kernels import check_truncate, gaussian_radius
    from .ops.dynamic import adaptive_filter

    truncate = check_truncate(truncate)
    job = _FileJob(src, dst, overwrite, max_memory)
    sigma_map = os.fspath(sigma_map)
    with _Planes(job.src) as source, _Planes(sigma_map) as sigma:
        if sigma.shape != source.shape[:3] or sigma.nt != 1:
            raise NiftiError(f"{sigma_map}: sigma map has shape {sigma.img_shape}; it must be 3-D on the volume's "
                             f"grid {source.shape[:3]}")
        if not np.allclose(sigma.affine, source.affine, atol=1e-3):
            raise NiftiError(f"{sigma_map}: sigma map is not on the grid of {job.src} (their affines differ)")
        zooms = np.array(source.zooms)
        largest = _largest(sigma, sigma_map, job.budget)
        # adaptive_filter's radii, for the whole map
        radii = [gaussian_radius(largest / z, truncate, "sigma_map's largest sigma") for z in zooms]
        reach = (radii[2], radii[2])
        # adaptive_filter's arrays, in float32s per voxel: the input, its padded copy, the output, the map
        # (float32 here, float64 there), the fields of 1-D weights (one per distinct voxel size and radius:
        # isotropic voxels share one) and the work of making the widest (float64 weights, their float32 copy and
        # six float64 per-voxel arrays); measured in tests/test_robust_nifti.py
        fields = {(z, r): 2 * r + 1 for z, r in zip(zooms, radii)}
        copies = 6 + sum(fields.values()) + 3 * max(fields.values()) + 12

        def for_volume(t):
            reader = _slabs.PlaneReader(sigma.reader(0), source.shape[:2], np.float32, keep=sum(reach))

            def filter_slab(block, planes, halo):
                s = _slabs.gather(planes, reader)
                # C-ordered views of the Fortran blocks: adaptive_filter's (D, H, W) with the zooms reversed
                out = adaptive_filter(block.T, s.T, zooms[::-1], truncate, mode=mode, cval=cval, workers=workers)
                return out.T[..., halo[0]:out.shape[0] - halo[1]]
            return filter_slab

        return job.run(source, reach, copies, None if mode == "constant" else scipy_mode(mode), for_volume, dtype,
                       workers, progress, return_volume, also_read=[sigma])


def _non_finite(a):
    return a.size - np.count_nonzero(np.isfinite(a))


def _largest(planes, path, budget):
    """The largest value of a sigma map read slab by slab within `budget` bytes (it sets the halo), refusing
    negative or non-finite values with the file's name."""
    largest = 0.0
    step = max(1, budget // 2 // max(1, planes.shape[0] * planes.shape[1] * 4))
    read = planes.reader(0)
    for a in range(0, planes.shape[2], step):
        block = np.empty(planes.shape[:2] + (min(step, planes.shape[2] - a),), np.float32, order="F")
        read(block, a)
        if not np.isfinite(block).all() or (block < 0).any():
            raise NiftiError(f"{path}: the sigma map must be finite and >= 0 everywhere (sigma in mm)")
        largest = max(largest, float(block.max(initial=0.0)))
    return largest


class _FileJob:
    """A file filtered into another slab by slab (filter_nifti, adaptive_filter_nifti): the output checks, the
    memory budget, and the run."""

    def __init__(self, src, dst, overwrite, max_memory):
        self.src, self.dst, self.overwrite = os.fspath(src), os.fspath(dst), overwrite
        if not overwrite and os.path.exists(self.dst):
            raise FileExistsError(errno.EEXIST, "output file exists (overwrite=False)", self.dst)
        self.budget = _slabs.WORK_BYTES if max_memory is None else _slabs.memory_bytes(max_memory, "max_memory")

    def run(self, source, reach, copies, pad_mode, for_volume, dtype, workers, progress, return_volume,
            also_read=()):
        """Every volume t of `source` through for_volume(t) -> filter_slab(block, planes, halo) (see
        _slabs.filter_volume), written to dst; the Volume filter_nifti returns. also_read: the other files
        the slabs read (a mask, a sigma map), checked to their end before the output is committed."""
        shape, nt = source.shape, source.nt
        compressed = self.dst.lower().endswith(".gz")
        # the gzip writer's blocks in flight come out of the budget (at most an eighth of it)
        gzip_bytes = min(self.budget // 8, _gzip.in_flight(resolve_workers(workers))) if compressed else 0
        budget = self.budget - gzip_bytes
        in_memory = np.prod(shape[:3], dtype=np.int64) * 4 * copies <= budget
        slab = shape[2] if in_memory else _slabs.thickness(shape, reach, 4, budget, copies)
        kept = []   # in memory, the volumes as written are also the returned Volume's data
        keep = in_memory and return_volume

        def advance(k1, t):   # planes done, over all volumes
            if progress is not None:
                progress(t * shape[2] + k1, nt * shape[2])

        def write(block):
            written = out.write(block, keep=keep)
            if keep:
                kept.append(written)

        out_shape = source.img_shape
        with NiftiWriter(self.dst, source, out_shape, dtype=dtype, overwrite=self.overwrite, workers=workers,
                         gzip_bytes=gzip_bytes or None) as out:
            for t in range(nt):
                _slabs.filter_volume(source.reader(t), shape[:2], np.float32, shape[2], reach, slab, pad_mode,
                                     for_volume(t), write, lambda k1, t=t: advance(k1, t))
            for planes in [source, *also_read]:
                planes.finish()   # a corrupt gzip stream fails here, before the output is committed
        if not return_volume:
            return None
        if in_memory:
            data = kept[0].reshape(out_shape, order="F") if len(kept) == 1 else np.stack(kept, axis=3)
            return Volume(data, source.affine, source.header.copy())
        with warnings.catch_warnings():   # the source's warnings were given already
            warnings.simplefilter("ignore", NiftiWarning)
            # as written: the output's own dtype, memory-mapped when it can be
            return load(self.dst, dtype=None, mmap="r" if not compressed else False)


class _Planes:
    """A NIfTI file open for reading plane by plane (a context manager): shape (X, Y, Z), nt volumes, and
    reader(t) -> read_into(view, a), which fills a Fortran-ordered (X, Y, m) float32 view with planes
    [a, a + m) of volume t, scaled as load() scales (straight from the file when the stored bytes are the
    values)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        with self._stack:
            self.img, self.finish = self._stack.enter_context(_source(self.path))
            self.affine, self.header = self.img.affine, self.img.header
            _warn_geometry(self.path, self.affine, self.header)
            shape = tuple(self.img.shape) + (1,) * (3 - len(self.img.shape))
            if len(shape) > 4 and any(n != 1 for n in shape[4:]):
                raise NiftiError(f"{self.path}: {len(shape)}-D data of shape {shape}; volconv reads 3-D and 4-D "
                                 f"volumes")
            self.img_shape = shape[:4] if len(self.img.shape) >= 4 else shape[:3]   # the output's data shape
            self.shape, self.nt = shape[:3], shape[3] if len(shape) >= 4 else 1
            self.zooms = tuple(float(z) for z in voxel_sizes(self.affine))
            self.raw = _raw_float32(self.path, self.img)
            if self.raw is not None:
                self._stack.enter_context(self.raw)
            self._stack = self._stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def reader(self, t):
        img, path, shape = self.img, self.path, self.shape
        plane_bytes = shape[0] * shape[1] * 4

        def read_into(view, a):
            m = view.shape[2]
            if self.raw is not None:   # the stored bytes are the values: read them straight into the block
                self.raw.seek(img.dataobj.offset + (t * shape[2] + a) * plane_bytes)
                if self.raw.readinto(memoryview(view.T).cast("B")) != m * plane_bytes:
                    raise NiftiError(f"{path}: truncated data (the file ended inside volume {t})")
                return
            index = (slice(None),) * min(len(img.shape), 2) + (slice(a, a + m),) * (len(img.shape) >= 3)
            index += (t,) * (len(img.shape) >= 4) + (0,) * max(0, len(img.shape) - 4)
            with _reading(path):
                view[...] = np.asarray(_scaled(img.dataobj, index, np.float32),
                                       dtype=np.float32).reshape(view.shape, order="F")
        return read_into


class _ArrayPlanes:
    """An array mask given in memory, read like a _Planes (3-D, or 4-D with one volume)."""

    def __init__(self, array):
        a = np.asarray(array)
        self.array = a[..., 0] if a.ndim == 4 and a.shape[3] == 1 else a
        self.img_shape, self.shape, self.nt = a.shape, self.array.shape, 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def finish(self):
        pass

    def reader(self, t):
        def read_into(view, a):
            view[...] = self.array[..., a:a + view.shape[2]]
        return read_into


def _raw_float32(path, img):
    """An open binary file of `path` when its data are stored as native float32 without scaling in a plain
    (uncompressed) file: the bytes are then the values load() gives, and slabs are read straight into place.
    None otherwise (nibabel reads and scales them)."""
    proxy = img.dataobj
    plain = isinstance(getattr(proxy, "file_like", None), str) and not path.lower().endswith((".gz", ".bz2", ".zst"))
    native = proxy.dtype == np.dtype(np.float32) and proxy.dtype.isnative
    unscaled = getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0
    return open(path, "rb") if plain and native and unscaled and proxy.order == "F" else None


def _scaled(proxy, slicer, dtype):
    """Planes of a nibabel array proxy scaled exactly as np.asarray(proxy, dtype) scales the whole array
    (what `load` does), so that slabs and the whole volume give the same numbers."""
    if hasattr(proxy, "_get_scaled"):   # nibabel's own path for __array__(dtype), restricted to the slicer
        return proxy._get_scaled(dtype=dtype, slicer=slicer)
    return np.asarray(proxy[slicer], dtype=dtype)


def _filter_volume(x, kernel, mode, cval, inside, normalize, outside, workers, halo=None):
    """One 3-D volume (or slab with `halo` planes of context along its last axis, not output): masked
    (outside voxels contribute nothing) and/or normalised filtering."""
    from .ops.filtering import filter_volume

    halo3 = None if halo is None else ((0, 0), (0, 0), tuple(halo))

    def correlate(v, m, c):
        return filter_volume("correlate", v, kernel, m, c, 0, "auto", workers, flip=False, halo=halo3)

    if inside is None and not normalize:
        return correlate(x, mode, cval)
    weighted = x
    if inside is not None:   # outside voxels are set to 0, not multiplied by 0: NaN * 0 would still be NaN
        weighted = x.copy(order="F")
        weighted[~inside] = 0
    if normalize:  # sum(k * w * x) / sum(k * w) over the voxels that exist and are inside
        num = correlate(weighted, "constant", 0.0)
        del weighted
        weight = np.ones(x.shape, x.dtype, order="F") if inside is None else inside.astype(x.dtype, order="F")
        den = correlate(weight, "constant", 0.0)
        del weight
        # a weight sum this small is no voxel at all (a local rule: slabs and the whole volume agree)
        tiny = 1e-12 * float(np.abs(kernel.to_dense()).sum())
        filtered = np.divide(num, den, out=np.zeros_like(num), where=np.abs(den) > tiny)
    else:
        filtered = correlate(weighted, mode, cval)
    if inside is not None:
        lo, hi = (0, 0) if halo is None else halo
        core = (Ellipsis, slice(lo, x.shape[2] - hi))
        keep = ~inside[core]
        filtered[keep] = x[core][keep] if outside == "keep" else 0
    return filtered
