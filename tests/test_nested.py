"""vc.nested_conv3d / vc.nested.compose / vc.multiscale_conv3d / vc.multiscale.merge and their layers, against
the sequential and parallel torch.nn.functional.conv3d references computed in float64.

Tolerances: float64 results within 1e-10 of the reference's scale; float32 within 2e-5 x the reference's
largest magnitude per stage (each stage's sums are of at most a few thousand float32 products)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import volconv as vc
from volconv.engine import nested

from conftest import config_rng

ACT = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def torch_chain(x, weights, biases, activation, groups):
    """The sequential chain in float64: conv3d(padding='same') per stage, the activation between stages."""
    y = torch.as_tensor(np.asarray(x, np.float64))
    for i, (w, b) in enumerate(zip(weights, biases)):
        y = F.conv3d(y, torch.as_tensor(np.asarray(w, np.float64)),
                     None if b is None else torch.as_tensor(np.asarray(b, np.float64)), padding="same", groups=groups)
        if i + 1 < len(weights):
            y = ACT[activation](y)
    return y.numpy()


def torch_branches(x, weights, dilations, groups, combine, biases):
    ys = [F.conv3d(torch.as_tensor(np.asarray(x, np.float64)), torch.as_tensor(np.asarray(w, np.float64)),
                   None if b is None else torch.as_tensor(np.asarray(b, np.float64)), padding="same", dilation=d,
                   groups=groups) for w, d, b in zip(weights, dilations, biases)]
    return (sum(ys) if combine == "sum" else torch.cat(ys, 1)).numpy()


def assert_close(got, want, dtype, stages=1):
    got = np.asarray(got.detach() if isinstance(got, torch.Tensor) else got, np.float64)
    scale = max(np.abs(want).max(), 1e-300)
    tol = 1e-10 if dtype == np.float64 else 2e-5 * stages
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max() / scale


def random_chain(r, stages, groups, channels_in, max_k=9):
    """Weights and biases of a chain: odd kernel sizes in [1, max_k] mixed per axis, channels multiples of
    groups, some biases missing."""
    ws, bs, cin = [], [], channels_in
    for s in range(stages):
        cout = groups * int(r.integers(1, 4))
        k = tuple(int(v) for v in 2 * r.integers(0, (max_k + 1) // 2, size=3) + 1)
        ws.append(r.standard_normal((cout, cin // groups) + k))
        bs.append(r.standard_normal(cout) if r.random() < 0.7 else None)
        cin = cout
    return ws, bs


@pytest.mark.parametrize("case", range(16))
def test_nested_random_chains_against_torch(case):
    r = config_rng(501, case)
    groups = int(r.choice([1, 2, 3]))
    stages = int(r.choice([2, 3]))
    ws, bs = random_chain(r, stages, groups, groups * int(r.integers(1, 4)))
    dtype = [np.float64, np.float32][case % 2]
    act = [None, "relu", "gelu", "silu"][case % 4]
    shape = (int(r.integers(1, 3)), ws[0].shape[1] * groups) + tuple(int(v) for v in r.integers(3, 14, size=3))
    x = r.standard_normal(shape)
    want = torch_chain(x, ws, bs, act, groups)
    for algorithm in ("fused", "stages", "auto"):
        got = vc.nested_conv3d(x.astype(dtype), [w.astype(dtype) for w in ws],
                               [None if b is None else b.astype(dtype) for b in bs], act, groups,
                               algorithm=algorithm)
        assert got.dtype == dtype
        assert_close(got, want, dtype, stages)


@pytest.mark.parametrize("groups,chans,ks,act", [
    (32, (32, 32), (7, 3), "relu"),          # the depthwise chain of the benchmark, smaller volume
    (1, (16, 16), (7, 3), "relu"),
    (1, (4, 1), ((5, 1, 3), (1, 3, 1)), None),  # anisotropic kernels
    (2, (6, 4, 2), (9, 5, 1), "gelu"),
    (1, (3, 3), (2, 4), "silu"),             # even kernels: torch's padding='same' ((k - 1) // 2 before)
])
def test_nested_hand_picked(groups, chans, ks, act):
    r = np.random.default_rng(7)
    cin = groups * 1 if groups > 1 else 2
    cin = 32 if groups == 32 else cin
    ws, bs = [], []
    for c, k in zip(chans, ks):
        k = (k,) * 3 if isinstance(k, int) else k
        ws.append(r.standard_normal((c, cin // groups) + k).astype(np.float32))
        bs.append(r.standard_normal(c).astype(np.float32))
        cin = c
    x = r.standard_normal((2, ws[0].shape[1] * groups, 11, 12, 37)).astype(np.float32)
    xt = torch.from_numpy(x).transpose(3, 4).contiguous().transpose(3, 4)   # non-contiguous torch input
    got = vc.nested_conv3d(xt, [torch.from_numpy(w) for w in ws], [torch.from_numpy(b) for b in bs], act, groups)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert_close(got, torch_chain(x, ws, bs, act, groups), np.float32, len(ws))


def test_fused_is_thread_count_independent_and_keeps_nan_local():
    r = np.random.default_rng(3)
    ws = [r.standard_normal((4, 2, 5, 5, 5)), r.standard_normal((2, 4, 3, 3, 3))]
    x = r.standard_normal((1, 2, 16, 9, 10))
    one = vc.nested_conv3d(x, ws, None, "relu", algorithm="fused", workers=1)
    two = vc.nested_conv3d(x, ws, None, "relu", algorithm="fused", workers=2)
    assert np.array_equal(one, two)
    x[0, 0, 8, 4, 5] = np.nan
    y = vc.nested_conv3d(x, ws, None, None, algorithm="auto")
    reach = 2 + 1   # the two stages' reach from the NaN
    bad = np.argwhere(np.isnan(y))[:, 2:]
    assert bad.size and np.abs(bad - [8, 4, 5]).max() <= reach


def test_compose_equals_the_chain_in_the_interior():
    r = np.random.default_rng(11)
    for groups, ks in ((1, (5, 3)), (2, (3, 3, 3)), (1, ((3, 5, 1), (1, 3, 3)))):
        ws, bs, cin = [], [], 2 * groups
        for i, k in enumerate(ks):
            k = (k,) * 3 if isinstance(k, int) else k
            ws.append(r.standard_normal((2 * groups, cin // groups) + k))
            bs.append(r.standard_normal(2 * groups) if i != 1 else None)
            cin = 2 * groups
        w, b = vc.nested.compose(ws, bs, groups)
        assert w.shape[2:] == tuple(sum(wi.shape[a] for wi in ws) - len(ws) + 1 for a in range(2, 5))
        x = r.standard_normal((1, 2 * groups, 14, 13, 12))
        chain = torch_chain(x, ws, bs, None, groups)
        single = F.conv3d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding="same",
                          groups=groups).numpy()
        composed = vc.nested_conv3d(x, ws, bs, None, groups, algorithm="composed")
        assert_close(composed, single, np.float64)
        m = [sum((wi.shape[a] - 1) for wi in ws[1:]) for a in range(2, 5)]   # the later stages' reach
        inner = (slice(None), slice(None)) + tuple(slice(k, n - k) for k, n in zip(m, x.shape[2:]))
        assert_close(single[inner], chain[inner], np.float64)
        assert np.abs(single - chain).max() > 1e-6   # and at the border they differ: the chain pads each stage


@pytest.mark.parametrize("act", [None, "relu", "gelu", "silu"])
def test_nested_gradcheck_over_slabs(monkeypatch, act):
    monkeypatch.setattr(nested, "SLAB_BYTES", 1)   # one plane per slab: the slab bookkeeping is exercised
    torch.manual_seed(0)
    groups = 2 if act in ("relu", "silu") else 1
    x = torch.randn(2, 2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(4, 2 // groups, 3, 3, 3, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 4 // groups, 3, 1, 3, dtype=torch.float64, requires_grad=True)]
    bs = [torch.randn(4, dtype=torch.float64, requires_grad=True), None]
    f = lambda x, w0, w1, b0: vc.nested_conv3d(x, [w0, w1], [b0, None], act, groups)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, *ws, bs[0]))


def test_nested_gradients_match_torch_autograd(monkeypatch):
    monkeypatch.setattr(nested, "SLAB_BYTES", 3 * 4 * 8 * 9 * 8 * 3)   # a few planes per slab
    r = np.random.default_rng(5)
    x = r.standard_normal((2, 4, 13, 8, 9))
    ws = [r.standard_normal((4, 1, 5, 5, 5)), r.standard_normal((4, 1, 3, 3, 3))]
    bs = [r.standard_normal(4), r.standard_normal(4)]
    grad = r.standard_normal((2, 4, 13, 8, 9))
    ours = [torch.tensor(a, requires_grad=True) for a in [x] + ws + bs]
    vc.nested_conv3d(ours[0], ours[1:3], ours[3:], "relu", 4).backward(torch.from_numpy(grad))
    theirs = [torch.tensor(a, requires_grad=True) for a in [x] + ws + bs]
    y = F.conv3d(F.relu(F.conv3d(theirs[0], theirs[1], theirs[3], padding=2, groups=4)), theirs[2], theirs[4],
                 padding=1, groups=4)
    y.backward(torch.from_numpy(grad))
    for a, b in zip(ours, theirs):
        assert_close(a.grad, b.grad.numpy(), np.float64)


@pytest.mark.parametrize("case", range(10))
def test_multiscale_random_against_torch_branches(case):
    r = config_rng(502, case)
    groups = int(r.choice([1, 2, 4]))
    n = int(r.integers(1, 4))
    combine = ["concat", "sum"][case % 2]
    per = groups * int(r.integers(1, 3))
    outs = [per] * n if combine == "sum" else [groups * int(r.integers(1, 3)) for _ in range(n)]
    ks = [tuple(int(v) for v in r.integers(1, 8, size=3)) for _ in range(n)]
    dils = [int(v) for v in r.integers(1, 4, size=n)]
    C = groups * int(r.integers(1, 3))
    dtype = [np.float64, np.float32][(case // 2) % 2]
    x = r.standard_normal((int(r.integers(1, 3)), C, 9, 10, 12))
    ws = [r.standard_normal((o, C // groups) + k) for o, k in zip(outs, ks)]
    bs = [r.standard_normal(o) if r.random() < 0.5 else None for o in outs]
    want = torch_branches(x, ws, dils, groups, combine, bs)
    for algorithm in ("merged", "branches", "auto"):
        got = vc.multiscale_conv3d(x.astype(dtype), [w.astype(dtype) for w in ws], dils, groups, combine,
                                   [None if b is None else b.astype(dtype) for b in bs], algorithm=algorithm)
        assert_close(got, want, dtype)


def test_merge_is_the_exact_reparameterisation():
    r = np.random.default_rng(2)
    ws = [r.standard_normal((3, 3, k, k, k)) for k in (3, 5, 7)]
    w, b = vc.multiscale.merge(ws, [2, 1, 1], [np.ones(3), None, np.arange(3.0)])
    assert w.shape == (3, 3, 7, 7, 7)
    by_hand = ws[2].copy()
    by_hand[:, :, 1:6, 1:6, 1:6] += ws[1]
    by_hand[:, :, 1:6:2, 1:6:2, 1:6:2] += ws[0]   # 3^3 dilated by 2: extent 5, centred in 7
    np.testing.assert_allclose(w, by_hand, rtol=0, atol=1e-14)   # sums of three numbers, any order
    np.testing.assert_array_equal(b, np.ones(3) + np.arange(3.0))
    x = r.standard_normal((1, 3, 10, 11, 12))
    want = torch_branches(x, ws, [2, 1, 1], 1, "sum", [np.ones(3), None, np.arange(3.0)])
    assert_close(F.conv3d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=3).numpy(), want,
                 np.float64)


def test_layers_against_torch_and_gradcheck():
    torch.manual_seed(0)
    m = vc.nn.NestedConv3d(2, (4, 2), kernel_sizes=(5, 3), activation="gelu", dtype=torch.float64)
    x = torch.randn(2, 2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    want = torch_chain(x.detach().numpy(), [w.detach().numpy() for w in m.weights],
                       [b.detach().numpy() for b in m.biases], "gelu", 1)
    assert_close(m(x), want, np.float64)
    params = dict(m.named_parameters())
    assert sorted(params) == ["biases.0", "biases.1", "weights.0", "weights.1"]
    assert torch.autograd.gradcheck(lambda x, *ps: torch.func.functional_call(m, dict(zip(params, ps)), (x,)),
                                    (x,) + tuple(p.detach().requires_grad_() for p in params.values()))
    ms = vc.nn.MultiScaleConv3d(2, 2, kernel_sizes=(1, 3), dilations=(1, 2), combine="concat", groups=2,
                                dtype=torch.float64)
    want = torch_branches(x.detach().numpy(), [w.detach().numpy() for w in ms.weights], [1, 2], 2, "concat",
                          [b.detach().numpy() for b in ms.biases])
    assert_close(ms(x), want, np.float64)
    assert ms.out_channels == 4
    params = dict(ms.named_parameters())
    assert torch.autograd.gradcheck(lambda x, *ps: torch.func.functional_call(ms, dict(zip(params, ps)), (x,)),
                                    (x,) + tuple(p.detach().requires_grad_() for p in params.values()))
    again = vc.nn.MultiScaleConv3d(2, 2, kernel_sizes=(1, 3), dilations=(1, 2), groups=2, dtype=torch.float64)
    again.load_state_dict(ms.state_dict())
    assert torch.equal(again(x), ms(x))


def test_errors():
    x = np.zeros((1, 4, 5, 5, 5))
    w = np.zeros((4, 4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"weights\[1\] does not fit weights\[0\]'s output"):
        vc.nested_conv3d(x, [w, np.zeros((4, 3, 3, 3, 3))])
    with pytest.raises(ValueError, match=r"weights\[0\] does not fit input"):
        vc.nested_conv3d(np.zeros((1, 3, 5, 5, 5)), [w])
    with pytest.raises(ValueError, match="activation must be one of"):
        vc.nested_conv3d(x, [w], activation="tanh")
    with pytest.raises(ValueError, match="composed.*linear"):
        vc.nested_conv3d(x, [w, w], activation="relu", algorithm="composed")
    with pytest.raises(TypeError, match="non-empty list"):
        vc.nested_conv3d(x, [])
    with pytest.raises(ValueError, match=r"biases\[1\] must have shape \(4,\)"):
        vc.nested_conv3d(x, [w, w], [None, np.zeros(3)])
    with pytest.raises(ValueError, match="input must be 5-D"):
        vc.nested_conv3d(x[0, 0], [w])
    with pytest.raises(TypeError, match=r"weights\[0\] has dtype float32 but input has dtype float64"):
        vc.nested_conv3d(x, [w.astype(np.float32)])
    with pytest.raises(ValueError, match="combine='sum' needs the same number of output channels"):
        vc.multiscale_conv3d(x, [w, np.zeros((2, 4, 3, 3, 3))], combine="sum")
    with pytest.raises(ValueError, match="combine must be"):
        vc.multiscale_conv3d(x, [w], combine="max")
    with pytest.raises(ValueError, match=r"weights\[1\] has 2 input channels per group"):
        vc.multiscale_conv3d(x, [w, np.zeros((4, 2, 3, 3, 3))])
    with pytest.raises(ValueError, match="dilations must hold one entry per branch"):
        vc.multiscale_conv3d(x, [w, w], dilations=[1])
    with pytest.raises(ValueError, match="groups=3 must divide"):
        vc.nn.NestedConv3d(4, 6, groups=3)
    with pytest.raises(ValueError, match="channels must be an int or one per stage"):
        vc.nn.NestedConv3d(4, (4, 4, 4), kernel_sizes=(3, 3))
