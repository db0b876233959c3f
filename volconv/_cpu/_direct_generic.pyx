# Direct kernels, generic build (flags in setup.py). The code is in direct.pxi.
include "direct.pxi"
