"""Build of volconv's compiled kernels. Needs Cython >= 3 and numpy; never torch; nvcc only for the optional
CUDA plugin (built when nvcc is on PATH; VOLCONV_CUDA=0 skips it, VOLCONV_CUDA=1 makes its failure fatal).

The compiled kernels (every family: volconv/_cpu/*.pxi + simd.h) are built three times, for baseline x86-64,
AVX2+FMA and AVX-512; volconv/_cpu/__init__.py imports the best one the CPU supports. VOLCONV_NATIVE=1 adds
-march=native to all three (a build for this machine only). OpenMP is used where the compiler has it.
"""
import os
import platform
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def compiler_accepts(flags):
    """True when the C compiler builds and links a small OpenMP program with these flags."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.c")
        with open(path, "w") as f:
            f.write(src)
        cmd = [cc, path, "-o", os.path.join(tmp, "t")] + flags
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
SIMD_FLAGS = {
    "generic": ["-DVC_VBYTES=16"],
    "avx2": ["-mavx2", "-mfma", "-DVC_VBYTES=32"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mprefer-vector-width=512", "-DVC_VBYTES=64"],
}


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:   # the three SIMD builds compile side by side (pip gives no -j of its own)
            self.parallel = os.cpu_count() or 1

    def build_extensions(self):
        openmp = sys.platform != "win32" and compiler_accepts(["-fopenmp"])
        if not openmp:
            print("volconv: the compiler has no OpenMP; building the serial kernels", file=sys.stderr)
        native = os.environ.get("VOLCONV_NATIVE") == "1"
        for ext in self.extensions:
            ext.extra_compile_args += ["-O3", "-fno-math-errno", "-Wno-unused-function"]
            if openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
            if native:
                ext.extra_compile_args.append("-march=native")
        super().build_extensions()
        self.build_cuda_plugin()

    def plugin_path(self):
        """volconv/_cuda_plugin.so beside the compiled kernels (the source tree for an editable install)."""
        cpu_dir = os.path.dirname(self.get_ext_fullpath("volconv._cpu._compiled_generic"))
        return os.path.join(os.path.dirname(cpu_dir), "_cuda_plugin.so")

    def build_cuda_plugin(self):
        """nvcc present: build the CUDA plugin (VOLCONV_CUDA=0 skips it, =1 makes a failure fatal)."""
        wanted = os.environ.get("VOLCONV_CUDA", "")
        if wanted == "0" or (wanted != "1" and shutil.which("nvcc") is None):
            return
        cuda = load_cuda_builder()
        try:
            self.plugin_built = cuda.build(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_plugin"),
                                           self.plugin_path())
        except RuntimeError as e:
            if wanted == "1":
                raise
            print(f"volconv: CUDA plugin not built ({e}); `python -m volconv.cuda build` retries", file=sys.stderr)

    def copy_extensions_to_source(self):
        """In-place (editable) builds: the plugin joins the compiled kernels in the source tree."""
        super().copy_extensions_to_source()
        built = getattr(self, "plugin_built", None)
        if built and os.path.exists(built) and os.path.abspath(built) != os.path.abspath(self.plugin_path()):
            shutil.copyfile(built, self.plugin_path())

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs + [self.plugin_path()] if os.path.exists(self.plugin_path()) else outputs


def load_cuda_builder():
    """volconv/cuda.py by path (it imports nothing from volconv): the one place that knows the nvcc command."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "volconv_cuda_builder", os.path.join(os.path.dirname(os.path.abspath(__file__)), "volconv", "cuda.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_extension(variant):
    import numpy

    flags = SIMD_FLAGS[variant] if X86 else ["-DVC_VBYTES=16"]
    import glob

    return Extension(f"volconv._cpu._compiled_{variant}", [f"volconv/_cpu/_compiled_{variant}.pyx"],
                     depends=glob.glob("volconv/_cpu/*.pxi") + glob.glob("volconv/_cpu/*.h"),
                     include_dirs=["volconv/_cpu", numpy.get_include()], extra_compile_args=list(flags),
                     define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")])


def extensions():
    from Cython.Build import cythonize

    variants = ["generic", "avx2", "avx512"] if X86 else ["generic"]
    return cythonize([compiled_extension(v) for v in variants], language_level=3, nthreads=os.cpu_count() or 1,
                     compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                                          "initializedcheck": False, "nonecheck": False})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
