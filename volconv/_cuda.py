"""The CUDA plugin's loader: finds volconv/_cuda_plugin.so (cuda_plugin/, built by nvcc), checks its ABI, and calls
its C functions. ctypes is enough: device pointers, shapes and the caller's stream go in, an error code comes
out, and every failure becomes a RuntimeError naming the op. The tensors' side is volconv/_torch/cuda.py.

`require(op)` is what an op answers a CUDA tensor it cannot run (the plugin missing, no GPU, or no CUDA version
of that op yet)."""
import ctypes
import os
import struct
import sys

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cuda_plugin.so")
BUILD_HINT = ("build it with nvcc present: `VOLCONV_CUDA=1 pip install --no-build-isolation .`, or "
              "`python -m volconv.cuda build` in a source checkout (see cuda_plugin/README.md)")
ABI = 2
_lib = None
_load_error = None


def _library():
    """The loaded plugin, or None (the reason in _load_error)."""
    global _lib, _load_error
    if _lib is None and _load_error is None:
        path = os.environ.get("VOLCONV_CUDA_LIBRARY", LIBRARY)
        if not os.path.exists(path):
            _load_error = "volconv was built without its CUDA plugin"
            return None
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:   # e.g. no CUDA runtime on this machine
            _load_error = f"volconv's CUDA plugin ({path}) could not be loaded: {e}"
            return None
        lib.vc_cuda_error_string.restype = ctypes.c_char_p
        if lib.vc_cuda_abi() != ABI:
            _load_error = f"volconv's CUDA plugin ({path}) is from another version; rebuild it"
            return None
        _lib = lib
    return _lib


def has_cuda():
    """True when the CUDA plugin is built, torch sees a CUDA GPU, and so does the plugin's own CUDA runtime (a
    driver older than the runtime the plugin was built with shows there, not in torch)."""
    torch = sys.modules.get("torch")
    lib = _library()
    return lib is not None and torch is not None and torch.cuda.is_available() and lib.vc_cuda_device_count() > 0


def require(op, *, has_cuda_version=False):
    """Raise what an op answers a CUDA tensor it cannot run: the plugin missing, no GPU, or (has_cuda_version
    False) no CUDA version of this op yet. Returns when the op can run on the GPU."""
    if _library() is None:
        raise RuntimeError(f"{_load_error}: {op} cannot run on a CUDA tensor; {BUILD_HINT}")
    if not has_cuda():
        raise RuntimeError(f"volconv's CUDA plugin is built but no CUDA GPU is available to it (none, or a driver "
                           f"older than its CUDA runtime): {op} cannot run on a CUDA tensor here")
    if has_cuda_version:
        return
    raise RuntimeError(f"{op} has no CUDA version in volconv's plugin yet: move its tensors to the CPU "
                       "(.cpu()) or use torch's own op")


def is_cuda(a):
    """Whether a is a tensor the CUDA plugin computes (the one test every op's device dispatch asks)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor) and a.device.type == "cuda"


def call(op, name, dtype, *args):
    """The plugin's function `name` called as every one of them is declared (volconv_cuda.h): an int dtype code,
    then pointers (ints: device addresses; None: NULL; ctypes arrays: host parameters) and last the stream. A
    non-zero code raises a RuntimeError naming op."""
    code = getattr(_library(), name)(ctypes.c_int(dtype), *(a if isinstance(a, ctypes.Array) else ctypes.c_void_p(a)
                                                            for a in args))
    if code:
        raise RuntimeError(f"volconv CUDA {op}: {_lib.vc_cuda_error_string(code).decode()}")


def params(*values):
    """Host int64 parameters for a plugin function (its `const long long *`)."""
    return (ctypes.c_longlong * len(values))(*(int(v) for v in values))


def float_bits(value):
    """A float as the int64 of its IEEE-754 double: how a real number travels among params."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def geometry(spec, *extra):
    """A ConvSpec as the plugin's 22 geometry values (zero padding: only the 'before' pads), then extra values
    some functions take after them."""
    (N, C, D, H, W), (O, _, kd, kh, kw) = spec.x_shape, spec.w_shape
    return params(N, C, D, H, W, O, spec.groups, kd, kh, kw, *spec.out_shape[2:], *spec.stride,
                  *(lo for lo, _ in spec.pads), *spec.dilation, *extra)
