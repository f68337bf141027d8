"""The library's structure, checked from its source (no imports, a second or two):

- one owner of the work directory's layout: no path name of a work directory (or of
  its evaluation folder) is joined, opened or written anywhere but `workdir.py`;
- no import cycle between the library's modules (imports at module level: a deferred
  import inside a function is how a module reaches an optional heavy dependency);
- no module imports a package above it: `networks` and `data` sit below `export` and
  `evaluation`, which sit below `training`; the top-level modules are the bottom layer,
  except the entry points that drive a whole run;
- small units: no module over 450 lines, no function over 60 (its whole span, the
  docstring included).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "keras_progdist")

# The work directory's and the evaluation folder's names (`workdir.WorkDir`, `EvalDir`).
LAYOUT_NAMES = {"ckpt", "final", "stages.json", "config.json", "operative_config.gin",
                "samples", "logs", "eval", "runs", "metrics.json", "report.md", ".lock",
                "digits.json", "digits.md"}
# Calls that take a path (or a part of one): a layout name passed to one of these is a
# path made outside `WorkDir`.
PATH_CALLS = {"join", "exists", "isdir", "isfile", "open", "makedirs", "listdir",
              "remove", "save", "restore", "read_meta", "recorded_sha256", "Slot",
              "atomic_write", "atomic_write_text", "atomic_write_json", "path", "_path",
              "save_grid", "write_image"}
# Package ranks: a module may import only packages of its own rank or below.
RANKS = {"networks": 0, "data": 0, "export": 1, "evaluation": 1, "training": 2}
ENTRY_POINTS = {"keras_progdist/__init__.py"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    yield os.path.relpath(path, ROOT), f.read()


def _module_name(relpath: str) -> str:
    name = relpath[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _imports(tree, module: str, top_level_only: bool):
    """The `keras_progdist` modules `tree` imports (`from a import b` counts `a.b`
    when that is a module of the library, else `a`)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # module level includes `if`/`try` blocks, not function bodies
        stack, nodes = list(tree.body), []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                stack.extend(ast.iter_child_nodes(node))
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("keras_progdist"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith("keras_progdist"):
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def _resolve(name: str, known: set) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _rank(module: str) -> int:
    """The rank of `module`'s package (top-level modules and the root: 0)."""
    parts = module.split(".")
    return RANKS.get(parts[1], 0) if len(parts) > 1 else 0


def test_only_workdir_names_paths_in_a_work_directory():
    found = []
    for relpath, source in _modules():
        if relpath.endswith("workdir.py"):
            continue
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else \
                getattr(func, "id", None)
            if called not in PATH_CALLS:
                continue
            for arg in list(node.args) + [k.value for k in node.keywords]:
                if isinstance(arg, ast.Constant) and arg.value in LAYOUT_NAMES:
                    found.append(f"{relpath}:{node.lineno} {called}({arg.value!r})")
    assert not found, "work-directory paths made outside workdir.py:\n" + "\n".join(found)


def test_no_import_cycle_and_no_import_from_a_package_above():
    sources = {_module_name(p): (p, ast.parse(s)) for p, s in _modules()}
    known = set(sources)
    graph = {m: {_resolve(i, known) for i in _imports(tree, m, True)} - {None, m}
             for m, (_, tree) in sources.items()}
    # Packages import their own submodules in __init__; a submodule importing its
    # package's __init__ is the same edge backwards, so packages are left out.
    packages = {m for m, (p, _) in sources.items() if p.endswith("__init__.py")}
    graph = {m: deps - packages for m, deps in graph.items() if m not in packages}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"
    above = []
    for module, (relpath, tree) in sources.items():
        if relpath in ENTRY_POINTS:
            continue
        for imported in {_resolve(i, known) for i in _imports(tree, module, False)} - {None}:
            if _rank(imported) > _rank(module):
                above.append(f"{module} imports {imported}")
    assert not above, "imports of a package above:\n" + "\n".join(sorted(above))


def _cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("limit", ["module", "function"])
def test_units_are_small(limit):
    too_long = []
    for relpath, source in _modules():
        lines = len(source.splitlines())
        if limit == "module" and lines > MAX_MODULE_LINES:
            too_long.append(f"{relpath}: {lines} lines")
        if limit == "function":
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    span = node.end_lineno - node.lineno + 1
                    if span > MAX_FUNCTION_LINES:
                        too_long.append(f"{relpath}:{node.lineno} {node.name}: {span}")
    assert not too_long, f"over {MAX_MODULE_LINES} lines a module / {MAX_FUNCTION_LINES} " \
        "a function:\n" + "\n".join(too_long)
