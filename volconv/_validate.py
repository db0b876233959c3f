"""Argument normalisers shared by every public function (one place, one vocabulary).

Errors name the argument and say what was expected. Compiled kernels trust what leaves here.
"""
import numbers
import os

import numpy as np

# The one table of boundary modes: scipy.ndimage's names (volconv's vocabulary), and each mode's name in
# torch.nn.Conv3d's padding_mode, torch.nn.functional.pad and numpy.pad (None: that library lacks it).
MODES = {
    # scipy      padding_mode  F.pad        np.pad
    "reflect":  (None,         None,        "symmetric"),   # d c b a | a b c d | d c b a
    "constant": ("zeros",      "constant",  "constant"),
    "nearest":  ("replicate",  "replicate", "edge"),
    "mirror":   ("reflect",    "reflect",   "reflect"),     # d c b | a b c d | c b a
    "wrap":     ("circular",   "circular",  "wrap"),
}
SCIPY_MODES = tuple(MODES)
SCIPY_ALIASES = {"grid-mirror": "reflect", "grid-constant": "constant", "grid-wrap": "wrap"}
TORCH_PADDING_MODES = {names[0]: mode for mode, names in MODES.items() if names[0]}
TORCH_PAD_MODES = {mode: names[1] for mode, names in MODES.items() if names[1]}
NUMPY_PAD_MODES = {mode: names[2] for mode, names in MODES.items()}
INT_MAX = 2**31 - 1   # the compiled kernels take strides, dilations and paddings as C ints


def five_d(shape, name="input"):
    """The shape of an input (a shape tuple, an array, a tensor or an array-like), checked to be 5-D
    (N, C, D, H, W)."""
    if not (isinstance(shape, tuple) and not any(hasattr(n, "__len__") for n in shape)):   # (sizes may be symbolic)
        shape = tuple(shape.shape) if hasattr(shape, "shape") else np.shape(shape)
    if len(shape) != 5:
        raise ValueError(f"{name} must be 5-D (N, C, D, H, W), got shape {shape}")
    return shape


def triple(value, name, *, minimum=None, maximum=None):
    """An int or a sequence of 3 ints -> tuple of 3 ints, each >= minimum and <= maximum."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        out = (int(value),) * 3
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a sequence of 3 ints, got {value!r}") from None
        if len(out) != 3 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in out):
            raise ValueError(f"{name} must be an int or a sequence of 3 ints, got {value!r}")
        out = tuple(int(v) for v in out)
    if minimum is not None and min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    if maximum is not None and max(out) > maximum:
        raise ValueError(f"{name} must be <= {maximum} on every axis, got {value!r}")
    return out


def scipy_mode(mode, name="mode"):
    """scipy.ndimage boundary mode (aliases resolved)."""
    if not isinstance(mode, str) or SCIPY_ALIASES.get(mode, mode) not in SCIPY_MODES:
        raise ValueError(f"{name} must be one of {', '.join(SCIPY_MODES)}, got {mode!r}")
    return SCIPY_ALIASES.get(mode, mode)


def torch_padding_mode(padding_mode):
    """torch.nn.Conv3d padding_mode -> scipy boundary mode."""
    if padding_mode not in TORCH_PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {', '.join(TORCH_PADDING_MODES)}, got {padding_mode!r}")
    return TORCH_PADDING_MODES[padding_mode]


def conv_padding(padding, kernel_size, dilation, stride):
    """torch conv3d padding (int | triple | 'same' | 'valid') -> ((lo, hi),) * 3."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * 3
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported with stride > 1 (as in torch), got stride "
                                 f"{stride}")
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))  # torch puts the odd extra at the end
            return tuple(pads)
        raise ValueError(f"padding must be an int, a triple, 'same' or 'valid', got {padding!r}")
    p = triple(padding, "padding", maximum=INT_MAX)
    if min(p) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return tuple((v, v) for v in p)


def workers(value):
    """scipy.fft's meaning: None -> every thread OpenMP allows (respects threadpoolctl and OMP_NUM_THREADS);
    n > 0 -> n threads; n < 0 -> counts back from the core count (-1 = all cores). In a fork child, 1
    (_cpu.threads: GNU OpenMP is not fork-safe)."""
    from ._cpu import threads

    if value is None:
        return threads()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value == 0:
        raise ValueError(f"workers must be None or a non-zero int, got {value!r}")
    if value > 0:
        return threads(int(value))
    cores = os.cpu_count() or 1
    n = cores + 1 + int(value)
    if n < 1:
        raise ValueError(f"workers={value} asks for fewer than one thread on {cores} cores")
    return threads(n)


