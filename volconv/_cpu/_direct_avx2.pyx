# Direct kernels, avx2 build (flags in setup.py). The code is in direct.pxi, separable.pxi and sparse.pxi.
include "direct.pxi"
include "separable.pxi"
include "sparse.pxi"
