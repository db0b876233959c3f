# Direct kernels, generic build (flags in setup.py). The code is in direct.pxi, separable.pxi, sparse.pxi, nested.pxi and dynamic.pxi.
include "direct.pxi"
include "separable.pxi"
include "sparse.pxi"
include "nested.pxi"
include "dynamic.pxi"
