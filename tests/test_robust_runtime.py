"""Issue 14, runtime: no hang after fork (item 7), no crash and no long doomed allocation when memory runs short
(item 8), and errors that name the argument for integers the kernels cannot take (item 16).

What could hang or crash the interpreter (a fork child, a failed allocation, a call that would once have
allocated gigabytes) runs in a fresh interpreter with a timeout and, where memory is concerned, an address-space
limit (RLIMIT_AS), so that a regression fails its test instead of hanging or crashing the suite or the machine.
"""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import volconv as vc
from volconv import _memory

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run first in a child that tests memory: its address space limited to what it maps now plus `extra` bytes.
LIMIT = """
import resource
def limit_address_space(extra):
    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))
"""


def run_python(code, timeout=120):
    """code in a fresh interpreter that imports this checkout's volconv; its completed process. The child
    leads a process group of its own: on a timeout the whole group is killed, forked grandchildren included
    (a hung fork child would otherwise outlive the test)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True) as child:
        try:
            out, err = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            pytest.fail(f"the child did not finish within {timeout} s (hung)")
        finally:
            try:   # what the child left behind (pool workers of a failed run)
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def assert_ran(proc, expect="ok"):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}"
    assert expect in proc.stdout, proc.stdout


needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and RLIMIT_AS")

# ---------------------------------------------------------------------------------------- item 7: fork


# Big enough that every call runs on two threads (threads_for), so the parent's OpenMP pool starts.
FORK_JOB = """
import multiprocessing as mp
import numpy as np
import volconv as vc

def job(workers, algorithm="direct"):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 32, 32, 32)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3, 3)).astype(np.float32)
    return vc.conv3d(x, w, padding=1, algorithm=algorithm, workers=workers)
"""


@needs_linux
@pytest.mark.parametrize("parent", ["volconv", "torch"])
def test_fork_pool_children_do_not_hang(parent):
    """A fork child of a parent whose OpenMP pool has started (by volconv, or by torch: one libgomp per
    process) runs volconv, whatever `workers` asks for, and gets the parent's result: the direct kernel's sums
    do not depend on the thread count."""
    start = "expected = job(2)" if parent == "volconv" else \
        "import torch; torch.set_num_threads(2); torch.rand(2**22).exp().sum(); expected = job(1)"
    proc = run_python(FORK_JOB + f"""
if __name__ == "__main__":
    {start}
    with mp.get_context("fork").Pool(2) as pool:
        outs = pool.starmap(job, [(None,), (2,), (-1,), (2, "sparse"), (2, "fft")])
    for out in outs[:3]:
        assert np.array_equal(out, expected)
    for out in outs[3:]:
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    print("ok")
""", timeout=90)
    assert_ran(proc)


@needs_linux
def test_fork_dataloader_workers_do_not_hang():
    """torch DataLoader workers (fork start method) run a vc.nn layer that asks for two threads."""
    proc = run_python("""
import numpy as np
import torch
import volconv as vc

layer = vc.nn.Conv3d(4, 4, 3, padding=1, algorithm="direct", workers=2)

class Volumes(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        with torch.no_grad():
            return layer(torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(i)))[0]

if __name__ == "__main__":
    expected = [Volumes()[i] for i in range(4)]   # the parent's pool starts here
    loader = torch.utils.data.DataLoader(Volumes(), batch_size=1, num_workers=2, multiprocessing_context="fork")
    for out, ref in zip(loader, expected):
        assert torch.equal(out[0], ref)
    print("ok")
