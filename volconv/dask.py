"""Scale-out with Dask: one volume too large for one call, filtered block by block (`filter`, on a
dask.array), and many scans filtered as dask.distributed tasks, one per scan (`filter_files`).

Needs the optional extra: `pip install volconv[dask]` (dask[array] and distributed). Nothing here imports
dask until a function is called, so `import volconv.dask` works without it.

Exactness of `filter`: every block is extended by its neighbours' voxels (dask.array.map_overlap) as far as
the kernel reaches, filtered by volconv with the caller's mode, and trimmed back. Interior faces thus see
their real neighbours; only the true volume edges are filled by `mode`/`cval` inside volconv, as in one call
on the whole volume ('wrap', whose fill comes from the opposite edge, gets dask's periodic boundary instead).
Each kept voxel is the same sum of the same products as in `vc.correlate` on the whole volume; only the
algorithm chosen per block (direct or FFT, by the cost model) and the vector/scalar split of a row can round
it differently.
"""
import os
import uuid

__all__ = ["filter", "filter_files"]


def _require_dask(*, distributed=False):
    """dask.array (and distributed.Client with distributed=True), or an ImportError saying how to get them."""
    try:
        import dask.array as da
    except ImportError:
        raise ImportError("volconv.dask needs dask: install volconv[dask] (pip install 'volconv[dask]', "
                          "which brings dask[array] and distributed)") from None
    if not distributed:
        return da
    try:
        import distributed as dd
    except ImportError:
        raise ImportError("volconv.dask.filter_files needs dask.distributed: install volconv[dask] "
                          "(pip install 'volconv[dask]', which brings dask[array] and distributed)") from None
    return dd


# ------------------------------------------------------------------------------------------- one volume


def _block_chunks(chunks, depth):
    """Chunks along one axis such that each neighbour holds `depth` voxels: unchanged when they already do;
    one chunk when the axis is not longer than depth; else neighbouring chunks merged (dask's
    ensure_minimum_chunksize)."""
    from dask.array.overlap import ensure_minimum_chunksize

    if len(chunks) == 1 or min(chunks) >= depth:
        return tuple(chunks)
    if sum(chunks) <= 2 * depth:
        return (sum(chunks),)
    return tuple(ensure_minimum_chunksize(depth, tuple(chunks)))


def _filter_block(block, kernel, *, op, mode, cval, origin, algorithm, workers):
    from .ops.filtering import convolve, correlate

    filt = convolve if op == "convolve" else correlate
    return filt(block, kernel, mode=mode, cval=cval, origin=origin, algorithm=algorithm, workers=workers)


def filter(array, kernel, *, mode="reflect", cval=0.0, origin=0, convolve=False, workers=1, algorithm="auto"):
    """Correlate (or, with convolve=True, convolve) a 3-D dask array chunk by chunk with
    dask.array.map_overlap; the result equals vc.correlate / vc.convolve on the whole volume (to the rounding
    of the dtype: the same sum per voxel, possibly by another algorithm per block).

    array: a 3-D dask.array (anything else array-like is wrapped by dask.array.asarray with automatic chunks).
    kernel: a 3-D array or a vc.kernels object (separable kernels run as 1-D passes in every block).
    mode, cval, origin, algorithm: as vc.correlate. workers: threads volconv uses inside each block (default 1:
    dask already runs blocks in parallel; None: all OpenMP allows, as in vc.correlate). Returns a lazy dask
    array with the chunks of `array` and the dtype vc.correlate gives (float32 for float32 and small integers,
    float64 for float64 and large integers).

    Each block is extended on its interior faces by the kernel's reach (max(lo, hi) per axis, see
    _validate.filter_pads); chunks smaller than that reach are merged with their neighbours for the computation and
    the result is rechunked back to the chunks of `array`."""
    da = _require_dask()
    import numpy as np

    from ._validate import filter_origins, filter_pads, real_number, scipy_mode, triple
    from ._validate import workers as resolve_workers
    from .kernels import Kernel
    from .ops.filtering import correlate

    if not isinstance(array, da.Array):
        array = da.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"array must be 3-D (D, H, W), got {array.ndim}-D shape {array.shape}")
    if not isinstance(kernel, Kernel):
        kernel = np.asarray(kernel)
    shape = tuple(kernel.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"kernel must be a non-empty 3-D array or a vc.kernels object, got shape {shape}")
    mode = scipy_mode(mode)
    origins = triple(origin, "origin")
    filter_origins(origins, shape, flip=convolve, given=origin)  # refused here rather than in every block
    resolve_workers(workers)  # refused here rather than in every block
    # the dtype volconv returns for this input (float32 kept, integers promoted), from a one-voxel call
    dtype = correlate(np.zeros((1, 1, 1), array.dtype), np.ones((1, 1, 1)), mode=mode, workers=1).dtype

    # convolve reaches the same distances mirrored, so max(lo, hi) serves both
    reach = [max(lo, hi) for lo, hi in filter_pads(shape, origins)]
    chunks = tuple(_block_chunks(c, d) for c, d in zip(array.chunks, reach))
    blocks = array.rechunk(chunks) if chunks != array.chunks else array
    # an axis in one chunk needs no overlap: volconv's mode handles both of its edges, as in one call
    depth = {axis: (d if len(c) > 1 else 0) for axis, (c, d) in enumerate(zip(chunks, reach))}
    boundary = {axis: "periodic" if mode == "wrap" and depth[axis] else "none" for axis in range(3)}
    out = blocks.map_overlap(_filter_block, depth=depth, boundary=boundary, trim=True, allow_rechunk=False,
                             dtype=dtype, meta=np.empty((0, 0, 0), dtype),
                             token=f"volconv-{'convolve' if convolve else 'correlate'}",
                             kernel=kernel, op="convolve" if convolve else "correlate", mode=mode,
                             cval=real_number(cval, "cval"), origin=origins, algorithm=algorithm, workers=workers)
    return out.rechunk(array.chunks) if out.chunks != array.chunks else out


