"""Loader of the CUDA plugin (cuda_plugin/, built into volconv/_cuda_plugin.so by nvcc) and the CUDA versions of
the ops that have one. ctypes is enough: device pointers, shapes and the caller's stream go in, an error code
comes out, and every failure becomes a RuntimeError naming the op.

`require(op)` is what an op without a CUDA version (or any op, without the plugin or a GPU) answers a CUDA
tensor with; `conv3d` is the CUDA version of vc.conv3d (zero padding in the kernels; other padding modes pad
first; autograd by the plugin's input- and weight-gradient kernels)."""
import ctypes
import functools
import os
import sys

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cuda_plugin.so")
BUILD_HINT = ("build it with nvcc present: `VOLCONV_CUDA=1 pip install --no-build-isolation .`, or "
              "`python -m volconv.cuda build` in a source checkout (see cuda_plugin/README.md)")
ABI = 1
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
        for name in ("vc_conv3d_forward", "vc_conv3d_grad_input", "vc_conv3d_grad_weight"):
            getattr(lib, name).argtypes = [ctypes.c_int] + [ctypes.c_void_p] * (4 if name.endswith("forward")
                                                                                else 3) + [ctypes.c_void_p] * 2
        if lib.vc_cuda_abi() != ABI:
            _load_error = f"volconv's CUDA plugin ({path}) is from another version; rebuild it"
            return None
        _lib = lib
    return _lib


def has_cuda():
    """True when the CUDA plugin is built and a CUDA GPU is present."""
    torch = sys.modules.get("torch")
    return _library() is not None and torch is not None and torch.cuda.is_available()


def require(op):
    """Raise what an op answers a CUDA tensor it cannot run: the plugin missing, no GPU, or no CUDA version of
    this op yet."""
    if _library() is None:
        raise RuntimeError(f"{_load_error}: {op} cannot run on a CUDA tensor; {BUILD_HINT}")
    if not has_cuda():
        raise RuntimeError(f"volconv's CUDA plugin is built but no CUDA GPU is available: {op} cannot run on a "
                           "CUDA tensor here")
    raise RuntimeError(f"{op} has no CUDA version in volconv's plugin yet: move its tensors to the CPU "
                       "(.cpu()) or use torch's own op")


def is_cuda(a):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor) and a.device.type == "cuda"


def _call(op, fn, *args):
    code = fn(*args)
    if code:
        raise RuntimeError(f"volconv CUDA {op}: {_lib.vc_cuda_error_string(code).decode()}")


def _geometry(spec):
    (N, C, D, H, W), (O, _, kd, kh, kw) = spec.x_shape, spec.w_shape
    values = (N, C, D, H, W, O, spec.groups, kd, kh, kw, *spec.out_shape[2:], *spec.stride,
              *(lo for lo, _ in spec.pads), *spec.dilation)
    return (ctypes.c_longlong * 22)(*values)


def _stream(t):
    import torch

    return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)


def _dtype(t):
    import torch

    return 0 if t.dtype == torch.float32 else 1


def conv3d(input, weight, bias, stride, padding, dilation, groups, padding_mode):
    """vc.conv3d for CUDA tensors (float32 / float64; float16 / bfloat16 computed in float32)."""
    import torch

    from ._validate import ConvSpec
    from .ops.dense import conv_spec

    if _library() is None or not has_cuda():
        require("conv3d")
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None and (not isinstance(t, torch.Tensor) or t.device != input.device):
            raise ValueError(f"{name} must be a tensor on {input.device}, like input")
    if input.dim() != 5:
        raise ValueError(f"input must be 5-D (N, C, D, H, W), got shape {tuple(input.shape)}")
    spec = conv_spec(tuple(input.shape), tuple(weight.shape), bias, stride, padding, dilation, groups,
                     padding_mode)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(dtype)
    if spec.mode != "constant":   # reflect / replicate / circular: pad with torch, then zero-padding geometry
        x = torch.nn.functional.pad(x, [p for lo_hi in reversed(spec.pads) for p in lo_hi],
                                    mode=padding_mode)
        spec = ConvSpec(tuple(x.shape), spec.w_shape, stride=spec.stride, pads=((0, 0),) * 3,
                        dilation=spec.dilation, groups=spec.groups, mode="constant")
    # zero padding: the kernels read nothing outside the input, so 'before' is all they need and an asymmetric
    # 'after' (padding='same' with even kernels) is the output's size alone
    out = _function().apply(x.contiguous(), weight.to(dtype).contiguous(),
                            None if bias is None else bias.to(dtype).contiguous(), spec)
    return out.to(input.dtype)


@functools.cache
def _function():
    """The autograd Function, defined on first use (importing this module must not import torch)."""
    import torch
    from torch.autograd.function import once_differentiable

    class Function(torch.autograd.Function):
        """conv3d on the GPU by the plugin, forward and backward."""

        @staticmethod
        def forward(ctx, x, w, b, spec):
            ctx.spec, ctx.has_bias = spec, b is not None
            ctx.save_for_backward(x, w)
            out = torch.empty(spec.out_shape, dtype=x.dtype, device=x.device)
            _call("conv3d", _lib.vc_conv3d_forward, _dtype(x), x.data_ptr(), w.data_ptr(),
                  None if b is None else b.data_ptr(), out.data_ptr(), _geometry(spec), _stream(x))
            return out

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            g = grad.contiguous()
            gx = gw = gb = None
            if ctx.needs_input_grad[0]:
                gx = torch.empty_like(x)
                _call("conv3d backward (input)", _lib.vc_conv3d_grad_input, _dtype(x), g.data_ptr(), w.data_ptr(),
                      gx.data_ptr(), _geometry(ctx.spec), _stream(x))
            if ctx.needs_input_grad[1]:
                gw = torch.empty_like(w)
                _call("conv3d backward (weight)", _lib.vc_conv3d_grad_weight, _dtype(x), x.data_ptr(),
                      g.data_ptr(), gw.data_ptr(), _geometry(ctx.spec), _stream(x))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = g.sum(dim=(0, 2, 3, 4))
            return gx, gw, gb, None

    return Function


def __getattr__(name):
    """HAS_CUDA: has_cuda() at the moment it is read (whether torch sees a GPU can change after import)."""
    if name == "HAS_CUDA":
        return has_cuda()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
