"""The architecture as a test: data flows one way, cli -> io / ops -> _torch -> engine -> _cpu / the CUDA loader.

Every import in volconv's source is read from its syntax tree, lazy ones (inside functions) included, and
resolved to the volconv module it names. Checked: no import cycle; each layer imports only the layers below it;
engine and ops import without torch; no module reaches into another's _private names; each file's first line
says what it holds and no module grows past one idea's size.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

import volconv

ROOT = pathlib.Path(volconv.__file__).parent

# top to bottom; a module may import its own layer's modules and any layer below. Leaf helpers (argument
# normalisers, memory, the compiled kernels, the CUDA loader, kernel builders) sit at the bottom.
LAYERS = [
    ["volconv.cli", "volconv.__main__"],
    ["volconv.nn", "volconv.dask", "volconv._benchmark"],
    ["volconv.io"],
    ["volconv", "volconv.ops", "volconv.decompose", "volconv.restoration", "volconv._dispatch"],
    ["volconv._torch"],
    ["volconv.engine"],
    ["volconv.kernels", "volconv._validate", "volconv._memory", "volconv._cpu", "volconv._cuda", "volconv.cuda",
    ],
]
MAX_LINES = 520


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(name):
    return MODULES[name].name == "__init__.py"


def _compiled(name):
    """Whether name is a compiled (Cython) module of volconv."""
    return ROOT.parent.joinpath(*name.split(".")).with_suffix(".pyx").exists()


def _imports(name):
    """(line, imported volconv module, imported name or None, local name bound to the module or None) for every
    import statement of module `name`, lazy ones included."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None, a.asname) for a in node.names if a.name.split(".")[0] == "volconv"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                source = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "volconv":
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                found.append((node.lineno, sub, None, a.asname or a.name) if sub in MODULES or _compiled(sub) else
                             (node.lineno, source, a.name, None))
    return found


def _layer(module):
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (i, prefix)
    return best


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_layers_import_only_downwards():
    wrong = []
    for name in MODULES:
        for line, target, _, _ in _imports(name):
            if target in MODULES and _layer(target)[0] < _layer(name)[0]:
                wrong.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target}")
    assert wrong == []


def test_torch_adapter_never_imports_ops_or_nn():
    wrong = [(name, target) for name in MODULES if name.startswith("volconv._torch")
             for _, target, _, _ in _imports(name) if target.startswith(("volconv.ops", "volconv.nn"))]
    assert wrong == []


def test_engine_imports_only_the_kernels_validation_and_the_cuda_loader():
    allowed = ("volconv.engine", "volconv._cpu", "volconv._validate", "volconv._cuda", "volconv._memory")
    wrong = [(name, target) for name in MODULES if name.startswith("volconv.engine")
             for _, target, _, _ in _imports(name) if not target.startswith(allowed)]
    assert wrong == []


def test_no_import_cycle():
    """Module-level and lazy imports alike; a package is entered through its __init__, which counts as
    importing it (so `volconv` itself, whose __init__ re-exports the API, is left out of the graph)."""
    graph = {name: {t for _, t, _, _ in _imports(name) if t in MODULES and t != "volconv" and t != name}
             for name in MODULES if name != "volconv"}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_reach_into_private_names():
    """`from m import _name` and `m._name` where m is another volconv module (private modules such as
    volconv._validate are fine; their public names are the package's shared vocabulary)."""
    wrong = []
    for name in MODULES:
        imports = _imports(name)
        wrong += [f"{name}:{line} from {target} import {imported}" for line, target, imported, _ in imports
                  if imported and imported.startswith("_") and not imported.startswith("__")]
        modules = {local: target for _, target, _, local in imports if local}
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                target = modules[node.value.id]
                if f"{target}.{node.attr}" not in MODULES and target != name:
                    wrong.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    assert wrong == []


def test_engine_and_ops_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import volconv, volconv.engine.dense, volconv.engine.nested, volconv.engine.dynamic, "
            "volconv.engine.separable, volconv.ops.conv, volconv.ops.filtering, volconv.ops.sparse, "
            "volconv.ops.lowrank, volconv.ops.nested, volconv.ops.multiscale, volconv.ops.dynamic, "
            "volconv.engine.deconvolution, volconv.ops.deconvolution, volconv.restoration\n"
            "import numpy as np\n"
            "assert volconv.conv3d(np.ones((1, 1, 4, 4, 4)), np.ones((1, 1, 3, 3, 3))).shape == (1, 1, 2, 2, 2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr


def test_import_volconv_stays_light():
    """`import volconv` (and so every `volconv` command's start) loads neither torch, nor scipy.fft (0.3 s), nor
    nibabel, dask or tensorly: each comes when a call needs it."""
    code = ("import sys, volconv\n"
            "heavy = [m for m in ('torch', 'scipy.fft', 'nibabel', 'dask', 'tensorly') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_file_says_its_idea_first_and_stays_small(name):
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    if path.name not in ("__init__.py", "__main__.py") or len(path.read_text().splitlines()) > 5:
        assert doc and doc.strip(), f"{path.relative_to(ROOT.parent)} has no docstring saying what it holds"
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT.parent)} is over {MAX_LINES} lines"


def test_every_package_ships():
    """A new package of the layout must be listed in pyproject.toml, or `pip install .` leaves it out."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = ROOT.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("an installed volconv, not a source checkout")
    listed = set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])
    assert listed == {name for name in MODULES if _is_package(name)}
