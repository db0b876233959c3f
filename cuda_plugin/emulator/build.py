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


def command(srcs, out, sanitize=None, opt="-O2", defines=()):
    cmd = ["g++", "-std=c++20", "-x", "c++", opt, "-g", "-fPIC", "-shared", "-pthread", "-Wall",
           "-Wno-unused-function", "-Wno-sign-compare", "-I", os.path.join(HERE, "include"),
           "-include", os.path.join(HERE, "cuda_emu.h")]
    cmd += sorted({f"-I{os.path.dirname(os.path.abspath(s))}" for s in srcs})
    cmd += [f"-D{d}" for d in defines]
    if sanitize:
        cmd += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
    return cmd + list(srcs) + ["-o", out]


def _digest(srcs, sanitize, opt, defines):
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
    h.update(repr(command([], "", sanitize, opt, defines)[:-2]).encode())
    return h.hexdigest()[:16]


def build(source_dir=PLUGIN, sanitize=None, opt="-O2", defines=(), out=None):
    """The emulated plugin library for source_dir's *.cu as they are now; built when no cached copy matches."""
    srcs = sources(source_dir)
    tag = _digest(srcs, sanitize, opt, defines)
    if out is None:
        os.makedirs(cache_dir(), exist_ok=True)
        out = os.path.join(cache_dir(), f"vc_cuda_emu_{sanitize or 'plain'}_{tag}.so")
        if os.path.exists(out):
            return out
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=os.path.dirname(os.path.abspath(out)))
    os.close(fd)
    try:
        proc = subprocess.run(command(srcs, tmp, sanitize, opt, defines), capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"g++ failed to build volconv's CUDA plugin for the emulator:\n{proc.stderr[-6000:]}")
        os.replace(tmp, out)   # a half-written library is never loaded; concurrent builds each finish theirs
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    san = next((a.split("=", 1)[1] for a in args if a.startswith("--sanitize=")), None)
    out = args[args.index("--out") + 1] if "--out" in args else None
    print(build(sanitize=san, out=out))
