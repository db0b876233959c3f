"""vc.nn.SymmetricConv3d (issue 18 part 3): the dense weight is exactly symmetric (equal to its flips, to its 48
cube transforms, a function of the distance from the centre computed here independently); the layer's output
equals torch's (float64) with the built weight; it commutes with flips / rot90 / transposes of the input;
parameter counts; gradients reach the orbit parameters (gradcheck in float64, and the orbit gradient equals the
dense weight's gradient summed over the orbit); from_conv is the orthogonal projection; bad arguments.

Tolerances: the weight's symmetry is exact (a gather: bit-equal values). Outputs against torch: conftest's
conv_tolerance (gamma_n or 4 sqrt(n) eps times conv(|x|, |w|) + |b|, per element). Equivariance compares two
volconv results (algorithm="direct"), so twice that bound. Projections: 1e-12 (float64) relative to ||W||."""
import itertools

import numpy as np
import pytest

import volconv as vc
from volconv.nn.symmetric import orbit_index

from conftest import check_conv3d, config_rng, conv_tolerance, ref_conv3d, assert_within

torch = pytest.importorskip("torch")

MODES = ["zeros", "reflect", "replicate", "circular"]
SPATIAL = (2, 3, 4)   # the spatial dims of (N, C, D, H, W) and of (O, C, kd, kh, kw)


def cube_transforms():
    """The 48 transforms of the cube on the last three dims: axis permutations times flips."""
    out = []
    for perm in itertools.permutations(SPATIAL):
        for flips in itertools.product((False, True), repeat=3):
            dims = [d for d, f in zip(SPATIAL, flips) if f]
            out.append(lambda t, perm=perm, dims=dims: (t.permute(0, 1, *perm).flip(dims) if dims
                                                        else t.permute(0, 1, *perm)))
    return out


def distances(kernel_size, zooms=(1.0, 1.0, 1.0)):
    """Distance of every tap from the kernel's centre, in mm (float64; an independent computation)."""
    axes = [(np.arange(k) - (k - 1) / 2) * z for k, z in zip(kernel_size, zooms)]
    d, h, w = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(d ** 2 + h ** 2 + w ** 2)


def layer(*args, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    return vc.nn.SymmetricConv3d(*args, dtype=dtype, **kwargs)


def assert_equivariant(conv, x, transform, context):
    """conv(T x) == T conv(x) within twice volconv's own bound (both sides are volconv results)."""
    with torch.no_grad():
        a, b = conv(transform(x)), transform(conv(x))
    _, mag = ref_conv3d(transform(x).numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                        conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    n_terms = conv.in_channels // conv.groups * int(np.prod(conv.kernel_size))
    dtype = np.float64 if x.dtype == torch.float64 else np.float32
    assert_within(a.numpy(), b.numpy().astype(np.float64), 2 * conv_tolerance(mag, dtype, n_terms, "direct"),
                  context)


# --------------------------------------------------------------------------------------------------------------
# orbits and the weight's symmetry
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetry, k, orbits", [
    ("mirror", 3, 8), ("mirror", 4, 8), ("mirror", 5, 27), ("mirror", (3, 4, 5), 12), ("mirror", 1, 1),
    ("octahedral", 3, 4), ("octahedral", 4, 4), ("octahedral", 5, 10), ("octahedral", 7, 20),
    ("octahedral", 2, 1), ("radial", 3, 4), ("radial", 5, 10), ("radial", 7, 19), ("radial", (1, 3, 3), 3)])
def test_orbit_counts_and_parameters(symmetry, k, orbits):
    """Hand-counted: mirror prod(ceil(k/2)); octahedral multisets of 3 from ceil(k/2) values; radial k=7 has
    19, not 20 (0^2+0^2+3^2 = 1^2+2^2+2^2)."""
    conv = layer(4, 6, k, groups=2, symmetry=symmetry)
    assert conv.orbits == orbits
    assert conv.orbit_weight.shape == (6, 2, orbits)
    assert sum(p.numel() for p in conv.parameters()) == 6 * 2 * orbits + 6
    assert conv.weight.shape == (6, 2) + conv.kernel_size
    assert not layer(4, 6, k, bias=False, symmetry=symmetry).bias