""", timeout=120)
    assert_ran(proc)


@needs_linux
def test_fork_child_resolves_one_thread():
    """The rule lives where thread counts are resolved: every `workers` value gives 1 in a fork child, and the
    parent keeps its threads."""
    from volconv._validate import workers

    before = [workers(w) for w in (None, 2, -1)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: report and leave at once (no pytest teardown here)
        os.write(write, repr([workers(w) for w in (None, 2, -1)] + [vc._cpu.max_threads()]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read()
    os.waitpid(pid, 0)
    assert child == repr([1, 1, 1, 1])
    assert [workers(w) for w in (None, 2, -1)] == before


# ------------------------------------------------------------------------- item 8: failed allocations

# Each call needs a small output but a large per-thread work buffer (a ring of 20001 padded planes for a kernel
# 20001 deep: ~330 MB), allocated inside the kernel's parallel region. The memory estimate is switched off so
# that the call reaches the kernel, whose allocation fails under the address-space limit.
ALLOC_CASES = {
    "direct": """vc.conv3d(np.ones((1, 1, 1, 64, 64), np.float32), np.ones((1, 1, 20001, 1, 1), np.float32),
                          padding=(10000, 0, 0), algorithm="direct", workers=1)""",
    "sparse": """vc.conv3d(np.ones((1, 1, 1, 64, 64), np.float32), np.ones((1, 1, 20001, 1, 1), np.float32),
                          padding=(10000, 0, 0), algorithm="sparse", workers=1)""",
    "nested": """vc.nested_conv3d(np.ones((1, 1, 1, 64, 64), np.float32), [np.ones((1, 1, 20001, 1, 1), np.float32)],
                                 algorithm="fused", workers=1)""",
    "separable": """vc.conv3d(np.ones((1, 1, 1, 1, 4096), np.float32),
                             vc.kernels.SeparableKernel([np.ones(20001), np.ones(1), np.ones(1)]),
                             padding=(10000, 0, 0), workers=1)""",
}


@needs_linux
@pytest.mark.parametrize("kernel", list(ALLOC_CASES))
def test_failed_work_buffer_allocation_raises(kernel):
    """A work buffer that cannot be allocated raises MemoryError (it used to be written through a NULL pointer:
    a segfault)."""
    proc = run_python(LIMIT + f"""
import numpy as np
import volconv as vc
try:
    from volconv import _memory
    _memory.available = lambda: None
except ImportError:
    pass
limit_address_space(200 * 2**20)
try:
    {ALLOC_CASES[kernel]}
except MemoryError as e:
    print("MemoryError:", e)
""", timeout=60)
    assert_ran(proc, "MemoryError: volconv's")
    assert "could not allocate its work buffers" in proc.stdout


# The same calls with the estimate on are refused before anything is allocated (no limit needed: an estimate
# is compared with what is available, and these pretend little is).
@pytest.mark.parametrize("kernel", list(ALLOC_CASES))
def test_work_buffers_are_estimated_before_allocating(kernel, monkeypatch):
    monkeypatch.setattr(_memory, "available", lambda: 100 * 2**20)
    with pytest.raises(MemoryError, match=r"needs 3\d\d MiB, but only 100 MiB of memory is available"):
        eval(ALLOC_CASES[kernel], {"vc": vc, "np": np})


# Calls that once allocated gigabytes (index maps as long as the stride, a padded row, rings) before failing
# or crashing; in a child limited to 1 GiB more than it maps after importing torch. Each must be refused at
# once (a fraction of a second) with a message naming the argument, or computed as torch computes it.
@needs_linux
def test_absurd_geometry_is_refused_at_once_naming_the_argument():
    proc = run_python(LIMIT + """
import time
import numpy as np
import torch
import volconv as vc
limit_address_space(2**30)
x = np.random.default_rng(0).standard_normal((1, 1, 8, 8, 8)).astype(np.float32)
w = np.random.default_rng(1).standard_normal((1, 1, 3, 3, 3)).astype(np.float32)
for kwargs, named in [(dict(padding=2**30), "padding ((1073741824, 1073741824)"),
                      (dict(padding=(0, 0, 10**7)), "padding ((0, 0), (0, 0), (10000000, 10000000))"),
                      (dict(padding=(0, 0, 2**27), dilation=(1, 1, 2**27)), "dilation (1, 1, 134217728)"),
                      (dict(padding=2**31), "padding must be <= 2147483647"),
                      (dict(stride=(1, 2**31, 1)), "stride must be <= 2147483647"),
                      (dict(dilation=(2**31, 1, 1)), "dilation must be <= 2147483647")]:
    t = time.perf_counter()
    try:
        vc.conv3d(x, w, **kwargs)
        raise AssertionError(f"{kwargs}: not refused")
    except (MemoryError, ValueError) as e:
        assert named in str(e), (kwargs, str(e))
    assert time.perf_counter() - t < 1.0, kwargs
# strides longer than the input: one output column, as torch computes it, at once and in little memory
for stride in [(1, 1, 2**28), (1, 3, 2**31 - 1), (2**30, 2, 5)]:
    t = time.perf_counter()
    out = vc.conv3d(x, w, stride=stride, padding=1, algorithm="direct")
    ref = torch.nn.functional.conv3d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=1)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)
    assert time.perf_counter() - t < 1.0, stride
