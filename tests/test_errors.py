"""Bad input: the right exception type, and a message that names the argument at fault."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
vc = pytest.importorskip("volconv")


def x5(shape=(1, 2, 6, 6, 6), dtype=np.float32):
    return np.ones(shape, dtype)


def w5(shape=(3, 2, 3, 3, 3), dtype=np.float32):
    return np.ones(shape, dtype)


def _names(argument, dtype_name):
    """Regex: the message names the argument, and the dtype (the word 'dtype' or the dtype's own name)."""
    return rf"(?s)(?=.*\b{argument}\b)(?=.*(dtype|{dtype_name}))"


# (id, callable, exception type(s), regex the message must match)
CONV3D_CASES = [
    # dimensionality
    ("input-3d", lambda: vc.conv3d(np.ones((6, 6, 6), np.float32), w5()), ValueError, r"\binput\b"),
    ("input-6d", lambda: vc.conv3d(np.ones((1, 1, 2, 6, 6, 6), np.float32), w5()), ValueError, r"\binput\b"),
    ("weight-4d", lambda: vc.conv3d(x5(), np.ones((3, 2, 3, 3), np.float32)), ValueError, r"\bweight\b"),
    ("weight-3d", lambda: vc.conv3d(x5(), np.ones((3, 3, 3), np.float32)), ValueError, r"\bweight\b"),
    # channels and groups
    ("channels-mismatch", lambda: vc.conv3d(x5((1, 3, 6, 6, 6)), w5((3, 2, 3, 3, 3))), ValueError,
     r"weight|groups|channel"),
    ("C-not-divisible-by-groups", lambda: vc.conv3d(x5((1, 3, 6, 6, 6)), w5((2, 1, 3, 3, 3)), groups=2),
     ValueError, r"groups"),
    ("weight-C-times-groups", lambda: vc.conv3d(x5((1, 4, 6, 6, 6)), w5((4, 1, 3, 3, 3)), groups=2), ValueError,
     r"weight|groups"),
    ("O-not-divisible-by-groups", lambda: vc.conv3d(x5((1, 4, 6, 6, 6)), w5((3, 2, 3, 3, 3)), groups=2),
     ValueError, r"groups"),
    ("groups-0", lambda: vc.conv3d(x5(), w5(), groups=0), ValueError, r"groups"),
    ("groups-negative", lambda: vc.conv3d(x5(), w5(), groups=-1), ValueError, r"groups"),
    # bias
    ("bias-wrong-length", lambda: vc.conv3d(x5(), w5(), np.ones(2, np.float32)), ValueError, r"\bbias\b"),
    ("bias-2d", lambda: vc.conv3d(x5(), w5(), np.ones((3, 1), np.float32)), ValueError, r"\bbias\b"),
    # kernel larger than the (padded) input
    ("kernel-larger", lambda: vc.conv3d(x5((1, 2, 2, 6, 6)), w5()), ValueError, r"larger"),
    ("dilated-kernel-larger", lambda: vc.conv3d(x5((1, 2, 5, 5, 5)), w5(), dilation=3), ValueError, r"larger"),
    ("dilated-kernel-larger-than-padded", lambda: vc.conv3d(x5((1, 2, 4, 5, 5)), w5(), dilation=3, padding=1),
     ValueError, r"larger"),
    # stride / padding / dilation
    ("stride-0", lambda: vc.conv3d(x5(), w5(), stride=0), ValueError, r"\bstride\b"),
    ("stride-negative", lambda: vc.conv3d(x5(), w5(), stride=(1, -1, 1)), ValueError, r"\bstride\b"),
    ("padding-negative", lambda: vc.conv3d(x5(), w5(), padding=-1), ValueError, r"\bpadding\b"),
    ("padding-negative-triple", lambda: vc.conv3d(x5(), w5(), padding=(0, 1, -2)), ValueError, r"\bpadding\b"),
    ("padding-same-stride2", lambda: vc.conv3d(x5(), w5(), stride=2, padding="same"), ValueError,
     r"\bpadding\b"),
    ("padding-unknown-string", lambda: vc.conv3d(x5(), w5(), padding="full"), ValueError, r"\bpadding\b"),
    ("padding-wrong-length", lambda: vc.conv3d(x5(), w5(), padding=(1, 1)), (ValueError, TypeError),
     r"\bpadding\b"),
    ("dilation-0", lambda: vc.conv3d(x5(), w5(), dilation=0), ValueError, r"\bdilation\b"),
    ("padding-mode-unknown", lambda: vc.conv3d(x5(), w5(), padding=1, padding_mode="mirror"), ValueError,
     r"padding_mode"),
    ("reflect-padding-too-large", lambda: vc.conv3d(x5((1, 2, 4, 6, 6)), w5(), padding=4,
                                                    padding_mode="reflect"), ValueError, r"padding"),
    ("circular-padding-too-large", lambda: vc.conv3d(x5((1, 2, 4, 6, 6)), w5(), padding=5,
                                                     padding_mode="circular"), ValueError, r"padding"),
    # algorithm / workers
    ("algorithm-unknown", lambda: vc.conv3d(x5(), w5(), algorithm="winograd"), ValueError, r"algorithm"),
    ("algorithm-case", lambda: vc.conv3d(x5(), w5(), algorithm="FFT"), ValueError, r"algorithm"),
    ("workers-0", lambda: vc.conv3d(x5(), w5(), workers=0), ValueError, r"workers"),
    ("workers-float", lambda: vc.conv3d(x5(), w5(), workers=1.5), ValueError, r"workers"),
    ("workers-str", lambda: vc.conv3d(x5(), w5(), workers="2"), ValueError, r"workers"),
    # dtypes: the message names the argument and its dtype (the word "dtype" or the dtype itself)
    ("input-complex", lambda: vc.conv3d(x5(dtype=np.complex64), w5(dtype=np.complex64)), TypeError,
     _names("input", "complex64")),
    ("input-int", lambda: vc.conv3d(x5(dtype=np.int32), w5(dtype=np.int32)), TypeError, _names("input", "int32")),
    ("input-uint8", lambda: vc.conv3d(x5(dtype=np.uint8), w5(dtype=np.uint8)), TypeError,
     _names("input", "uint8")),
    ("input-bool", lambda: vc.conv3d(x5(dtype=bool), w5(dtype=bool)), TypeError, _names("input", "bool")),
    ("torch-complex", lambda: vc.conv3d(torch.ones(1, 2, 6, 6, 6, dtype=torch.complex64),
                                        torch.ones(3, 2, 3, 3, 3, dtype=torch.complex64)), TypeError,
     _names("input", "complex64")),
    ("torch-int", lambda: vc.conv3d(torch.ones(1, 2, 6, 6, 6, dtype=torch.int64),
                                    torch.ones(3, 2, 3, 3, 3, dtype=torch.int64)), TypeError,
     _names("input", "int64") + r"(?=.*\bcast\b)"),
    ("weight-int", lambda: vc.conv3d(x5(), w5(dtype=np.int32)), TypeError, _names("weight", "int32")),
    # input and weight of different float dtypes: refused like torch; the message names the argument at fault
    ("dtype-mismatch-np", lambda: vc.conv3d(x5(dtype=np.float64), w5(dtype=np.float32)), TypeError, r"weight"),
    ("dtype-mismatch-torch", lambda: vc.conv3d(torch.ones(1, 2, 6, 6, 6, dtype=torch.float32),
                                               torch.ones(3, 2, 3, 3, 3, dtype=torch.float64)), TypeError, r"weight"),
    ("dtype-mismatch-bias", lambda: vc.conv3d(x5(), w5(), np.ones(3, np.float64)), TypeError, r"\bbias\b"),
    # not arrays
    ("input-None", lambda: vc.conv3d(None, w5()), TypeError, r"\binput\b"),
    ("input-str", lambda: vc.conv3d("volume.nii", w5()), TypeError, r"\binput\b"),
    ("input-object", lambda: vc.conv3d(object(), w5()), TypeError, r"\binput\b"),
    ("weight-None", lambda: vc.conv3d(x5(), None), TypeError, r"\bweight\b"),
    ("weight-str", lambda: vc.conv3d(x5(), "kernel"), TypeError, r"\bweight\b"),
]


@pytest.mark.parametrize("call, exc, match", [pytest.param(c, e, m, id=i) for i, c, e, m in CONV3D_CASES])
def test_conv3d_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("algorithm", ["direct", "fft", "torch"])
def test_kernel_larger_for_every_algorithm(algorithm):
    """The check lives in the shared validation, not in one algorithm."""
    with pytest.raises(ValueError, match="larger"):
        vc.conv3d(x5((1, 2, 6, 6, 2)), w5(), algorithm=algorithm)


def test_dilated_kernel_exactly_fits_is_not_an_error():
    """Boundary of the 'larger' check: extent 7 on a padded axis of 7 gives one output."""
    out = vc.conv3d(x5((1, 2, 5, 5, 5)), w5(), dilation=3, padding=1)
    assert out.shape == (1, 3, 1, 1, 1)


FILTER_CASES = [
    ("volume-2d", lambda f: f(np.ones((6, 6)), np.ones((3, 3, 3))), ValueError, r"\bvolume\b"),
    ("volume-4d", lambda f: f(np.ones((1, 6, 6, 6)), np.ones((3, 3, 3))), ValueError, r"\bvolume\b"),
    ("volume-5d", lambda f: f(np.ones((1, 1, 6, 6, 6)), np.ones((3, 3, 3))), ValueError, r"\bvolume\b"),
    ("kernel-2d", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3))), ValueError, r"\bkernel\b"),
    ("kernel-4d", lambda f: f(np.ones((6, 6, 6)), np.ones((1, 3, 3, 3))), ValueError, r"\bkernel\b"),
    ("mode-unknown", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3, 3)), mode="zeros"), ValueError,
     r"\bmode\b"),
    ("mode-torch-name", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3, 3)), mode="circular"), ValueError,
     r"\bmode\b"),
    ("algorithm-unknown", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3, 3)), algorithm="magic"), ValueError,
     r"algorithm"),
    ("origin-too-large", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3, 3)), origin=2), ValueError,
     r"\borigin\b"),
    ("origin-too-small-one-axis", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 4, 3)), origin=(0, -3, 0)),
     ValueError, r"\borigin\b"),
    ("origin-wrong-length", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3, 3)), origin=(0, 0)),
     (ValueError, TypeError), r"\borigin\b"),
    ("workers-0", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3, 3)), workers=0), ValueError, r"workers"),
    ("workers-float", lambda f: f(np.ones((6, 6, 6)), np.ones((3, 3, 3)), workers=2.0), ValueError, r"workers"),
    ("volume-None", lambda f: f(None, np.ones((3, 3, 3))), TypeError, r"\bvolume\b"),
    ("volume-str", lambda f: f("scan.nii.gz", np.ones((3, 3, 3))), TypeError, r"\bvolume\b"),
    ("kernel-None", lambda f: f(np.ones((6, 6, 6)), None), TypeError, r"\bkernel\b"),
]