@pytest.mark.parametrize("i", range(12))
def test_mirror_weight_equals_its_flips(i):
    r = config_rng(181, i)
    k = tuple(int(v) for v in r.integers(1, 7, 3))
    w = layer(2, 3, k, symmetry="mirror").weight
    for dims in ([2], [3], [4], [2, 3], [2, 3, 4]):
        assert torch.equal(w, w.flip(dims)), (k, dims)
    # the orbits are exactly the flip classes: a tap's orbit holds only its flips
    index = orbit_index(k, "mirror")
    assert index.max() + 1 == np.prod([(n + 1) // 2 for n in k])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_octahedral_weight_equals_its_48_transforms(k):
    w = layer(2, 3, k, symmetry="octahedral").weight
    transforms = cube_transforms()
    assert len({tuple(t(torch.arange(27.).reshape(1, 1, 3, 3, 3)).flatten().tolist()) for t in transforms}) == 48
    for t in transforms:
        assert torch.equal(t(w), w)
    # and no coarser tying: different orbits hold different (random) values
    assert len(torch.unique(w[0, 0])) == layer(2, 3, k, symmetry="octahedral").orbits


@pytest.mark.parametrize("i", range(10))
def test_radial_weight_depends_on_distance_only(i):
    r = config_rng(182, i)
    k = tuple(int(v) for v in r.integers(1, 8, 3))
    zooms = None if i < 4 else tuple(float(z) for z in r.choice([0.5, 1.0, 1.2, 2.5, 3.0], 3))
    conv = layer(1, 2, k, symmetry="radial", zooms=zooms)
    dist = distances(k, zooms or (1.0, 1.0, 1.0)).ravel()
    w = conv.weight.detach().reshape(2, 1, -1).numpy()
    same = np.abs(dist[:, None] - dist[None, :]) < 1e-9
    tied = w[0, 0][:, None] == w[0, 0][None, :]
    assert np.array_equal(tied, same), (k, zooms)     # equal values exactly where distances are equal
    assert conv.orbits == len(np.unique(np.round(dist, 9)))


def test_radial_isotropic_is_octahedral_too_and_anisotropic_is_not():
    iso = layer(1, 1, 5, symmetry="radial").weight
    for t in cube_transforms():
        assert torch.equal(t(iso), iso)
    aniso = layer(1, 1, 5, symmetry="radial", zooms=(2.0, 1.0, 1.0)).weight
    assert torch.equal(aniso.transpose(3, 4), aniso)          # H and W have the same voxel size
    assert not torch.equal(aniso.transpose(2, 3), aniso)      # D does not: an ellipsoid in voxels


# --------------------------------------------------------------------------------------------------------------
# the layer's output
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("i", range(12))
def test_forward_equals_torch_with_the_built_weight(i):
    r = config_rng(183, i)
    symmetry = ("mirror", "octahedral", "radial")[i % 3]
    k = int(r.integers(1, 6)) if symmetry == "octahedral" else tuple(int(v) for v in r.integers(1, 6, 3))
    groups = int(r.choice([1, 2]))
    stride = tuple(int(v) for v in r.integers(1, 3, 3))
    dilation = tuple(int(v) for v in r.integers(1, 3, 3))
    dtype = (torch.float32, torch.float64)[i % 2]
    mode = MODES[i % 4]
    conv = layer(2 * groups, 3 * groups, k, stride=stride, padding=1, dilation=dilation, groups=groups,
                 padding_mode=mode, symmetry=symmetry, bias=i % 5 != 0, dtype=dtype)
    spatial = [int((kk - 1) * d + 3 + r.integers(0, 5)) for kk, d in zip(conv.kernel_size, dilation)]
    x = torch.randn(2, 2 * groups, *spatial, dtype=dtype, generator=torch.Generator().manual_seed(i))
    x = x.transpose(2, 4).contiguous().transpose(2, 4)   # same values, non-contiguous strides
    out = conv(x)
    assert out.dtype == dtype and out.shape[0] == 2
    b = None if conv.bias is None else conv.bias.detach().numpy()
    check_conv3d(out.detach(), x, conv.weight.detach().numpy(), b, stride=stride, padding=1, dilation=dilation,
                 groups=groups, padding_mode=mode, context=f"{symmetry} k={k} {mode} {dtype}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k, padding", [(3, "same"), (5, 2), ((3, 5, 1), "same"), (4, 0), (2, 1)])
def test_mirror_layer_commutes_with_flips(mode, k, padding):
    """Odd kernels with 'same' padding and any kernel with equal padding on both sides."""
    if mode != "zeros" and padding == 0:
        pytest.skip("no padding: the mode does not apply")
    conv = layer(2, 3, k, padding=padding, padding_mode=mode, symmetry="mirror", algorithm="direct")
    x = torch.randn(2, 2, 7, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for dims in ([2], [3], [4], [2, 4], [2, 3, 4]):
        assert_equivariant(conv, x, lambda t, dims=dims: t.flip(dims), f"k={k} {mode} flip {dims}")


def test_a_plain_kernel_does_not_commute_with_flips():
    """The check can fail: an unconstrained kernel's output on a flipped input is not the flipped output."""
    conv = torch.nn.Conv3d(1, 1, 3, padding=1).double()
    x = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert (conv(x.flip([2])) - conv(x).flip([2])).abs().max() > 1e-3


@pytest.mark.parametrize("symmetry", ["octahedral", "radial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_octahedral_and_radial_layers_commute_with_rotations(symmetry, dtype):
    conv = layer(2, 2, 3, padding="same", symmetry=symmetry, dtype=dtype, algorithm="direct")
    x = torch.randn(2, 2, 5, 6, 7, dtype=dtype, generator=torch.Generator().manual_seed(2))
    rotations = [lambda t, dims=dims, n=n: torch.rot90(t, n, dims)
                 for dims in ((2, 3), (3, 4), (2, 4)) for n in (1, 2, 3)]
    transposes = [lambda t, a=a, b=b: t.transpose(a, b) for a, b in ((2, 3), (3, 4), (2, 4))]
    for j, t in enumerate(rotations + transposes):
        assert_equivariant(conv, x, t, f"{symmetry} transform {j}")


def test_octahedral_layer_commutes_with_all_48_transforms():
    conv = layer(1, 2, 5, padding=2, padding_mode="reflect", symmetry="octahedral", algorithm="direct")
    x = torch.randn(1, 1, 6, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for j, t in enumerate(cube_transforms()):
        assert_equivariant(conv, x, t, f"transform {j}")


def test_anisotropic_radial_commutes_with_rotations_of_its_isotropic_plane():
    conv = layer(1, 1, 3, padding=1, symmetry="radial", zooms=(2.5, 0.8, 0.8), algorithm="direct")
    x = torch.randn(1, 1, 5, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert_equivariant(conv, x, lambda t: torch.rot90(t, 1, (3, 4)), "rot90 in H-W")
    with torch.no_grad():   # a rotation through D is not a symmetry of these voxels
        y = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
        assert (conv(torch.rot90(y, 1, (2, 3))) - torch.rot90(conv(y), 1, (2, 3))).abs().max() > 1e-6


# --------------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetry", ["mirror", "octahedral", "radial"])
def test_gradcheck_through_the_orbit_parameters(symmetry):
    conv = layer(2, 2, 3, padding=1, symmetry=symmetry)
    x = torch.randn(1, 2, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    params = (conv.orbit_weight, conv.bias)

    def run(w, b, x):
        return torch.func.functional_call(conv, {"orbit_weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(run, (*params, x))


@pytest.mark.parametrize("symmetry, k", [("mirror", (3, 4, 5)), ("octahedral", 4), ("radial", 5)])
def test_orbit_gradient_is_the_dense_gradient_summed_over_the_orbit(symmetry, k):
    conv = layer(2, 3, k, padding=2, symmetry=symmetry)
    x = torch.randn(2, 2, 6, 7, 6, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    (conv(x) * g).sum().backward()
    w = conv.weight.detach().requires_grad_()
    (torch.nn.functional.conv3d(x, w, conv.bias.detach(), padding=2) * g).sum().backward()
    index = orbit_index(k, symmetry).ravel()
    dense = w.grad.reshape(3, 2, -1).numpy()
    expected = np.stack([dense[:, :, index == j].sum(axis=2) for j in range(conv.orbits)], axis=2)
    np.testing.assert_allclose(conv.orbit_weight.grad.numpy(), expected, rtol=1e-10, atol=1e-10)
    assert conv.bias.grad is not None


# --------------------------------------------------------------------------------------------------------------
# from_conv: the orthogonal projection
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetry", ["mirror", "octahedral", "radial"])
def test_from_conv_of_a_symmetric_conv_keeps_it(symmetry):
    sym = layer(2, 4, 3, padding=1, groups=2, padding_mode="circular", symmetry=symmetry)
    conv = torch.nn.Conv3d(2, 4, 3, padding=1, groups=2, padding_mode="circular").double()
    with torch.no_grad():
        conv.weight.copy_(sym.weight)
        conv.bias.copy_(sym.bias)
    new = vc.nn.SymmetricConv3d.from_conv(conv, symmetry)
    assert new.projection_error < 1e-15
    assert (new.groups, new.padding_mode, new.padding) == (2, "circular", (1, 1, 1))
    x = torch.randn(2, 2, 5, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), conv(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("i", range(9))
def test_from_conv_is_the_orthogonal_projection(i):
    r = config_rng(184, i)
    symmetry = ("mirror", "octahedral", "radial")[i % 3]
    k = int(r.integers(2, 6)) if symmetry == "octahedral" else tuple(int(v) for v in r.integers(1, 6, 3))
    zooms = (1.0, 2.0, 0.7) if symmetry == "radial" and i > 4 else None
    torch.manual_seed(i)
    conv = torch.nn.Conv3d(3, 2, k, bias=i % 2 == 0).double()
    w = conv.weight.detach()
    new = vc.nn.SymmetricConv3d.from_conv(conv, symmetry, zooms)
    p = new.weight.detach()
    residual = w - p
    assert abs(new.projection_error - float(residual.norm() / w.norm())) < 1e-12
    assert new.projection_error > 0.05                    # a random kernel is far from symmetric
    other = layer(3, 2, k, symmetry=symmetry, zooms=zooms).weight.detach()   # any symmetric kernel
    for s in (p, other):
        assert abs(float((residual * s).sum())) < 1e-12 * float(w.norm() * s.norm())
    with torch.no_grad():
        conv.weight.copy_(p)
    again = vc.nn.SymmetricConv3d.from_conv(conv, symmetry, zooms)
    torch.testing.assert_close(again.weight, p, rtol=1e-13, atol=1e-15)   # projecting twice changes nothing
    assert again.projection_error < 1e-14
    assert (new.bias is None) == (conv.bias is None)


def test_from_conv_float32_zero_weight_and_state_dict():
    conv = torch.nn.Conv3d(1, 1, 3)
    new = vc.nn.SymmetricConv3d.from_conv(conv, "octahedral")
    assert new.orbit_weight.dtype == torch.float32 and new(torch.randn(1, 1, 4, 4, 4)).dtype == torch.float32
    with torch.no_grad():
        conv.weight.zero_()
    assert vc.nn.SymmetricConv3d.from_conv(conv, "mirror").projection_error == 0.0
    copy = layer(1, 1, 3, symmetry="octahedral", dtype=torch.float32)
    copy.load_state_dict(new.state_dict())
    assert torch.equal(copy.weight, new.weight)
    assert set(new.state_dict()) == {"orbit_weight", "bias"}


def test_initialisation_has_torch_conv3d_variance():
    conv = layer(16, 32, 3, symmetry="radial")
    bound = 1 / np.sqrt(16 * 27)
    w = conv.weight.detach()
    assert w.abs().max() <= bound and conv.bias.abs().max() <= bound
    assert abs(float(conv.orbit_weight.detach().var()) - bound ** 2 / 3) < 0.2 * bound ** 2 / 3


# --------------------------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"symmetry": "rotational"}, "symmetry must be one of"),
    ({"symmetry": "octahedral", "kernel_size": (3, 3, 5)}, "cubic kernel"),
    ({"symmetry": "radial", "zooms": (1.0, 2.0)}, "zooms must be 3 positive numbers"),
    ({"symmetry": "radial", "zooms": (1.0, 0.0, 1.0)}, "zooms must be 3 positive numbers"),
    ({"symmetry": "radial", "zooms": (1.0, float("nan"), 1.0)}, "zooms must be 3 positive numbers"),
    ({"symmetry": "radial", "zooms": (1.0, "2", 1.0)}, "zooms must be 3 positive numbers"),
    ({"symmetry": "radial", "zooms": 1.0}, "zooms must be 3 positive numbers"),
    ({"symmetry": "mirror", "zooms": (1.0, 1.0, 1.0)}, "symmetry='radial' only"),
    ({"symmetry": "octahedral", "zooms": (1.0, 1.0, 1.0)}, "symmetry='radial' only"),
    ({"groups": 3}, "divisible by groups"),
    ({"padding_mode": "mirror"}, "padding_mode must be one of"),
    ({"kernel_size": 0}, "kernel_size must be >= 1"),
    ({"padding": -1}, "padding must be >= 0"),
])
def test_bad_arguments(kwargs, match):
    args = {"in_channels": 2, "out_channels": 4, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        vc.nn.SymmetricConv3d(**args)


def test_from_conv_needs_a_conv3d():
    with pytest.raises(TypeError, match="torch.nn.Conv3d"):
        vc.nn.SymmetricConv3d.from_conv(torch.nn.Conv2d(1, 1, 3), "mirror")
    with pytest.raises(ValueError, match="cubic kernel"):
        vc.nn.SymmetricConv3d.from_conv(torch.nn.Conv3d(1, 1, (1, 3, 3)), "octahedral")


@pytest.mark.cuda
@pytest.mark.parametrize("symmetry", ["mirror", "octahedral", "radial"])
def test_on_the_cuda_plugin_forward_and_orbit_gradients(symmetry, cuda_plugin, device):
    """On the plugin (a GPU, or the CPU emulator): the same output and orbit gradients as the CPU layer."""
    cpu = layer(2, 3, 3, padding=1, padding_mode="reflect", symmetry=symmetry)
    gpu = layer(2, 3, 3, padding=1, padding_mode="reflect", symmetry=symmetry).to(device)
    assert gpu.orbit_index.device.type == torch.device(device).type
    x = torch.randn(2, 2, 5, 6, 7, dtype=torch.float64)
    out_cpu, out_gpu = cpu(x), gpu(x.to(device))
    g = torch.randn_like(out_cpu)
    (out_cpu * g).sum().backward()
    (out_gpu * g.to(device)).sum().backward()
    assert cuda_plugin.calls, "the forward did not run on the plugin"
    torch.testing.assert_close(out_gpu.detach().cpu(), out_cpu.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gpu.orbit_weight.grad.cpu(), cpu.orbit_weight.grad, rtol=1e-11, atol=1e-11)
