"""The package is a one-way house: imports point down the layers, never up, never round in a circle.

Every module of ``purchase_intent`` is parsed with ``ast`` (nothing is imported or executed); every
import statement counts, at module level or inside a function, relative forms (``from . import x``,
``from ..pipeline import y``) resolved to absolute module names. The rules, one test each:

* no cycles in the import graph (a runtime import of ``a.b`` also runs the package ``a/__init__``);
* no module imports another module's ``_private`` name (``from x import _y``, or ``x._y`` where ``x``
  is a module of the package bound by an import);
* layering: a module imports only modules of its own layer or below (the ``LAYERS`` table below;
  a module missing from the table fails the test until it is placed);
* imports inside functions are for optional extras only: never a module of the package (unless
  that module itself needs an optional extra to import, e.g. ``serve.app`` needs fastapi, or the
  pair is one of ``DEFERRED_IMPORTS``), and of third-party / standard-library modules only those in
  ``OPTIONAL_EXTRAS``.

Imports under ``if TYPE_CHECKING:`` count for every rule except cycles (they never run).
The last tests run the same checker on small synthetic packages: a broken one (each rule
reported) and a clean one (nothing reported), so a green run here means something.
"""
from __future__ import annotations

import ast
import fnmatch
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = "purchase_intent"
REPO = Path(__file__).resolve().parents[1]

# The layers, bottom (0) to top. A module may import modules of its own layer or below.
# Names are relative to the package: "serve" covers serve/__init__ and every serve.* module,
# "models" likewise; "events_*" is a pattern; "__init__" is purchase_intent/__init__.py itself.
# A new module fails test_layers until it is added here (and to docs/ARCHITECTURE.md).
LAYERS: dict[int, list[str]] = {
    0: ["__init__", "config", "times", "vocabulary", "workspace", "memory", "allocator", "distributed",
        "calibration", "privacy", "simulate", "storage", "engine"],     # foundations, no domain logic
    1: ["events", "event_*", "events_*", "formats", "labels", "splits", "features", "feature_frame", "sequences",
        "sequence_frame", "sequence_shards", "reason_text", "evaluate", "spark_sql"],  # data: events -> examples -> X
    2: ["models", "train", "dp", "dp_tabular"],                         # estimators and the loops
    3: ["runs", "pretrain"],                                            # artifacts: built examples, runs
    4: ["explain"],                                                     # reasons per prediction
    5: ["score", "report", "report_page", "ensemble", "tabular", "erasure", "rotation", "monitor", "tracking",
        "spark_engine", "spark_scoring"],  # uses of a run
    6: ["pipeline", "prepare", "serve", "cli", "commands", "retrain"],  # entry points
}

# Third-party modules that live in an optional extra (pyproject's optional-dependencies, plus the
# extras planned in /work/shared/ARCHITECTURE.md): the only modules a function may import.
# Core dependencies (numpy, pandas, pyarrow, duckdb, sklearn, torch, tqdm, safetensors, scipy) and
# the standard library are imported at the top of the module.
OPTIONAL_EXTRAS: frozenset[str] = frozenset({
    "lightgbm",                                                          # lgbm
    "fastapi", "starlette", "uvicorn", "pydantic", "httpx", "orjson",    # serve
    "captum",                                                            # explain
    "onnx", "onnxruntime", "onnxscript",                                 # onnx
    "opacus", "pyspark", "mlflow", "psycopg", "psycopg2", "playwright",  # dp, spark, mlflow, postgres, browser
    "adbc_driver_postgresql", "adbc_driver_manager",                     # postgres (ADBC)
    "sqlglot", "py4j",                                                   # spark (with pyspark)
})

# (importer, imported) pairs of the package's modules that may be imported inside a function, each with
# its reason, which tests/test_cli.py::test_parsing_the_command_line_imports_no_model_library proves:
# - `cli.main` imports `commands` only once the command line has parsed, so that a mistyped command or
#   flag is refused at once;
# - `commands` imports the modules that import PyTorch or scikit-learn (about 3 s) in the commands that
#   use them, and `runs` the models package where a run's model is loaded or named, so that `ingest`,
#   `build` and `simulate` (through `prepare`) start without them.
DEFERRED_IMPORTS: frozenset[tuple[str, str]] = frozenset({
    ("cli", "commands"),
    *(("commands", m) for m in ("pipeline", "pretrain", "erasure", "rotation", "retrain", "tabular")),
    ("runs", "models"), ("runs", "models.onnx_inference"),
})

