"""The engine: numpy arrays in, numpy arrays out, no torch. Checked geometry (a ConvSpec) and contiguous arrays of
one float dtype arrive from the front doors (volconv.ops) or the torch adapter (volconv._torch); the engine
picks an algorithm by its cost model and calls the compiled kernels (volconv._cpu), which trust their inputs.

layout (row maps, rings, memory, threads), cost (the model), border (a constant cval's share), dense, fft,
sparse, separable (CP / Tucker / Gaussian passes), nested, dynamic."""
