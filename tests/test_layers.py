"""The package's import graph (every import in clconv/**/*.py, at module level or inside a
function) has no cycle and points downwards through LAYERS."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clconv"

# Rule: an edge goes to a module of a strictly lower number, except edges inside one
# subpackage (clconv.algorithms.* may import each other, and a subpackage's __init__ its own
# submodules; the root package clconv is placed like any module, since every module is its
# submodule). The integer part is the layer; a fraction orders the modules inside one layer
# (limits imports device and problem, arrays programs, gradients and module functional, ...).
LAYERS = {
    "clconv.version": 0, "clconv.problem": 0, "clconv.device": 0, "clconv.paths": 0,
    "clconv.options": 0, "clconv.reference": 0, "clconv.limits": 0.5,
    "clconv.programs": 1, "clconv.suites": 1, "clconv.scratch": 1.2, "clconv.arrays": 1.5,
    "clconv.capabilities": 1.5,
    "clconv.algorithms": 2, "clconv.peak": 2,     # and every clconv.algorithms.*: see layer()
    "clconv.store": 3,
    "clconv.search": 4,
    "clconv.planner": 5,
    "clconv.functional": 6, "clconv.gradients": 6.5, "clconv.module": 6.5,
    "clconv.batch_norm": 6.7,
    "clconv.autotune": 7, "clconv.bench": 7.1, "clconv.tune_suite": 7.2, "clconv": 7.5,
    "clconv.torch": 7.6, "clconv.bench_models": 7.7, "clconv.cli": 7.8, "clconv.__main__": 7.9,
}


def layer(module):
    if module.startswith("clconv.algorithms."):
        return LAYERS["clconv.algorithms"]
    return LAYERS.get(module)


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name):
    return PACKAGE.parent.joinpath(*name.split("."), "__init__.py").is_file()


def is_module(name):
    return PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py").is_file() \
        or is_package(name)


def imports(path):
    """The clconv modules that the file at path imports anywhere but under TYPE_CHECKING."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, todo = set(), [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:   # `from x import sub` imports the submodule x.sub
                sub = f"{base}.{alias.name}"
                found.add(sub if is_module(sub) else base)
    return {m for m in found if m == "clconv" or m.startswith("clconv.")} - {name}


def graph():
    return {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def find_cycle(edges):
    """A cycle [a, b, ..., a] of the graph {module: imported modules}, else None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(edges.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    return next(filter(None, map(visit, sorted(edges))), None)


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def same_package(source, target):
    """An edge between two modules of one subpackage, or from a subpackage's __init__ to one
    of its own submodules."""
    parent = source.rpartition(".")[0]
    return ((parent != "clconv" and target.startswith(parent + "."))
            or (source != "clconv" and is_package(source) and target.startswith(source + ".")))


def test_layers_import_only_downwards():
    edges = graph()
    problems = [f"{m} is not placed in LAYERS" for m in edges if layer(m) is None]
    problems += [f"{s} ({layer(s)}) imports {t} ({layer(t)})"
                 for s, targets in sorted(edges.items()) for t in sorted(targets)
                 if None not in (layer(s), layer(t)) and not same_package(s, t)
                 and not layer(t) < layer(s)]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