@pytest.mark.parametrize("func_name", ["correlate", "convolve"])
@pytest.mark.parametrize("call, exc, match", [pytest.param(c, e, m, id=i) for i, c, e, m in FILTER_CASES])
def test_filter_errors(func_name, call, exc, match):
    with pytest.raises(exc, match=match):
        call(getattr(vc, func_name))


def test_valid_arguments_do_not_raise():
    """Every error case above differs from a valid call in exactly the argument it names (so the tests above
    cannot pass because of some other, accidental error)."""
    vc.conv3d(x5(), w5())
    vc.conv3d(x5((1, 4, 6, 6, 6)), w5((4, 2, 3, 3, 3)), groups=2)
    vc.conv3d(x5(), w5(), np.ones(3, np.float32), stride=(1, 2, 1), padding=(0, 1, 2), padding_mode="reflect")
    vc.conv3d(x5(), w5(), padding="same", workers=1, algorithm="fft")
    vc.conv3d(x5((1, 2, 4, 6, 6)), w5(), padding=3, padding_mode="reflect")
    vc.conv3d(x5((1, 2, 4, 6, 6)), w5(), padding=4, padding_mode="circular")
    for f in (vc.correlate, vc.convolve):
        f(np.ones((6, 6, 6)), np.ones((3, 4, 3)), origin=(1, -2, 0), mode="grid-wrap", workers=-1)


