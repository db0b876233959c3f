"""Issue 14, the command's items: outputs that would replace an input or another output (9), SIGTERM and stale
temporaries (10), inputs that are not real-valued volumes and failures that must not end in a traceback (11), and
the batch runner's resume / recursive walk / list of failures, --version and a missing output extension (18).

Tests call main([...]) directly, except where the process itself is the subject (signals, a closed pipe): those
run `python -m volconv` in a subprocess with a timeout.
"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hypothesis.strategies as st
import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings

import volconv
import volconv.io as vio
from volconv.cli import main

from test_cli import assert_failure, listing, run, synthetic, write

ROOT = Path(volconv.__file__).resolve().parent.parent
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


def command(*argv, **kwargs):
    """`python -m volconv argv` in a fresh interpreter that imports this checkout's volconv."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(kwargs.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "volconv", *[str(a) for a in argv]], env=env, **kwargs)


def no_traceback(err):
    assert "Traceback" not in err, err


def rgb(path, shape=(8, 8, 8)):
    data = np.zeros(shape, RGB24)
    data["R"] = 200
    save_units(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def save_units(img, path):
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def complex_volume(path, shape=(8, 8, 8)):
    data = (np.ones(shape) + 1j * np.ones(shape)).astype(np.complex64)
    save_units(nib.Nifti1Image(data, np.eye(4)), path)
    return path


# ------------------------------------------------------------------------------- 9: an output replaces a file


@pytest.mark.parametrize("case", ["preview is OUT", "OUT is IN", "OUT is IN via a symlink", "OUT is IN, relative",
                                  "mask is OUT", "kernel is OUT", "sigma map is OUT", "preview is IN"])
def test_an_output_equal_to_another_input_or_output_is_refused(tmp_path, capsys, monkeypatch, case):
    """Compared by resolved path (realpath, or the same inode), with or without --force; nothing is written."""
    monkeypatch.chdir(tmp_path)
    src, _ = synthetic(tmp_path)
    out = tmp_path / "out.nii.gz"
    write(out, np.ones((20, 16, 14), np.float32))   # an existing output, so that --force is what would allow it
    (tmp_path / "link.nii.gz").symlink_to(src)
    kernel = ["--gaussian", "1mm"]
    argv, culprit, names = {
        "preview is OUT": ([src, out, "--preview", out], out, ("--preview", "OUT")),
        "OUT is IN": ([src, src], src, ("OUT", "IN")),
        "OUT is IN via a symlink": ([src, tmp_path / "link.nii.gz"], tmp_path / "link.nii.gz", ("OUT", "IN")),
        "OUT is IN, relative": ([src, Path("sub") / ".." / src.name], Path("sub") / ".." / src.name,
                                ("OUT", "IN")),
        "mask is OUT": ([src, out, "--mask", out], out, ("OUT", "--mask")),
        "kernel is OUT": ([src, out, "--kernel", out], out, ("OUT", "--kernel")),
        "sigma map is OUT": ([src, out, "--sigma-map", out], out, ("OUT", "--sigma-map")),
        "preview is IN": ([src, tmp_path / "o2.nii.gz", "--preview", src], src, ("--preview", "IN")),
    }[case]
    (tmp_path / "sub").mkdir()
    if case.startswith(("kernel", "sigma")):
        kernel = []
    before = {p.name: p.read_bytes() for p in (src, out)}
    code, _, err = run(capsys, "filter", *argv, *kernel, "--force")
    assert_failure(code, err, culprit, also="same file")
    assert all(name in err for name in names), err
    assert {p.name: p.read_bytes() for p in (src, out)} == before
    assert listing(tmp_path) == ["link.nii.gz", "out.nii.gz", "sub", "vol.nii.gz"]


def test_batch_refuses_a_mask_that_is_one_of_its_outputs(tmp_path, capsys):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    synthetic(in_dir, "a.nii.gz")
    out_dir.mkdir()
    mask = write(out_dir / "a.nii.gz", np.ones((20, 16, 14), np.uint8))
    before = mask.read_bytes()
    code, _, err = run(capsys, "batch", in_dir, out_dir, "--gaussian", "1mm", "--mask", mask, "--force")
    assert_failure(code, err, mask, also="same file")
    assert "--mask" in err
    assert mask.read_bytes() == before


# ------------------------------------------------------------------------------- 10: SIGTERM, stale temporaries


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii"])
def test_sigterm_mid_write_exits_143_and_leaves_nothing(tmp_path, name):
    """SIGTERM (timeout, a scheduler, a container stop) while the output is being written: handled as SIGINT is,
    exit 128 + 15, one line, neither the output nor its temporary file left."""
    src = tmp_path / "in" / "big.nii"
    src.parent.mkdir()
    write(src, np.random.default_rng(0).random((160, 160, 120), dtype=np.float32))   # ~12 MB
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # --max-memory 1MiB: slabs of a few planes streamed into the temporary, so writing lasts long enough (a whole
    # volume written at once can finish between two polls, and the run would end before the signal)
    proc = command("filter", src, out_dir / name, "--gaussian", "3vox", "--workers", "1", "--max-memory", "1MiB",
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not os.listdir(out_dir):   # the temporary file appears when writing starts
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    no_traceback(err)
    assert err.strip().splitlines()[-1] == "volconv: terminated", err
    assert listing(out_dir) == []


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_later_run_removes_stale_temporaries_of_dead_processes(tmp_path, capsys):
    """A run killed outright (SIGKILL, power loss) leaves its hidden temporary; the next write into that directory
    removes those of this host whose process is gone, and keeps everything else."""
    src, _ = synthetic(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    host = vio.atomic._temporary_tag(0).split("@", 1)[1]
    stale = [f".a.{dead_pid()}@{host}.k3j_x9q1.tmp.nii.gz", f".b.{dead_pid()}@{host}.abcdefgh.tmp.nii",
             f".p.png.{dead_pid()}@{host}.abcdefgh.tmp.png"]
    kept = [f".c.{os.getpid()}@{host}.abcdefgh.tmp.nii.gz",           # a live process's (this one's)
            f".d.{dead_pid()}@{socket.gethostname()}x.abcdefgh.tmp.nii",   # another host's: its pid means nothing
            ".e.abcdefgh.tmp.nii.gz", "notes.txt"]                            # not ours by name
    for name in stale + kept:
        (out_dir / name).write_bytes(b"partial")
    code, _, err = run(capsys, "filter", src, out_dir / "o.nii.gz", "--gaussian", "1mm")
    assert code == 0, err
    assert listing(out_dir) == sorted(kept + ["o.nii.gz"])


# ------------------------------------------------------------------------------- 11: no traceback, ever


@pytest.mark.parametrize("make, what", [(rgb, "RGB"), (complex_volume, "complex")])
def test_rgb_and_complex_volumes_are_refused_naming_the_file(tmp_path, capsys, make, what):
    src = make(tmp_path / f"{what}.nii.gz")
    code, _, err = run(capsys, "filter", src, tmp_path / "o.nii.gz", "--box", "3vox")
    assert_failure(code, err, src, also=what)
    no_traceback(err)
    # the one refusal is in the reading path that load and filter_nifti share
    with pytest.raises(vio.NiftiError, match=what):
        vio.filter_nifti(src, tmp_path / "o.nii.gz", np.ones((3, 3, 3)))
    with pytest.raises(vio.NiftiError, match=what):
        vio.load(src)
    assert vio.load(src, dtype=None).data.dtype == nib.load(str(src)).get_data_dtype()   # as stored, on request
    assert listing(tmp_path) == [src.name]


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "x"])
def test_truncate_must_be_a_positive_finite_number(tmp_path, capsys, value):
    src, _ = synthetic(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["filter", str(src), str(tmp_path / "o.nii.gz"), "--gaussian", "1mm", "--truncate", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--truncate" in err and "positive finite number" in err, err
    assert listing(tmp_path) == ["vol.nii.gz"]


def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    """`volconv info F | head`: the reader goes away; no BrokenPipeError traceback."""
    src, _ = synthetic(tmp_path)
    proc = command("info", *[src] * 200, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()   # before the interpreter has started: every write meets a closed pipe
    try:
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert err == "", err
    assert proc.returncode == 1


def test_an_unexpected_failure_is_one_line_and_volconv_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    src, _ = synthetic(tmp_path)

    def broken(*args, **kwargs):
        raise TypeError("simulated bug")

    monkeypatch.setattr(vio, "filter_nifti", broken)
    code, _, err = run(capsys, "filter", src, tmp_path / "o.nii.gz", "--gaussian", "1mm")
    assert_failure(code, err, src, also="simulated bug")
    assert "VOLCONV_DEBUG" in err
    monkeypatch.setenv("VOLCONV_DEBUG", "1")
    with pytest.raises(TypeError, match="simulated bug"):
        main(["filter", str(src), str(tmp_path / "o.nii.gz"), "--gaussian", "1mm"])


# ------------------------------------------------------------------------------- 18: the batch, --version, names


def test_batch_keeps_going_past_bad_files_and_lists_them(tmp_path, capsys):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    synthetic(in_dir, "a_good.nii.gz")
    rgb(in_dir / "b_rgb.nii.gz")
    complex_volume(in_dir / "c_complex.nii")
    synthetic(in_dir, "d_good.nii", seed=3)
    code, _, err = run(capsys, "batch", in_dir, out_dir, "--box", "3vox")
    assert code == 1
    no_traceback(err)
    assert listing(out_dir) == ["a_good.nii.gz", "d_good.nii"]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"volconv: error: {in_dir}: 2 of 4 files failed: "), last
    assert "b_rgb.nii.gz" in last and "c_complex.nii" in last and "good" not in last, last


def test_batch_skip_existing_resumes_an_interrupted_batch(tmp_path, capsys):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    for i, name in enumerate(("a.nii.gz", "b.nii.gz", "c.nii")):
        synthetic(in_dir, name, seed=i)
    out_dir.mkdir()
    done = write(out_dir / "a.nii.gz", np.zeros((20, 16, 14), np.float32))   # what the interrupted run finished
    before = done.read_bytes()
    code, _, err = run(capsys, "batch", in_dir, out_dir, "--gaussian", "1mm", "--skip-existing")
    assert code == 0, err
    assert listing(out_dir) == ["a.nii.gz", "b.nii.gz", "c.nii"]
    assert done.read_bytes() == before
    assert "skipped 1 existing" in err and "2 files filtered" in err
    code, _, err = run(capsys, "batch", in_dir, out_dir, "--gaussian", "1mm", "--skip-existing")
    assert code == 0 and "skipped 3 existing" in err, err
    with pytest.raises(SystemExit) as info:
        main(["batch", str(in_dir), str(out_dir), "--gaussian", "1mm", "--skip-existing", "--force"])
    assert info.value.code == 2


def test_batch_recursive_mirrors_a_bids_layout(tmp_path, capsys):
    """--recursive walks nested folders (hidden ones and the output folder itself skipped) and writes each file
    under the same relative path in OUT_DIR; without it only IN_DIR's own files are filtered."""
    bids = tmp_path / "bids"
    names = ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/func/sub-01_task-rest_bold.nii",
             "sub-02/anat/sub-02_T1w.nii.gz", "top.nii"]
    for i, name in enumerate(names):
        (bids / name).parent.mkdir(parents=True, exist_ok=True)
        synthetic((bids / name).parent, Path(name).name, seed=i)
    (bids / ".git").mkdir()
    synthetic(bids / ".git", "hidden.nii")
    out_dir = bids / "derivatives" / "smooth"   # inside IN_DIR, as BIDS puts it: not walked as input
    code, _, err = run(capsys, "batch", bids, out_dir, "--gaussian", "1mm", "--recursive")
    assert code == 0, err
    written = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    assert written == sorted(names)
    assert "4 files filtered" in err
    code, _, err = run(capsys, "batch", bids, out_dir, "--gaussian", "1mm", "--recursive", "--skip-existing")
    assert code == 0 and "skipped 4 existing" in err, err
    flat = tmp_path / "flat"
    code, _, err = run(capsys, "batch", bids, flat, "--gaussian", "1mm")
    assert code == 0, err
    assert listing(flat) == ["top.nii"]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"volconv {volconv.__version__}"


def test_filter_adds_nii_gz_when_the_output_has_no_extension(tmp_path, capsys):
    """As fslmaths does (FSLOUTPUTTYPE's default NIFTI_GZ): OUT without .nii / .nii.gz gets .nii.gz."""
    src, _ = synthetic(tmp_path, "vol.nii")
    code, _, err = run(capsys, "filter", src, tmp_path / "smooth", "--gaussian", "1mm")
    assert code == 0, err
    assert listing(tmp_path) == ["smooth.nii.gz", "vol.nii"]
    assert f"-> {tmp_path / 'smooth.nii.gz'}" in err
    code, _, err = run(capsys, "filter", src, tmp_path / "sub.01.smooth", "--gaussian", "1mm")
    assert code == 0 and (tmp_path / "sub.01.smooth.nii.gz").exists(), err
    with pytest.raises(SystemExit) as info:   # another format's name is still refused, not extended
        main(["filter", str(src), str(tmp_path / "o.img"), "--gaussian", "1mm"])
    assert info.value.code == 2


def test_an_input_directory_is_named_as_the_input(tmp_path, capsys):
    """A directory given as IN, next to OUT: the error names IN, not OUT (whose folder it happens to be)."""
    code, _, err = run(capsys, "filter", tmp_path, tmp_path / "o.nii.gz", "--box", "3vox")
    assert_failure(code, err, tmp_path, also="is a directory")


def test_bench_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", "--threads", "0"])
    assert info.value.code == 2
    assert "positive finite integer" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(hops=st.lists(st.sampled_from(["./", "sub/../", "link/", "sub/../link/"]), max_size=4),
       absolute=st.booleans(), hard_link=st.booleans())
def test_every_spelling_of_an_input_is_refused_as_an_output(hops, absolute, hard_link):
    """However OUT spells the input's path (./, a/.., a symlinked folder, absolute or relative, or a hard link),
    the one check refuses it; a different file passes."""
    from volconv.cli.common import CommandError, check_distinct as _check_distinct

    with tempfile.TemporaryDirectory() as top:
        top = Path(top)
        (top / "sub").mkdir()
        (top / "link").symlink_to(top)
        (top / "in.nii").write_bytes(b"x")
        if hard_link:
            os.link(top / "in.nii", top / "hard.nii")
        name = "hard.nii" if hard_link else "in.nii"
        spelled = "".join(hops) + name
        out = top / spelled if absolute else Path(os.path.relpath(top, os.getcwd())) / spelled
        with pytest.raises(CommandError, match="OUT is the same file as IN"):
            _check_distinct([("IN", top / "in.nii")], [("OUT", out)])
        _check_distinct([("IN", top / "in.nii")], [("OUT", top / "sub" / name)])
