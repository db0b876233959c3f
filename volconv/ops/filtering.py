"""vc.correlate / vc.convolve: scipy.ndimage's filtering of one 3-D volume (modes, cval, origin), for every kind
of kernel (dense, separable, sparse), and filter_volume, the slab-with-halo form io.filter_nifti runs."""
import numpy as np

from .. import _cuda
from .._dispatch import Caller, check_tensors, is_tensor, wants_autograd
from .._validate import ConvSpec, filter_origins, filter_pads, real_number, scipy_mode, triple
from .._validate import workers as resolve_workers
from ..engine import cost, dense
from ..engine import sparse as sparse_engine
from ..engine.separable import run_separable
from ..kernels import Kernel, SeparableKernel
from .conv import as_separable
from .sparse import SparseKernel


def filter_volume(op, volume, kernel, mode, cval, origin, algorithm, workers, *, flip, halo=None, output=None):
    """correlate / convolve. halo: per axis, (lo, hi) planes at the volume's ends that are context, not output
    (a slab of a larger volume, io.filter_nifti): those sides are not padded and the output omits them. Each
    must be at most the kernel's reach on that side. output: a numpy array to write the result into (returned)."""
    on_gpu = _cuda.is_cuda(volume)   # the CUDA plugin's conv3d, the volume padded by torch (_torch.conv)
    tensor_path = on_gpu or wants_autograd(volume)
    kernel = as_separable(kernel)
    # separable and sparse kernels run as such on the CPU engine and on the GPU (not in CPU autograd)
    separable = kernel if isinstance(kernel, SeparableKernel) and (on_gpu or not tensor_path) else None
    sparse_k = kernel if isinstance(kernel, SparseKernel) and (on_gpu or not tensor_path) else None
    if isinstance(kernel, Kernel):  # factored kernels are never built: a zero-stride stand-in gives the shape
        kernel = _stand_in(kernel) if separable is not None or sparse_k is not None else kernel.to_dense()
    if on_gpu:   # checked where they are; zero-stride stand-ins give the shapes below
        check_tensors(op, [volume, kernel], ["volume", "kernel"], cuda=True)
        caller, v, k = None, _stand_in(volume), _stand_in(kernel)
    else:
        caller = Caller(op, [volume, kernel], ["volume", "kernel"], promote_ints=True)
        v, k = caller.arrays
    if v.ndim != 3:
        raise ValueError(f"volume must be 3-D (D, H, W), got {v.ndim}-D shape {v.shape}")
    if k.ndim != 3:
        raise ValueError(f"kernel must be 3-D (kd, kh, kw), got {k.ndim}-D shape {k.shape}")
    if min(k.shape) < 1:
        raise ValueError(f"kernel must not be empty, got shape {k.shape}")
    mode = scipy_mode(mode)
    origins = triple(origin, "origin")
    if output is not None:
        _check_output(output, caller, v.shape, halo)
    if v.size == 0:   # nothing to filter: an empty result, as scipy.ndimage gives
        return volume.detach().clone() if on_gpu else _into(output, caller.result(np.empty(v.shape, caller.dtype)))
    # NIfTI data arrive in Fortran order: filter the transposed volume with the transposed kernel (no copy)
    fortran = v.flags.f_contiguous and not v.flags.c_contiguous
    halo = ((0, 0),) * 3 if halo is None else tuple(tuple(h) for h in halo)
    if fortran:
        v, k, origins, halo = v.T, k.T, origins[::-1], halo[::-1]
        if separable is not None:
            separable = SeparableKernel(separable.factors[::-1], separable.weights)
        if sparse_k is not None:
            sparse_k = SparseKernel(sparse_k.indices[:, ::-1], sparse_k.values, sparse_k.shape[::-1])
    origins = filter_origins(origins, k.shape, flip=flip, given=origin)
    if flip:  # convolution = correlation with the flipped kernel
        k = k[::-1, ::-1, ::-1]
        if separable is not None:
            separable = SeparableKernel([f[:, ::-1] for f in separable.factors], separable.weights)
    pads = tuple((lo - hlo, hi - hhi) for (lo, hi), (hlo, hhi) in zip(filter_pads(k.shape, origins), halo))
    spec = ConvSpec((1, 1) + v.shape, (1, 1) + k.shape, stride=(1, 1, 1), pads=pads, dilation=(1, 1, 1),
                    groups=1, mode=mode, cval=real_number(cval, "cval"))
    if sparse_k is not None:   # (1, 1, ...) taps sorted as the sparse kernels take them
        idx = np.array(sparse_k.shape) - 1 - sparse_k.indices if flip else sparse_k.indices
        order = np.lexsort(idx.T[::-1])
        idx5 = np.concatenate([np.zeros((idx.shape[0], 2), np.int64), idx[order]], axis=1)
        values = sparse_k.values[order]
    if on_gpu and separable is not None:
        from .._torch.lowrank import separable_kernel_conv3d

        return separable_kernel_conv3d(volume[None, None], separable, spec, workers)[0, 0]
    if on_gpu and sparse_k is not None:
        from .._torch.sparse import sparse_conv3d

        return sparse_conv3d(volume[None, None], idx5, values, None, spec, workers)[0, 0]
    if on_gpu or wants_autograd(volume, kernel):
        from .._torch import conv
        from .._torch.common import tensor

        w = tensor(kernel, like=volume if on_gpu or caller.is_tensor else None)
        w = w.flip((0, 1, 2)) if flip else w
        return conv.conv3d(tensor(volume, like=w)[None, None], w[None, None], None, spec,
                           dense.resolve_algorithm(algorithm), workers)[0, 0]
    v = caller.cast(v, "volume")
    if sparse_k is not None:
        out = sparse_engine.run(v[None, None], idx5, values.astype(v.dtype), None, spec, resolve_workers(workers))
    elif separable is not None:   # written straight into output when it has the layout and dtype computed in
        buf = output.T if output is not None and fortran else output
        direct = buf is not None and buf.dtype == v.dtype and buf.flags.c_contiguous \
            and not np.may_share_memory(buf, v)   # filtering in place (output=volume) goes through a copy
        out = run_separable(v[None, None], separable, spec, dense.resolve_algorithm(algorithm),
                            resolve_workers(workers), out=buf[None, None] if direct else None)
    else:
        k = caller.cast(k, "kernel")
        if algorithm == "auto" and not np.all(k) and not cost.all_finite(v):
            algorithm = "sparse"   # scipy's footprint: a zero weight is no tap, so NaN / Inf under it do not spread
        out = dense.run(v[None, None], k[None, None], None, spec, dense.resolve_algorithm(algorithm),
                        resolve_workers(workers))
    return _into(output, caller.result(out[0, 0].T if fortran else out[0, 0]))


