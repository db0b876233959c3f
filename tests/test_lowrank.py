"""Low-rank execution (ops/lowrank.py): vc.cp_conv3d / vc.tucker_conv3d against torch.conv3d with the dense
weight REBUILT from the factors (float64 reference), over strides, dilations, paddings and padding modes,
dtypes, batches, odd and even kernels and ranks 1 to 32; the layers' gradients and conversions; bad input.

Tolerance: the factored computation sums over the input channels, the three 1-D passes (or the core) and the
ranks, each term bounded by the product of the factors' magnitudes, so the bound is gamma_n times the
convolution of |x| with the weight made of the factors' absolute values (n: all those terms)."""
import numpy as np
import pytest

import volconv as vc
from volconv.decompose import CPKernel, TuckerKernel

from conftest import assert_within, config_rng, conv_tolerance, ref_conv3d, valid_padding_for_mode

torch = pytest.importorskip("torch")

MODES = ["zeros", "reflect", "replicate", "circular"]


def random_geometry(r, i):
    ks = tuple(int(v) for v in r.integers(1, 6, 3))
    stride = tuple(int(v) for v in r.integers(1, 3, 3))
    dilation = tuple(int(v) for v in r.integers(1, 3, 3))
    spatial = tuple(int((k - 1) * d + 1 + r.integers(0, 9)) for k, d in zip(ks, dilation))
    padding = tuple(int(r.integers(0, 3)) for _ in range(3))
    mode = MODES[i % 4] if valid_padding_for_mode(MODES[i % 4], [(p, p) for p in padding], spatial) else "zeros"
    return ks, stride, dilation, spatial, padding, mode


def check_factored(out, x, w, w_abs, n_terms, b, dtype, **conv):
    ref, _ = ref_conv3d(x, w, b, **conv)
    _, mag = ref_conv3d(x, w_abs, None if b is None else np.abs(b), **conv)
    assert_within(out, ref, conv_tolerance(mag, dtype, n_terms, "direct"), str(conv))


@pytest.mark.parametrize("i", range(30))
def test_cp_conv3d_random_configs(i):
    r = config_rng(21, i)
    ks, stride, dilation, spatial, padding, mode = random_geometry(r, i)
    Cin, Cout, R = int(r.integers(1, 6)), int(r.integers(1, 6)), [1, 2, 4, 8, 16, 32][i % 6]
    dtype = np.float64 if i % 3 == 0 else np.float32
    cp = CPKernel(r.standard_normal(R), [r.standard_normal((n, R)) for n in (Cout, Cin) + ks])
    x = r.standard_normal((int(r.integers(1, 3)), Cin) + spatial).astype(dtype)
    b = r.standard_normal(Cout).astype(dtype) if i % 2 else None
    out = vc.cp_conv3d(x, cp, b, stride, padding, dilation, padding_mode=mode)
    assert out.dtype == dtype
    w_abs = CPKernel(np.abs(cp.weights), [np.abs(f) for f in cp.factors]).to_dense()
    check_factored(out, x, cp.to_dense(), w_abs, Cin + sum(ks) + R, b, dtype, stride=stride, padding=padding,
                   dilation=dilation, padding_mode=mode)
    if i % 5 == 0:   # vc.conv3d takes the CPKernel as the weight
        np.testing.assert_array_equal(vc.conv3d(x, cp, b, stride, padding, dilation, padding_mode=mode), out)


@pytest.mark.parametrize("i", range(20))
def test_tucker_conv3d_random_configs(i):
    r = config_rng(22, i)
    ks, stride, dilation, spatial, padding, mode = random_geometry(r, i)
    Cin, Cout = int(r.integers(1, 7)), int(r.integers(1, 7))
    sizes = (Cout, Cin) + ks
    full = i % 2 == 0
    ranks = tuple(int(r.integers(1, n + 1)) for n in (sizes if full else sizes[:2]))
    core = r.standard_normal(ranks if full else ranks + ks)
    factors = [r.standard_normal((n, k)) for n, k in zip(sizes, ranks)] + ([] if full else [None] * 3)
    tk = TuckerKernel(core, factors)
    dtype = np.float32 if i % 3 else np.float64
    x = r.standard_normal((int(r.integers(1, 3)), Cin) + spatial).astype(dtype)
    out = vc.tucker_conv3d(x, tk, None, stride, padding, dilation, padding_mode=mode)
    w_abs = TuckerKernel(np.abs(core), [None if f is None else np.abs(f) for f in factors]).to_dense()
    check_factored(out, x, tk.to_dense(), w_abs, Cin + int(np.prod(core.shape)) + Cout, None, dtype,
                   stride=stride, padding=padding, dilation=dilation, padding_mode=mode)


def test_single_kernel_decompositions_act_as_one_channel_weights_and_filters():
    import scipy.ndimage as ndi

    r = np.random.default_rng(0)
    fs = [r.standard_normal((k, 3)) for k in (5, 4, 3)]
    cp = CPKernel(r.standard_normal(3), fs)
    v = r.standard_normal((12, 13, 14))
    np.testing.assert_allclose(vc.correlate(v, cp, mode="mirror"), ndi.correlate(v, cp.to_dense(), mode="mirror"),
                               atol=1e-12)
    x = v[None, None]
    np.testing.assert_allclose(vc.cp_conv3d(x, cp, padding=2), vc.conv3d(x, cp.to_dense()[None, None], padding=2),
                               atol=1e-12)
    tk = TuckerKernel(r.standard_normal((2, 2, 2)), [r.standard_normal((k, 2)) for k in (5, 4, 3)])
    np.testing.assert_allclose(vc.tucker_conv3d(x, tk, padding=1), vc.conv3d(x, tk.to_dense()[None, None], padding=1),
                               atol=1e-12)


