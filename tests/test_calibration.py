"""The cost model's per-machine calibration (volconv/engine/calibration.py, `volconv bench --calibrate`): stored
and read back per machine, a broken file falls back to the defaults with one warning, VOLCONV_CALIBRATION=off
ignores it, and a stored calibration changes what "auto" runs where it should (the results stay the same)."""
import dataclasses
import json
import os
import warnings

import numpy as np
import pytest

import volconv as vc
from volconv._validate import ConvSpec
from volconv.cli import main
from volconv.engine import calibration, cost, dense, rates
from volconv.engine import deconvolution as deconvolution_engine
from volconv.engine.calibration import DEFAULTS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of this test's own, read afresh by the cost model."""
    monkeypatch.setenv("VOLCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VOLCONV_CALIBRATION", raising=False)
    calibration.reset()
    yield tmp_path
    calibration.reset()


def stored(**changes):
    """Store the defaults with these changes as this machine's calibration; the constants stored."""
    constants = dataclasses.replace(DEFAULTS, **changes)
    calibration.store(constants, version="test")
    return constants


def same_spec(n, k, mode="reflect"):
    """vc.correlate's geometry for one n^3 volume and a k^3 kernel."""
    return ConvSpec((1, 1, n, n, n), (1, 1, k, k, k), stride=(1, 1, 1), pads=(((k - 1) // 2, k // 2),) * 3,
                    dilation=(1, 1, 1), groups=1, mode=mode)


# ----------------------------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------------------------

def test_store_and_load_round_trip(cache):
    other = {"format": 1, "machines": {"another machine": {"constants": {"bandwidth": 1e9}}}}
    (cache / "calibration.json").write_text(json.dumps(other))
    constants = stored(direct_gflops_1=12.5, fft_scale=0.25, separable_gflops=7.0)
    record = calibration.load()
    assert record["constants"] == constants
    assert record["machine"] == calibration.machine_key()
    assert record["volconv"] == "test" and record["date"][:2] == "20"
    assert calibration.current() == constants   # store() makes the cost model read it again
    machines = json.loads((cache / "calibration.json").read_text())["machines"]
    assert set(machines) == {"another machine", calibration.machine_key()}   # the other machine's entry kept
    assert not [p for p in os.listdir(cache) if p != "calibration.json"]      # no temporary file left


def test_where_the_file_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("VOLCONV_CACHE_DIR", str(tmp_path / "explicit"))
    assert calibration.path() == str(tmp_path / "explicit" / "calibration.json")
    monkeypatch.delenv("VOLCONV_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration.path() == str(tmp_path / "xdg" / "volconv" / "calibration.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calibration.path() == str(tmp_path / "home" / ".cache" / "volconv" / "calibration.json")


def test_machine_key_names_the_cpu_its_threads_and_the_simd_build():
    from volconv import _cpu

    key = calibration.machine_key()
    assert calibration.cpu_model() in key and f"{os.cpu_count()} CPUs" in key and key.endswith(_cpu.SIMD)


def test_no_file_or_another_machines_entry_gives_the_defaults_silently(cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibration.current() is DEFAULTS
        calibration.reset()
        (cache / "calibration.json").write_text(json.dumps(
            {"format": 1, "machines": {"another machine": {"constants": {"fft_scale": 0.01}}}}))
        assert calibration.load() is None
        assert calibration.current() is DEFAULTS


def test_a_file_from_an_older_volconv_keeps_the_defaults_of_what_it_lacks(cache):
    (cache / "calibration.json").write_text(json.dumps({"format": 1, "machines": {calibration.machine_key(): {
        "constants": {"fft_scale": 0.5, "a_constant_of_the_past": 3.0}}}}))
    assert calibration.current() == dataclasses.replace(DEFAULTS, fft_scale=0.5)


@pytest.mark.parametrize("content", [
    "{not json",
    "[1, 2, 3]",
    json.dumps({"format": 1, "machines": {"KEY": {"constants": {"bandwidth": -5.0}}}}),
    json.dumps({"format": 1, "machines": {"KEY": {"constants": {"direct_gflops_1": "fast"}}}}),
    json.dumps({"format": 1, "machines": {"KEY": {"constants": {"sparse_gflops": float("nan")}}}}),
    json.dumps({"format": 1, "machines": {"KEY": ["not", "a", "table"]}}),
], ids=["not-json", "not-a-table", "negative", "a-string", "nan", "entry-not-a-table"])
def test_a_broken_file_gives_one_warning_and_the_defaults(cache, content):
    (cache / "calibration.json").write_text(content.replace("KEY", calibration.machine_key()))
    with pytest.warns(RuntimeWarning, match="calibration.json") as caught:
        assert calibration.current() is DEFAULTS
        assert calibration.current() is DEFAULTS   # read once per process: no second warning
    assert len(caught) == 1
    assert vc.correlate(np.ones((8, 8, 8), np.float32), np.ones((5, 5, 5), np.float32)).shape == (8, 8, 8)


def test_calibration_off_ignores_the_stored_file(cache, monkeypatch):
    stored(fft_scale=0.02)
    assert calibration.current().fft_scale == 0.02
    monkeypatch.setenv("VOLCONV_CALIBRATION", "off")
    calibration.reset()
    assert calibration.current() is DEFAULTS
    assert cost.choose_algorithm(np.ones(1, np.float32), same_spec(48, 7), 2, allow_torch=False) == "direct"


# ----------------------------------------------------------------------------------------------------------------
# what "auto" chooses
# ----------------------------------------------------------------------------------------------------------------

def spy_on_algorithms(monkeypatch):
    """The names of the dense algorithms run from now on, in order."""
    ran = []
    for name, run in list(dense.ALGORITHMS.items()):
        def spy(*args, _name=name, _run=run):
            ran.append(_name)
            return _run(*args)
        monkeypatch.setitem(dense.ALGORITHMS, name, spy)
    return ran


@pytest.mark.parametrize("k, default, changes, calibrated", [
    (7, "direct", {"fft_scale": 1 / 50}, "fft"),                              # FFT 50x faster than the model
    (15, "fft", {"direct_gflops_1": 50 * DEFAULTS.direct_gflops_1}, "direct"),  # the direct kernel 50x faster
])
def test_a_stored_calibration_changes_the_choice(cache, monkeypatch, rng, k, default, changes, calibrated):
    n = 48
    spec = same_spec(n, k)
    volume = rng.standard_normal((n, n, n)).astype(np.float32)
    kernel = rng.standard_normal((k, k, k)).astype(np.float32)
    ran = spy_on_algorithms(monkeypatch)
    before = cost.algorithm_costs(spec, 2, allow_torch=False)
    assert cost.choose_algorithm(volume, spec, 2, allow_torch=False) == default
    out_default = vc.correlate(volume, kernel, workers=2)

    stored(**changes)
    after = cost.algorithm_costs(spec, 2, allow_torch=False)
    assert cost.choose_algorithm(volume, spec, 2, allow_torch=False) == calibrated
    out_calibrated = vc.correlate(volume, kernel, workers=2)
    assert ran == [default, calibrated]   # what vc.correlate ran, through the cost model
    np.testing.assert_allclose(out_calibrated, out_default, rtol=0,
                               atol=1e-5 * float(np.abs(out_default).max()))
    # the costs moved by exactly the stored factors
    scale = changes.get("fft_scale", 1.0)
    assert after["fft"] == pytest.approx(before["fft"] * scale, rel=1e-12)
    if "direct_gflops_1" in changes:
        compute = lambda costs: costs["direct"] - cost.streaming_cost(spec)   # noqa: E731
        assert compute(after) == pytest.approx(compute(before) / 50, rel=1e-9)


def test_a_stored_calibration_changes_the_deconvolution_choice(cache):
    assert deconvolution_engine.choose_algorithm((128,) * 3, (11,) * 3, 4, 2) == "fft"
    stored(fft_scale=50.0)
    assert deconvolution_engine.choose_algorithm((128,) * 3, (11,) * 3, 4, 2) == "direct"


def test_every_rate_enters_its_cost(cache):
    """Each stored rate divides the arithmetic part of the cost it names (twice the rate: half the seconds)."""
    spec = ConvSpec((1, 16, 16, 16, 16), (16, 16, 3, 3, 3), stride=(1, 1, 1), pads=((1, 1),) * 3,
                    dilation=(1, 1, 1), groups=1, mode="constant")
    parts = {"direct_gflops_8": lambda: cost.direct_cost(spec, 2) - cost.streaming_cost(spec),
             "wgrad_gflops_8": lambda: cost.wgrad_cost(spec, 2) - calibration.current().call_overhead,
             "torch_gflops": lambda: cost.torch_cost(spec, 2) - cost.TORCH_CALL,
             "sparse_gflops": lambda: cost.sparse_cost(spec, 100, 2) - cost.streaming_cost(spec),
             "separable_gflops": lambda: cost.separable_cost(spec, 9, 2) - cost.streaming_cost(spec),
             "bandwidth": lambda: cost.streaming_cost(spec) - calibration.current().call_overhead}
    before = {name: part() for name, part in parts.items()}
    stored(**{name: 2 * getattr(DEFAULTS, name) for name in parts})
    for name, part in parts.items():
        assert part() == pytest.approx(before[name] / 2, rel=1e-9), name


# ----------------------------------------------------------------------------------------------------------------
# measuring, and the command
# ----------------------------------------------------------------------------------------------------------------

def test_bench_calibrate_quick_measures_and_stores(cache, capsys):
    assert main(["bench", "--calibrate", "--quick", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert str(cache / "calibration.json") in out and "direct_gflops_1" in out
    record = calibration.load()
    constants = record["constants"]
    assert record["quick"] is True and record["threads"] == 2
    for field in dataclasses.fields(constants):
        assert np.isfinite(getattr(constants, field.name)) and getattr(constants, field.name) > 0, field.name
    measured = ("direct_gflops_1", "direct_gflops_4", "direct_gflops_8", "sparse_gflops", "separable_gflops",
                "call_overhead", "bandwidth", "fft_scale")
    assert all(getattr(constants, name) != getattr(DEFAULTS, name) for name in measured)
    assert main(["bench", "--calibration"]) == 0
    shown = capsys.readouterr().out
    assert calibration.machine_key() in shown and "stored" in shown and record["date"] in shown


def test_bench_calibration_shows_when_nothing_is_stored(cache, capsys):
    assert main(["bench", "--calibration"]) == 0
    assert "nothing stored for this machine" in capsys.readouterr().out


def test_bench_calibrate_into_an_unwritable_directory_fails_before_measuring(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VOLCONV_CACHE_DIR", str(blocker / "cache"))   # under a file: even root cannot create it
    monkeypatch.setattr(rates, "measure", lambda **kwargs: pytest.fail("measured before the check"))
    assert main(["bench", "--calibrate", "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("volconv: error: cannot write the calibration") and "VOLCONV_CACHE_DIR" in err
    assert len(err.splitlines()) == 1 and "unexpected" not in err


def test_bench_calibration_of_a_broken_file_is_one_error_line(cache, capsys):
    (cache / "calibration.json").write_text("{not json")
    assert main(["bench", "--calibration"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("volconv: error: cannot read the calibration file") and "calibration.json" in err
    assert len(err.splitlines()) == 1 and "unexpected" not in err