print("ok")
""", timeout=120)
    assert_ran(proc)


@needs_linux
def test_large_strides_and_dilations_match_torch():
    """Random geometries with strides far beyond the input (the row layout used to grow with the W stride:
    gigabytes; hence the child with 1 GiB to spare): every algorithm that takes them gives torch's result.
    float64 reference; tolerance: the float32 rounding bound gamma_54 * 216 < 1e-3 of a sum of at most
    2 * 27 products of magnitude <= 4."""
    proc = run_python(LIMIT + """
import numpy as np
import torch
import volconv as vc
limit_address_space(2**30)
rng = np.random.default_rng(20241129)
tried = 0
while tried < 12:
    shape = tuple(int(n) for n in rng.integers(1, 9, size=3))
    k = tuple(int(n) for n in rng.integers(1, 4, size=3))
    stride = tuple(int(2 ** rng.integers(0, 31)) for _ in range(3))
    dilation = tuple(int(rng.integers(1, 3)) for _ in range(3))
    padding = tuple(int(n) for n in rng.integers(0, 3, size=3))
    if any(d * (kk - 1) + 1 > n + 2 * p for n, kk, d, p in zip(shape, k, dilation, padding)):
        continue
    tried += 1
    x = rng.uniform(-2, 2, (1, 2) + shape).astype(np.float32)
    w = rng.uniform(-2, 2, (2, 2) + k).astype(np.float32)
    ref = torch.nn.functional.conv3d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                     stride=stride, padding=padding, dilation=dilation).numpy()
    for algorithm in ("direct", "sparse", "auto"):
        out = vc.conv3d(x, w, stride=stride, padding=padding, dilation=dilation, algorithm=algorithm)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3,
                                   err_msg=f"{algorithm} stride={stride} dilation={dilation} k={k}")
print("ok")
""", timeout=120)
    assert_ran(proc)


@pytest.mark.parametrize("call", ["conv3d", "sparse_conv3d", "nn.Conv3d", "dynamic_conv3d"])
@pytest.mark.parametrize("name, value", [("stride", (2**31, 1, 1)), ("dilation", (1, 2**31, 1)),
                                         ("stride", 2**63)])
def test_integers_beyond_the_kernels_are_refused_by_name(call, name, value):
    x = np.ones((1, 1, 4, 4, 4), np.float32)
    w = np.ones((1, 1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=rf"{name} must be <= 2147483647 on every axis"):
        if call == "conv3d":
            vc.conv3d(x, w, **{name: value})
        elif call == "sparse_conv3d":
            vc.sparse_conv3d(x, vc.SparseKernel.from_dense(w), **{name: value})
        elif call == "nn.Conv3d":
            vc.nn.Conv3d(1, 1, 1, **{name: value})(torch.from_numpy(x))
        else:
            vc.dynamic_conv3d(x, np.ones((1, 1, 1, 4, 4, 4), np.float32), 1, **{name: value})


# ---------------------------------------------------------------------------- what "available" means


def test_available_memory_is_what_the_machine_has():
    free = _memory.available()
    assert free is not None and free > 0
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert free <= total


@needs_linux
def test_available_memory_honours_the_address_space_limit():
    proc = run_python(LIMIT + """
from volconv import _memory
limit_address_space(300 * 2**20)
free = _memory.available()
assert 250 * 2**20 < free <= 300 * 2**20, free
print("ok")
""", timeout=60)
    assert_ran(proc)


@pytest.mark.parametrize("files, expected", [
    # cgroup v2: the tightest of the cgroup and its parent; reclaimable page cache does not count as used
    ({"/proc/self/cgroup": "0::/job/step\n",
      "/cg/job/step/memory.max": "max\n", "/cg/job/step/memory.current": "100\n",
      "/cg/job/memory.max": "1000\n", "/cg/job/memory.current": "700\n",
      "/cg/job/memory.stat": "anon 500\ninactive_file 200\n"}, 1000 - (700 - 200)),
    # cgroup v1 with its "no limit" value, and a limit one level up
    ({"/proc/self/cgroup": "4:memory:/a\n3:cpu:/\n",
      "/cg/memory/a/memory.limit_in_bytes": "9223372036854771712\n", "/cg/memory/a/memory.usage_in_bytes": "5\n",
      "/cg/memory/memory.limit_in_bytes": "4096\n", "/cg/memory/memory.usage_in_bytes": "1024\n"}, 4096 - 1024),
    ({"/proc/self/cgroup": "0::/\n", "/cg/memory.max": "max\n", "/cg/memory.current": "5\n"}, None),
])
def test_cgroup_headroom(files, expected, monkeypatch):
    monkeypatch.setattr(_memory, "_read", lambda path: files.get(path))
    assert _memory._cgroup_available("/cg") == expected
