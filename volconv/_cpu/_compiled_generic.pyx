# Every compiled kernel family, generic build (flags in setup.py); volconv._cpu.compiled is the build the CPU runs.
# The code is in direct.pxi, separable.pxi, sparse.pxi, nested.pxi, dynamic.pxi and bilateral.pxi.
include "direct.pxi"
include "separable.pxi"
include "sparse.pxi"
include "nested.pxi"
include "dynamic.pxi"
include "bilateral.pxi"
