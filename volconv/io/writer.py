"""Writing NIfTI files: `save`, and `NiftiWriter`, the stream of header and data that it and the filters write.

save keeps the source header's geometry and metadata (affine, qform and sform with their codes, xyzt units, TR,
dim_info), writes float32 unless another dtype is asked for, never a new scale factor, and the file appears
atomically (io.atomic): it is written to a temporary file beside the target and renamed into place, so a
failure leaves neither a partial output nor a temporary file.
"""
import errno
import os
import stat
import warnings

import nibabel as nib
import numpy as np

from .._validate import workers as resolve_workers
from .atomic import fsync_directory, link_no_clobber, new_file_mode, temporary
from .parallel_gzip import ParallelGzipWriter
from .volume import NiftiWarning, Volume

NIFTI_EXTENSIONS = (".nii.gz", ".nii")   # the names of the files volconv writes (it reads any by content)
SAVE_DTYPES = tuple(np.dtype(t) for t in ("float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                           "uint32", "int64", "uint64"))


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
        ordinary gzip stream (volconv.io.parallel_gzip), the same data whatever the thread count.

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
        self.ext = next((e for e in NIFTI_EXTENSIONS if path.lower().endswith(e)), None)
        if self.ext is None:
            raise ValueError(f"{path}: output file name must end in .nii or .nii.gz")
        out_dtype = np.dtype(np.float32 if dtype is None else dtype)
        if out_dtype not in SAVE_DTYPES:
            raise ValueError(f"save: dtype must be one of {', '.join(str(d) for d in SAVE_DTYPES)}; got "
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
        self.mode = stat.S_IMODE(os.stat(self.path).st_mode) if os.path.exists(self.path) else new_file_mode()
        base = os.path.basename(self.path)
        try:
            fd, self.tmp = temporary(self.directory, base, self.ext)
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
                link_no_clobber(self.tmp, self.path)
        except BaseException as e:
            self._abandon(e)
        fsync_directory(self.directory)
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


def _open_temp(fd):
    """The writable file object for the temporary output (a seam for tests that simulate a full disk)."""
    return os.fdopen(fd, "wb")


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
