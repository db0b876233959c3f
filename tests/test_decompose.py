"""vc.decompose: CP / Tucker decompositions recover tensors built from known factors, rank selection finds the
smallest rank, suggest's candidates keep their promises, and bad arguments are refused with clear messages.

References are built here independently (explicit outer products and mode products), never with the module's
own to_dense."""
import math
import re
from functools import reduce

import numpy as np
import pytest

import volconv as vc
from volconv import decompose as D
from volconv.decompose import _tensorly

SHAPES = {3: (5, 6, 7), 5: (6, 5, 3, 4, 5)}


def cp_reference(weights, factors):
    """sum_r weights[r] * outer(f_0[:, r], ..., f_n[:, r]) by explicit outer products."""
    terms = (w * reduce(np.multiply.outer, [f[:, r] for f in factors]) for r, w in enumerate(weights))
    return sum(terms)


def tucker_reference(core, factors):
    """core x_0 f_0 x_1 ... by one mode product at a time on the unfoldings (f None: mode kept)."""
    out = core
    for m, f in enumerate(factors):
        if f is not None:
            moved = np.moveaxis(out, m, 0)
            out = np.moveaxis((f @ moved.reshape(moved.shape[0], -1)).reshape((f.shape[0],) + moved.shape[1:]),
                              0, m)
    return out


def rel_err(reference, approx):
    return np.linalg.norm(reference - approx) / np.linalg.norm(reference)


def random_cp(rng, shape, rank):
    factors = [rng.standard_normal((n, rank)) for n in shape]
    return cp_reference(rng.uniform(0.5, 2.0, rank), factors)


# ------------------------------------------------------------------------------------------------ CP


@pytest.mark.parametrize("ndim", [3, 5])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_cp_recovers_a_tensor_built_at_its_rank(rng, ndim, rank):
    shape = SHAPES[ndim]
    w = random_cp(rng, shape, rank)
    k = D.cp(w, rank)
    assert isinstance(k, D.CPKernel) and isinstance(k, vc.kernels.Kernel)
    assert (k.rank, k.shape, k.ndim) == (rank, shape, ndim)
    assert k.weights.shape == (rank,) and k.weights.dtype == np.float64
    assert [f.shape for f in k.factors] == [(n, rank) for n in shape]
    np.testing.assert_allclose([np.linalg.norm(f, axis=0) for f in k.factors], 1.0, rtol=1e-13)  # scale in weights
    assert rel_err(w, cp_reference(k.weights, k.factors)) < 1e-6
    assert k.relative_error < 1e-6
    assert k.relative_error == pytest.approx(rel_err(w, cp_reference(k.weights, k.factors)), rel=1e-6, abs=1e-14)
    np.testing.assert_allclose(k.to_dense(), w, rtol=0, atol=1e-6 * np.abs(w).max())
    np.testing.assert_allclose(np.asarray(k), w, rtol=0, atol=1e-6 * np.abs(w).max())


def test_cp_of_a_conv_weight_exposes_spatial_and_channel_factors(rng):
    w = random_cp(rng, SHAPES[5], 2)
    k = D.cp(w, 2)
    assert [f.shape for f in k.spatial] == [(3, 2), (4, 2), (5, 2)]
    out, inp = k.channel
    assert out.shape == (6, 2) and inp.shape == (5, 2)
    assert k.macs_per_voxel == 2 * (5 + 3 + 4 + 5 + 6)   # R * (Cin + kd + kh + kw + Cout)
    with pytest.raises(ValueError, match="3-D"):
        k.to_separable()
    with pytest.raises(AttributeError, match="channel"):
        D.cp(random_cp(rng, SHAPES[3], 1), 1).channel


def test_cp_to_separable_is_the_same_kernel(rng):
    w = random_cp(rng, SHAPES[3], 2)
    k = D.cp(w, 2)
    s = k.to_separable()
    assert isinstance(s, vc.kernels.SeparableKernel) and s.rank == 2 and s.shape == SHAPES[3]
    np.testing.assert_allclose(s.to_dense(), cp_reference(k.weights, k.factors), rtol=0, atol=1e-12)
    assert k.macs_per_voxel == 2 * sum(SHAPES[3])


def test_cp_is_deterministic(rng):
    w = rng.standard_normal((4, 3, 3, 3, 3))
    a, b = D.cp(w, 3, random_state=7), D.cp(w, 3, random_state=7)
    np.testing.assert_array_equal(a.weights, b.weights)
    for fa, fb in zip(a.factors, b.factors):
        np.testing.assert_array_equal(fa, fb)


