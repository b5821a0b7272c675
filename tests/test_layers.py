"""The folders of harness/ are layers, and an import only goes down.

docs/architecture.md names the layers; this test reads every module's
imports (with :mod:`ast`, nothing is imported) and fails on

- an import of a module in a higher layer (``cell/`` importing ``running/``),
- a cycle between modules, even one held together by imports inside
  functions,
- an import inside a function that is not of a heavy optional dependency
  and says nothing of why it is there.

The last two tests plant an upward import and a cycle in a copy of the
tree and show that the checks catch them.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Bottom to top; a module may import from its own layer or a lower one.
LAYERS = ("contract", "cell", "grid", "results", "running", "analysis", "cli")
#: The public plugin API re-exports the contract and a few cell helpers.
PUBLIC_API_RANK = LAYERS.index("cell")
#: Function-local ``from ftbench…`` imports allowed in all, each with a reason.
MAX_LOCAL_IMPORTS = 25
#: A function-local import must say why on its line or the line above.
REASON = re.compile(r"#")


def module_name(path: Path, root: Path) -> str | None:
    rel = path.relative_to(root)
    if rel.parts[0] == "ftbench":
        parts = ["ftbench", *rel.parts[1:]]
    elif rel.parts[0] in ("harness", "plugins", "tasks"):
        parts = ["ftbench", *rel.parts]
    else:
        return None
    parts[-1] = parts[-1][:-3]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def rank_of(module: str) -> int | None:
    """The layer of a module of ftbench, or None for modules outside the layering (plugins, tasks)."""
    if module == "ftbench":
        return PUBLIC_API_RANK
    parts = module.split(".")
    if parts[:2] != ["ftbench", "harness"] or len(parts) == 2:
        return None
    head = parts[2]
    return LAYERS.index(head) if head in LAYERS else None


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for folder in ("ftbench", "harness"):
        for path in sorted((root / folder).rglob("*.py")):
            name = module_name(path, root)
            if name:
                found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import of a module in ``known``."""
    tree = ast.parse(path.read_text())
    local_lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_lines |= {n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import mod`` imports the module pkg.mod when there is one
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        else:
            continue
        for t in dict.fromkeys(targets):
            if t in known:
                found.append((t, node.lineno, node.lineno in local_lines))
    return found


def graph(root: Path) -> dict[str, list[tuple[str, int, bool]]]:
    mods = modules(root)
    known = set(mods)
    return {name: [i for i in imports_of(path, known) if i[0] != name] for name, path in mods.items()}


def upward_imports(root: Path) -> list[str]:
    bad = []
    for name, deps in graph(root).items():
        mine = rank_of(name)
        for dep, line, _ in deps:
            theirs = rank_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{name}:{line} imports {dep} ({LAYERS[theirs]} is above {LAYERS[mine]})")
    return bad


def cycles(root: Path) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm)."""
    g = {n: sorted({d for d, _, _ in deps}) for n, deps in graph(root).items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def local_imports(root: Path) -> tuple[list[str], list[str]]:
    """Function-local imports of ftbench modules: all of them, and those without a reason."""
    everything, silent = [], []
    for name, path in modules(root).items():
        lines = path.read_text().splitlines()
        for dep, line, local in imports_of(path, set(modules(root))):
            if not local:
                continue
            where = f"{path.relative_to(root)}:{line} imports {dep}"
            everything.append(where)
            if not (REASON.search(lines[line - 1]) or REASON.search(lines[line - 2].strip()[:1] or "")):
                silent.append(where)
    return everything, silent


def test_no_module_imports_from_a_higher_layer():
    bad = upward_imports(ROOT)
    assert not bad, "imports that go up a layer (see docs/architecture.md):\n" + "\n".join(bad)


def test_no_modules_import_each_other():
    found = cycles(ROOT)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_inside_functions_are_few_and_say_why():
    everything, silent = local_imports(ROOT)
    assert not silent, "imports inside functions without a '#' reason next to them:\n" + "\n".join(silent)
    assert len(everything) < MAX_LOCAL_IMPORTS, "\n".join(everything)


def test_every_folder_of_the_core_is_a_layer():
    folders = {p.name for p in (ROOT / "harness").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS) - {"cli"}, folders
    assert {p.name for p in (ROOT / "harness").glob("*.py")} == {"__init__.py", "cli.py"}


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for folder in ("ftbench", "harness"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_layer_check_catches_a_planted_upward_import(tmp_path):
    root = _copy(tmp_path)
    target = root / "harness" / "cell" / "measure.py"
    target.write_text(target.read_text() + "\nfrom ftbench.harness.running import driver  # planted\n")
    bad = upward_imports(root)
    assert any("ftbench.harness.cell.measure" in b and "running.driver" in b for b in bad), bad


def test_the_cycle_check_catches_a_planted_cycle(tmp_path):
    root = _copy(tmp_path)
    low, high = root / "harness" / "contract" / "format.py", root / "harness" / "contract" / "targets.py"
    assert "contract.format" not in high.read_text()
    high.write_text(high.read_text() + "\nfrom ftbench.harness.contract import format  # planted\n")
    low.write_text(low.read_text() + "\n\ndef planted():\n    from ftbench.harness.contract import targets  # planted\n")
    found = cycles(root)
    assert ["ftbench.harness.contract.format", "ftbench.harness.contract.targets"] in found, found