# (importer, third-party module) pairs of core dependencies that may be imported inside a function, for the
# same reason: `storage` imports pandas and `pyarrow.dataset` (which imports pandas, ~0.3 s) where it reads a
# DataFrame or scans encrypted files, so that the command line, which reads `storage` through `memory`,
# answers a mistake or --help without them (the same test proves it)
DEFERRED_THIRD_PARTY: frozenset[tuple[str, str]] = frozenset({("storage", "pandas"), ("storage", "pyarrow.dataset")})


# ---------------------------------------------------------------------------------------------
# The checker: parse a package into import records, then one function per rule.


@dataclass(frozen=True)
class Import:
    importer: str            # absolute module name of the importing module
    path: str                # its file, relative to the package's parent directory
    line: int
    target: str              # absolute module imported (ours or third-party)
    name: Optional[str]      # the name taken from ``target`` (from-imports of a non-module name)
    text: str                # the statement, one alias: "from ..pipeline import _is_sequence_model"
    local: bool              # inside a function (or lambda)
    type_checking: bool      # under ``if TYPE_CHECKING:``
    guarded: bool            # inside ``try:`` with an ``except ImportError`` (or ModuleNotFoundError)
    stmt: str = ""           # the whole statement, every alias

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Package:
    name: str
    modules: dict[str, str]          # absolute module name -> file path (relative, for messages)
    packages: set[str]               # modules that are packages (an __init__.py)
    imports: list[Import]
    private_attrs: list[tuple[str, str, int, str]]  # (importer, path, line, "module._name")

    def ours(self, module: str) -> bool:
        return module == self.name or module.startswith(self.name + ".")

    def rel(self, module: str) -> str:
        """``purchase_intent.serve.app`` -> ``serve.app``; the package itself -> ``__init__``."""
        return "__init__" if module == self.name else module[len(self.name) + 1:]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = []
    for t in ([handler.type] if not isinstance(handler.type, ast.Tuple) else handler.type.elts):
        if isinstance(t, ast.Name):
            names.append(t.id)
    return handler.type is None or any(n in ("ImportError", "ModuleNotFoundError", "Exception") for n in names)


