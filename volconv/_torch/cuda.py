"""The CUDA plugin's kernels on tensors: device pointers, the current stream of the tensors' device, the dtype
code (0: float32, 1: float64). Zero padding only: the callers pad other modes first."""
import ctypes

import torch

from .. import _cuda


def _stream(t):
    return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)


def _dtype(t):
    return 0 if t.dtype == torch.float32 else 1


def _launch(op, name, spec, shape, *inputs):
    """The plugin's function `name` on inputs (None: a null pointer) into a fresh tensor of this shape, on the
    first input's device and stream: (dtype code, input pointers..., output pointer, geometry, stream)."""
    like = inputs[0]
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    with torch.cuda.device(like.device):
        _cuda.call(op, name, _dtype(like), *(None if t is None else t.data_ptr() for t in inputs), out.data_ptr(),
                   _cuda.geometry(spec), _stream(like))
    return out


def conv3d_forward(x, w, b, spec):
    return _launch("conv3d", "vc_conv3d_forward", spec, spec.out_shape, x, w, b)


def conv3d_grad_input(grad, w, spec):
    return _launch("conv3d backward (input)", "vc_conv3d_grad_input", spec, spec.x_shape, grad, w)


def conv3d_grad_weight(x, grad, spec):
    return _launch("conv3d backward (weight)", "vc_conv3d_grad_weight", spec, spec.w_shape, x, grad)