@pytest.mark.parametrize("ndim", [3, 5])
def test_cp_target_error_gives_the_smallest_rank(rng, ndim):
    w = random_cp(rng, SHAPES[ndim], 3)
    target = 1e-4
    assert D.cp(w, 1).relative_error > target and D.cp(w, 2).relative_error > target
    k = D.cp(w, target)
    assert k.rank == 3
    assert k.relative_error <= target
    assert rel_err(w, cp_reference(k.weights, k.factors)) <= target


def test_cp_target_error_on_a_noisy_tensor_lands_between_the_ranks(rng):
    """A rank-2 tensor plus 1% noise: rank 1 misses 5%, rank 2 meets it."""
    clean = random_cp(rng, (6, 5, 4, 4, 4), 2)
    w = clean + 0.01 * np.linalg.norm(clean) / math.sqrt(clean.size) * rng.standard_normal(clean.shape)
    assert D.cp(w, 1).relative_error > 0.05
    k = D.cp(w, 0.05)
    assert k.rank == 2 and k.relative_error <= 0.05


def test_cp_target_error_out_of_reach(rng):
    w = rng.standard_normal((4, 5, 6))
    with pytest.raises(ValueError, match="no CP rank up to 2"):
        D.cp(w, 1e-3, max_rank=2)


def test_rank_search_bisects_between_ladder_steps(monkeypatch):
    """ALS replaced by a stand-in whose error is 0.3 / rank; the weight is rank 1, so no rank is ruled out by the
    singular values. Ranks 1, 2, 3, 4, 6 are tried, 6 passes, then 5 (between 4 and 6) passes too."""
    tried = []

    def stand_in(w, rank, **options):
        tried.append(rank)
        return D.CPKernel(np.ones(rank), [np.ones((n, rank)) for n in w.shape], relative_error=0.3 / rank)

    monkeypatch.setattr(_tensorly, "cp_als", stand_in)
    assert D.cp(np.ones((3, 4, 5)), 0.065).rank == 5
    assert tried == [1, 2, 3, 4, 6, 5]
    tried.clear()
    with pytest.raises(ValueError, match="best was 0.0375 at rank 8"):
        D.cp(np.ones((3, 4, 5)), 0.01, max_rank=8)
    assert tried == [1, 2, 3, 4, 6, 8]


def test_rank_search_skips_the_ranks_the_singular_values_rule_out(rng, monkeypatch):
    """A generic rank-3 tensor has matricizations of rank 3: ranks 1 and 2 fail without running ALS."""
    w = random_cp(rng, (6, 7, 8), 3)
    tried, als = [], _tensorly.cp_als
    monkeypatch.setattr(_tensorly, "cp_als", lambda w, rank, **options: tried.append(rank) or als(w, rank, **options))
    assert D.cp(w, 1e-4).rank == 3
    assert tried == [3]


def test_target_monitor_stops_als_when_met_or_hopeless():
    patient = _tensorly.target_monitor(0.1, 200, give_up=False)
    assert not any(patient(None, e) for e in 0.9 - 1e-4 * np.arange(50))
    assert patient(None, 0.1)
    quick = _tensorly.target_monitor(0.1, 200, give_up=True)
    # 1e-4 per iteration: at twice that pace the 190 iterations left would reach 0.86, not 0.1
    stops = [quick(None, e) for e in 0.9 - 1e-4 * np.arange(12)]
    assert not any(stops[:10]) and stops[10]
    brisk = _tensorly.target_monitor(0.1, 200, give_up=True)
    assert not any(brisk(None, e) for e in 0.9 - 1e-2 * np.arange(50))   # on pace for the target


def test_zero_weight_decomposes_exactly():
    z = np.zeros((3, 2, 3, 3, 3))
    for k in (D.cp(z, 2), D.cp(z, 0.1), D.tucker(z, (2, 1))):
        assert k.relative_error == 0.0
        np.testing.assert_array_equal(k.to_dense(), z)


# ------------------------------------------------------------------------------------------------ Tucker


def orthonormal(rng, n, r):
    return np.linalg.qr(rng.standard_normal((n, r)))[0]


