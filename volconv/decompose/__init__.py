"""Low-rank kernels: CP (PARAFAC) and Tucker decompositions of conv weights and 3-D kernels, and rank selection.

tensorly computes the decompositions (numpy backend, float64); volconv executes the factors without rebuilding the
dense kernel (vc.cp_conv3d, vc.tucker_conv3d, and a SeparableKernel's 1-D passes). This module builds the kernel
objects and chooses ranks; it imports tensorly on first use, so `CPKernel` and `TuckerKernel` are cheap to import.

Conventions
-----------
- A weight is a conv weight (Cout, Cin, kd, kh, kw), torch.nn.Conv3d's layout, or one 3-D kernel (kd, kh, kw).
  numpy arrays, torch tensors (any device; copied to the CPU) and volconv Kernels are accepted everywhere.
- Factors follow tensorly: factor m is a (shape[m], rank) matrix, one column per rank-1 term (CP) or per core
  index (Tucker). A SeparableKernel stores the transpose, (rank, k_axis); `CPKernel.to_separable()` converts.
- CP:     W = sum_r weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r]). The factors' columns have unit
  norm (tensorly's normalize_factors=True), so `weights` carries the scale.
- Tucker: W = core x_0 factors[0] x_1 factors[1] ... (the mode-m product with the (shape[m], ranks[m]) factor).
  A factor of None keeps its mode: the core has the full size there. Tucker-2 of a conv weight keeps the three
  spatial modes: a 1x1x1 conv Cin -> Ri, the core as a dense kd x kh x kw conv Ri -> Ro, a 1x1x1 conv Ro -> Cout.
- relative_error = ||W - rebuilt||_F / ||W||_F, measured on the rebuilt array (not tensorly's running estimate).
- A CP rank given as a float in (0, 1) is a target relative error: the smallest rank meeting it is searched for
  (ALS at each rank stops once the target is met). No rank-R CP (nor Tucker with ranks <= R) beats the best
  rank-R approximation of any matricization of W (Eckart-Young), so the ranks that the singular values rule out
  are skipped without running ALS.
- macs_per_voxel: the multiply-adds per output voxel when the kernel is executed factor by factor; a dense
  weight costs its size (Cout * Cin * kd * kh * kw). `suggest` compares the representations by it.
- CP-ALS materialises (size / mode size) x rank Khatri-Rao products and whole-tensor unfoldings, so a CP
  decomposition is refused before tensorly runs when rank * size * 8 bytes exceeds MAX_CP_BYTES (2 GiB).
- Results are deterministic for a given random_state (SVD initialisation; the seed only fills the columns of a
  mode smaller than the rank).
"""
import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np

from .kernels import Kernel, SeparableKernel

MAX_CP_BYTES = 2 * 2**30
_MODE_NAMES = {5: ("Cout", "Cin", "kd", "kh", "kw"), 3: ("kd", "kh", "kw")}
_SHAPES = "a conv weight (Cout, Cin, kd, kh, kw) or a 3-D kernel (kd, kh, kw)"


# ------------------------------------------------------------------------------------------------ kernel objects


class ToleranceNotMet(ValueError):
    """No decomposition within the rank limits reaches the requested relative error (vc.nn.convert keeps such a
    layer as it was unless strict=True)."""


