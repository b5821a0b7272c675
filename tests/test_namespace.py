"""One namespace, a public plugin API, and code that stays readable.

- a built wheel installs ``ftbench`` and nothing generic (no top-level
  ``harness``, ``plugins`` or ``tasks``);
- no source file imports the old top-level names;
- every name in ``ftbench.__all__`` exists and is documented, and every
  import shown in a docstring example runs;
- built-in plugins import only from ``ftbench``;
- docs/architecture.md names every module of the core, and only modules that exist;
- no function in harness/ runs past the length limit without a reason.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OLD = {"harness", "plugins", "tasks"}
SOURCE_DIRS = ("ftbench", "harness", "plugins", "tasks", "tests", "benchmarks", "examples")
#: Lines a function in harness/ may have before it needs a written reason.
MAX_FUNCTION_LINES = 60
LONG_OK = "# long:"


def _sources():
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            if "build" not in path.parts and ".venv" not in path.parts:
                yield path


def old_name_uses(text: str, where: str) -> list[str]:
    """Imports of, or module paths into, the old generic top-level packages."""
    found = []
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "-m harness.cli", importlib.import_module("plugins.eager"), resources.files("harness")
            names = [node.value] if re.fullmatch(r"(harness|plugins|tasks)(\.\w+)*", node.value) and \
                node.value not in OLD else []
        else:
            continue
        found += [f"{where}:{node.lineno}: {n}" for n in names if n.split(".")[0] in OLD]
    return found


def test_a_built_wheel_installs_only_the_ftbench_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("ftbench-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"ftbench", next(t for t in tops if t.endswith(".dist-info"))}, tops
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module file of the mapped folders, not a sample: a folder left out of pyproject's
    # package list would install without some of its modules.
    expected = {f"ftbench/{p.relative_to(ROOT / 'ftbench').as_posix()}" for p in (ROOT / "ftbench").rglob("*.py")}
    for folder in ("harness", "plugins", "tasks"):
        expected |= {f"ftbench/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                     for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}: add their package to [tool.setuptools] packages in pyproject.toml"
    # Installed on its own, away from the source tree: the API imports, the old names do not.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert not {"harness", "plugins", "tasks"} & {p.name for p in site.iterdir()}
    probe = ("import sys, ftbench; print(','.join(ftbench.__all__)); print(ftbench.__file__)\n"
             "try:\n    import harness\nexcept ImportError:\n    print('no harness')\n")
    # The wheel's copy comes first on the path, ahead of any development install.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    api, where, harness = out.stdout.splitlines()
    assert "hookimpl" in api.split(",") and "StandardEngine" in api.split(",")
    assert where.startswith(str(site)) and harness == "no harness"


def test_no_source_imports_the_old_top_level_names():
    found = []
    for path in _sources():
        found += old_name_uses(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "old names:\n" + "\n".join(found)


def test_the_scan_would_catch_an_old_name():
    bad = "import harness\nfrom tasks.generation import X\nrun('-m', 'harness.cli')\nfrom ftbench import Task\n"
    assert len(old_name_uses(bad, "x.py")) == 3


def test_the_public_api_is_complete_and_documented():
    import ftbench

    for name in ftbench.__all__:
        obj = getattr(ftbench, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), f"ftbench.{name} has no docstring"
    for name in ("hookimpl", "Task", "EvalContext", "Encoded", "ModelPreset", "BackendSpec", "Engine",
                 "StandardEngine", "EngineContext", "FtbenchError", "DataError", "Unavailable",
                 "DECODER", "ENCODER", "ENCODER_DECODER"):
        assert name in ftbench.__all__


def _docstring_imports():
    """(where, import statement) for each import line in a docstring of ftbench's modules."""
    for path in _sources():
        if path.parts[len(ROOT.parts)] not in ("ftbench", "harness", "plugins", "tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node) or ""
                for line in doc.splitlines():
                    s = line.strip()
                    if re.match(r"(from \S+ import \S|import \w)", s) and "ftbench" in s:
                        yield f"{path.relative_to(ROOT)} ({getattr(node, 'name', 'module')})", s


def test_every_import_in_a_docstring_example_runs():
    examples = list(_docstring_imports())
    assert len(examples) >= 2  # the hookspecs' and the package's own examples at least
    for where, statement in examples:
        try:
            exec(statement, {})  # noqa: S102 - our own docstrings
        except ImportError as e:
            pytest.fail(f"{where}: `{statement}` fails: {e}")


def test_built_in_plugins_import_only_from_ftbench():
    found = []
    for d in ("plugins", "tasks"):
        for path in sorted((ROOT / d).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftbench.harness"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}")
    assert not found, "built-in plugins must use the public API:\n" + "\n".join(found)


def architecture_modules(text: str) -> set[str]:
    """Module files named by docs/architecture.md: full paths, and bare names under a folder heading."""
    named, folder = set(), None
    for line in text.splitlines():
        named |= set(re.findall(r"\b((?:harness|plugins|tasks|ftbench)(?:/\w+)*/\w+\.py)\b", line))
        heading = re.search(r"\b(harness/\w+/)\s*$", line)
        if heading:
            folder = heading.group(1)
            continue
        if line.startswith("#"):  # another section: bare names no longer belong to the folder
            folder = None
        if folder:
            named |= {folder + m for m in re.findall(r"(?<![/\w])(\w+\.py)\b", line)}
    return named


def test_architecture_doc_names_only_modules_that_exist():
    named = architecture_modules((ROOT / "docs" / "architecture.md").read_text())
    assert len(named) >= 25
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_architecture_doc_names_every_module_of_the_core():
    named = architecture_modules((ROOT / "docs" / "architecture.md").read_text())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "harness").rglob("*.py") if p.name != "__init__.py"}
    unnamed = sorted(modules - named)
    assert not unnamed, f"docs/architecture.md does not say what these modules are for: {unnamed}"


def _long_functions(text: str, where: str) -> list[str]:
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            head = " ".join(lines[max(0, node.lineno - 3):node.lineno + 1])
            if n > MAX_FUNCTION_LINES and LONG_OK not in head:
                found.append(f"{where}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_in_the_core_is_long_without_a_reason():
    found = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        found += _long_functions(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, (f"functions over {MAX_FUNCTION_LINES} lines (split them, or write "
                       f"'{LONG_OK} why' next to the def):\n" + "\n".join(found))


def test_the_installed_console_script_runs(tmp_path):
    script = Path(sys.executable).parent / "ftbench"
    if not script.exists():
        pytest.fail(f"no console script beside {sys.executable}: install with pip install -e .")
    out = subprocess.run([str(script), "list", "--json"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"eager"' in out.stdout and '"generation"' in out.stdout


def test_registration_hook_wrappers_are_refused_by_name():
    from ftbench import FtbenchError, hookimpl
    from ftbench.harness.contract.plugins import get_plugin_manager
    from ftbench.harness.contract.registry import Registry

    class Wrapping:
        @hookimpl(wrapper=True)
        def register_tasks(self, register):
            return (yield)

    pm = get_plugin_manager()
    pm.register(Wrapping(), name="wrapping")
    with pytest.raises(FtbenchError, match="'wrapping' implements register_tasks as a hook wrapper"):
        Registry.load(pm)


def test_every_module_under_the_namespace_imports():
    for path in sorted((ROOT / "harness").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = "ftbench." + ".".join(p for p in rel.parts if p != "__init__")
        if name.endswith("preload"):
            continue  # imports every model family: the fork server's job, not this test's
        importlib.import_module(name)