def filter_origins(origins, shape, *, flip, name="origin", given=None):
    """scipy.ndimage origins (a triple) of a kernel of this shape -> the origins of the correlation that runs:
    convolve (flip) correlates with the flipped kernel, its centre moved as scipy.ndimage does. Each must keep
    the kernel on its centre voxel's range, as scipy requires."""
    if flip:
        origins = tuple(-o - (1 - n % 2) for o, n in zip(origins, shape))
    for o, n in zip(origins, shape):
        if not -(n // 2) <= o <= (n - 1) // 2:
            raise ValueError(f"{name} {given if given is not None else origins!r} moves the kernel of size {n} off "
                             f"its centre: each origin must lie in [-(size // 2), (size - 1) // 2]")
    return tuple(origins)


def filter_pads(shape, origins):
    """((lo, hi),) * 3: the voxels a kernel of this shape reaches below and above each output voxel (the
    padding of scipy.ndimage's correlate) for correlation-frame origins."""
    return tuple((n // 2 + o, n - 1 - (n // 2 + o)) for n, o in zip(shape, origins))


def float_dtype(dtype, name, *, promote_ints):
    """float32/float64 -> itself; float16 -> float32 (computed there, cast back by the caller);
    ints and bools -> the smallest float that holds them when promote_ints, else TypeError. Byte order is a
    storage detail (NIfTI files are often big-endian): the answer is always the native-order type."""
    dtype = native(dtype)
    if dtype in (np.float32, np.float64):
        return dtype
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype.kind in "biu" and promote_ints:
        return np.promote_types(dtype, np.float32)
    if dtype.kind == "c":
        raise TypeError(f"{name} has complex dtype {dtype}; volconv supports real float32 and float64")
    if dtype.kind in "biu":  # torch's CPU conv3d computes integers exactly; a silent cast would not
        raise TypeError(f"{name} has integer dtype {dtype}; volconv computes in float32 or float64: cast it "
                        "first (tensor.float(), array.astype(np.float32))")
    raise TypeError(f"{name} has dtype {dtype}; volconv supports float32 and float64"
                    + (" (and integer volumes, promoted)" if promote_ints else ""))


def native(dtype):
    """dtype in the machine's byte order (np.dtype('>f4') -> float32), as scipy and torch compute."""
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def real_number(value, name):
    """A real number (int, float, numpy scalar or 0-d array; NaN and Inf allowed) -> float; else TypeError
    naming the argument (float("abc") and float(None) say neither which argument nor what it wants)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)) or \
            (isinstance(value, np.ndarray) and (value.ndim or value.dtype.kind not in "iuf")):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def pad_index(n, lo, hi, mode):
    """Index map of an axis of length n padded by (lo, hi) under a scipy boundary mode.

    Returns int64 array of length n + lo + hi: the source index of every padded position, -1 where the
    value is the constant (mode 'constant'). lo/hi may be negative (cropping)."""
    p = np.arange(-lo, n + hi, dtype=np.int64)
    if mode == "constant":
        return np.where((p >= 0) & (p < n), p, -1)
    if mode == "nearest":
        return np.clip(p, 0, n - 1)
    if mode == "wrap":
        return np.mod(p, n)
    if mode == "reflect":  # d c b a | a b c d | d c b a   (period 2n)
        q = np.mod(p, 2 * n)
        return np.where(q < n, q, 2 * n - 1 - q)
    if mode == "mirror":  # d c b | a b c d | c b a       (period 2n - 2)
        if n == 1:
            return np.zeros_like(p)
        q = np.mod(p, 2 * n - 2)
        return np.where(q < n, q, 2 * n - 2 - q)
    raise ValueError(f"unknown boundary mode {mode!r}")


def pad_array(x, pads, mode, cval=0.0):
    """x (..., D, H, W) padded along its last three axes by pads ((lo, hi),) * 3 under a scipy mode
    ('constant' pads with cval; negative pads crop). Any padding size works (reflection repeats, as in
    scipy.ndimage)."""
    if mode == "constant" and min(min(p) for p in pads) >= 0:
        return np.pad(x, ((0, 0),) * (x.ndim - 3) + tuple(pads), constant_values=cval)
    for axis, (lo, hi) in zip(range(x.ndim - 3, x.ndim), pads):
        idx = pad_index(x.shape[axis], lo, hi, mode)
        x = np.take(x, np.maximum(idx, 0), axis=axis)
        if mode == "constant":
            shape = [1] * x.ndim
            shape[axis] = idx.size
            x = np.where((idx >= 0).reshape(shape), x, x.dtype.type(cval))
    return x


class ConvSpec:
    """Checked geometry of one convolution: NCDHW input, (O, C/groups, kd, kh, kw) weight, padding in
    scipy boundary-mode terms. Every algorithm receives one of these."""

    def __init__(self, x_shape, w_shape, *, stride, pads, dilation, groups, mode, cval=0.0):
        five_d(x_shape)
        if len(w_shape) != 5:
            raise ValueError(f"weight must be 5-D (out_channels, in_channels/groups, kd, kh, kw), "
                             f"got shape {tuple(w_shape)}")
        if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        N, C = x_shape[:2]
        O, Cg = w_shape[:2]
        if C % groups:
            raise ValueError(f"groups={groups} must divide the input's {C} channels")
        if O % groups:
            raise ValueError(f"groups={groups} must divide weight's {O} output channels")
        if Cg * groups != C:
            raise ValueError(f"weight has {Cg} input channels per group, so with groups={groups} the input "
                             f"must have {Cg * groups} channels, got {C}")
        if min(w_shape) < 1:
            raise ValueError(f"weight must not be empty, got shape {tuple(w_shape)}")
        self.stride, self.dilation, self.pads = stride, dilation, pads
        self.groups, self.mode, self.cval = int(groups), mode, cval
        self.x_shape, self.w_shape = tuple(x_shape), tuple(w_shape)
        out = []
        for axis, (n, k, s, d, (lo, hi)) in enumerate(zip(x_shape[2:], w_shape[2:], stride, dilation, pads)):
            extent, padded = d * (k - 1) + 1, n + lo + hi
            if extent > padded:
                raise ValueError(f"weight's kernel (extent {extent} with dilation {d}) is larger than the padded "
                                 f"input ({padded}) along spatial axis {axis}")
            out.append((padded - extent) // s + 1)
        self.out_shape = (N, O) + tuple(out)

    def with_cval(self, cval):
        return ConvSpec(self.x_shape, self.w_shape, stride=self.stride, pads=self.pads, dilation=self.dilation,
                        groups=self.groups, mode=self.mode, cval=cval)

    def padded(self):
        """The same convolution on an input already padded by self.pads."""
        shape = self.x_shape[:2] + tuple(n + lo + hi for n, (lo, hi) in zip(self.x_shape[2:], self.pads))
        return ConvSpec(shape, self.w_shape, stride=self.stride, pads=((0, 0),) * 3, dilation=self.dilation,
                        groups=self.groups, mode="constant")

    @property
    def kernel_size(self):
        return self.w_shape[2:]

    def reach(self):
        """Per axis, how far the dilated kernel reaches past its first tap: (k - 1) * dilation."""
        return tuple((k - 1) * d for k, d in zip(self.kernel_size, self.dilation))

    def transposed_pads(self):
        """Padding of the transposed convolution at stride 1 (the input gradient: the output gradient correlated
        with the flipped kernel): the reach less this padding on each side (negative: a crop)."""
        return tuple((r - lo, r - hi) for r, (lo, hi) in zip(self.reach(), self.pads))

    def flops(self):
        """Multiply-adds x 2 of the direct method."""
        return 2.0 * np.prod(self.out_shape, dtype=np.float64) * np.prod(self.w_shape[1:], dtype=np.float64)


def conv_spec(x_shape, w_shape, b, stride, padding, dilation, groups, padding_mode):
    """conv3d's arguments (torch's names and rules) checked -> ConvSpec."""
    stride = triple(stride, "stride", minimum=1, maximum=INT_MAX)
    dilation = triple(dilation, "dilation", minimum=1, maximum=INT_MAX)
    mode = torch_padding_mode(padding_mode)
    if len(w_shape) != 5:
        raise ValueError(f"weight must be 5-D (out_channels, in_channels/groups, kd, kh, kw), got shape "
                         f"{tuple(w_shape)}")
    pads = conv_padding(padding, w_shape[2:], dilation, stride)
    if len(x_shape) == 5 and padding_mode in ("reflect", "circular"):
        for n, (lo, hi) in zip(x_shape[2:], pads):
            limit = n - 1 if padding_mode == "reflect" else n
            if max(lo, hi) > limit:
                raise ValueError(f"padding {max(lo, hi)} is too large for padding_mode={padding_mode!r} on an "
                                 f"axis of size {n} (at most {limit}, as in torch)")
    spec = ConvSpec(x_shape, w_shape, stride=stride, pads=pads, dilation=dilation, groups=groups, mode=mode)
    if b is not None and tuple(b.shape) != (w_shape[0],):
        raise ValueError(f"bias must have shape ({w_shape[0]},) (one value per output channel), got "
                         f"{tuple(b.shape)}")
    return spec


def positive_int(value, name):
    """An int >= 1 (numpy integers too; a bool is not one) -> int; anything else -> ValueError naming the
    argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
