"""What every torch op of volconv shares: the compute dtype of a tensor, tensors to numpy and back, a ConvSpec as
an operator's plain arguments, threads as an operator argument, and whether torch.compile / export trace."""
import functools

import numpy as np
import torch

from .._validate import ConvSpec, workers as resolve_workers


def compute_dtype(t):
    """The dtype volconv computes a tensor in: float64 stays, every other dtype (float16, bfloat16, float32)
    computes in float32 and is cast back by the caller."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def tensor(a, like=None):
    """a as a torch tensor (numpy operands of a differentiable call join the autograd graph as constants), in
    like's dtype and on its device when given."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t if like is None else t.to(device=like.device, dtype=like.dtype)


def operand(a, dtype):
    """a (a tensor or an array) as a contiguous tensor of dtype, the form every op's kernels take."""
    return tensor(a).to(dtype).contiguous()


def numpy(t):
    """A tensor's values as a contiguous numpy array (None stays None)."""
    return None if t is None else t.detach().contiguous().numpy()


def empty(like):
    """The operators' placeholder for a gradient nobody asked for."""
    return like.new_empty(0)


def compiling():
    """True while torch.compile / torch.export trace: the ops then run as custom operators the tracer sees into."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def threads_arg(workers):
    """`workers` as the ops' int argument (0: None, all threads): resolved inside the op, not while tracing."""
    return 0 if workers is None else int(workers)


def threads(n):
    """An op's thread argument resolved (threads_arg's inverse)."""
    return resolve_workers(None if n == 0 else n)


def ints(values):
    return tuple(int(v) for v in values)   # symbolic sizes (torch.compile's dynamic shapes) become concrete


def spec(x_shape, w_shape, stride, pads, dilation, groups, mode, cval=0.0):
    """The ConvSpec of an op's plain arguments (spec_args' inverse)."""
    return _spec(ints(x_shape), ints(w_shape), ints(stride), ints(pads), ints(dilation), int(groups), mode,
                 float(cval))


@functools.lru_cache(maxsize=256)
def _spec(x_shape, w_shape, stride, pads, dilation, groups, mode, cval):
    """(Cached: a layer's forward and backward rebuild the same ConvSpec at every step; ConvSpecs are never
    modified.)"""
    return ConvSpec(x_shape, w_shape, stride=stride, pads=(pads[0:2], pads[2:4], pads[4:6]), dilation=dilation,
                    groups=groups, mode=mode, cval=cval)


def spec_args(spec):
    """A ConvSpec as the ops' plain arguments: stride, pads (6), dilation, groups, mode, cval."""
    return list(spec.stride), [p for lo_hi in spec.pads for p in lo_hi], list(spec.dilation), spec.groups, \
        spec.mode, float(spec.cval)