def test_tucker2_recovers_a_tucker2_tensor(rng):
    core = rng.standard_normal((3, 2, 3, 4, 5))
    factors = [rng.standard_normal((7, 3)), rng.standard_normal((6, 2)), None, None, None]
    w = tucker_reference(core, factors)
    k = D.tucker(w, (3, 2))
    assert isinstance(k, D.TuckerKernel)
    assert k.factors[2:] == [None, None, None]
    assert [f.shape for f in k.factors[:2]] == [(7, 3), (6, 2)]
    assert k.ranks == (3, 2, 3, 4, 5) and k.shape == w.shape and k.ndim == 5
    assert k.relative_error < 1e-10
    assert rel_err(w, tucker_reference(k.core, k.factors)) < 1e-10
    np.testing.assert_allclose(k.to_dense(), w, rtol=0, atol=1e-10 * np.abs(w).max())
    # a 1x1x1 conv 6 -> 2, the 3x4x5 core conv 2 -> 3, a 1x1x1 conv 3 -> 7
    assert k.macs_per_voxel == 6 * 2 + 3 * 2 * 3 * 4 * 5 + 7 * 3


@pytest.mark.parametrize("shape, ranks", [((6, 5, 4, 4, 5), (3, 2, 2, 3, 2)), ((6, 7, 5), (2, 3, 4))])
def test_full_tucker_recovers_a_tucker_tensor(rng, shape, ranks):
    core = rng.standard_normal(ranks)
    w = tucker_reference(core, [orthonormal(rng, n, r) for n, r in zip(shape, ranks)])
    k = D.tucker(w, ranks)
    assert k.ranks == ranks and k.shape == shape
    assert all(f is not None and f.shape == (n, r) for f, n, r in zip(k.factors, shape, ranks))
    assert k.relative_error < 1e-10
    np.testing.assert_allclose(tucker_reference(k.core, k.factors), w, rtol=0, atol=1e-10 * np.abs(w).max())
    np.testing.assert_allclose(k.to_dense(), w, rtol=0, atol=1e-10 * np.abs(w).max())


def test_tucker_macs_of_a_3d_kernel():
    """1-D passes W (r outputs), H (r^2), D (r^3), then the core: r*kw + r^2*kh + r^3*kd + r^3."""
    k = D.TuckerKernel(np.ones((2, 2, 2)), [np.ones((5, 2)), np.ones((6, 2)), np.ones((7, 2))])
    assert k.macs_per_voxel == 2 * 7 + 4 * 6 + 8 * 5 + 8


def test_tucker_constructor_keeps_modes():
    k = D.TuckerKernel(np.ones((2, 3, 1, 1, 1)), [np.ones((4, 2)), None, None, None, None])
    assert k.shape == (4, 3, 1, 1, 1) and k.relative_error is None
    np.testing.assert_array_equal(k.to_dense(), np.full((4, 3, 1, 1, 1), 2.0))   # sums of 2 ones


# ------------------------------------------------------------------------------------------------ separable


def test_separable_gaussian_is_rank_one():
    g = vc.kernels.gaussian(1.5).to_dense()
    s = D.separable(g)
    assert isinstance(s, vc.kernels.SeparableKernel) and s.rank == 1
    assert rel_err(g, s.to_dense()) < 1e-10
    assert rel_err(g, np.einsum("r,ri,rj,rk->ijk", s.weights, *s.factors)) < 1e-10
    assert D.cp(g, 1).relative_error < 1e-10


def test_separable_log_is_rank_three():
    lap = vc.kernels.log(1.5).to_dense()
    assert D.cp(lap, 2).relative_error > 1e-3
    s = D.separable(lap, 3)
    assert s.rank == 3 and rel_err(lap, s.to_dense()) < 1e-6
    assert D.separable(lap, 1e-6).rank == 3


# ------------------------------------------------------------------------------------------------ suggest


