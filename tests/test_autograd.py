"""Autograd: gradcheck of vc.conv3d on torch tensors, and vc.nn.Conv3d against torch.nn.Conv3d.

gradcheck runs in float64 with torch's defaults (eps=1e-6, atol=1e-5, rtol=1e-3): the finite differences have
an error ~eps^2 * |f'''| + 1e-16/eps ~ 1e-10 here, so those tolerances catch any wrong gradient (a wrong sign,
a missing fold of the padding, a transposed kernel) while being immune to rounding, FFT included (~1e-15).

Module comparisons run in float32 against torch in float64, with conftest.conv_tolerance: forward as in
test_conv3d; gradients are sums too (input grad: Og*k^3 terms, times up to 2^3 for a non-zero padding mode's
fold; weight grad: N*Do*Ho*Wo terms; bias grad: N*Do*Ho*Wo terms), so the same bound applies with mag = the
gradient computed from |x|, |w|, |grad_out|.
"""
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
vc = pytest.importorskip("volconv")

from conftest import assert_within, check_conv3d, conv_tolerance  # noqa: E402

@pytest.fixture(autouse=True)
def torch_one_thread():
    """gradcheck makes thousands of calls on tiny tensors; with 2 threads on a busy 2-core machine every call
    pays an OpenMP barrier that may wait a whole scheduler tick (10x-100x slower). Correctness of the threaded
    paths is test_threads.py's job."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


GRAD_CONFIGS = [
    pytest.param(dict(), id="plain-pad0"),
    pytest.param(dict(padding=1), id="pad1"),
    pytest.param(dict(padding=1, stride=2), id="stride2"),
    pytest.param(dict(padding=(1, 0, 1), stride=(1, 2, 3)), id="stride-triple"),
    pytest.param(dict(padding=2, dilation=2), id="dil2"),
    pytest.param(dict(padding=(2, 1, 0), dilation=(2, 1, 1), stride=(2, 1, 1)), id="dil-stride-mixed"),
    pytest.param(dict(padding=1, groups=2), id="groups2"),
    pytest.param(dict(padding=1, groups=2, out_channels=4), id="depthwise-mult2"),
    pytest.param(dict(padding=1, padding_mode="reflect"), id="reflect"),
    pytest.param(dict(padding=(1, 2, 0), padding_mode="replicate"), id="replicate"),
    pytest.param(dict(padding=2, padding_mode="circular"), id="circular"),
    pytest.param(dict(padding=1, padding_mode="reflect", stride=2, groups=2), id="reflect-stride-groups"),
    pytest.param(dict(padding="same", kshape=(2, 3, 4)), id="same-even"),
    pytest.param(dict(padding="same", kshape=(2, 3, 4), padding_mode="circular"), id="same-even-circular"),
    pytest.param(dict(padding="valid", bias=False), id="valid-no-bias"),
]


def _grad_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = cfg.get("groups", 1)
    c_in, c_out = 2, cfg.get("out_channels", 2)
    kshape = cfg.get("kshape", (3, 3, 3))
    x = torch.randn(1, c_in, 5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in // groups, *kshape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True) if cfg.get("bias", True) else None
    kw = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode") if k in cfg}
    return x, w, b, kw


@pytest.mark.parametrize("algorithm", ["direct", "fft"])
@pytest.mark.parametrize("cfg", GRAD_CONFIGS)
def test_gradcheck(cfg, algorithm):
    x, w, b, kw = _grad_inputs(cfg)
    inputs = (x, w) if b is None else (x, w, b)

    def f(*args):  # one thread: these tiny problems only pay OpenMP's synchronisation (test_threads covers it)
        return vc.conv3d(*args, **kw, algorithm=algorithm, workers=1)

    out = f(*inputs)
    assert out.requires_grad and out.grad_fn is not None, "vc.conv3d is not differentiable on torch tensors"
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["auto", "torch"])
@pytest.mark.parametrize("cfg", [GRAD_CONFIGS[2], GRAD_CONFIGS[9]])
def test_gradcheck_other_algorithms(cfg, algorithm):
    x, w, b, kw = _grad_inputs(cfg, seed=1)
    assert torch.autograd.gradcheck(lambda *a: vc.conv3d(*a, **kw, algorithm=algorithm, workers=1), (x, w, b))


@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_gradient_of_one_argument_only(which):
    """Only one argument needs a gradient (the Function's needs_input_grad paths)."""
    x, w, b, kw = _grad_inputs(dict(padding=1, stride=2, padding_mode="replicate"), seed=2)
    for t, name in ((x, "input"), (w, "weight"), (b, "bias")):
        t.requires_grad_(name == which)
    target = {"input": x, "weight": w, "bias": b}[which]
    assert torch.autograd.gradcheck(lambda t: vc.conv3d(*[t if a is target else a for a in (x, w, b)], **kw,
                                                        algorithm="direct", workers=1), (target,))


def test_numpy_path_has_no_autograd():
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5, 5))
    w = np.ones((1, 2, 3, 3, 3))
    assert isinstance(vc.conv3d(x, w), np.ndarray)


