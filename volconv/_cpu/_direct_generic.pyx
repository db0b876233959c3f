# Direct kernels, generic build (flags in setup.py). The code is in direct.pxi and separable.pxi.
include "direct.pxi"
include "separable.pxi"
