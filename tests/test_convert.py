"""vc.nn.convert on models with mixed Conv3d settings, state_dict / pickle round trips, and the U-Net example
(a few training steps of each variant: the loss falls)."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import volconv as vc


def lowrank_conv(cin, cout, k, rank, **kwargs):
    """A Conv3d whose weight IS a CP rank-`rank` tensor (so a CP conversion is exact up to rounding)."""
    conv = torch.nn.Conv3d(cin, cout, k, **kwargs).double()
    g = torch.Generator().manual_seed(cin * 100 + cout)
    with torch.no_grad():
        f = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in (cout, cin) + conv.kernel_size]
        conv.weight.copy_(torch.einsum("or,cr,ar,br,er->ocabe", *f) * 0.05)
    return conv


def mixed_model():
    return torch.nn.Sequential(
        lowrank_conv(3, 8, 3, 2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(8, 8, 3, padding=1, groups=4).double(),                 # grouped: stays dense
        lowrank_conv(8, 6, (3, 1, 5), 3, stride=(1, 2, 1), padding=(1, 0, 2), dilation=(2, 1, 1),
                     padding_mode="reflect"),
        torch.nn.Conv3d(6, 2, 1, bias=False).double())                           # 1x1x1: stays dense


@pytest.mark.parametrize("to,options", [("cp", {"rank": 3}), ("cp", {"tolerance": 1e-6}),
                                        ("tucker", {"rank": 8}), ("auto", {"tolerance": 1e-6}),
                                        ("sparse", {"density": 1.0})])
def test_converted_model_matches_the_original(to, options):
    model = mixed_model()
    x = torch.randn(2, 3, 9, 10, 11, dtype=torch.float64)
    converted, report = vc.nn.convert(model, to, **options)
    assert not any(type(m) is torch.nn.Conv3d for m in converted.modules())   # every Conv3d replaced
    assert any(type(m) is torch.nn.Conv3d for m in model.modules())           # the original untouched
    with torch.no_grad():
        want, got = model(x), converted(x)
    assert (got - want).norm() <= 1e-5 * want.norm()   # weight errors <= 1e-6, through a few layers
    kinds = {r.name: r.representation for r in report.layers}
    assert kinds["2"] in ("dense", "sparse") and kinds["4"] == ("sparse" if to == "sparse" else "dense")
    if to in ("cp", "tucker"):
        assert kinds["0"] == kinds["3"] == to
    assert all(r.relative_error <= 1e-6 for r in report.layers)
    assert report.parameters_before == sum(p.numel() for p in model.parameters())
    assert "| layer |" in str(report)


def test_round_trips_and_measured_speedups():
    model = mixed_model()
    x = torch.randn(1, 3, 8, 8, 8, dtype=torch.float64)
    converted, report = vc.nn.convert(model, "cp", rank=3, example=x)
    assert all(r.measured_speedup is not None and r.measured_speedup > 0 for r in report.layers)
    again = pickle.loads(pickle.dumps(converted))
    twin, _ = vc.nn.convert(mixed_model(), "cp", rank=3)
    twin.load_state_dict(converted.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), converted(x)) and torch.equal(twin(x), converted(x))
    # a trained torch.nn.Conv3d checkpoint loads into vc.nn.Conv3d: same keys
    dense = vc.nn.Conv3d(3, 8, 3, padding=1).double()
    dense.load_state_dict(model[0].state_dict())
    with torch.no_grad():
        assert torch.allclose(dense(x), model[0](x), atol=1e-12)


def test_inplace_and_errors():
    model = mixed_model()
    same, _ = vc.nn.convert(model, "tucker", rank=2, inplace=True)
    assert same is model and not any(type(m) is torch.nn.Conv3d for m in model.modules())
    with pytest.raises(ValueError, match="to must be one of"):
        vc.nn.convert(mixed_model(), "svd", rank=2)
    with pytest.raises(ValueError, match="needs tolerance"):
        vc.nn.convert(mixed_model(), "auto")
    with pytest.raises(ValueError, match="needs rank or tolerance"):
        vc.nn.convert(mixed_model(), "cp")
    with pytest.raises(ValueError, match="tolerance must be a relative error"):
        vc.nn.convert(mixed_model(), "auto", tolerance=1.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        vc.nn.convert("model", "auto", tolerance=0.1)


def test_unet_example_trains_every_variant():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import unet3d

    rng = np.random.default_rng(0)
    volume = rng.standard_normal((40, 40, 40)).astype(np.float32) * 0.3 + 1.0   # a small stand-in, fast to load
    results, report = unet3d.run(steps=12, patch=16, channels=(4, 8, 8), tolerance=0.3, log=lambda *a: None,
                                 volume=volume)
    for name, (losses, seconds) in results.items():
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), name
        assert seconds > 0
    assert len(report.layers) == 11