class _ModuleVisitor(ast.NodeVisitor):
    def __init__(self, pkg: Package, module: str, path: str, is_package: bool):
        self.pkg, self.module, self.path = pkg, module, path
        self.base = module if is_package else module.rpartition(".")[0]
        self.depth = 0          # enclosing functions
        self.tc = 0             # enclosing TYPE_CHECKING blocks
        self.guard = 0          # enclosing try-except-ImportError bodies
        self.bindings: dict[str, str] = {}  # local name -> module of ours it is bound to
        self.attrs: list[ast.Attribute] = []

    # scopes
    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If):
        if _is_type_checking(node.test):
            self.tc += 1
            for n in node.body:
                self.visit(n)
            self.tc -= 1
            for n in node.orelse:
                self.visit(n)
        else:
            self.generic_visit(node)

    def visit_Try(self, node):
        guarded = any(_catches_import_error(h) for h in node.handlers)
        self.guard += guarded
        for n in node.body:
            self.visit(n)
        self.guard -= guarded
        for n in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(n)

    visit_TryStar = visit_Try

    # imports
    def _add(self, node, target: str, name: Optional[str], text: str):
        self.pkg.imports.append(Import(self.module, self.path, node.lineno, target, name, text,
                                       self.depth > 0, self.tc > 0, self.guard > 0, ast.unparse(node)))

    def visit_Import(self, node: ast.Import):
        for a in node.names:
            text = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
            self._add(node, a.name, None, text)
            if a.asname:
                self.bindings[a.asname] = a.name
            else:
                self.bindings[a.name.split(".")[0]] = a.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            parts = self.base.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            source = ".".join(parts + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for a in node.names:
            text = f"from {'.' * node.level}{node.module or ''} import {a.name}"
            text += f" as {a.asname}" if a.asname else ""
            sub = f"{source}.{a.name}"
            if a.name != "*" and sub in self.pkg.modules:
                self._add(node, sub, None, text)
                self.bindings[a.asname or a.name] = sub
            else:
                self._add(node, source, a.name, text)

    def visit_Attribute(self, node: ast.Attribute):
        self.attrs.append(node)
        self.generic_visit(node)

    def resolve(self, expr: ast.expr) -> Optional[str]:
        """The module of ours that ``expr`` (a name or dotted attribute chain) denotes, if any."""
        if isinstance(expr, ast.Name):
            m = self.bindings.get(expr.id)
            return m if m is not None and self.pkg.ours(m) else None
        if isinstance(expr, ast.Attribute):
            base = self.resolve(expr.value)
            if base is not None and f"{base}.{expr.attr}" in self.pkg.modules:
                return f"{base}.{expr.attr}"
        return None


def analyse(root: Path, package: str) -> Package:
    """Parse every ``*.py`` under ``root / package`` (nothing is imported)."""
    pkg_dir = root / package
    files = sorted(p for p in pkg_dir.rglob("*.py") if "__pycache__" not in p.parts)
    modules, packages = {}, set()
    for f in files:
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        modules[".".join(parts)] = str(f.relative_to(root))
    pkg = Package(package, modules, packages, [], [])
    for module, path in modules.items():
        tree = ast.parse((root / path).read_text(), filename=path)
        v = _ModuleVisitor(pkg, module, path, module in packages)
        v.visit(tree)
        for node in v.attrs:
            target = v.resolve(node.value)
            if target is not None and target != module and _private(node.attr):
                pkg.private_attrs.append((module, path, node.lineno, f"{ast.unparse(node.value)}.{node.attr}"))
    return pkg


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _internal(pkg: Package) -> list[Import]:
    return [i for i in pkg.imports if pkg.ours(i.target) and i.target != i.importer]


def _fmt(pkg: Package, i: Import, note: str = "") -> str:
    where = " (in a function)" if i.local else (" (TYPE_CHECKING)" if i.type_checking else "")
    return f"  {i.where()}: {pkg.rel(i.importer)} -> {pkg.rel(i.target)}: `{i.text}`{where}{note}"


# rule (a): cycles ------------------------------------------------------------------------------

def find_cycles(pkg: Package) -> list[str]:
    """One entry per strongly connected component of the runtime import graph: a shortest cycle
    through it and every import edge inside it (at least one per cycle has to go)."""
    edges: dict[str, dict[str, list[tuple[Import, str]]]] = defaultdict(lambda: defaultdict(list))
    for i in _internal(pkg):
        if i.type_checking:
            continue
        edges[i.importer][i.target].append((i, ""))
        # importing a.b.c first runs a/__init__ and a/b/__init__ (unless the importer is inside them)
        parts = i.target.split(".")
        for k in range(1, len(parts)):
            parent = ".".join(parts[:k])
            if parent in pkg.packages and parent != i.importer and not (
                    i.importer == parent or i.importer.startswith(parent + ".")):
                edges[i.importer][parent].append((i, f" [runs package {pkg.rel(parent)}/__init__]"))

    # Tarjan's strongly connected components (iterative).
    nodes = sorted(set(edges) | {t for d in edges.values() for t in d})
    index, low, on, stack, sccs, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v):
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    sccs.append(sorted(comp))

    for v in nodes:
        if v not in index:
            strongconnect(v)

    out = []
    for comp in sorted(c for c in sccs if len(c) > 1):
        members = set(comp)
        start = comp[0]
        prev, queue = {start: None}, deque([start])
        cycle = None
        while queue and cycle is None:
            u = queue.popleft()
            for w in sorted(edges[u]):
                if w == start:
                    path, x = [start], u
                    while x is not None:
                        path.append(x)
                        x = prev[x]
                    cycle = path[::-1]
                    break
                if w in members and w not in prev:
                    prev[w] = u
                    queue.append(w)
        lines = [f"cycle among {{{', '.join(pkg.rel(m) for m in comp)}}}: "
                 + " -> ".join(pkg.rel(m) for m in cycle) + "; its imports:"]
        for a in comp:
            for b in sorted(edges[a]):
                if b in members:  # one line per statement (a from-import of several names is one edge)
                    seen = {}
                    for i, note in edges[a][b]:
                        seen.setdefault((i.line, note), _fmt(pkg, i, note).replace(f"`{i.text}`", f"`{i.stmt}`"))
                    lines += list(seen.values())
        out.append("\n".join(lines))
    return out


