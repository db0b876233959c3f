"""vc.filters: scikit-image's Hessian-based 3-D filters, fast and with the same numbers: the Gaussian Hessian
(hessian, hessian_eigvals; skimage.feature.hessian_matrix / hessian_matrix_eigvals) and the multi-scale ridge
filters frangi, sato and meijering (skimage.filters), with sigmas in mm for anisotropic voxels."""
from .ops.hessian import hessian, hessian_eigvals
from .ops.vesselness import frangi, meijering, sato

hessian_matrix = hessian   # scikit-image's name for it

__all__ = ["hessian", "hessian_matrix", "hessian_eigvals", "frangi", "sato", "meijering"]