def test_suggest_a_rank_two_weight(rng):
    shape = (8, 6, 3, 3, 3)
    w = random_cp(rng, shape, 2)
    tolerance = 1e-3
    found = D.suggest(w, tolerance)
    kinds = {c.kind: c for c in found}
    assert set(kinds) == {"dense", "sparse", "cp", "tucker"}
    dense_macs = math.prod(shape)
    for c in found:
        assert c.relative_error <= tolerance
        assert c.predicted_speedup == pytest.approx(dense_macs / c.macs_per_voxel)
        assert c.relative_error == pytest.approx(rel_err(w, np.asarray(c.kernel)), rel=1e-9, abs=1e-15)
    assert [c.macs_per_voxel for c in found] == sorted(c.macs_per_voxel for c in found)
    assert kinds["dense"].relative_error == 0 and kinds["dense"].macs_per_voxel == dense_macs
    cp = kinds["cp"]
    assert cp.params["rank"] <= 2 and cp.predicted_speedup > 1
    assert cp.macs_per_voxel == cp.params["rank"] * (6 + 3 + 3 + 3 + 8)
    ro, ri = kinds["tucker"].params["ranks"][:2]
    assert (ro, ri) == (2, 2)   # (1, 1) cannot hold a generic rank-2 weight
    assert kinds["tucker"].macs_per_voxel == 6 * ri + ro * ri * 27 + 8 * ro
    assert found[0].kind == "cp"


def test_suggest_sparse_is_the_fewest_entries(rng):
    w = rng.standard_normal((4, 5, 6))
    w[0] = 0.0
    tolerance = 0.3
    sparse = next(c for c in D.suggest(w, tolerance) if c.kind == "sparse")
    kept = sparse.kernel != 0
    assert sparse.macs_per_voxel == sparse.params["nnz"] == kept.sum()
    assert sparse.params["density"] == pytest.approx(kept.sum() / w.size)
    np.testing.assert_array_equal(sparse.kernel[kept], w[kept])
    assert np.abs(w[kept]).min() >= np.abs(w[~kept]).max()   # the largest magnitudes are kept
    assert rel_err(w, sparse.kernel) <= tolerance
    one_less = sparse.kernel.copy()
    one_less.flat[np.flatnonzero(kept)[np.argmin(np.abs(w[kept]))]] = 0.0
    assert rel_err(w, one_less) > tolerance
    exact = next(c for c in D.suggest(w, 0) if c.kind == "sparse")   # tolerance 0 still drops the zeros
    assert exact.relative_error == 0 and exact.params["nnz"] == np.count_nonzero(w)
    assert {c.kind for c in D.suggest(w, 0)} == {"dense", "sparse"}


def test_suggest_a_gaussian_kernel():
    g = vc.kernels.gaussian((1.0, 1.5, 2.0)).to_dense()
    kinds = {c.kind: c for c in D.suggest(g, 1e-8)}
    assert kinds["cp"].params["rank"] == 1 and kinds["cp"].macs_per_voxel == sum(g.shape)
    assert kinds["tucker"].params["ranks"] == (1, 1, 1)
    assert kinds["tucker"].macs_per_voxel == g.shape[2] + g.shape[1] + g.shape[0] + 1


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("rank, error", [(0, ValueError), (-1, ValueError), (2.5, ValueError), (1.0, ValueError),
                                         (0.0, ValueError), ("3", TypeError), (True, TypeError), (None, TypeError)])
def test_cp_refuses_bad_ranks(rank, error):
    with pytest.raises(error, match="rank"):
        D.cp(np.ones((2, 3, 4)), rank)


@pytest.mark.parametrize("ranks, match", [((7, 2), r"mode 0 \(Cout\).*size 6"), ((2, 6), r"mode 1 \(Cin\).*size 5"),
                                          ((0, 2), "mode 0"), ((2, 2, 2), "2 ints"),
                                          ((1, 1, 4, 1, 1), r"mode 2 \(kd\).*size 3")])
def test_tucker_refuses_bad_ranks(ranks, match):
    with pytest.raises(ValueError, match="ranks") as info:
        D.tucker(np.ones((6, 5, 3, 3, 3)), ranks)
    assert info.match(match)


def test_tucker_refuses_bad_ranks_of_a_3d_kernel():
    with pytest.raises(ValueError, match=r"ranks.*mode 1 \(kh\).*size 4"):
        D.tucker(np.ones((3, 4, 5)), (1, 5, 1))
    with pytest.raises(ValueError, match="3 ints"):
        D.tucker(np.ones((3, 4, 5)), (1, 1))
    with pytest.raises(TypeError, match="ranks"):
        D.tucker(np.ones((3, 4, 5)), 2)
    with pytest.raises(TypeError, match="ranks"):
        D.tucker(np.ones((3, 4, 5)), (1, 1.5, 1))


