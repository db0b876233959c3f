"""PyTorch conventions: volconv's custom operators (opcheck), torch.compile and torch.export of a model with every
volconv layer type (no graph break, same outputs and gradients as eager), no_grad / inference_mode, dtypes."""
import pytest
import torch

import volconv as vc


class Every(torch.nn.Module):
    """One of each volconv layer."""

    def __init__(self):
        super().__init__()
        self.conv = vc.nn.Conv3d(2, 4, 3, padding=1)
        self.cp = vc.nn.CPConv3d(4, 4, 3, padding=1, rank=2)
        self.tucker = vc.nn.TuckerConv3d(4, 4, 3, padding=1, ranks=(2, 2))
        self.sparse = vc.nn.SparseConv3d.from_conv(torch.nn.Conv3d(4, 4, 3, padding=1), density=0.3)
        self.nested = vc.nn.NestedConv3d(4, 4, (5, 3), groups=4)
        self.multiscale = vc.nn.MultiScaleConv3d(4, 2, (1, 3), combine="concat")
        self.variable = vc.nn.VariableKernelConv3d(4, 4, 5)
        self.dynamic = vc.nn.DynamicConv3d(4, 3, tile=2)
        self.res2 = vc.nn.Res2Block3d(4, scales=2, reduction=1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.cp(x) + self.tucker(x) + self.sparse(x)
        x = self.nested(x) + self.multiscale(x)
        x = self.variable(x, kernel_size=3)
        return self.res2(self.dynamic(x))


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    return Every(), torch.randn(2, 2, 6, 7, 8)


def test_compile_has_no_graph_break_and_matches_eager(model_and_input):
    m, x = model_and_input
    x = x.clone().requires_grad_()
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    eager = m(x)
    eager_grads = torch.autograd.grad(eager.sum(), [x] + list(m.parameters()))
    compiled = torch.compile(m)(x)
    assert torch.allclose(compiled, eager, atol=1e-5)
    for a, b in zip(torch.autograd.grad(compiled.sum(), [x] + list(m.parameters())), eager_grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_export(model_and_input):
    m, x = model_and_input
    exported = torch.export.export(m, (x,))
    assert any("volconv." in str(n.target) for n in exported.graph.nodes)   # the custom operators, not numpy
    assert torch.allclose(exported.module()(x), m(x), atol=1e-5)


def _geometry():
    return [1, 1, 1], [1, 1, 0, 1, 1, 1], [1, 1, 1], 1, "constant", 0.0   # stride, pads, dilation, ...


def test_opcheck_every_operator():
    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(1, 2, 4, 5, 6, **f64, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, 3, **f64, requires_grad=True)
    b = torch.randn(3, **f64, requires_grad=True)
    stride, pads, dilation, groups, mode, cval = _geometry()
    ops = torch.ops.volconv
    torch.library.opcheck(ops.conv3d.default, (x, w, b, stride, pads, dilation, groups, mode, cval, "direct", 1))
    idx = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 2], [2, 0, 2, 1, 0]])
    values = torch.randn(3, **f64, requires_grad=True)
    torch.library.opcheck(ops.sparse_conv3d.default, (x, values, b, idx, [3, 2, 3, 2, 3], stride, pads, dilation,
                                                      groups, mode, 1))
    fd, fh, fw = (torch.randn(2, k, **f64, requires_grad=True) for k in (3, 2, 3))
    torch.library.opcheck(ops.separable_conv3d.default, (x, fd, fh, fw, stride, pads, dilation, mode, 1))
    ws = [torch.randn(4, 2, 3, 3, 3, **f64, requires_grad=True), torch.randn(2, 4, 1, 3, 1, **f64,
                                                                             requires_grad=True)]
    biases = [b.new_zeros(4).requires_grad_(), b.new_empty(0)]   # stage 2 has none: an empty tensor
    torch.library.opcheck(ops.nested_conv3d.default, (x, ws, biases, "relu", 1, "fused", 1))
    K = torch.randn(1, 2, 27, 4, 5, 6, **f64, requires_grad=True)
    torch.library.opcheck(ops.dynamic_conv3d.default, (x, K, [3, 3, 3], [1, 1, 1], "1,1,1", [1, 1, 1], 1))


def test_no_grad_and_inference_mode_save_nothing(model_and_input):
    m, x = model_and_input
    xg = x.clone().requires_grad_()
    with torch.no_grad():
        out = m(xg)
    assert out.grad_fn is None and not out.requires_grad
    with torch.inference_mode():
        again = m(x)
    assert again.is_inference() and torch.allclose(again, out, atol=1e-6)


def test_dtypes_and_devices():
    layer = vc.nn.Conv3d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5, 5)
    half = layer.half()(x.half())              # computed in float32, returned in the input's dtype
    assert half.dtype == torch.float16
    want = torch.nn.functional.conv3d(x, layer.weight.float(), layer.bias.float(), padding=1)
    assert torch.allclose(half.float(), want, atol=1e-2)
    layer = vc.nn.Conv3d(2, 3, 3, padding=1).to("cpu", torch.float64)
    assert layer(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="input is on device meta; volconv runs on cpu and cuda"):
        vc.nn.NestedConv3d(2, 2).to("meta")(torch.zeros(1, 2, 4, 4, 4, device="meta"))
