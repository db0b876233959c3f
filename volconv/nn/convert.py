"""vc.nn.convert: replace every torch.nn.Conv3d of a model by the volconv layer that represents its weight
within a tolerance (CP, Tucker, sparse or dense), with a report of what was chosen and what it gains."""
import copy
import math
import time
from dataclasses import dataclass, field

import torch

from .conv import Conv3d
from .lowrank import CPConv3d, TuckerConv3d
from .sparse import SparseConv3d

TARGETS = ("cp", "tucker", "sparse", "auto")
# "auto" weighs each candidate's multiply-adds by how fast its kernels run per multiply-add here, relative to
# the dense direct kernel (measured on the benchmarks: the factored layers pay passes over memory for their
# projections, the sparse kernel one tap at a time), and keeps the dense layer unless the gain is real.
EFFICIENCY = {"dense": 1.0, "cp": 0.35, "tucker": 0.5, "sparse": 0.25}
MIN_GAIN = 1.3


@dataclass
class LayerReport:
    name: str
    representation: str          # "dense", "cp", "tucker", "sparse" or "kept" (the original layer, note says why)
    params: dict                 # rank / ranks / density
    relative_error: float        # ||W - W'|| / ||W||
    parameters_before: int
    parameters_after: int
    predicted_speedup: float     # dense multiply-adds per voxel / the layer's
    measured_speedup: float = None   # the original layer's forward time / the new one's (with `example`)
    note: str = ""


@dataclass
class ConversionReport:
    layers: list = field(default_factory=list)

    @property
    def parameters_before(self):
        return sum(r.parameters_before for r in self.layers)

    @property
    def parameters_after(self):
        return sum(r.parameters_after for r in self.layers)

    def __str__(self):
        lines = ["| layer | representation | relative error | parameters | predicted | measured | note |",
                 "|---|---|---:|---:|---:|---:|---|"]
        for r in self.layers:
            what = r.representation + "".join(f" {k}={v}" for k, v in r.params.items())
            measured = "" if r.measured_speedup is None else f"{r.measured_speedup:.2f}x"
            lines.append(f"| {r.name} | {what} | {r.relative_error:.3g} | {r.parameters_before} -> "
                         f"{r.parameters_after} | {r.predicted_speedup:.2f}x | {measured} | {r.note} |")
        lines.append(f"\nparameters: {self.parameters_before} -> {self.parameters_after}")
        return "\n".join(lines)


def convert(model, to="auto", *, rank=None, tolerance=None, density=None, inplace=False, example=None,
            workers=None, strict=False):
    """Replace every torch.nn.Conv3d in `model` (stride, padding, dilation, groups, bias and padding_mode kept)
    by a volconv layer; returns (model, ConversionReport).

    to: "cp" (CPConv3d; `rank` an int, or `tolerance` the relative weight error to meet), "tucker"
    (TuckerConv3d; `rank` (Rout, Rin) or an int for both, or `tolerance`), "sparse" (SparseConv3d; `density`,
    or `tolerance`: the fewest largest entries within it), "auto" (per layer the cheapest representation within
    `tolerance` that vc.decompose.suggest finds, kept dense unless it runs clearly faster). Layers a
    representation cannot take (grouped convolutions for CP / Tucker, 1x1x1 kernels) become vc.nn.Conv3d.
    A layer that no CP rank (up to 64) or Tucker ranks bring within `tolerance` is kept as it was (the original
    torch.nn.Conv3d; its report row says "kept" and why) so that one hard layer does not stop the model's
    conversion; strict=True raises vc.decompose.ToleranceNotMet (a ValueError) instead.
    example: an input for the model; then each layer's input shape is recorded and its speed-up measured.
    inplace=False converts a deep copy. The result saves and loads with state_dict and pickle."""
    if to not in TARGETS:
        raise ValueError(f"to must be one of {', '.join(TARGETS)}, got {to!r}")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise ValueError(f"tolerance must be a relative error in [0, 1), got {tolerance!r}")
    needs = {"auto": (tolerance,), "cp": (rank, tolerance), "tucker": (rank, tolerance),
             "sparse": (density, tolerance)}[to]
    if all(v is None for v in needs):
        what = {"auto": "tolerance", "cp": "rank or tolerance", "tucker": "rank or tolerance",
                "sparse": "density or tolerance"}[to]
        raise ValueError(f"to={to!r} needs {what}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    shapes = _input_shapes(model, example) if example is not None else {}
    report = ConversionReport()
    for name, parent, attr, conv in _conv3d_modules(model):
        new, row = _convert_one(name, conv, to, rank, tolerance, density, workers, strict)
        if name in shapes:
            row.measured_speedup = _speedup(conv, new, shapes[name])
        setattr(parent, attr, new)
        report.layers.append(row)
    return model, report


def _conv3d_modules(model):
    """(qualified name, parent, attribute, module) of every torch.nn.Conv3d, collected before any is replaced."""
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, torch.nn.Conv3d):
                found.append((f"{parent_name}.{attr}" if parent_name else attr, parent, attr, child))
    return found


