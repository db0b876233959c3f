"""tensorly's CP-ALS and HOOI of a float64 array, as a CPKernel / TuckerKernel with its measured relative error.

tensorly runs on its numpy backend and is imported on first use."""
import contextlib
import math
import warnings

import numpy as np

from ._lowrank_kernels import CPKernel, TuckerKernel


def cp_als(w, rank, *, n_iter_max, init, random_state, tol, target=None, give_up=False):
    """tensorly's CP-ALS of the float64 array w -> a CPKernel with its measured error. With a target error, ALS
    stops once it is met (or, with give_up, once it looks out of reach; see target_monitor)."""
    if not w.any():   # ALS divides by the norm; zero is exactly zero weights on unit-norm columns
        return CPKernel(np.zeros(rank), [np.full((n, rank), n ** -0.5) for n in w.shape], relative_error=0.0)
    from tensorly.decomposition import parafac

    # tensorly only computes the error handed to the callback when tol > 0
    stop = None if target is None or not tol else target_monitor(target, n_iter_max, give_up)
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


def target_monitor(target, n_iter_max, give_up):
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


def hooi(w, modes, ranks, *, n_iter_max, init, random_state, tol):
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


def _relative_error(w, rebuilt):
    """||w - rebuilt||_F / ||w||_F; 0 when both are zero."""
    norm, diff = np.linalg.norm(w), np.linalg.norm(w - rebuilt)
    return float(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