# rule (b): private names ---------------------------------------------------------------------

def find_private_imports(pkg: Package) -> list[str]:
    out = []
    for i in _internal(pkg):
        if i.name is not None and _private(i.name):
            out.append(_fmt(pkg, i))
        elif i.name is None:  # a module: private if a component is, unless imported from inside its package
            parts = i.target.split(".")
            for k in range(1, len(parts)):
                inside = ".".join(parts[:k])
                if _private(parts[k]) and not (i.importer == inside or i.importer.startswith(inside + ".")):
                    out.append(_fmt(pkg, i, " [private module]"))
                    break
    for importer, path, line, expr in pkg.private_attrs:
        out.append(f"  {path}:{line}: {pkg.rel(importer)} uses `{expr}` (attribute of an imported module)")
    return sorted(set(out), key=_sort_key)


def _sort_key(s: str):
    where = s.strip().split(": ", 1)[0]
    path, _, line = where.rpartition(":")
    return (path, int(line) if line.isdigit() else 0, s)


# rule (c): layers ----------------------------------------------------------------------------

def layer_of(pkg: Package, module: str, layers: dict[int, list[str]]) -> Optional[int]:
    rel = pkg.rel(module)
    exact = [lay for lay, names in layers.items() if rel in names]
    if exact:
        return exact[0]
    best, best_len = None, -1
    for lay, names in layers.items():
        for n in names:
            if rel.startswith(n + ".") and len(n) > best_len:
                best, best_len = lay, len(n)
    if best is not None:
        return best
    for lay, names in layers.items():
        for n in names:
            top = rel.split(".")[0]
            if any(c in n for c in "*?[") and (fnmatch.fnmatchcase(rel, n) or fnmatch.fnmatchcase(top, n)):
                return lay
    return None


def find_layer_violations(pkg: Package, layers: dict[int, list[str]]) -> tuple[list[str], list[str]]:
    """(modules missing from the table, upward imports)."""
    missing, up = set(), []
    for m in pkg.modules:
        if layer_of(pkg, m, layers) is None:
            missing.add(f"  {pkg.modules[m]}: `{pkg.rel(m)}` is in no layer")
    for i in _internal(pkg):
        lo, lt = layer_of(pkg, i.importer, layers), layer_of(pkg, i.target, layers)
        if lt is None and i.target not in pkg.modules:
            missing.add(f"  {i.where()}: `{pkg.rel(i.target)}` (imported, no file yet) is in no layer")
        if lo is not None and lt is not None and lt > lo:
            up.append(_fmt(pkg, i, f" [layer {lo} imports layer {lt}]"))
    return sorted(missing), up


# rule (d): imports inside functions ----------------------------------------------------------

def _needs_extra(pkg: Package, extras: frozenset[str]) -> set[str]:
    """Modules of ours that cannot be imported without an optional extra: a module-level (not
    guarded, not TYPE_CHECKING) import of an extra, directly or through module-level imports."""
    need = {i.importer for i in pkg.imports
            if not (i.local or i.type_checking or i.guarded) and i.target.split(".")[0] in extras}
    deps = defaultdict(set)
    for i in _internal(pkg):
        if not (i.local or i.type_checking or i.guarded):
            deps[i.importer].add(i.target)
    changed = True
    while changed:
        changed = False
        for m, ts in deps.items():
            if m not in need and ts & need:
                need.add(m)
                changed = True
    return need


