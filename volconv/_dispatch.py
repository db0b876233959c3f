"""One dispatch point for every op: numpy arrays and torch tensors in, numpy arrays out to the kernels, and the
result handed back in the caller's type, dtype and device. torch is never imported here: a tensor can only
come from a program that already imported it."""
import numbers
import sys

import numpy as np

from . import _cuda
from ._validate import float_dtype


def _torch():
    return sys.modules.get("torch")


def is_tensor(x):
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def wants_autograd(*args):
    """True when a torch tensor among args needs a gradient (the op must go through its autograd Function), or
    while torch.compile / export trace tensors (the autograd paths are then volconv's custom operators)."""
    torch = _torch()
    if torch is None:
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tensors and (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def compiling():
    """True while torch.compile / torch.export trace: tensor ops then go through volconv's custom operators
    (nn/_library.py), which the tracer can see into."""
    torch = _torch()
    return torch is not None and (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def _device(x):
    return x.device if is_tensor(x) else "cpu"


class Caller:
    """What the caller gave (numpy or torch, dtype, device): numpy views for the kernels, results back."""

    def __init__(self, op, arrays, names, *, optional=("bias",), promote_ints=False):
        for a, n in zip(arrays, names):
            if a is None and n not in optional:
                raise TypeError(f"{n} must be a numpy array or a torch tensor, got None")
        present = [(a, n) for a, n in zip(arrays, names) if a is not None]
        first, first_name = present[0]
        self.torch_dtype = first.dtype if is_tensor(first) else None
        self.is_tensor = is_tensor(first)
        for a, n in present:
            if is_tensor(a) and a.device.type == "cuda":
                _cuda.require(op)
            if str(_device(a)) != str(_device(first)):
                raise ValueError(f"{n} is on {_device(a)} but {first_name} is on {_device(first)}; "
                                 "put them on the same device")
            if is_tensor(a) and a.device.type != "cpu":
                raise ValueError(f"{n} is on device {a.device}; volconv runs on cpu and cuda")
        self.arrays = [None if a is None else self._numpy(a, n) for a, n in zip(arrays, names)]
        self.caller_dtype = self.arrays[names.index(first_name)].dtype
        self.dtype = float_dtype(self.caller_dtype, first_name, promote_ints=promote_ints)

    @staticmethod
    def _numpy(a, name):
        if is_tensor(a):
            torch = _torch()
            a = a.detach()
            if a.dtype == torch.bfloat16:  # numpy has no bfloat16: computed in float32 like float16
                a = a.float()
            if a.is_complex() or a.is_sparse:
                raise TypeError(f"{name} must be a dense real tensor, got {a.dtype} "
                                f"{'sparse' if a.is_sparse else ''}".rstrip())
            return a.numpy()
        if isinstance(a, np.ndarray):
            return a
        if isinstance(a, (list, tuple, numbers.Number)):  # array-likes of numbers are welcome
            arr = np.asarray(a)
            if arr.dtype.kind in "biufc":
                return arr
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(a).__name__}")

    def cast(self, a, name, *, same_dtype=False):
        """a as a C-contiguous array of the compute dtype. same_dtype: refuse a different float dtype (torch's
        rule for input and weight)."""
        if a is None:
            return None
        if same_dtype and a.dtype != self.caller_dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but input has dtype {self.caller_dtype}; "
                            "they must match (as in torch)")
        float_dtype(a.dtype, name, promote_ints=True)  # refuses complex / object / strings
        return np.ascontiguousarray(a, dtype=self.dtype)

    def result(self, out):
        """out (numpy, compute dtype) in the caller's type and dtype."""
        if self.is_tensor:
            torch = _torch()
            t = torch.from_numpy(out)
            return t if t.dtype == self.torch_dtype or not self.torch_dtype.is_floating_point else \
                t.to(self.torch_dtype)
        if self.caller_dtype.kind == "f" and out.dtype != self.caller_dtype:
            return out.astype(self.caller_dtype)
        return out
