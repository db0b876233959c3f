"""The smallest representation of a weight within a target relative error: CP rank, Tucker ranks, pruning.

CP runs ALS at each rank tried and skips the ranks the singular values of the weight's matricizations rule out."""
import math

import numpy as np

from . import _tensorly
from ._arguments import MAX_CP_BYTES


class ToleranceNotMet(ValueError):
    """No decomposition within the rank limits reaches the requested relative error (vc.nn.convert keeps such a
    layer as it was unless strict=True)."""


def smallest_cp(w, target, largest, max_rank, als, give_up):
    """The CPKernel of the smallest rank <= largest meeting the target error (see cp). largest < max_rank when
    the memory cap lowered it."""
    bound = _cp_error_bounds(w, largest)
    capped = f" (ranks above {largest} exceed the {MAX_CP_BYTES / 2**30:g} GiB cap)" if largest < max_rank else ""
    if bound[largest] > target:
        raise ToleranceNotMet(f"no CP rank up to {largest} can reach relative error {target:g}: the singular "
                              f"values of the weight's matricizations bound rank {largest}'s error below by "
                              f"{bound[largest]:.3g}{capped}")
    first = 1 + int(np.argmax(bound[1:] <= target))   # the bound decreases with the rank: ranks below fail
    tried = {}

    def passes(r):
        tried[r] = _tensorly.cp_als(w, r, target=target, give_up=give_up, **als)
        return tried[r].relative_error <= target

    failing, passing = first - 1, None
    for r in _rank_ladder(first, largest):
        if passes(r):
            passing = r
            break
        failing = r
    if passing is None:
        best = min(tried.values(), key=lambda k: k.relative_error)
        raise ToleranceNotMet(f"no CP rank up to {largest} reached relative error {target:g}: the best was "
                              f"{best.relative_error:.3g} at rank {best.rank}{capped}")
    while passing - failing > 1:
        mid = (failing + passing) // 2
        if passes(mid):
            passing = mid
        else:
            failing = mid
    return tried[passing]


def _rank_ladder(first, last):
    """first, then the ranks 2^k and 3 * 2^k between first and last, then last."""
    steps = {s for k in range(last.bit_length() + 1) for s in (2 ** k, 3 * 2 ** k) if first < s < last}
    return sorted({first, last} | steps)


def smallest_tucker(w, tolerance, als):
    """The TuckerKernel of the smallest equal ranks r = 1, 2, 4, ... (capped at each mode's size) within
    tolerance: Tucker-2 (channel modes) for a conv weight, all three modes for a 3-D kernel. None if even the
    full ranks miss it (rounding only). Ranks whose unfolding tails alone exceed the tolerance are skipped.
    als: the HOOI settings (see tucker)."""
    modes = (0, 1) if w.ndim == 5 else (0, 1, 2)
    tails = [_matricization_tails(w, (m,)) for m in modes]
    r = 1
    while True:
        ranks = tuple(min(r, w.shape[m]) for m in modes)
        if max(t[min(rk, t.size - 1)] for t, rk in zip(tails, ranks)) <= tolerance:
            kernel = _tensorly.hooi(w, modes, ranks, **als)
            if kernel.relative_error <= tolerance:
                return kernel
        if all(rk == w.shape[m] for m, rk in zip(modes, ranks)):
            return None
        r *= 2


def _cp_error_bounds(w, largest):
    """bound[r] for r = 0..largest: a lower bound on the relative error of any rank-r CP of w. A rank-r CP has
    every matricization (any split of the modes into rows and columns) of matrix rank <= r, so no rank-r CP
    beats the best rank-r approximation of any of them."""
    bound = np.zeros(largest + 1)
    for split in range(2 ** (w.ndim - 1) - 1):   # row modes: mode 0 plus a proper subset of the others
        rows = (0,) + tuple(m for m in range(1, w.ndim) if split >> (m - 1) & 1)
        tails = _matricization_tails(w, rows)
        bound = np.maximum(bound, tails[np.minimum(np.arange(largest + 1), tails.size - 1)])
    return bound


def _matricization_tails(w, rows):
    """tails[r]: the relative error of the best rank-r approximation of w reshaped to (prod of the `rows` modes,
    the rest), for r = 0..min(rows, columns) (Eckart-Young: the norm of the singular values past the r-th)."""
    columns = tuple(m for m in range(w.ndim) if m not in rows)
    matrix = np.transpose(w, rows + columns).reshape(math.prod(w.shape[m] for m in rows), -1)
    energy = np.linalg.svd(matrix, compute_uv=False) ** 2
    tails = np.sqrt(np.append(np.cumsum(energy[::-1])[::-1], 0.0))
    return tails / tails[0] if tails[0] > 0 else tails


def magnitude_pruned(w, tolerance):
    """(pruned array, nnz, relative error): w without its smallest-magnitude entries, as many as fit within
    tolerance (zeros always go)."""
    flat = w.ravel()
    order = np.argsort(np.abs(flat), kind="stable")
    dropped_norm = np.sqrt(np.cumsum(flat[order] ** 2))   # [i]: the norm of the i + 1 smallest entries
    norm = dropped_norm[-1]
    n_drop = int(np.searchsorted(dropped_norm, tolerance * norm, side="right"))
    pruned = flat.copy()
    pruned[order[:n_drop]] = 0.0
    error = dropped_norm[n_drop - 1] / norm if n_drop and norm > 0 else 0.0
    return pruned.reshape(w.shape), flat.size - n_drop, error