# ------------------------------------------------------------------------------------------- many scans


class Cluster:
    """A dask.distributed Client for `scheduler`: an address ('tcp://host:8786'), a Client (used as is, left
    open), a cluster object (has .scheduler_address), or None / 'local' for a local cluster in this process
    (threads; volconv's kernels and zlib release the GIL), closed on exit."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.client = self.cluster = None
        self.owned = False

    def __enter__(self):
        dd = _require_dask(distributed=True)
        s = self.scheduler
        if isinstance(s, dd.Client):
            self.client = s
            return s
        self.owned = True
        if s is None or s == "local":
            self.cluster = dd.LocalCluster(n_workers=1, threads_per_worker=os.cpu_count() or 1, processes=False,
                                           dashboard_address=":0")
            s = self.cluster
        elif isinstance(s, str):
            _check_address(s)
        elif not hasattr(s, "scheduler_address"):
            raise TypeError(f"scheduler must be an address ('tcp://host:8786'), a distributed.Client, 'local' "
                            f"or None, got {s!r}")
        try:
            self.client = dd.Client(s, set_as_default=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.client

    def __exit__(self, *exc):
        if self.owned:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        return False


def _check_address(address):
    """Refuse a malformed scheduler address before distributed.Client tries it (a Client that fails to parse
    its address hangs for a minute when it is collected)."""
    from distributed.comm import get_address_host_port, parse_address

    try:
        if parse_address(address)[0] in ("tcp", "tls", "ws", "wss"):
            get_address_host_port(address)
    except ValueError as e:
        raise ValueError(f"{address!r} is not a scheduler address like tcp://host:8786 ({e})") from None


def _absolute(path):
    return os.path.abspath(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path


def run_files(client, func, pairs, *args, **kwargs):
    """func(src, dst, *args, **kwargs) for every (src, dst) as a task on client's workers, one per scan, paths
    made absolute here (the workers' working directory is not the caller's: they need a shared filesystem).
    Yields (index, result, exception) as the tasks finish; unfinished tasks are cancelled if the caller stops
    early (an error, Ctrl-C)."""
    dd = _require_dask(distributed=True)
    futures = {}
    try:
        for i, (src, dst) in enumerate(pairs):
            key = f"volconv-{os.path.basename(os.fspath(dst))}-{uuid.uuid4().hex}"  # named on the dashboard
            future = client.submit(func, _absolute(src), _absolute(dst), *args, key=key, **kwargs)
            futures[future] = i
        for future in dd.as_completed(futures, loop=client.loop):
            try:
                result, exc = future.result(), None
            except Exception as e:  # the task's own exception, re-raised here by distributed
                result, exc = None, e
            yield futures[future], result, exc
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending)


def _filter_one(src, dst, kernel, overwrite, kwargs):
    from .io import filter_nifti

    filter_nifti(src, dst, kernel, overwrite=overwrite, **kwargs)
    return dst


def _names_file(exc, paths):
    text = str(exc)
    return getattr(exc, "filename", None) is not None or any(os.fspath(p) in text for p in paths)


def filter_files(pairs, kernel, *, scheduler=None, overwrite=False, **filter_nifti_kwargs):
    """vc.filter_nifti(src, dst, kernel, ...) for many (src, dst) pairs as dask.distributed tasks, one per scan.

    scheduler: an address ('tcp://host:8786'), a distributed.Client (left open), or None (or 'local') for a
    local cluster in this process, closed afterwards. Paths are made absolute here and must mean the same
    files on every worker (a shared filesystem). kernel: as filter_nifti (an array, a vc.kernels object, or a
    callable zooms -> kernel, sent to the workers by pickling). filter_nifti_kwargs: mode, cval, mask,
    normalize, outside, dtype, workers (threads per scan; default 1 here, since every worker thread filters
    its own scan). Every file is attempted; returns the list of dst paths, or raises the first failure (in
    the order of `pairs`) with its file named, after all tasks have finished."""
    pairs = [(src, dst) for src, dst in pairs]
    filter_nifti_kwargs.setdefault("workers", 1)
    if "mask" in filter_nifti_kwargs:
        filter_nifti_kwargs["mask"] = _absolute(filter_nifti_kwargs["mask"])
    failures = {}
    with Cluster(scheduler) as client:
        for i, _, exc in run_files(client, _filter_one, pairs, kernel, overwrite, filter_nifti_kwargs):
            if exc is not None:
                failures[i] = exc
    if failures:
        i = min(failures)
        exc = failures[i]
        src, dst = pairs[i]
        if not _names_file(exc, [src, dst, _absolute(src), _absolute(dst)]):
            exc = RuntimeError(f"{os.fspath(src)}: {type(exc).__name__}: {exc}")
            exc.__cause__ = failures[i]
        if len(failures) > 1 and hasattr(exc, "add_note"):
            exc.add_note(f"volconv.dask.filter_files: {len(failures)} of {len(pairs)} files failed; this is the "
                         "first of them")
        raise exc
    return [os.fspath(dst) for _, dst in pairs]
