"""volconv inside a PyTorch model (issue: models, conversion, torch.compile), float32, 2 threads, one run:

the example's 3D U-Net (examples/unet3d.py, 32-64-128 channels) trained for a few steps on the bundled brain,
then converted by vc.nn.convert(to="auto", tolerance=T) for several T, timed against the original on a
1 x 1 x 96^3 input (inference) and on a 1 x 1 x 64^3 training step, with the output's relative error
(target: >= 2x at inference, the output within the stated error).

    python bench/bench_models.py [--threads 2] [--steps 30] [--out FILE]
"""
import os
import sys
import time

import torch

import volconv as vc
from volconv import _benchmark
from volconv._benchmark import Table, best_times

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import unet3d  # noqa: E402


def main(argv=None):
    def options(p):
        p.add_argument("--steps", type=int, default=30)
        p.add_argument("--tolerances", type=float, nargs="+", default=(0.0, 0.3, 0.6))
    a = _benchmark.arguments(__doc__, argv, options)
    torch.manual_seed(0)
    import numpy as np

    net = unet3d.UNet3d((32, 64, 128))
    data = unet3d.batches(unet3d.load_brain(), 32, 2, 0.3, np.random.default_rng(0))
    losses, _ = unet3d.train(net, data, a.steps)
    net.eval()
    x = torch.randn(1, 1, 96, 96, 96)
    xt = torch.randn(1, 1, 64, 64, 64)
    grad = torch.randn(1, 1, 64, 64, 64)

    def step(model):
        def run():
            model.zero_grad()
            model(xt).backward(grad)
        return run

    with torch.no_grad():
        reference = net(x)
    infer, train = {"original (torch.nn.Conv3d)": lambda: net(x)}, {"original (torch.nn.Conv3d)": step(net)}
    notes = []
    for tol in a.tolerances:
        start = time.perf_counter()
        model, report = vc.nn.convert(net, "auto", tolerance=tol)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            error = ((model(x) - reference).norm() / reference.norm()).item()
        kinds = {}
        for r in report.layers:
            kinds[r.representation] = kinds.get(r.representation, 0) + 1
        name = f"converted, tolerance {tol:g}"
        infer[name] = (lambda m: lambda: m(x))(model)
        train[name] = step(model)
        notes.append(f"- {name}: layers {kinds}, parameters {report.parameters_before} -> {report.parameters_after}, "
                     f"output relative error {error:.2e}, conversion {seconds:.1f} s")
    with torch.no_grad():
        inference_times = best_times(infer, rounds=2, repeat=1)
    training_times = best_times(train, rounds=2, repeat=1)
    ours = [n for n in infer if n.startswith("converted")]
    table = Table(f"3D U-Net 32-64-128 trained {a.steps} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}), "
                  f"float32, {a.threads} threads")
    for n in ours:
        table.add(f"inference 1x1x96^3, {n}", {k: inference_times[k] for k in (n, "original (torch.nn.Conv3d)")},
                  [n], ["original (torch.nn.Conv3d)"])
    for n in ours:
        table.add(f"training step 1x1x64^3, {n}", {k: training_times[k] for k in (n, "original (torch.nn.Conv3d)")},
                  [n], ["original (torch.nn.Conv3d)"])
    _benchmark.emit(table.markdown() + "\n\n" + "\n".join(notes) + "\n\nTarget: converted with to='auto' at a stated "
                    "tolerance >= 2x faster at inference, its output within the stated relative error.", a.out)


if __name__ == "__main__":
    main()
