"""Plugin discovery, duplicate names, blocking and loading switches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftbench import hookimpl
from ftbench.harness.contract.api import BackendSpec, FtbenchError
from ftbench.harness.contract.engine import StandardEngine
from ftbench.harness.contract.plugins import DEFAULT_PLUGINS, broken_plugins, get_plugin_manager
from ftbench.harness.contract.registry import DuplicateName, Registry

from conftest import ROOT, TINY, ftbench, pip_install_copy, records

EXAMPLE = ROOT / "examples" / "ftbench-hello"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    """The README's example plugin, pip-installed (offline) into a private target dir."""
    return pip_install_copy(EXAMPLE, tmp_path_factory)


def test_third_party_plugin_is_listed_and_runs(installed_example, tmp_path):
    env = {"PYTHONPATH": str(installed_example)}
    listing = json.loads(ftbench("list", "--json", env=env, check=True).stdout)
    tasks = {t["name"]: t for t in listing["tasks"]}
    backends = {b["name"]: b for b in listing["backends"]}
    assert tasks["echo"]["plugin"] == "hello"
    assert backends["threads"]["plugin"] == "hello" and backends["threads"]["available"]

    out = tmp_path / "out"
    ftbench("run", "--task", "echo", "--backend", "threads:threads=1", "--out", out, *TINY, env=env, check=True)
    (rec,) = records(out)
    assert rec["status"] == "ok", rec["error"]
    assert rec["task"] == "echo" and rec["backend"] == "threads:threads=1"
    assert rec["tokens_per_s"] > 0


def test_third_party_optimization_is_listed_and_judged(installed_example, tmp_path):
    env = {"PYTHONPATH": str(installed_example)}
    listing = json.loads(ftbench("list", "--json", env=env, check=True).stdout)
    opts = {o["name"]: o for o in listing["optimizations"]}
    assert opts["no-decay"]["plugin"] == "hello" and opts["no-decay"]["available"]
    assert opts["no-decay"]["math"] == "numerics"

    out = tmp_path / "out"
    ftbench("run", "--task", "echo", "--backend", "eager", "--ablation", "no-decay", "--out", out, *TINY, env=env,
            check=True)
    base, rec = records(out)
    assert rec["config"]["opt"] == "no-decay" and rec["status"] == "ok", rec["error"]
    assert rec["recipe_fingerprint"] != base["recipe_fingerprint"]  # other numerics: another recipe
    assert rec["parity"]["status"] == "not-compared"
    verdict = rec["opt_verdict"]
    assert verdict["kind"] == "numerics changed" and verdict["baseline_cell_id"] == base["cell_id"]
    assert verdict["eval_loss_change"] == pytest.approx(rec["eval_loss"] / base["eval_loss"] - 1)


class _Dup:
    @hookimpl
    def register_backends(self, register):
        register(BackendSpec("eager", engine=StandardEngine))


def test_duplicate_name_names_both_plugins():
    with pytest.raises(DuplicateName) as exc:
        Registry.load(get_plugin_manager(extra=(_Dup(),)))
    msg = str(exc.value)
    assert "'eager'" in msg and "'eager'" in msg.split("by plugin", 1)[1]
    assert "_Dup" in msg


def test_block_and_load_only(monkeypatch):
    monkeypatch.setenv("FTBENCH_BLOCK_PLUGINS", "eager")
    reg = Registry.load()
    assert "eager" not in reg.backends and "generation" in reg.tasks
    with pytest.raises(FtbenchError, match="unknown backend 'eager'"):
        reg.backend("eager")

    monkeypatch.delenv("FTBENCH_BLOCK_PLUGINS")
    monkeypatch.setenv("FTBENCH_LOAD_PLUGINS", "eager,generation")
    reg = Registry.load()
    assert set(reg.backends) == {"eager"} and set(reg.tasks) == {"generation"} and not reg.models


def test_block_switch_reaches_the_cli(tmp_path):
    proc = ftbench("list", "--json", env={"FTBENCH_BLOCK_PLUGINS": "eager"})
    assert proc.returncode == 0
    assert "eager" not in {b["name"] for b in json.loads(proc.stdout)["backends"]}


class _Misspelled:
    @hookimpl
    def register_task(self, register):  # not a hook: must fail loudly
        pass


def test_misspelled_hook_fails_loudly():
    # Loudly for that plugin only: it is left out and listed as broken, the others keep working.
    pm = get_plugin_manager(extra=(_Misspelled(),))
    assert "register_task" in broken_plugins(pm)["_Misspelled"]
    assert "_Misspelled" not in {pm.get_name(p) for p in pm.get_plugins()}


def test_builtins_are_ordinary_plugins():
    pm = get_plugin_manager()
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert {m.rsplit(".", 1)[-1] for m in DEFAULT_PLUGINS} <= names


def test_every_hook_is_documented_with_an_example():
    from ftbench.harness.contract import hookspecs

    for name in ("register_tasks", "register_backends", "register_models", "register_optimizations",
                 "collect_environment"):
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Example" in doc or "::" in doc, name


def test_backend_without_options_rejects_one(tmp_path):
    proc = ftbench("run", "--backend", "eager:stage=3", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "eager:stage=3" in proc.stderr and "unknown option" in proc.stderr and "stage" in proc.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_listing_does_not_import_torch_or_deepspeed():
    # 'ftbench list' must stay fast: importing torch alone costs seconds.
    code = ("import sys, ftbench.harness.cli\nfrom ftbench.harness.contract.registry import Registry\nreg = Registry.load()\n"
            "[reg.backend_availability(n) for n in reg.backends]\n"
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