@pytest.mark.parametrize("shape", [(3, 3), (2, 3, 3, 3), (1, 2, 3, 3, 3, 3), (0, 3, 3)])
def test_weights_of_the_wrong_shape_are_refused(shape):
    w = np.ones(shape)
    for call in (lambda: D.cp(w, 1), lambda: D.tucker(w, (1, 1)), lambda: D.suggest(w, 0.1)):
        with pytest.raises(ValueError, match=r"weight.*" + re.escape(str(shape))):
            call()
    with pytest.raises(ValueError, match="kernel3d"):
        D.separable(np.ones((2, 2, 3, 3, 3)))


def test_non_finite_weights_are_refused():
    w = np.ones((2, 3, 4))
    w[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="weight must be finite"):
        D.cp(w, 1)


def test_constructors_validate_factors():
    ok = [np.ones((3, 2)), np.ones((4, 2)), np.ones((5, 2))]
    assert D.CPKernel(np.ones(2), ok).shape == (3, 4, 5)
    with pytest.raises(ValueError, match="columns"):
        D.CPKernel(np.ones(2), [np.ones((3, 2)), np.ones((4, 3)), np.ones((5, 2))])
    with pytest.raises(ValueError, match="columns"):
        D.CPKernel(np.ones(3), ok)
    with pytest.raises(ValueError, match="factors must hold one matrix per mode"):
        D.CPKernel(np.ones(2), ok + [np.ones((2, 2))])
    with pytest.raises(ValueError, match=r"factors\[1\]"):
        D.CPKernel(np.ones(2), [ok[0], np.ones(4), ok[2]])
    with pytest.raises(ValueError, match=r"factors\[2\] must be finite"):
        D.CPKernel(np.ones(2), ok[:2] + [np.full((5, 2), np.inf)])
    with pytest.raises(ValueError, match="weights"):
        D.CPKernel(np.ones((2, 1)), ok)
    with pytest.raises(ValueError, match="relative_error"):
        D.CPKernel(np.ones(2), ok, relative_error=-1.0)
    with pytest.raises(ValueError, match="core"):
        D.TuckerKernel(np.ones((2, 2)), [np.ones((3, 2))] * 3)
    with pytest.raises(ValueError, match=r"factors\[1\] must have core.shape\[1\] = 2 columns"):
        D.TuckerKernel(np.ones((2, 2, 2)), [np.ones((3, 2)), np.ones((3, 3)), None])
    with pytest.raises(ValueError, match="one matrix per mode"):
        D.TuckerKernel(np.ones((2, 2, 2, 2)), [None] * 4)


def test_shape_does_not_rebuild_the_kernel():
    """A (1000,)*5 kernel would need 8 PB dense: shape comes from the factors."""
    k = D.CPKernel(np.ones(1), [np.ones((1000, 1))] * 5)
    assert k.shape == (1000,) * 5 and k.ndim == 5
    t = D.TuckerKernel(np.ones((1, 1, 1)), [np.ones((10**6, 1))] * 3)
    assert t.shape == (10**6,) * 3


class _Unreadable:
    """A weight whose values must never be read: only its shape."""

    def __init__(self, shape):
        self.shape = shape

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the weight was converted before the memory cap was checked")


def test_memory_cap_refuses_before_any_work():
    with pytest.raises(ValueError, match=r"2 GiB.*#32"):
        D.cp(_Unreadable((64, 64, 31, 31, 31)), 3)
    with pytest.raises(ValueError, match=r"2 GiB.*#32"):
        D.cp(_Unreadable((64, 64, 64, 64, 64)), 0.1)   # even rank 1 is over the cap
    with pytest.raises(ValueError, match="2 GiB"):
        D.cp(np.broadcast_to(0.0, (64, 64, 31, 31, 31)), 3)


def test_torch_tensors_are_accepted(rng):
    torch = pytest.importorskip("torch")
    w = random_cp(rng, (4, 3, 3, 3, 3), 2)
    t = torch.tensor(w, requires_grad=True)
    k = D.cp(t, 2)
    np.testing.assert_array_equal(k.to_dense(), D.cp(w, 2).to_dense())
    assert k.relative_error < 1e-6
    tk = D.tucker(t, (2, 2))
    assert tk.relative_error < 1e-10
    assert any(c.kind == "cp" for c in D.suggest(t, 1e-3))
    assert D.separable(torch.from_numpy(vc.kernels.gaussian(1.0).to_dense())).rank == 1
    built = D.CPKernel(torch.ones(2), [torch.ones(3, 2, dtype=torch.float32)] * 3)
    assert built.factors[0].dtype == np.float64 and built.shape == (3, 3, 3)
