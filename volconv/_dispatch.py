"""The front doors' view of their arguments: numpy arrays or torch tensors in (Caller: checked, as numpy arrays
for the engine, the result handed back in the caller's type, dtype and device), the tensors that must take the
torch adapter instead (gradients, a GPU, tracing), and torch's batching conventions. torch is never imported
here: a tensor can only come from a program that already imported it."""
import functools
import inspect
import numbers
import sys

import numpy as np

from . import _cuda
from .engine import cost
from ._validate import float_dtype, native


def torch_module():
    """torch when the program has imported it, else None."""
    return sys.modules.get("torch")


def is_tensor(x):
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def wants_autograd(*args):
    """True when a torch tensor among args needs a gradient (the op must go through its autograd Function), or
    while torch.compile / export trace tensors (the autograd paths are then volconv's custom operators)."""
    torch = torch_module()
    if torch is None:
        return False
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tensors and compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def compiling():
    """True while torch.compile / torch.export trace: tensor ops then go through volconv's custom operators
    (volconv/_torch), which the tracer can see into."""
    if torch_module() is None:
        return False
    from ._torch.common import compiling as tracing

    return tracing()


def all_finite(*arrays):
    """engine.cost.all_finite for arrays and tensors (on any device)."""
    torch = torch_module()
    return all(a is None or (bool(torch.isfinite(a.detach()).all()) if is_tensor(a) else cost.all_finite(a))
               for a in arrays)


def check_devices(op, arrays, names, *, cuda=False):
    """Every tensor among arrays (None skipped) on the first one's device, which must be the CPU or, when the
    op has a CUDA version (cuda) and the plugin and a GPU are there, a GPU."""
    present = [(a, n) for a, n in zip(arrays, names) if a is not None]
    first, first_name = present[0]
    for a, n in present:
        if _cuda.is_cuda(a):   # the one test of "runs on the plugin"
            _cuda.require(op, has_cuda_version=cuda)
        if str(_device(a)) != str(_device(first)):
            raise ValueError(f"{n} is on {_device(a)} but {first_name} is on {_device(first)}; "
                             "put them on the same device")
        if is_tensor(a) and a.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{n} is on device {a.device}; volconv runs on cpu and cuda")


def check_tensors(op, arrays, names, *, cuda=False):
    """The torch adapter's arguments checked where they stand (not converted): devices (check_devices), and
    every other tensor of the first one's dtype, as torch requires."""
    check_devices(op, arrays, names, cuda=cuda)
    first = arrays[0]
    if is_tensor(first) and not (first.is_floating_point() and not first.is_complex()):
        raise TypeError(f"{names[0]} has dtype {first.dtype}; volconv computes in float32 or float64: cast it first "
                        "(tensor.float())")
    for a, n in zip(arrays[1:], names[1:]):
        if is_tensor(a) and a.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {a.dtype} but {names[0]} has dtype {first.dtype}; they must match "
                            "(as in torch)")


def _device(x):
    return x.device if is_tensor(x) else "cpu"


class Caller:
    """What the caller gave (numpy or torch, dtype, device): numpy views for the kernels, results back."""

    def __init__(self, op, arrays, names, *, optional=("bias",), promote_ints=False):
        for a, n in zip(arrays, names):
            if a is None and n not in optional:
                raise TypeError(f"{n} must be a numpy array or a torch tensor, got None")
        first_name = next(n for a, n in zip(arrays, names) if a is not None)
        first = arrays[names.index(first_name)]
        self.torch_dtype = first.dtype if is_tensor(first) else None
        self.is_tensor = is_tensor(first)
        check_devices(op, arrays, names)
        self.arrays = [None if a is None else self._numpy(a, n) for a, n in zip(arrays, names)]
        # a big-endian array (as NIfTI files store) is the same numbers: computed and returned in native order
        self.caller_dtype = native(self.arrays[names.index(first_name)].dtype)
        self.dtype = float_dtype(self.caller_dtype, first_name, promote_ints=promote_ints)

    @staticmethod
    def _numpy(a, name):
        if is_tensor(a):
            torch = torch_module()
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
        if same_dtype and native(a.dtype) != self.caller_dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but input has dtype {self.caller_dtype}; "
                            "they must match (as in torch)")
        float_dtype(a.dtype, name, promote_ints=True)  # refuses complex / object / strings
        return np.ascontiguousarray(a, dtype=self.dtype)

    def result(self, out):
        """out (numpy, compute dtype) in the caller's type and dtype."""
        if self.is_tensor:
            torch = torch_module()
            t = torch.from_numpy(out)
            return t if t.dtype == self.torch_dtype or not self.torch_dtype.is_floating_point else \
                t.to(self.torch_dtype)
        if self.caller_dtype.kind == "f" and out.dtype != self.caller_dtype:
            return out.astype(self.caller_dtype)
        return out


def torch_batching(*also):
    """Decorator of every op and layer forward whose argument `input` is (N, C, D, H, W): torch's conventions
    for it, in one place. `also`: further arguments carrying the same batch axis (dynamic_conv3d's kernels).
    - an unbatched (C, D, H, W) input runs as a batch of one and comes back without the batch axis;
    - an empty batch (N = 0) runs the op on one item of zeros and returns its first 0 items: the result's
      shape, dtype, device and autograd graph are the op's own (no per-op shape code; the cost of one item),
      and the input's gradient is empty;
    - a volume with an empty axis (D, H or W = 0) is refused, as torch refuses it."""
    def decorate(fn):
        names = list(inspect.signature(fn).parameters)   # read once, not per call
        where = {name: names.index(name) for name in ("input",) + also}

        def get(args, kwargs, name):
            i = where[name]
            return args[i] if i < len(args) else kwargs.get(name)

        def mapped(args, kwargs, change):
            args, kwargs = list(args), dict(kwargs)
            for name, i in where.items():
                value = get(args, kwargs, name)
                if value is not None:
                    if i < len(args):
                        args[i] = change(value)
                    else:
                        kwargs[name] = change(value)
            return args, kwargs

        @functools.wraps(fn)
        def run(*args, **kwargs):
            x = get(args, kwargs, "input")
            shape = tuple(getattr(x, "shape", ()))
            if hasattr(x, "shape") and len(shape) not in (4, 5):
                raise ValueError(f"input must be 5-D (N, C, D, H, W) or 4-D (C, D, H, W) without the batch axis, "
                                 f"got shape {shape}")
            if len(shape) == 4:
                args, kwargs = mapped(args, kwargs, lambda a: a[None])
                return fn(*args, **kwargs)[0]
            if len(shape) == 5 and 0 in shape[2:]:
                raise ValueError(f"input has an empty volume, shape {shape}: D, H and W must be >= 1 (only the "
                                 "batch axis may be empty, as in torch)")
            if len(shape) == 5 and shape[0] == 0:
                args, kwargs = mapped(args, kwargs, _with_zero_item)
                return fn(*args, **kwargs)[:0]
            return fn(*args, **kwargs)
        return run
    return decorate


def _with_zero_item(a):
    """a (0, ...) with one item of zeros appended (joined to a's autograd graph when a is a tensor)."""
    if is_tensor(a):
        return torch_module().cat([a, a.new_zeros((1,) + tuple(a.shape[1:]))])
    a = np.asarray(a)
    return np.zeros((1,) + a.shape[1:], a.dtype)
