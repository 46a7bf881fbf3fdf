"""The package's layout is its architecture: layers that import downwards only.

Read from the sources' ASTs (every import, also those inside functions), so
nothing is imported here. A layer is a subpackage (wire/v1 and wire/v114 are
one each) or a top-level module; docs/development.md ("Layout") draws the same
order.
"""

import ast
import os

import pytest

pytestmark = pytest.mark.matrix  # the core suite, run on every Python

PACKAGE = "nodepass_gevent"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Bottom first. A module may import its own layer and those below it, never
# one above it or beside it (the two wires know nothing of each other).
LAYERS = [
    ("__init__", "urls", "log"),          # the version; URL splitting and logging for all
    ("settings",),                        # environment variables -> frozen Settings
    ("config",),                          # URL -> frozen config
    ("tunnelset",),                       # URLs / tunnels file -> checked tunnels
    ("base",),                            # net, lifecycle, stats, semaphore, health
    ("edge",),                            # access, proxyheader, ratelimit, policy
    ("copy",),                            # the copy engines, TLS, readers
    ("wire", "wire.v1", "wire.v114"),     # the wires, one subpackage per version
    ("tunnel",),                          # the roles both wires share
    ("ops",),                             # fleet, metrics, systemd, nodepass-service
    ("completion", "manpage", "service"),
    ("cli",),
    ("__main__",),
]
RANK = {layer: rank for rank, layers in enumerate(LAYERS) for layer in layers}
TOP_LEVEL_MOST = 12  # modules at the top: the entry, the CLI, the configuration


def modules():
    """{dotted name: path} of every module in the package (a package by its own name)."""
    found = {}
    for folder, _, names in os.walk(ROOT):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                if dotted.endswith(".__init__"):
                    dotted = dotted[:-len(".__init__")]
                found[dotted] = path
    return found


def layer_of(module):
    parts = module.split(".")[1:]  # without "nodepass_gevent"
    if not parts:
        return "__init__"
    if parts[0] == "wire" and len(parts) > 1:
        return "wire." + parts[1]
    return parts[0]


def imports_of(module, path, known):
    """The package's modules ``module`` imports, anywhere in its body."""
    with open(path, encoding="utf-8") as source:
        tree = ast.parse(source.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                name = base + "." + alias.name
                found.add(name if name in known else base)
    return {name for name in found if name in known and name != module}


def graph():
    """{module: the package's modules it imports}"""
    known = modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def test_every_import_goes_down_the_layers():
    upwards = []
    for module, targets in sorted(graph().items()):
        for target in sorted(targets):
            here, there = layer_of(module), layer_of(target)
            if here != there and RANK[there] >= RANK[here]:
                upwards.append("%s -> %s (%s -> %s)" % (module, target, here, there))
    assert upwards == []


def test_every_layer_is_named_and_the_top_level_stays_small():
    layers = {layer_of(module) for module in graph()}
    assert sorted(layers - set(RANK)) == []  # a new module or subpackage: give it its layer
    top_level = [name for name in os.listdir(ROOT) if name.endswith(".py")]
    assert len(top_level) <= TOP_LEVEL_MOST, sorted(top_level)


def test_no_module_imports_itself_round_a_cycle():
    edges = graph()
    state = {}  # module -> "open" while on the path, "done" after

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_subpackages_import_nothing_on_their_own():
    """An __init__ is a docstring: `from nodepass_gevent.ops import servicectl`
    must not pull gevent in (nodepass-service runs before it is installed)."""
    for module, path in modules().items():
        if path.endswith("__init__.py") and module != PACKAGE:
            with open(path, encoding="utf-8") as source:
                body = ast.parse(source.read()).body
            assert all(isinstance(node, ast.Expr) for node in body), path
