"""vc.restoration: image restoration with scikit-image's semantics on volconv's engine (Richardson-Lucy
deconvolution: volconv.ops.deconvolution)."""
from .ops.deconvolution import richardson_lucy

__all__ = ["richardson_lucy"]