def _convert_one(name, conv, to, rank, tolerance, density, workers, strict):
    from ..decompose import ToleranceNotMet, suggest, tucker

    w = conv.weight.detach()
    before = w.numel() + (conv.bias.numel() if conv.bias is not None else 0)
    trivial = conv.groups != 1 or math.prod(conv.kernel_size) == 1
    row = lambda kind, params, error, new, speedup, note="": LayerReport(  # noqa: E731
        name, kind, params, float(error), before, sum(p.numel() for p in new.parameters()), float(speedup),
        note=note)

    def dense(note):
        new = Conv3d.from_conv(conv, workers=workers)
        return new, row("dense", {}, 0.0, new, 1.0, note)

    def kept(reason):
        """The layer as it was, unless strict (then the reason is raised)."""
        if strict:
            raise ToleranceNotMet(f"layer {name!r}: {reason}")
        return conv, row("kept", {}, 0.0, conv, 1.0, f"kept as it was: {reason}")

    def sparse(dens):
        new = SparseConv3d.from_conv(conv, density=dens, workers=workers)
        error = float(torch.linalg.vector_norm(new.to_dense().detach() - w) / torch.linalg.vector_norm(w))
        return new, row("sparse", {"density": round(dens, 4)}, error, new, 1 / max(dens, 1e-12))

    if to == "sparse":
        if density is None:   # the fewest largest entries within tolerance
            density = next(c for c in suggest(w.cpu(), tolerance) if c.kind == "sparse").params["density"]
        return sparse(density)
    if trivial:
        if to == "auto" and conv.groups != 1:   # no factors across groups, but pruning may pay
            best = _best([c for c in suggest(w.cpu(), tolerance) if c.kind in ("dense", "sparse")])
            if best.kind == "sparse":
                return sparse(best.params["density"])
        return dense("groups > 1" if conv.groups != 1 else "1x1x1")
    if to == "cp":
        try:
            new = CPConv3d.from_conv(conv, rank if rank is not None else tolerance, workers=workers)
        except ToleranceNotMet as e:
            return kept(str(e))
        return new, row("cp", {"rank": new.rank}, new.relative_error, new, _factored_speedup(conv, new))
    if to == "tucker":
        if rank is not None:
            ranks = (rank, rank) if isinstance(rank, int) else tuple(rank)
            ranks = (min(ranks[0], conv.out_channels), min(ranks[1], conv.in_channels))   # at most full rank
            new = TuckerConv3d.from_kernel(conv, tucker(w.cpu(), ranks), workers=workers)
        else:
            found = [c for c in suggest(w.cpu(), tolerance) if c.kind == "tucker"]
            if not found:
                return kept(f"no Tucker ranks reach relative error {tolerance:g}")
            new = TuckerConv3d.from_kernel(conv, found[0].kernel, workers=workers)
        return new, row("tucker", {"ranks": new.ranks}, new.relative_error, new, _factored_speedup(conv, new))
    best = _best(suggest(w.cpu(), tolerance))   # "auto"
    if best.kind == "dense":
        return dense("nothing cheaper within tolerance")
    if best.kind == "sparse":
        return sparse(best.params["density"])
    cls = CPConv3d if best.kind == "cp" else TuckerConv3d
    new = cls.from_kernel(conv, best.kernel, workers=workers)
    return new, row(best.kind, dict(best.params), best.relative_error, new, best.predicted_speedup)


def _best(candidates):
    """The candidate with the largest speed-up once its kernel's efficiency is counted; dense unless another
    gains at least MIN_GAIN."""
    gain = lambda c: c.predicted_speedup * EFFICIENCY[c.kind]  # noqa: E731
    best = max(candidates, key=gain)
    return best if gain(best) >= MIN_GAIN else next(c for c in candidates if c.kind == "dense")


def _factored_speedup(conv, new):
    """Dense multiply-adds per output voxel over the factored layer's (projections and spatial part)."""
    cin, cout, k = conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    if isinstance(new, CPConv3d):
        r = new.rank
        macs = r * (cin + cout + sum(conv.kernel_size))
    else:
        rout, rin = new.ranks[:2]
        macs = rin * cin + rout * rin * k + cout * rout
    return cin * cout * k / macs


def _input_shapes(model, example):
    """Each Conv3d's input shape in a forward of `example` (no gradients)."""
    shapes, hooks = {}, []

    def record(name):
        def hook(module, args, out):   # returns None: the output stays as it is
            shapes.setdefault(name, tuple(args[0].shape))
        return hook
    for name, _, _, conv in _conv3d_modules(model):
        hooks.append(conv.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _speedup(old, new, shape, rounds=3):
    """The original layer's best forward time over the new one's, on a random input of `shape`."""
    x = torch.randn(shape, dtype=old.weight.dtype, device=old.weight.device)

    def best(layer):
        times = []
        with torch.no_grad():
            layer(x)
            for _ in range(rounds):
                start = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - start)
        return min(times)
    return best(old) / best(new)