@pytest.mark.parametrize("padding_mode", ["zeros", "sideways", "reflect-101"])
def test_nn_conv3d_rejects_unknown_padding_mode(padding_mode):
    if padding_mode == "zeros":
        vc.nn.Conv3d(2, 3, 3, padding_mode=padding_mode)
        return
    with pytest.raises(ValueError, match="padding_mode"):
        vc.nn.Conv3d(2, 3, 3, padding_mode=padding_mode)


# --------------------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------------------

def test_has_cuda_is_bool():
    assert isinstance(vc.has_cuda(), bool)
    if not torch.cuda.is_available():
        assert vc.has_cuda() is False  # no GPU, so cannot be True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")   # not `cuda`: no plugin here
@pytest.mark.parametrize("op", ["conv3d", "correlate"])
def test_cuda_tensor_without_plugin(op):
    if vc.has_cuda():
        pytest.skip("the CUDA plugin is built: nothing to refuse")
    if op == "conv3d":
        call = lambda: vc.conv3d(torch.ones(1, 2, 6, 6, 6, device="cuda"),  # noqa: E731
                                 torch.ones(3, 2, 3, 3, 3, device="cuda"))
    else:
        call = lambda: vc.correlate(torch.ones(6, 6, 6, device="cuda"),  # noqa: E731
                                    torch.ones(3, 3, 3, device="cuda"))
    with pytest.raises(Exception, match="volconv was built without its CUDA plugin"):
        call()