class CPKernel(Kernel):
    """A CP (PARAFAC) kernel: sum over r of weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r]).

    weights: (rank,); factors: one (mode_size, rank) matrix per mode, 5 for a conv weight (Cout, Cin, kd, kh, kw)
    or 3 for a 3-D kernel (kd, kh, kw). relative_error: how far the decomposition is from the weight it was
    computed from (None when built directly from factors). weights=None means all ones."""

    def __init__(self, weights, factors, relative_error=None):
        factors = [_matrix(f, f"factors[{m}]") for m, f in enumerate(_mode_list(factors))]
        rank = factors[0].shape[1]
        if weights is None:
            weights = np.ones(rank)
        weights = np.array(_float_array(weights, "weights"))
        if weights.ndim != 1 or weights.size < 1:
            raise ValueError(f"weights must be a 1-D array of length rank >= 1, got shape {weights.shape}")
        _check_finite(weights, "weights")
        if any(f.shape[1] != weights.size for f in factors):
            raise ValueError(f"every factor must have len(weights) = {weights.size} columns (the rank), got "
                             f"factor shapes {[f.shape for f in factors]}")
        self.weights = weights
        self.factors = factors
        self.relative_error = _error_value(relative_error)

    @property
    def rank(self):
        return self.weights.size

    @property
    def shape(self):
        """The full kernel's shape (without rebuilding it)."""
        return tuple(f.shape[0] for f in self.factors)

    @property
    def ndim(self):
        return len(self.factors)

    @property
    def spatial(self):
        """The (kd, rank), (kh, rank), (kw, rank) factors."""
        return self.factors[-3:]

    @property
    def channel(self):
        """(out factor (Cout, rank), in factor (Cin, rank)) of a conv weight."""
        if self.ndim != 5:
            raise AttributeError("a 3-D CPKernel has no channel factors (only a conv weight's CPKernel has them)")
        return self.factors[0], self.factors[1]

    @property
    def macs_per_voxel(self):
        """rank * (Cout + Cin + kd + kh + kw) for a conv weight, rank * (kd + kh + kw) for a 3-D kernel: each
        rank-1 term is a 1x1x1 projection Cin -> 1, three 1-D passes and a 1x1x1 expansion 1 -> Cout."""
        return self.rank * sum(self.shape)

    def to_dense(self):
        modes = "abcde"[:self.ndim]
        return np.einsum(f"z,{','.join(m + 'z' for m in modes)}->{modes}", self.weights, *self.factors,
                         optimize=True)

    def to_separable(self):
        """The 3-D kernel as a SeparableKernel (rank 1-D passes; its factors are (rank, k_axis))."""
        if self.ndim != 3:
            raise ValueError("to_separable() needs a 3-D CPKernel (kd, kh, kw); a conv weight's CPKernel has "
                             ".spatial and .channel factors instead")
        return SeparableKernel(factors=[f.T for f in self.factors], weights=self.weights)

    def __repr__(self):
        return f"CPKernel(shape={self.shape}, rank={self.rank}, relative_error={_repr_error(self.relative_error)})"


class TuckerKernel(Kernel):
    """A Tucker kernel: core x_0 factors[0] x_1 ... x_n factors[n] (mode-m products).

    core: the core tensor (one axis per mode); factors: one entry per mode, 5 for a conv weight or 3 for a 3-D
    kernel, each a (mode_size, core.shape[m]) matrix or None to keep that mode (the core has its full size).
    Tucker-2 of a conv weight: factors (U_out, U_in, None, None, None)."""

    def __init__(self, core, factors, relative_error=None):
        factors = _mode_list(factors)
        core = np.array(_float_array(core, "core"))
        if core.ndim != len(factors) or core.size == 0:
            raise ValueError(f"core must be non-empty with one axis per factor ({len(factors)}), got shape "
                             f"{core.shape}")
        _check_finite(core, "core")
        factors = [None if f is None else _matrix(f, f"factors[{m}]") for m, f in enumerate(factors)]
        for m, f in enumerate(factors):
            if f is not None and f.shape[1] != core.shape[m]:
                raise ValueError(f"factors[{m}] must have core.shape[{m}] = {core.shape[m]} columns, got shape "
                                 f"{f.shape}")
        self.core = core
        self.factors = factors
        self.relative_error = _error_value(relative_error)

    @property
    def ranks(self):
        return self.core.shape

    @property
    def shape(self):
        """The full kernel's shape (without rebuilding it)."""
        return tuple(n if f is None else f.shape[0] for n, f in zip(self.core.shape, self.factors))

    @property
    def ndim(self):
        return self.core.ndim

    @property
    def macs_per_voxel(self):
        """Multiply-adds per output voxel run factor by factor: the input-channel factor (Cin x Ri, 1x1x1), 1-D
        passes along W, H, D with the spatial factors present (each multiplies the channels by its rank), the
        core as a dense conv over the kept spatial modes into Ro channels, the output-channel factor (Ro x Cout).
        Tucker-2: Cin*Ri + Ro*Ri*kd*kh*kw + Cout*Ro; a 3-D kernel with ranks r: r*kw + r^2*kh + r^3*kd + r^3."""
        macs, r_out, channels = 0, 1, 1
        if self.ndim == 5:
            macs += sum(f.size for f in self.factors[:2] if f is not None)   # Cout*Ro + Cin*Ri
            r_out, channels = self.ranks[:2]
        kept = 1
        for f, n in zip(self.factors[:-4:-1], self.shape[:-4:-1]):   # W, H, D
            if f is None:
                kept *= n
            else:
                macs += channels * f.size   # channels x (k x r)
                channels *= f.shape[1]
        return macs + r_out * channels * kept

    def to_dense(self):
        out = self.core
        for m, f in enumerate(self.factors):
            if f is not None:
                out = np.moveaxis(np.tensordot(f, out, axes=(1, m)), 0, m)
        return out

    def __repr__(self):
        return (f"TuckerKernel(shape={self.shape}, ranks={self.ranks}, "
                f"relative_error={_repr_error(self.relative_error)})")


