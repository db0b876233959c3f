"""The CUDA plugin's kernels on tensors: device pointers, the current stream of the tensors' device, the dtype
code (0: float32, 1: float64). Zero padding only: the callers pad other modes first."""
import torch

from .. import _cuda


def _stream(t):
    return torch.cuda.current_stream(t.device).cuda_stream


def _dtype(t):
    return 0 if t.dtype == torch.float32 else 1


def launch(op, name, params, shape, *inputs):
    """The plugin's function `name` on inputs (contiguous tensors; None: a null pointer) into a fresh tensor of
    `shape` (a list of shapes: several outputs, returned as a tuple), in the first input's dtype, on its device
    and stream: name(dtype code, input pointers..., output pointers..., params, stream), params from
    _cuda.params / _cuda.geometry."""
    like, several = inputs[0], isinstance(shape, list)
    outs = [torch.empty(s, dtype=like.dtype, device=like.device) for s in (shape if several else [shape])]
    with torch.cuda.device(like.device):
        _cuda.call(op, name, _dtype(like), *(None if t is None else t.data_ptr() for t in inputs),
                   *(o.data_ptr() for o in outs), params, _stream(like))
    return tuple(outs) if several else outs[0]


def conv3d_forward(x, w, b, spec):
    return launch("conv3d", "vc_conv3d_forward", _cuda.geometry(spec), spec.out_shape, x, w, b)


def conv3d_grad_input(grad, w, spec):
    return launch("conv3d backward (input)", "vc_conv3d_grad_input", _cuda.geometry(spec), spec.x_shape, grad, w)


def conv3d_grad_weight(x, grad, spec):
    return launch("conv3d backward (weight)", "vc_conv3d_grad_weight", _cuda.geometry(spec), spec.w_shape, x, grad)
