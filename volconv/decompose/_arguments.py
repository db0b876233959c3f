"""Checks of vc.decompose's arguments: weights, factors, ranks, ALS settings and the CP memory cap.

Each names the argument and says what was expected; the decompositions trust what leaves here.
"""
import math
import numbers

import numpy as np

from .._validate import positive_int

MAX_CP_BYTES = 2 * 2**30
_MODE_NAMES = {5: ("Cout", "Cin", "kd", "kh", "kw"), 3: ("kd", "kh", "kw")}
_SHAPES = "a conv weight (Cout, Cin, kd, kh, kw) or a 3-D kernel (kd, kh, kw)"


def float_array(value, name):
    """An array-like, torch tensor (any device) or Kernel -> a float64 numpy array (not copied when it is one)."""
    if hasattr(value, "detach"):   # a torch tensor; torch itself is never imported here
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}") from None


def check_finite(a, name):
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")


def factor_matrix(value, name):
    """A factor -> a C-contiguous float64 copy, (mode_size, rank) with both >= 1."""
    a = np.array(float_array(value, name), order="C")
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (mode_size, rank) matrix, got shape {a.shape}")
    check_finite(a, name)
    return a


def mode_list(factors):
    """factors -> a list with one entry per mode (5 or 3)."""
    try:
        factors = list(factors)
    except TypeError:
        raise TypeError(f"factors must be a list of matrices, one per mode, got {type(factors).__name__}") from None
    if len(factors) not in (3, 5):
        raise ValueError("factors must hold one matrix per mode: 5 for a conv weight (Cout, Cin, kd, kh, kw) or 3 "
                         f"for a kernel (kd, kh, kw), got {len(factors)}")
    return factors


def error_value(error):
    if error is None:
        return None
    if isinstance(error, bool) or not isinstance(error, numbers.Real) or not error >= 0:
        raise ValueError(f"relative_error must be None or a non-negative number, got {error!r}")
    return float(error)


def weight_shape(weight, name="weight"):
    """The shape of a weight to decompose, read without converting it (so that size checks come first)."""
    shape = tuple(int(n) for n in (weight.shape if hasattr(weight, "shape") else np.shape(weight)))
    if len(shape) not in (3, 5) or min(shape) < 1:
        raise ValueError(f"{name} must be {_SHAPES}, non-empty, got shape {shape}")
    return shape


def weight_array(weight):
    w = float_array(weight, "weight")
    check_finite(w, "weight")
    return w


def rank_or_target(rank):
    """rank -> (rank, None) for a positive int, (None, target) for a float in (0, 1)."""
    expected = "a positive int or a float in (0, 1) (a target relative error)"
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"rank must be {expected}, got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 1:
            raise ValueError(f"rank must be {expected}, got {rank!r}")
        return int(rank), None
    if not 0 < rank < 1:
        raise ValueError(f"rank must be {expected}, got {rank!r}")
    return None, float(rank)


def target_error(tol):
    """separable's tol: a target relative error in (0, 1)."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < 1:
        raise ValueError(f"tol must be a target relative error in (0, 1), got {tol!r}")
    return float(tol)


def error_tolerance(tolerance):
    """suggest's tolerance: a relative error in [0, 1) (0: exact representations only)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a relative error in [0, 1), got {tolerance!r}")
    return tolerance


def als_options(n_iter_max, init, tol, random_state):
    """The tensorly iteration settings shared by cp and tucker, validated."""
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    return dict(n_iter_max=positive_int(n_iter_max, "n_iter_max"), init=init, tol=float(tol),
                random_state=random_state)


def check_cp_memory(shape, rank):
    need = rank * math.prod(shape) * 8
    if need > MAX_CP_BYTES:
        raise ValueError(
            f"a rank-{rank} CP decomposition of a weight of shape {shape} would need about {need / 2**30:.1f} GiB "
            f"(rank x size x 8 bytes), over the {MAX_CP_BYTES / 2**30:g} GiB cap: tensorly's CP-ALS builds "
            "Khatri-Rao products and unfoldings of the whole tensor, the memory blow-up of tensorly/torch issue #32 "
            "(a (1024, 512, 3, 3, 3) conv asked for 83 GB). Use a smaller rank or a Tucker-2 decomposition.")


def tucker_ranks(shape, ranks):
    """ranks -> (decomposed modes, their ranks): 2 ranks on a conv weight are Tucker-2 (the channel modes)."""
    expected = "2 ints (Tucker-2) or 5 ints" if len(shape) == 5 else "3 ints"
    try:
        ranks = tuple(ranks)
    except TypeError:
        raise TypeError(f"ranks must be {expected} for a weight of shape {shape}, got {ranks!r}") from None
    if len(shape) == 5 and len(ranks) == 2:
        modes = (0, 1)
    elif len(ranks) == len(shape):
        modes = tuple(range(len(shape)))
    else:
        raise ValueError(f"ranks must be {expected} for a weight of shape {shape}, got {ranks!r}")
    names = _MODE_NAMES[len(shape)]
    for m, r in zip(modes, ranks):
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"ranks must be ints, got {r!r} for mode {m} ({names[m]})")
        if not 1 <= r <= shape[m]:
            raise ValueError(f"ranks: {r} for mode {m} ({names[m]}) must be between 1 and that mode's size "
                             f"{shape[m]}")
    return modes, tuple(int(r) for r in ranks)