def test_no_grad_context():
    x, w, b, kw = _grad_inputs(dict(padding=1))
    with torch.no_grad():
        out = vc.conv3d(x, w, b, **kw)
    assert not out.requires_grad


def test_double_call_accumulates_like_torch():
    """Gradients accumulate across two uses of the same weight (no state kept between calls)."""
    x, w, b, kw = _grad_inputs(dict(padding=1))
    (vc.conv3d(x, w, b, **kw, algorithm="direct").sum() + vc.conv3d(x * 2, w, b, **kw, algorithm="fft").sum()
     ).backward()
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F = torch.nn.functional
    (F.conv3d(x2, w2, b2, padding=1).sum() + F.conv3d(x2 * 2, w2, b2, padding=1).sum()).backward()
    for a, e in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# vc.nn.Conv3d vs torch.nn.Conv3d
# --------------------------------------------------------------------------------------------------------------

def test_conv3d_module_constructor_matches_torch():
    """torch.nn.Conv3d's arguments, order and defaults; algorithm and workers keyword-only."""
    defaults = vc.nn.Conv3d(2, 4, 3)
    ref = torch.nn.Conv3d(2, 4, 3)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(defaults, attr) == getattr(ref, attr), attr
    assert defaults.bias is not None and defaults.weight.shape == ref.weight.shape
    assert defaults.weight.dtype == torch.float32
    # positional, in torch's order
    m = vc.nn.Conv3d(4, 6, 3, 2, 1, 2, 2, False, "reflect")
    assert (m.stride, m.padding, m.dilation, m.groups, m.bias, m.padding_mode) == \
        ((2, 2, 2), (1, 1, 1), (2, 2, 2), 2, None, "reflect")
    assert m.weight.shape == (6, 2, 3, 3, 3)
    # keywords, torch's names
    m = vc.nn.Conv3d(in_channels=2, out_channels=2, kernel_size=(1, 2, 3), stride=1, padding="same", dilation=1,
                     groups=1, bias=True, padding_mode="zeros", device="cpu", dtype=torch.float64,
                     algorithm="direct", workers=1)
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert m.weight.shape == (2, 2, 1, 2, 3)
    # algorithm and workers only as keywords
    with pytest.raises(TypeError):
        vc.nn.Conv3d(2, 2, 3, 1, 0, 1, 1, True, "zeros", None, None, "fft")
    assert isinstance(m, torch.nn.Module)
    assert set(dict(m.named_parameters())) == {"weight", "bias"}
    assert set(ref.state_dict()) == set(defaults.state_dict())


def test_conv3d_module_keyword_only_in_signature():
    """The two volconv extras are keyword-only where the signature shows them."""
    params = inspect.signature(vc.nn.Conv3d.__init__).parameters
    for name in ("algorithm", "workers"):
        assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["algorithm"].default == "auto" and params["workers"].default is None


def test_conv3d_module_repr_shows_non_defaults():
    assert "fft" in repr(vc.nn.Conv3d(2, 2, 3, algorithm="fft"))
    assert "workers" in repr(vc.nn.Conv3d(2, 2, 3, workers=1))
    assert "algorithm" not in repr(vc.nn.Conv3d(2, 2, 3))


MODULE_CONFIGS = [
    pytest.param(dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), id="k3-pad1"),
    pytest.param(dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 4), padding="same"), id="same-even"),
    pytest.param(dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, stride=2, groups=2),
                 id="stride2-groups2"),
    pytest.param(dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=4),
                 id="depthwise-dil2"),
    pytest.param(dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"),
                 id="reflect"),
    pytest.param(dict(in_channels=3, out_channels=2, kernel_size=3, padding=(2, 1, 0), padding_mode="replicate",
                      bias=False), id="replicate-no-bias"),
    pytest.param(dict(in_channels=2, out_channels=3, kernel_size=5, padding=2, padding_mode="circular",
                      stride=(1, 2, 1)), id="circular-k5"),
    pytest.param(dict(in_channels=6, out_channels=6, kernel_size=3, padding=1), id="channel-mixing"),
    pytest.param(dict(in_channels=1, out_channels=2, kernel_size=7, padding=3), id="k7"),
]


