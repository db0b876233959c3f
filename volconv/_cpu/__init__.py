"""The compiled CPU kernels: picks the SIMD build this CPU runs (AVX-512, AVX2, or baseline x86-64).

`compiled` is that build (every kernel family: direct, separable, sparse, nested, dynamic).

VOLCONV_SIMD=generic|avx2|avx512 forces one (tests use it to check every build on one machine).
"""
import importlib
import os

try:
    from . import _compiled_generic
except ImportError as e:  # a source checkout without built extensions (e.g. `import volconv` from the repo root)
    raise ImportError("volconv's compiled kernels are not built here: install with `pip install -e .` in the source "
                      "tree, or run from outside it to use an installed volconv") from e

_LEVELS = ("generic", "avx2", "avx512")


def _load():
    supported = _LEVELS[: _compiled_generic.cpu_level() + 1]
    wanted = os.environ.get("VOLCONV_SIMD")
    if wanted:
        if wanted not in _LEVELS:
            raise ValueError(f"VOLCONV_SIMD must be one of {', '.join(_LEVELS)}, got {wanted!r}")
        if wanted not in supported:
            raise RuntimeError(f"VOLCONV_SIMD={wanted} but this CPU supports only {', '.join(supported)}")
        supported = supported[: _LEVELS.index(wanted) + 1]
    for level in reversed(supported):
        try:
            return level, importlib.import_module(f"{__name__}._compiled_{level}")
        except ImportError:  # a build without that variant (non-x86 machines build only 'generic')
            continue
    raise ImportError("volconv's compiled kernels are missing; reinstall with `pip install .`")


SIMD, compiled = _load()
HAVE_OPENMP = compiled.have_openmp()

# Fork safety. GNU libgomp keeps its thread pool between parallel regions and has no fork handler: in a child
# forked after the pool started, the first parallel region with more than one thread waits forever for the
# parent's threads (multiprocessing's "fork" start method, the default on Linux before Python 3.14; torch
# DataLoader workers). The pool may have been started by volconv or by any library sharing the process's one
# libgomp.so.1 (torch's own copy has that name too, and the dynamic linker loads only one), so a fork child
# runs volconv on one thread, as torch's DataLoader workers run torch. "spawn" and "forkserver" children start
# a fresh interpreter and keep every thread. `threads` applies the rule where every thread count is resolved
# (_validate.workers).
_fork_child = False


def _after_fork_in_child():
    global _fork_child
    _fork_child = True


if hasattr(os, "register_at_fork"):   # POSIX (Windows has no fork)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def threads(requested=None):
    """The threads a kernel runs with: `requested` (None: every thread OpenMP allows, which honours
    OMP_NUM_THREADS and threadpoolctl), or 1 in a fork child (see above)."""
    if _fork_child:
        return 1
    return compiled.max_threads() if requested is None else requested


def max_threads():
    """Threads volconv uses when not told (1 in a fork child)."""
    return threads()
