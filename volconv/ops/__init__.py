"""The front doors: one module per capability (conv, filtering, sparse, lowrank, nested, multiscale, dynamic);
each public op validates its arguments once, then runs the engine (numpy arrays, tensors needing nothing
else) or the torch adapter (tensors needing gradients, on a GPU, or traced)."""