def _magnitude_grads(x, w, G, kwargs):
    """Gradients of sum(|G| * conv(|x|, |w|)) in float64: the sums of |terms| behind each true gradient."""
    m = torch.nn.Conv3d(**{**kwargs, "bias": False}).double()
    xa = x.detach().double().abs().requires_grad_()
    with torch.no_grad():
        m.weight.copy_(w.detach().double().abs())
    (m(xa) * G.double().abs()).sum().backward()
    return xa.grad.numpy(), m.weight.grad.numpy()


@pytest.mark.parametrize("algorithm", ["auto", "direct", "fft", "torch"])
@pytest.mark.parametrize("kwargs", MODULE_CONFIGS)
def test_module_forward_backward_match_torch(kwargs, algorithm):
    torch.manual_seed(0)
    ref32 = torch.nn.Conv3d(**kwargs)
    mod = vc.nn.Conv3d(**kwargs, algorithm=algorithm)
    mod.load_state_dict(ref32.state_dict())
    ref = torch.nn.Conv3d(**kwargs).double()
    ref.load_state_dict(ref32.state_dict())

    x = torch.randn(2, kwargs["in_channels"], 8, 7, 9, requires_grad=True)
    out = mod(x)
    assert out.dtype == torch.float32 and out.requires_grad
    conv_kw = {k: kwargs[k] for k in ("stride", "padding", "dilation", "groups", "padding_mode") if k in kwargs}
    check_conv3d(out.detach(), x.detach(), mod.weight.detach(), None if mod.bias is None else mod.bias.detach(),
                 algorithm=algorithm, context=f"forward {kwargs}", **conv_kw)

    G = torch.randn(out.shape)
    (out * G).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (ref(x64) * G.double()).sum().backward()

    mag_x, mag_w = _magnitude_grads(x, mod.weight, G, kwargs)
    groups = kwargs.get("groups", 1)
    k3 = int(np.prod(mod.weight.shape[2:]))
    n_in = (kwargs["out_channels"] // groups) * k3 * 8   # x8: a padding mode may fold up to 2^3 copies
    n_w = int(np.prod(out.shape)) // kwargs["out_channels"]
    tol_x = conv_tolerance(mag_x, np.float32, n_in, algorithm, mag_x.size + out[0, 0].numel())
    assert_within(x.grad, x64.grad.numpy(), tol_x, f"input grad {kwargs} {algorithm}")
    tol_w = conv_tolerance(mag_w, np.float32, n_w, algorithm, x[0, 0].numel())
    assert_within(mod.weight.grad, ref.weight.grad.numpy(), tol_w, f"weight grad {kwargs} {algorithm}")
    if mod.bias is not None:
        mag_b = G.double().abs().sum(dim=(0, 2, 3, 4)).numpy()
        tol_b = conv_tolerance(mag_b, np.float32, n_w, "direct")
        assert_within(mod.bias.grad, ref.bias.grad.numpy(), tol_b, f"bias grad {kwargs} {algorithm}")


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_module_non_contiguous_input_and_grad(layout):
    torch.manual_seed(1)
    ref = torch.nn.Conv3d(3, 4, 3, padding=1).double()
    mod = vc.nn.Conv3d(3, 4, 3, padding=1, dtype=torch.float64, algorithm="direct")
    mod.load_state_dict(ref.state_dict())
    base = torch.randn(2, 3, 7, 8, 9, dtype=torch.float64)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last_3d)
    else:
        x = base.permute(0, 1, 4, 3, 2).contiguous().permute(0, 1, 4, 3, 2)
    assert not x.is_contiguous()
    x.requires_grad_()
    x2 = base.clone().requires_grad_()
    G = torch.randn(2, 9, 8, 7, 4, dtype=torch.float64).permute(0, 4, 3, 2, 1)  # non-contiguous grad_output
    (mod(x) * G).sum().backward()
    (ref(x2) * G).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=1e-10, atol=1e-10)


