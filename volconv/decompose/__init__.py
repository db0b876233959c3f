"""Low-rank kernels: CP (PARAFAC) and Tucker decompositions of conv weights and 3-D kernels, and rank selection.

tensorly computes the decompositions (numpy backend, float64); volconv executes the factors without rebuilding the
dense kernel (vc.cp_conv3d, vc.tucker_conv3d, and a SeparableKernel's 1-D passes). This package builds the kernel
objects and chooses ranks; it imports tensorly on first use, so `CPKernel` and `TuckerKernel` are cheap to import.
Here the public functions; the kernel objects in _lowrank_kernels, the argument checks in _arguments, tensorly's
runs in _tensorly, the searches for the smallest rank within a tolerance in _search.

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
import math
from dataclasses import dataclass, field

from .._validate import positive_int
from . import _tensorly
from ._arguments import (MAX_CP_BYTES, als_options, check_cp_memory, error_tolerance, rank_or_target, target_error,
                         tucker_ranks, weight_array, weight_shape)
from ._lowrank_kernels import CPKernel, TuckerKernel
from ._search import ToleranceNotMet, magnitude_pruned, smallest_cp, smallest_tucker


def cp(weight, rank, *, max_rank=64, n_iter_max=200, init="svd", random_state=0, tol=1e-8):
    """CP (PARAFAC) decomposition of a conv weight (Cout, Cin, kd, kh, kw) or a 3-D kernel (kd, kh, kw).

    rank: a positive int, or a float in (0, 1): a target relative error. Then the smallest rank up to max_rank
    whose decomposition meets it is returned: ranks 1, 2, 3, 4, 6, 8, 12, 16, 24, ... are tried from the first
    one the singular values allow, and the gap below the first passing one is bisected (ALS stops as soon as
    the target is met). ToleranceNotMet (a ValueError) when no rank up to max_rank meets it.
    n_iter_max, init ("svd" or "random"), random_state, tol: tensorly's CP-ALS (tol: the change of its relative
    error at which ALS stops). Refused before any work when rank * size * 8 bytes exceeds MAX_CP_BYTES.
    Returns a CPKernel with its measured relative_error."""
    return _cp(weight, rank, max_rank, als_options(n_iter_max, init, tol, random_state), give_up=False)


def _cp(weight, rank, max_rank, als, give_up):
    """cp() once its ALS settings are validated. give_up: let ALS abandon a rank it is unlikely to bring to the
    target (suggest's quick search, see target_monitor)."""
    shape = weight_shape(weight)
    fixed, target = rank_or_target(rank)
    max_rank = positive_int(max_rank, "max_rank")
    if fixed is not None:
        check_cp_memory(shape, fixed)
        return _tensorly.cp_als(weight_array(weight), fixed, **als)
    largest = min(max_rank, MAX_CP_BYTES // (8 * math.prod(shape)))
    check_cp_memory(shape, max(largest, 1))
    return smallest_cp(weight_array(weight), target, largest, max_rank, als, give_up)


def tucker(weight, ranks, *, n_iter_max=100, init="svd", random_state=0, tol=1e-8):
    """Tucker decomposition (HOOI) of a conv weight (Cout, Cin, kd, kh, kw) or a 3-D kernel (kd, kh, kw).

    ranks: for a conv weight, 2 ints (Tucker-2: the output and input channel ranks; the spatial modes are kept,
    their factors None) or 5 ints (one per mode); for a 3-D kernel, 3 ints. Each between 1 and its mode's size.
    n_iter_max, init ("svd" or "random"), random_state, tol: tensorly's HOOI (tol: the change of its relative
    error at which it stops). Returns a TuckerKernel with its measured relative_error."""
    shape = weight_shape(weight)
    modes, ranks = tucker_ranks(shape, ranks)
    als = als_options(n_iter_max, init, tol, random_state)
    return _tensorly.hooi(weight_array(weight), modes, ranks, **als)


def separable(kernel3d, rank=None, *, tol=1e-6, max_rank=64, random_state=0):
    """A 3-D kernel (kd, kh, kw) as a sum of `rank` separable terms: a SeparableKernel, run as 1-D passes.

    rank: an int, a float in (0, 1) (a target relative error, as in cp), or None: the smallest rank whose
    relative error is <= tol (here tol is that target, not an ALS setting). cp(kernel3d, ...).to_separable()
    gives the same kernel with its relative_error."""
    shape = weight_shape(kernel3d, "kernel3d")
    if len(shape) != 3:
        raise ValueError(f"kernel3d must be a 3-D kernel (kd, kh, kw), got shape {shape}")
    if rank is None:
        rank = target_error(tol)
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
    shape = weight_shape(weight)
    tolerance = error_tolerance(tolerance)
    w = weight_array(weight)
    dense_macs = math.prod(shape)

    def candidate(kind, params, error, macs, kernel):
        speedup = dense_macs / macs if macs else math.inf
        return Candidate(kind, params, float(error), int(macs), speedup, kernel)

    pruned, nnz, error = magnitude_pruned(w, tolerance)
    found = [candidate("dense", {}, 0.0, dense_macs, w),
             candidate("sparse", {"density": nnz / w.size, "nnz": nnz}, error, nnz, pruned)]
    if tolerance > 0:
        try:   # cp(w, tolerance, max_rank=64), giving up early on ranks that look out of reach
            settings = als_options(**{name: value for name, value in cp.__kwdefaults__.items() if name != "max_rank"})
            k = _cp(w, float(tolerance), 64, settings, give_up=True)
            found.append(candidate("cp", {"rank": k.rank}, k.relative_error, k.macs_per_voxel, k))
        except ValueError:   # no rank up to 64 within tolerance, or over the memory cap
            pass
        # Tucker with tucker()'s settings but a looser tol: HOOI gains little on its SVD start, no need to polish
        k = smallest_tucker(w, tolerance, als_options(**dict(tucker.__kwdefaults__, tol=1e-6)))
        if k is not None:
            found.append(candidate("tucker", {"ranks": k.ranks}, k.relative_error, k.macs_per_voxel, k))
    return sorted(found, key=lambda c: (c.macs_per_voxel, c.relative_error))


__all__ = ["CPKernel", "TuckerKernel", "Candidate", "cp", "tucker", "separable", "suggest", "MAX_CP_BYTES",
           "ToleranceNotMet"]
