"""Build volconv's CUDA plugin for the CPU emulator: cuda_plugin/*.cu compiled by g++ with cuda_emu.h, into a
shared library with the same C interface as the nvcc build (volconv/_cuda.py loads either).

The plugin's sources are plain C++ apart from what vc_launch.cuh wraps in macros (launches, __shared__), so no
source is rewritten: `-include cuda_emu.h` defines the CUDA keywords, builtins and runtime API, and CUDA_EMU makes
the macros expand to the emulator's launch and per-block shared memory.

    python cuda_plugin/emulator/build.py [--sanitize=address|thread|undefined] [--out LIB]   # prints the path

The library is cached under $VOLCONV_EMULATOR_CACHE (default ~/.cache/volconv/emulator), named by a hash of
the plugin's sources, the emulator's files, the sanitizer and the compiler command: a changed source builds anew.
This file imports nothing from volconv (tests/conftest.py loads it by path).
"""
import glob
import hashlib
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.dirname(HERE)


def cache_dir():
    return os.environ.get("VOLCONV_EMULATOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "volconv",
                                                                     "emulator")


def sources(source_dir=PLUGIN):
    found = sorted(glob.glob(os.path.join(source_dir, "*.cu")))
    if not found:
        raise RuntimeError(f"no CUDA sources (*.cu) in {source_dir}")
    return found


def flags(sanitize=None, opt="-O2", defines=()):
    """g++'s flags for every emulated source (include directories aside)."""
    cmd = ["-std=c++20", "-x", "c++", opt, "-g", "-fPIC", "-pthread", "-Wall", "-Wno-unused-function",
           "-Wno-sign-compare", "-I", os.path.join(HERE, "include"), "-include", os.path.join(HERE, "cuda_emu.h")]
    cmd += [f"-D{d}" for d in defines]
    if sanitize:
        cmd += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
    return cmd


def _digest(srcs, *settings):
    """A hash of srcs' contents, the headers they may include (theirs and the emulator's), this file and the
    settings: the same for the same sources wherever they lie."""
    h = hashlib.sha256()
    source_dirs = sorted({os.path.dirname(os.path.abspath(s)) for s in srcs})
    files = list(srcs) + [f for d in source_dirs for f in sorted(glob.glob(os.path.join(d, "*.cuh")) +
                                                                  glob.glob(os.path.join(d, "*.h")))]
    files += sorted(glob.glob(os.path.join(HERE, "*.h")) + glob.glob(os.path.join(HERE, "include", "*")))
    files.append(os.path.abspath(__file__))
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
    h.update(repr(settings).encode())
    return h.hexdigest()[:16]


def _run(cmd, out):
    """cmd writing `out` through a temporary file renamed into place: a half-written file is never used, and
    concurrent builds each finish theirs."""
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        proc = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"g++ failed to build volconv's CUDA plugin for the emulator:\n{proc.stderr[-6000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build(source_dir=PLUGIN, sanitize=None, opt="-O2", defines=(), out=None):
    """The emulated plugin library for source_dir's *.cu as they are now; built when no cached copy matches,
    from one cached object per source (only a changed source, or a changed header, compiles again)."""
    srcs = sources(source_dir)
    settings = (sanitize, opt, tuple(defines))
    os.makedirs(cache_dir(), exist_ok=True)
    if out is None:
        out = os.path.join(cache_dir(), f"vc_cuda_emu_{sanitize or 'plain'}_{_digest(srcs, *settings)}.so")
        if os.path.exists(out):
            return out
    objects = []
    for src in srcs:
        obj = os.path.join(cache_dir(), f"{os.path.basename(src)}_{sanitize or 'plain'}_"
                                        f"{_digest([src], *settings)}.o")
        if not os.path.exists(obj):
            _run(["g++", *flags(*settings), f"-I{os.path.dirname(os.path.abspath(src))}", "-c", src], obj)
        objects.append(obj)
    link = ["g++", "-shared", "-pthread"] + ([f"-fsanitize={sanitize}"] if sanitize else [])
    return _run(link + objects, out)


if __name__ == "__main__":
    args = sys.argv[1:]
    san = next((a.split("=", 1)[1] for a in args if a.startswith("--sanitize=")), None)
    out = args[args.index("--out") + 1] if "--out" in args else None
    print(build(sanitize=san, out=out))