def test_module_trains_like_torch():
    """Three SGD steps through a small network give the same parameters as with torch.nn.Conv3d."""
    torch.manual_seed(2)

    def net(conv_cls, **extra):
        return torch.nn.Sequential(conv_cls(2, 4, 3, padding=1, **extra), torch.nn.ReLU(),
                                   conv_cls(4, 1, 3, padding=1, padding_mode="replicate", **extra)).double()

    ref = net(torch.nn.Conv3d)
    ours = net(vc.nn.Conv3d, algorithm="direct")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 2, 6, 6, 6, dtype=torch.float64)
    y = torch.randn(2, 1, 6, 6, 6, dtype=torch.float64)
    for model in (ref, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-9, msg=name)


# ------------------------------------------------------------------------------------------------------------
# correlate / convolve are differentiable too (every scipy mode, cval, origins)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reflect", "constant", "nearest", "mirror", "wrap"])
@pytest.mark.parametrize("op", ["correlate", "convolve"])
def test_filter_gradcheck(op, mode):
    torch.manual_seed(3)
    v = torch.randn(5, 6, 7, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    fn = getattr(vc, op)
    origin = (0, -1, 1) if op == "correlate" else (1, 0, -1)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, mode=mode, cval=1.5, origin=origin), (v, k))
    import scipy.ndimage as ndi
    ref = getattr(ndi, op)(v.detach().numpy(), k.detach().numpy(), mode=mode, cval=1.5, origin=origin)
    out = fn(v, k, mode=mode, cval=1.5, origin=origin)
    assert out.requires_grad
    # float64: a few ulps of sum|k| * max|v| (direct sum of 18 terms)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=0, atol=1e-12)


def test_filter_gradient_with_numpy_kernel():
    """A numpy kernel joins the graph as a constant; the volume's gradient is the adjoint filter."""
    v = torch.randn(6, 6, 6, dtype=torch.float64, requires_grad=True)
    k = np.random.default_rng(0).standard_normal((3, 3, 3))
    vc.correlate(v, k, mode="constant").sum().backward()
    # d/dv sum(correlate(v, k)) with zero padding = correlate(ones, flipped k) with zero padding
    import scipy.ndimage as ndi
    expected = ndi.correlate(np.ones((6, 6, 6)), k[::-1, ::-1, ::-1], mode="constant")
    np.testing.assert_allclose(v.grad.numpy(), expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Gradients on rows wide enough for the vector kernels (gradcheck's tiny volumes only reach their scalar tails)
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cin, cout, groups, k, stride, dilation, width", [
    (4, 8, 1, 3, 1, 1, 37),    # 4-channel blocks of the weight gradient, taps 3, a tail of 5 columns
    (8, 8, 2, 5, 1, 1, 64),    # grouped, 4-channel blocks, taps 4 + 1
    (3, 3, 3, 9, 1, 1, 40),    # depthwise: one channel per block, taps 8 + 1
    (2, 3, 1, 7, 2, 1, 45),    # stride: phase-split rows
    (3, 2, 1, 3, 1, 2, 33),    # dilation
    (1, 1, 1, 1, 1, 1, 16),    # pointwise, exactly one vector
])
def test_wide_row_gradients_match_torch(cin, cout, groups, k, stride, dilation, width, dtype):
    torch.manual_seed(7)
    x = torch.randn(2, cin, 5, 6, width, dtype=dtype, requires_grad=True)
    w = torch.randn(cout, cin // groups, k, k, k, dtype=dtype, requires_grad=True)
    kw = dict(stride=stride, dilation=dilation, groups=groups, padding=dilation * (k // 2))
    g = torch.randn_like(torch.nn.functional.conv3d(x, w, **kw))
    gx, gw = torch.autograd.grad(vc.conv3d(x, w, algorithm="direct", **kw), (x, w), g)
    def grads(xv, wv, gv):
        xv, wv = xv.detach().double().requires_grad_(), wv.detach().double().requires_grad_()
        return torch.autograd.grad(torch.nn.functional.conv3d(xv, wv, **kw), (xv, wv), gv.double())

    rx, rw = grads(x, w, g)
    mag_x, mag_w = grads(x.abs(), w.abs(), g.abs())   # per entry: the sum of |products| it adds up
    # rounding of a sum of T terms: within ~sqrt(T) * eps of that magnitude (x8 margin, as in conftest)
    eps = torch.finfo(dtype).eps
    terms_w = g[:, 0].numel()
    terms_x = w[0].numel() * cout // groups
    assert ((gw.double() - rw).abs() <= 8 * eps * terms_w ** 0.5 * mag_w + 1e-300).all()
    assert ((gx.double() - rx).abs() <= 8 * eps * terms_x ** 0.5 * mag_x + 1e-300).all()
