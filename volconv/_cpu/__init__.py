"""The compiled CPU kernels: picks the SIMD build this CPU runs (AVX-512, AVX2, or baseline x86-64).

VOLCONV_SIMD=generic|avx2|avx512 forces one (tests use it to check every build on one machine).
"""
import importlib
import os

try:
    from . import _direct_generic
except ImportError as e:  # a source checkout without built extensions (e.g. `import volconv` from the repo root)
    raise ImportError("volconv's compiled kernels are not built here: install with `pip install -e .` in the source "
                      "tree, or run from outside it to use an installed volconv") from e

_LEVELS = ("generic", "avx2", "avx512")


def _load():
    supported = _LEVELS[: _direct_generic.cpu_level() + 1]
    wanted = os.environ.get("VOLCONV_SIMD")
    if wanted:
        if wanted not in _LEVELS:
            raise ValueError(f"VOLCONV_SIMD must be one of {', '.join(_LEVELS)}, got {wanted!r}")
        if wanted not in supported:
            raise RuntimeError(f"VOLCONV_SIMD={wanted} but this CPU supports only {', '.join(supported)}")
        supported = supported[: _LEVELS.index(wanted) + 1]
    for level in reversed(supported):
        try:
            return level, importlib.import_module(f"{__name__}._direct_{level}")
        except ImportError:  # a build without that variant (non-x86 machines build only 'generic')
            continue
    raise ImportError("volconv's compiled kernels are missing; reinstall with `pip install .`")


SIMD, direct = _load()
max_threads = direct.max_threads
HAVE_OPENMP = direct.have_openmp()