def test_direct_refuses_rings_larger_than_the_memory_available(monkeypatch):
    """The padded-plane rings are allocated inside the parallel region: a layer whose rings would not fit in
    the memory available is refused beforehand, saying what to do instead."""
    from volconv.engine import layout
    monkeypatch.setattr(layout, "ring_bytes", lambda spec, itemsize: 2**60)
    x = np.ones((1, 4, 6, 7, 8), np.float32)
    w = np.ones((4, 4, 3, 3, 3), np.float32)
    with pytest.raises(MemoryError, match="algorithm='fft'"):
        vc.conv3d(x, w, padding=1, algorithm="direct")
    assert vc.conv3d(x, w, padding=1, algorithm="fft").shape == (1, 4, 6, 7, 8)


def test_auto_avoids_rings_larger_than_the_memory_available(monkeypatch):
    """"auto" leaves out the ring-based kernels (direct, sparse) when their rings would not fit and another
    algorithm can do the convolution (with no other it refuses, as "direct" does above)."""
    from volconv.engine import layout
    monkeypatch.setattr(layout, "ring_bytes", lambda spec, itemsize: 2**60)
    x = np.random.default_rng(3).random((1, 1, 12, 12, 12), dtype=np.float32)
    w = np.zeros((1, 1, 5, 5, 5), np.float32)
    w[0, 0, 2, 2, 2], w[0, 0, 0, 1, 4] = 1.0, 0.5   # mostly zeros: sparse would be the cheapest
    ref = torch.nn.functional.conv3d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), padding=2).numpy()
    np.testing.assert_allclose(vc.conv3d(x, w, padding=2), ref, atol=1e-5)   # fft or torch: float32 rounding


def test_tensors_for_the_torch_adapter_are_checked_where_they_stand():
    """Tensors that take the torch adapter (gradients, a GPU, tracing) are checked without conversion: an integer
    input is refused with what to do, and a weight of another float dtype as torch refuses it."""
    w = torch.ones(1, 1, 3, 3, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"input has dtype torch.int64; .*cast it first"):
        vc.conv3d(torch.ones(1, 1, 4, 4, 4, dtype=torch.int64), w)
    x = torch.ones(1, 1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float32 but input has dtype torch.float64; "
                                        r"they must match"):
        vc.conv3d(x, w)
    with pytest.raises(TypeError, match=r"kernels has dtype torch.float32 but input has dtype torch.float64"):
        vc.dynamic_conv3d(x, torch.ones(1, 1, 27, 2, 2, 2), 3)