def _check_output(output, caller, shape, halo):
    """output= as scipy.ndimage takes it: a writeable numpy array of the result's shape and a floating dtype."""
    if caller.is_tensor or not isinstance(output, np.ndarray):
        raise TypeError(f"output must be a numpy array (with a numpy volume), got {type(output).__name__}")
    want = tuple(n - lo - hi for n, (lo, hi) in zip(shape, halo or ((0, 0),) * 3))
    if output.shape != want:
        raise ValueError(f"output must have the result's shape {want}, got {output.shape}")
    if output.dtype.kind != "f" or not output.flags.writeable:
        raise ValueError(f"output must be a writeable float32 or float64 array, got {output.dtype}"
                         + ("" if output.flags.writeable else " (read-only)"))


def _into(output, result):
    """The result, copied into output when one was given and the kernel did not write there itself."""
    if output is None:
        return result
    if not np.may_share_memory(result, output):   # a view of output (written in place), or a fresh array
        np.copyto(output, result, casting="same_kind")
    return output


def correlate(volume, kernel, *, mode="reflect", cval=0.0, origin=0, algorithm="auto", workers=None, output=None):
    """Multidimensional correlation of one 3D volume, with the results of ``scipy.ndimage.correlate``.

    mode: "reflect" (d c b a | a b c d), "constant" (cval outside), "nearest", "mirror" (d c b | a b c d) or
    "wrap"; origin: int or per-axis triple, shifts the kernel as in scipy. Integer volumes are computed and
    returned as float (numpy's promotion with float32), not rounded back to the integer type.
    cval enters only the outputs whose window leaves the volume (any value, NaN and +-Inf included: elsewhere
    the result is as exact as with cval=0). As in scipy, a zero weight is not part of the filter: NaN / Inf in
    the volume or in cval spread only through non-zero weights (with algorithm="auto"; "direct" and "torch"
    multiply zero weights like torch.conv3d, "fft" spreads a non-finite volume over the whole output).
    output: a numpy array of the volume's shape (float32 or float64) to write the result into, as scipy's; it is
    returned. A separable kernel (the Gaussian) writes straight into it when it is contiguous in the volume's
    order and of the compute dtype: no new array, none of the page faults a fresh result costs."""
    return filter_volume("correlate", volume, kernel, mode, cval, origin, algorithm, workers, flip=False,
                         output=output)


def convolve(volume, kernel, *, mode="reflect", cval=0.0, origin=0, algorithm="auto", workers=None, output=None):
    """Multidimensional convolution of one 3D volume, with the results of ``scipy.ndimage.convolve``.
    Arguments as `correlate`."""
    return filter_volume("convolve", volume, kernel, mode, cval, origin, algorithm, workers, flip=True,
                         output=output)


def _stand_in(a):
    """A zero-stride float32 array of a's shape (a tensor's or a kernel object's; an array-like as an array): what
    the checks and the geometry read, never computed with."""
    if is_tensor(a) or isinstance(a, Kernel):
        return np.broadcast_to(np.float32(0), tuple(a.shape))
    return np.asarray(a)