# ------------------------------------------------------------------------------------------------ decompositions


def cp(weight, rank, *, max_rank=64, n_iter_max=200, init="svd", random_state=0, tol=1e-8):
    """CP (PARAFAC) decomposition of a conv weight (Cout, Cin, kd, kh, kw) or a 3-D kernel (kd, kh, kw).

    rank: a positive int, or a float in (0, 1): a target relative error. Then the smallest rank up to max_rank
    whose decomposition meets it is returned: ranks 1, 2, 3, 4, 6, 8, 12, 16, 24, ... are tried from the first
    one the singular values allow, and the gap below the first passing one is bisected (ALS stops as soon as
    the target is met). ToleranceNotMet (a ValueError) when no rank up to max_rank meets it.
    n_iter_max, init ("svd" or "random"), random_state, tol: tensorly's CP-ALS (tol: the change of its relative
    error at which ALS stops). Refused before any work when rank * size * 8 bytes exceeds MAX_CP_BYTES.
    Returns a CPKernel with its measured relative_error."""
    return _cp(weight, rank, max_rank, _als_options(n_iter_max, init, tol, random_state), give_up=False)


def _cp(weight, rank, max_rank, als, give_up):
    """cp() once its ALS settings are validated. give_up: let ALS abandon a rank it is unlikely to bring to the
    target (suggest's quick search, see _target_monitor)."""
    shape = _weight_shape(weight)
    fixed, target = _rank_or_target(rank)
    max_rank = _positive_int(max_rank, "max_rank")
    if fixed is not None:
        _check_cp_memory(shape, fixed)
        return _parafac(_weight_array(weight), fixed, **als)
    largest = min(max_rank, MAX_CP_BYTES // (8 * math.prod(shape)))
    _check_cp_memory(shape, max(largest, 1))
    return _smallest_cp(_weight_array(weight), target, largest, max_rank, als, give_up)


def tucker(weight, ranks, *, n_iter_max=100, init="svd", random_state=0, tol=1e-8):
    """Tucker decomposition (HOOI) of a conv weight (Cout, Cin, kd, kh, kw) or a 3-D kernel (kd, kh, kw).

    ranks: for a conv weight, 2 ints (Tucker-2: the output and input channel ranks; the spatial modes are kept,
    their factors None) or 5 ints (one per mode); for a 3-D kernel, 3 ints. Each between 1 and its mode's size.
    n_iter_max, init ("svd" or "random"), random_state, tol: tensorly's HOOI (tol: the change of its relative
    error at which it stops). Returns a TuckerKernel with its measured relative_error."""
    shape = _weight_shape(weight)
    modes, ranks = _tucker_ranks(shape, ranks)
    als = _als_options(n_iter_max, init, tol, random_state)
    return _hooi(_weight_array(weight), modes, ranks, **als)


def separable(kernel3d, rank=None, *, tol=1e-6, max_rank=64, random_state=0):
    """A 3-D kernel (kd, kh, kw) as a sum of `rank` separable terms: a SeparableKernel, run as 1-D passes.

    rank: an int, a float in (0, 1) (a target relative error, as in cp), or None: the smallest rank whose
    relative error is <= tol (here tol is that target, not an ALS setting). cp(kernel3d, ...).to_separable()
    gives the same kernel with its relative_error."""
    shape = _weight_shape(kernel3d, "kernel3d")
    if len(shape) != 3:
        raise ValueError(f"kernel3d must be a 3-D kernel (kd, kh, kw), got shape {shape}")
    if rank is None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < 1:
            raise ValueError(f"tol must be a target relative error in (0, 1), got {tol!r}")
        rank = float(tol)
    return cp(kernel3d, rank, max_rank=max_rank, random_state=random_state).to_separable()


@dataclass(frozen=True)
class Candidate:
    """One representation of a weight found by `suggest`.

    kind: "dense", "sparse", "cp" or "tucker"; params: {} (dense), {"density": ..., "nnz": ...} (sparse),
    {"rank": r} (cp), {"ranks": core shape} (tucker); kernel: the weight in that form (the float64 array for
    dense, the pruned array with zeros in place for sparse, a CPKernel, a TuckerKernel)."""
    kind: str
    params: dict
    relative_error: float
    macs_per_voxel: int
    predicted_speedup: float
    kernel: object = field(repr=False, compare=False)


def suggest(weight, tolerance):
    """The representations of a conv weight (Cout, Cin, kd, kh, kw) or 3-D kernel (kd, kh, kw) within relative
    error `tolerance` (in [0, 1)), cheapest first (by macs_per_voxel; predicted_speedup = dense macs / macs):

    - "dense": the weight itself (always present);
    - "sparse": magnitude pruning, the fewest largest-magnitude entries within tolerance (macs = their number);
    - "cp": the smallest CP rank within tolerance, searched up to 64 as in cp() but abandoning the ALS of a
      rank once its pace says it will miss (quick, but it can miss a rank whose ALS converges late); absent if
      none is found;
    - "tucker": for a conv weight the smallest Tucker-2 ranks (r, r) (each capped at its channel count), for a
      3-D kernel equal ranks on every mode, r = 1, 2, 4, 8, ...
    With tolerance 0 only "dense" and "sparse" (dropping the zeros) are given: a decomposition is exact only up
    to rounding. The low-rank candidates are only as good as ALS finds them; ranks the singular values rule out
    are skipped, so a weight far from low rank costs no ALS run."""
    shape = _weight_shape(weight)
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a relative error in [0, 1), got {tolerance!r}")
    w = _weight_array(weight)
    dense_macs = math.prod(shape)

    def candidate(kind, params, error, macs, kernel):
        speedup = dense_macs / macs if macs else math.inf
        return Candidate(kind, params, float(error), int(macs), speedup, kernel)

    pruned, nnz, error = _magnitude_pruned(w, tolerance)
    found = [candidate("dense", {}, 0.0, dense_macs, w),
             candidate("sparse", {"density": nnz / w.size, "nnz": nnz}, error, nnz, pruned)]
    if tolerance > 0:
        try:   # cp(w, tolerance, max_rank=64), giving up early on ranks that look out of reach
            cp_als = _als_options(**{name: value for name, value in cp.__kwdefaults__.items() if name != "max_rank"})
            k = _cp(w, float(tolerance), 64, cp_als, give_up=True)
            found.append(candidate("cp", {"rank": k.rank}, k.relative_error, k.macs_per_voxel, k))
        except ValueError:   # no rank up to 64 within tolerance, or over the memory cap
            pass
        k = _smallest_tucker(w, tolerance)
        if k is not None:
            found.append(candidate("tucker", {"ranks": k.ranks}, k.relative_error, k.macs_per_voxel, k))
    return sorted(found, key=lambda c: (c.macs_per_voxel, c.relative_error))


# ------------------------------------------------------------------------------------------------ tensorly runs


def _parafac(w, rank, *, n_iter_max, init, random_state, tol, target=None, give_up=False):
    """tensorly's CP-ALS of the float64 array w -> a CPKernel with its measured error. With a target error, ALS
    stops once it is met (or, with give_up, once it looks out of reach; see _target_monitor)."""
    if not w.any():   # ALS divides by the norm; zero is exactly zero weights on unit-norm columns
        return CPKernel(np.zeros(rank), [np.full((n, rank), n ** -0.5) for n in w.shape], relative_error=0.0)
    from tensorly.decomposition import parafac

    # tensorly only computes the error handed to the callback when tol > 0
    stop = None if target is None or not tol else _target_monitor(target, n_iter_max, give_up)
    with _tensorly_numpy():
        weights, factors = parafac(w, rank, n_iter_max=n_iter_max, init=init, random_state=random_state, tol=tol,
                                   normalize_factors=True, callback=stop)
    # tensorly normalises before each sweep, so the last sweep's update is not: finish the job (unit columns)
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    weights = weights * np.prod(norms, axis=0)
    factors = [f / np.where(n > 0, n, 1.0) for f, n in zip(factors, norms)]
    kernel = CPKernel(weights, factors)
    kernel.relative_error = _relative_error(w, kernel.to_dense())
    return kernel


def _target_monitor(target, n_iter_max, give_up):
    """The ALS callback of a rank search. It stops ALS once its running error meets the target: the rank passes,
    more iterations would only refine it. With give_up it also stops, failing the rank, once after 10 iterations
    even twice the pace of the last 5 would not reach the target in the iterations left. ALS mostly slows down
    as it goes, so this saves the full run at every rank too small (most of the time of a search on a weight far
    from low rank), but it abandons the ranks where ALS would leave a plateau (a "swamp") late."""
    errors = []

    def stop(cp_tensor, error):
        errors.append(error)   # errors[0] is the initialisation's, errors[k] the k-th iteration's
        if error <= target:
            return True
        done = len(errors) - 1
        if not give_up or done < 10:
            return False
        pace = (errors[-6] - error) / 5
        return bool(error - 2 * pace * (n_iter_max - done) > target)
    return stop


def _hooi(w, modes, ranks, *, n_iter_max, init, random_state, tol):
    """tensorly's Tucker (HOOI) of the float64 array w on `modes` -> a TuckerKernel with its measured error."""
    factors = [None] * w.ndim
    if not w.any():   # HOOI divides by the norm; zero is a zero core on orthonormal columns
        core_shape = list(w.shape)
        for m, r in zip(modes, ranks):
            core_shape[m], factors[m] = r, np.eye(w.shape[m], r)
        return TuckerKernel(np.zeros(core_shape), factors, relative_error=0.0)
    from tensorly.decomposition import partial_tucker

    with _tensorly_numpy():
        (core, mode_factors), _ = partial_tucker(w, list(ranks), modes=list(modes), n_iter_max=n_iter_max,
                                                 init=init, random_state=random_state, tol=tol)
    for m, f in zip(modes, mode_factors):
        factors[m] = f
    kernel = TuckerKernel(core, factors)
    kernel.relative_error = _relative_error(w, kernel.to_dense())
    return kernel


@contextlib.contextmanager
def _tensorly_numpy():
    """tensorly on its numpy backend (for this thread), without the warning it gives whenever a rank exceeds an
    unfolding's size (a CP rank above a kernel side, a Tucker core on a small mode): it then completes the
    factor itself, which is what is wanted here."""
    import tensorly as tl

    with tl.backend_context("numpy", local_threadsafe=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
        yield


# ------------------------------------------------------------------------------------------------ rank selection


def _smallest_cp(w, target, largest, max_rank, als, give_up):
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
        tried[r] = _parafac(w, r, target=target, give_up=give_up, **als)
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


def _smallest_tucker(w, tolerance):
    """The TuckerKernel of the smallest equal ranks r = 1, 2, 4, ... (capped at each mode's size) within
    tolerance: Tucker-2 (channel modes) for a conv weight, all three modes for a 3-D kernel. None if even the
    full ranks miss it (rounding only). Ranks whose unfolding tails alone exceed the tolerance are skipped."""
    modes = (0, 1) if w.ndim == 5 else (0, 1, 2)
    tails = [_matricization_tails(w, (m,)) for m in modes]
    r = 1
    while True:
        ranks = tuple(min(r, w.shape[m]) for m in modes)
        if max(t[min(rk, t.size - 1)] for t, rk in zip(tails, ranks)) <= tolerance:
            kernel = tucker(w, ranks, tol=1e-6)   # HOOI gains little on its SVD start: no need to polish
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


def _magnitude_pruned(w, tolerance):
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


# ------------------------------------------------------------------------------------------------ validation


def _float_array(value, name):
    """An array-like, torch tensor (any device) or Kernel -> a float64 numpy array (not copied when it is one)."""
    if hasattr(value, "detach"):   # a torch tensor; torch itself is never imported here
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__}") from None


def _check_finite(a, name):
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")


def _matrix(value, name):
    """A factor -> a C-contiguous float64 copy, (mode_size, rank) with both >= 1."""
    a = np.array(_float_array(value, name), order="C")
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (mode_size, rank) matrix, got shape {a.shape}")
    _check_finite(a, name)
    return a


def _mode_list(factors):
    """factors -> a list with one entry per mode (5 or 3)."""
    try:
        factors = list(factors)
    except TypeError:
        raise TypeError(f"factors must be a list of matrices, one per mode, got {type(factors).__name__}") from None
    if len(factors) not in (3, 5):
        raise ValueError("factors must hold one matrix per mode: 5 for a conv weight (Cout, Cin, kd, kh, kw) or 3 "
                         f"for a kernel (kd, kh, kw), got {len(factors)}")
    return factors


def _error_value(error):
    if error is None:
        return None
    if isinstance(error, bool) or not isinstance(error, numbers.Real) or not error >= 0:
        raise ValueError(f"relative_error must be None or a non-negative number, got {error!r}")
    return float(error)


def _repr_error(error):
    return "None" if error is None else f"{error:.3g}"


def _relative_error(w, rebuilt):
    """||w - rebuilt||_F / ||w||_F; 0 when both are zero."""
    norm, diff = np.linalg.norm(w), np.linalg.norm(w - rebuilt)
    return float(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)


def _weight_shape(weight, name="weight"):
    """The shape of a weight to decompose, read without converting it (so that size checks come first)."""
    shape = tuple(int(n) for n in (weight.shape if hasattr(weight, "shape") else np.shape(weight)))
    if len(shape) not in (3, 5) or min(shape) < 1:
        raise ValueError(f"{name} must be {_SHAPES}, non-empty, got shape {shape}")
    return shape


def _weight_array(weight):
    w = _float_array(weight, "weight")
    _check_finite(w, "weight")
    return w


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _rank_or_target(rank):
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


def _als_options(n_iter_max, init, tol, random_state):
    """The tensorly iteration settings shared by cp and tucker, validated."""
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    return dict(n_iter_max=_positive_int(n_iter_max, "n_iter_max"), init=init, tol=float(tol),
                random_state=random_state)


def _check_cp_memory(shape, rank):
    need = rank * math.prod(shape) * 8
    if need > MAX_CP_BYTES:
        raise ValueError(
            f"a rank-{rank} CP decomposition of a weight of shape {shape} would need about {need / 2**30:.1f} GiB "
            f"(rank x size x 8 bytes), over the {MAX_CP_BYTES / 2**30:g} GiB cap: tensorly's CP-ALS builds "
            "Khatri-Rao products and unfoldings of the whole tensor, the memory blow-up of tensorly/torch issue #32 "
            "(a (1024, 512, 3, 3, 3) conv asked for 83 GB). Use a smaller rank or a Tucker-2 decomposition.")


def _tucker_ranks(shape, ranks):
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


__all__ = ["CPKernel", "TuckerKernel", "Candidate", "cp", "tucker", "separable", "suggest", "MAX_CP_BYTES",
           "ToleranceNotMet"]
