"""The CUDA plugin's kernels on tensors: device pointers, the current stream of the tensors' device, the dtype
code (0: float32, 1: float64). Zero padding only: the callers pad other modes first."""
import ctypes

import torch

from .. import _cuda


def _stream(t):
    return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)


def _dtype(t):
    return 0 if t.dtype == torch.float32 else 1


def conv3d_forward(x, w, b, spec):
    out = torch.empty(spec.out_shape, dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _cuda.call("conv3d", "vc_conv3d_forward", _dtype(x), x.data_ptr(), w.data_ptr(),
                   None if b is None else b.data_ptr(), out.data_ptr(), _cuda.geometry(spec), _stream(x))
    return out


def conv3d_grad_input(grad, w, spec):
    gx = torch.empty(spec.x_shape, dtype=grad.dtype, device=grad.device)
    with torch.cuda.device(grad.device):
        _cuda.call("conv3d backward (input)", "vc_conv3d_grad_input", _dtype(grad), grad.data_ptr(), w.data_ptr(),
                   gx.data_ptr(), _cuda.geometry(spec), _stream(grad))
    return gx


def conv3d_grad_weight(x, grad, spec):
    gw = torch.empty(spec.w_shape, dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device):
        _cuda.call("conv3d backward (weight)", "vc_conv3d_grad_weight", _dtype(x), x.data_ptr(), grad.data_ptr(),
                   gw.data_ptr(), _cuda.geometry(spec), _stream(x))
    return gw
