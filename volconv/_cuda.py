"""Loader of the CUDA plugin (cuda_plugin/). The plugin is not built yet: every CUDA tensor is refused here,
at the one dispatch point, with how to build it."""

HAS_CUDA = False

BUILD_HINT = ("build it with nvcc present: `VOLCONV_CUDA=1 pip install --no-build-isolation .` "
              "(see cuda_plugin/README.md)")


def has_cuda():
    """True when the CUDA plugin is built and a GPU is present."""
    return HAS_CUDA


def require(op):
    """Raise the error every op gives a CUDA tensor while the plugin is missing."""
    raise RuntimeError(f"volconv was built without its CUDA plugin: {op} cannot run on a CUDA tensor; "
                       + BUILD_HINT)
