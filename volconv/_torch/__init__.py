"""The torch adapter, imported only when a tensor arrives: one definition per op of its kernels (dispatched by
device below autograd: the CPU engine or the CUDA plugin) and of its autograd formula, bound as a torch.library
custom operator (what torch.compile and torch.export see, named volconv::*) and as an eager autograd.Function.

Imports torch, the engine, _validate and the CUDA loader; never volconv.ops or volconv.nn."""