def find_local_package_imports(pkg: Package, extras: frozenset[str] = OPTIONAL_EXTRAS,
                               deferred: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
    need = _needs_extra(pkg, extras)
    return [_fmt(pkg, i) for i in _internal(pkg)
            if i.local and i.target not in need and (pkg.rel(i.importer), pkg.rel(i.target)) not in deferred]


def find_local_non_extra_imports(pkg: Package, extras: frozenset[str] = OPTIONAL_EXTRAS) -> list[str]:
    return [f"  {i.where()}: {pkg.rel(i.importer)}: `{i.text}` (in a function; "
            f"`{i.target.split('.')[0]}` is not an optional extra: import it at the top)"
            for i in pkg.imports
            if i.local and not pkg.ours(i.target) and i.target.split(".")[0] not in extras
            and (pkg.rel(i.importer), i.target) not in DEFERRED_THIRD_PARTY]


# ---------------------------------------------------------------------------------------------
# The rules on the real package.

_PKG: Optional[Package] = None


def real_package() -> Package:
    global _PKG
    if _PKG is None:
        _PKG = analyse(REPO, PACKAGE)
    return _PKG


def _fail(title: str, offences: list[str], hint: str) -> None:
    if offences:
        pytest.fail(f"{title}: {len(offences)}\n" + "\n".join(offences) + f"\n{hint}", pytrace=False)


def test_import_graph_has_no_cycles():
    _fail("import cycles", find_cycles(real_package()),
          "Move the shared code down a layer (see LAYERS) instead of importing upwards.")


def test_no_module_imports_another_modules_private_names():
    _fail("imports of another module's _private names", find_private_imports(real_package()),
          "Make the name public (drop the underscore, document it) in the module that owns it, "
          "or move the code that needs it there.")


def test_layers():
    missing, up = find_layer_violations(real_package(), LAYERS)
    msg = []
    if missing:
        msg += [f"modules missing from LAYERS: {len(missing)}", *missing,
                "Add each to LAYERS in tests/test_architecture.py (and a line to docs/ARCHITECTURE.md)."]
    if up:
        msg += [f"imports from a higher layer: {len(up)}", *up,
                "A module imports only its own layer or below (LAYERS in tests/test_architecture.py)."]
    if msg:
        pytest.fail("\n".join(msg), pytrace=False)


def test_no_function_local_imports_of_package_modules():
    _fail("package modules imported inside a function",
          find_local_package_imports(real_package(), deferred=DEFERRED_IMPORTS),
          "Import them at the top of the module; a function-local import is only for an optional extra "
          "(OPTIONAL_EXTRAS) or a module of ours that needs one to import.")


def test_function_local_imports_are_optional_extras_only():
    _fail("non-optional modules imported inside a function", find_local_non_extra_imports(real_package()),
          "Only OPTIONAL_EXTRAS (tests/test_architecture.py) may be imported inside a function.")


# ---------------------------------------------------------------------------------------------
# The checker on synthetic packages: it can fail, and it can pass.

SYNTH_LAYERS = {0: ["__init__", "base", "plugins_*"], 1: ["mid", "sub"], 2: ["top"]}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


CLEAN = {
    "shop/__init__.py": '"""A clean package."""\n__version__ = "1"\n',
    "shop/base.py": "import json\n\nPUBLIC = 1\n_secret = 2\n\n\ndef _helper():\n    return _secret\n",
    "shop/plugins_a.py": "from .base import PUBLIC\n",
    "shop/mid.py": "from . import base\nfrom .base import PUBLIC\n\nX = base.PUBLIC + PUBLIC\n",
    "shop/sub/__init__.py": "from .x import Y\n",
    "shop/sub/x.py": "from ..mid import X\nfrom . import _impl\n\nY = X + _impl.Z\n",
    "shop/sub/_impl.py": "Z = 3\n",
    "shop/top.py": (
        "from typing import TYPE_CHECKING\n"
        "from shop import mid, sub\n"
        "import shop.base\n"
        "if TYPE_CHECKING:\n"
        "    from .mid import X\n"
        "try:\n"
        "    import orjson\n"
        "except ImportError:\n"
        "    orjson = None\n"
        "\n"
        "def fit():\n"
        "    import lightgbm\n"
        "    from .app import make\n"
        "    return lightgbm, make, mid.X, sub.Y, shop.base.PUBLIC, shop.__version__\n"
    ),
    "shop/app.py": "from fastapi import FastAPI\n\nfrom . import mid\n\n\ndef make():\n    return FastAPI(v=mid.X)\n",
}
CLEAN_LAYERS = {**SYNTH_LAYERS, 2: ["top", "app"]}

BROKEN = {
    "shop/__init__.py": "",
    "shop/base.py": "from .mid import M\n\nB = 1\n_secret = 2\n",                   # upward: base -> mid
    "shop/mid.py": (
        "from .base import B, _secret\n"                                            # private name
        "from . import base\n"
        "\n"
        "M = base._secret + B\n"                                                    # private attribute
        "\n"
        "\n"
        "def late():\n"
        "    from .top import T\n"                                                  # local + upward + cycle
        "    import json\n"                                                         # local, not an extra
        "    return T, json\n"
    ),
    "shop/top.py": "from .mid import M\n\nT = M\n",
    "shop/stray.py": "from . import top\n",                                         # not in any layer
    "shop/sub/__init__.py": "from ..mid import M\n",
    "shop/sub/_impl.py": "Z = 3\n",
    "shop/other.py": "from .sub import _impl\n",                                    # private module from outside
}
BROKEN_LAYERS = {**SYNTH_LAYERS, 1: ["mid", "sub", "other"]}


def test_checker_reports_every_rule_on_a_broken_package(tmp_path):
    _write(tmp_path, BROKEN)
    pkg = analyse(tmp_path, "shop")

    cycles = find_cycles(pkg)
    assert len(cycles) == 1, cycles
    assert cycles[0].startswith("cycle among {base, mid, top}: base -> mid -> base"), cycles[0]
    for where in ("shop/base.py:1: base -> mid", "shop/mid.py:1: mid -> base", "shop/mid.py:8: mid -> top",
                  "shop/top.py:1: top -> mid"):
        assert where in cycles[0], (where, cycles[0])

    private = find_private_imports(pkg)
    assert private == [
        "  shop/mid.py:1: mid -> base: `from .base import _secret`",
        "  shop/mid.py:4: mid uses `base._secret` (attribute of an imported module)",
        "  shop/other.py:1: other -> sub._impl: `from .sub import _impl` [private module]",
    ], private

    missing, up = find_layer_violations(pkg, BROKEN_LAYERS)
    assert missing == ["  shop/stray.py: `stray` is in no layer"], missing
    assert up == [
        "  shop/base.py:1: base -> mid: `from .mid import M` [layer 0 imports layer 1]",
        "  shop/mid.py:8: mid -> top: `from .top import T` (in a function) [layer 1 imports layer 2]",
    ], up

    assert find_local_package_imports(pkg) == ["  shop/mid.py:8: mid -> top: `from .top import T` (in a function)"]
    assert find_local_non_extra_imports(pkg) == [
        "  shop/mid.py:9: mid: `import json` (in a function; `json` is not an optional extra: import it at the top)"]


def test_checker_passes_a_clean_package(tmp_path):
    _write(tmp_path, CLEAN)
    pkg = analyse(tmp_path, "shop")
    assert {pkg.rel(m) for m in pkg.modules} == {"__init__", "base", "plugins_a", "mid", "sub", "sub.x", "sub._impl",
                                                 "top", "app"}
    # relative and absolute forms resolve to the same modules
    edges = {(pkg.rel(i.importer), pkg.rel(i.target)) for i in _internal(pkg)}
    assert {("mid", "base"), ("sub.x", "mid"), ("sub.x", "sub._impl"), ("sub", "sub.x"), ("top", "mid"),
            ("top", "sub"), ("top", "base"), ("top", "app"), ("app", "mid"), ("plugins_a", "base")} <= edges
    assert find_cycles(pkg) == []
    assert find_private_imports(pkg) == []
    assert find_layer_violations(pkg, CLEAN_LAYERS) == ([], [])
    # `from .app import make` inside top.fit is allowed: app needs fastapi (an extra) to import
    assert find_local_package_imports(pkg) == []
    assert find_local_non_extra_imports(pkg) == []


def test_checker_counts_the_package_init_that_an_import_runs(tmp_path):
    # a imports shop.sub.leaf, which first runs shop/sub/__init__.py, which imports a: a cycle
    _write(tmp_path, {"shop/__init__.py": "", "shop/a.py": "from .sub.leaf import L\n",
                      "shop/sub/__init__.py": "from ..a import L\n", "shop/sub/leaf.py": "L = 1\n"})
    cycles = find_cycles(analyse(tmp_path, "shop"))
    assert len(cycles) == 1 and cycles[0].startswith("cycle among {a, sub}: a -> sub -> a"), cycles
    assert "shop/a.py:1: a -> sub.leaf: `from .sub.leaf import L` [runs package sub/__init__]" in cycles[0], cycles[0]