@pytest.mark.parametrize("layer", ["cp", "cp-reflect", "cp-circular-dilated", "cp-wide-padding", "tucker2",
                                   "tucker5"])
def test_layers_gradcheck_and_state_dict(layer):
    torch.manual_seed(0)
    make = {"cp": lambda: vc.nn.CPConv3d(2, 3, (3, 2, 3), padding=1, stride=(1, 2, 1), rank=3,
                                         dtype=torch.float64),
            # stride 1: the input gradient is a separable pass too, folded back for the padding modes
            "cp-reflect": lambda: vc.nn.CPConv3d(2, 3, (3, 2, 3), padding=1, padding_mode="reflect", rank=2,
                                                 dtype=torch.float64),
            "cp-circular-dilated": lambda: vc.nn.CPConv3d(2, 3, 3, padding=(2, 1, 0), dilation=(2, 1, 1),
                                                          padding_mode="circular", rank=2, dtype=torch.float64),
            "cp-wide-padding": lambda: vc.nn.CPConv3d(2, 3, 2, padding=3, rank=2, dtype=torch.float64),
            "tucker2": lambda: vc.nn.TuckerConv3d(2, 3, 3, padding=1, ranks=(2, 2), padding_mode="circular",
                                                  dtype=torch.float64),
            "tucker5": lambda: vc.nn.TuckerConv3d(2, 3, 3, padding=1, ranks=(2, 2, 2, 2, 2), dilation=2,
                                                  dtype=torch.float64)}[layer]
    m = make()
    # small (gradcheck is O(size^2)); a batch of 2: the channel projections run one matrix product per item
    x = torch.randn(2, 2, 5, 4, 5, dtype=torch.float64, requires_grad=True)
    if m.padding_mode != "zeros":
        p = [q for q in reversed(m.padding) for _ in range(2)]
        ref = torch.nn.functional.conv3d(torch.nn.functional.pad(x, p, mode=m.padding_mode), m.to_dense(), m.bias,
                                         m.stride, 0, m.dilation)
    else:
        ref = torch.nn.functional.conv3d(x, m.to_dense(), m.bias, m.stride, m.padding, m.dilation)
    assert torch.allclose(m(x), ref, atol=1e-12)
    params = dict(m.named_parameters())
    assert torch.autograd.gradcheck(
        lambda x, *ps: torch.func.functional_call(m, dict(zip(params, ps)), (x,)),
        (x,) + tuple(p.detach().requires_grad_() for p in params.values()))
    again = make()
    again.load_state_dict(m.state_dict())
    assert torch.equal(again(x), m(x))


def test_from_conv_recovers_a_low_rank_layer():
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(6, 5, 3, padding=1).double()
    r = np.random.default_rng(2)
    cp = CPKernel(np.ones(2), [r.standard_normal((n, 2)) for n in (5, 6, 3, 3, 3)])
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(cp.to_dense()))
    x = torch.randn(1, 6, 8, 9, 10, dtype=torch.float64)
    layer = vc.nn.CPConv3d.from_conv(conv, rank=2)
    assert layer.relative_error < 1e-6
    assert torch.allclose(layer(x), conv(x), atol=1e-6 * conv(x).abs().max().item())
    tucker = vc.nn.TuckerConv3d.from_conv(conv, ranks=(2, 2))
    assert tucker.relative_error < 1e-6 and torch.allclose(tucker(x), conv(x), atol=1e-6 * conv(x).abs().max().item())


def test_errors():
    x = np.zeros((1, 3, 6, 6, 6))
    cp = CPKernel(np.ones(2), [np.ones((n, 2)) for n in (4, 2, 3, 3, 3)])
    with pytest.raises(ValueError, match="channels"):
        vc.cp_conv3d(x, cp)   # the weight has 2 input channels, the input 3
    with pytest.raises(TypeError, match="CPKernel"):
        vc.cp_conv3d(x, np.ones((4, 3, 3, 3, 3)))
    with pytest.raises(TypeError, match="TuckerKernel"):
        vc.tucker_conv3d(x, cp)
    with pytest.raises(ValueError, match="groups"):
        vc.conv3d(np.zeros((1, 4, 6, 6, 6)), cp, groups=2)
    with pytest.raises(ValueError, match="groups"):
        vc.nn.CPConv3d(4, 4, 3, groups=2, rank=2)
    with pytest.raises(ValueError, match="rank"):
        vc.nn.CPConv3d(4, 4, 3, rank=0)
    with pytest.raises(ValueError, match="ranks"):
        vc.nn.TuckerConv3d(4, 4, 3, ranks=(5, 2))
    with pytest.raises(TypeError, match="Conv3d"):
        vc.nn.CPConv3d.from_conv(torch.nn.Conv2d(2, 2, 3), rank=2)
