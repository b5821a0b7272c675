"""Building the plugin manager: built-ins first, then entry points.

Built-in plugins are listed in :data:`DEFAULT_PLUGINS` and registered exactly
like third-party ones (which come from the ``ftbench`` entry-point group), so
the core never special-cases a plugin by name.

Three environment switches, in the spirit of pytest's ``-p no:NAME`` and llm's
``LLM_LOAD_PLUGINS``:

* ``FTBENCH_BLOCK_PLUGINS=deepspeed,compile`` skips those plugins;
* ``FTBENCH_LOAD_PLUGINS=eager,generation`` loads only the listed plugins
  (an empty value loads none);
* ``FTBENCH_PLUGINS_EXTRA=mypkg.myplugin,other`` also registers the listed
  modules by import path, like pytest's ``-p mypkg.myplugin``: a plugin you
  are developing (or a test's fault-injecting plugin) works without being
  installed.  The variable is inherited by every cell process, so a plugin
  loaded this way is seen by the driver and by the cells alike.

A plugin's name is its entry-point name, or for built-ins the last part of
the module path (``ftbench.plugins.eager`` -> ``eager``).

One broken plugin never takes the others down: a plugin that fails to
import, implements a hook that does not exist (pluggy's validation, e.g. a
misspelled ``register_task``) or raises in a registration hook is left out
and listed as *broken* with its error (:func:`broken_plugins`, ``ftbench
list``); every other plugin keeps working.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

import pluggy

from ftbench.harness.contract import hookspecs
from ftbench.harness.contract.format import shorten

DEFAULT_PLUGINS: tuple[str, ...] = (
    "ftbench.plugins.eager",
    "ftbench.plugins.compiled",
    "ftbench.plugins.deepspeed_zero",
    "ftbench.plugins.data_parallel",
    "ftbench.plugins.accelerate_backend",
    "ftbench.plugins.hf_trainer",
    "ftbench.plugins.presets",
    "ftbench.plugins.trackers",
    "ftbench.plugins.optimizations",
    "ftbench.tasks.generation",
    "ftbench.tasks.translation",
    "ftbench.tasks.classification",
    "ftbench.tasks.summarization",
    "ftbench.tasks.dialogue",
)

ENTRY_POINT_GROUP = "ftbench"


def _names_from_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def get_plugin_manager(extra: tuple = ()) -> pluggy.PluginManager:
    """A fresh, fully loaded plugin manager.

    Nothing is cached at module level, so tests can build as many as they
    like.  ``extra`` registers additional plugin objects (handy in tests)::

        pm = get_plugin_manager()
        pm.hook.register_tasks(register=print)
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = _names_from_env("FTBENCH_BLOCK_PLUGINS") or set()
    only = _names_from_env("FTBENCH_LOAD_PLUGINS")

    def wanted(name: str) -> bool:
        return name not in blocked and (only is None or name in only)

    broken: dict[str, str] = {}
    pm.ftbench_broken = broken  # read through broken_plugins(pm)

    def add(name: str, load, where: str) -> None:
        try:
            pm.register(load(), name=name)
        except Exception as e:  # noqa: BLE001 - any failure of one plugin is that plugin's, reported per plugin
            broken[name] = f"{where}: {type(e).__name__}: {shorten(str(e), 300)}"

    for module_path in DEFAULT_PLUGINS:
        name = module_path.rsplit(".", 1)[-1]
        if wanted(name):
            add(name, lambda m=module_path: importlib.import_module(m), f"cannot import {module_path}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if not wanted(ep.name) or pm.get_plugin(ep.name) is not None or ep.name in broken:
            continue
        add(ep.name, ep.load, f"cannot load entry point {ep.value}")
    # Named explicitly, so FTBENCH_LOAD_PLUGINS does not filter them; blocking still does.
    for module_path in sorted(_names_from_env("FTBENCH_PLUGINS_EXTRA") or ()):
        name = module_path.rsplit(".", 1)[-1]
        if name in blocked or pm.get_plugin(name) is not None:
            continue
        add(name, lambda m=module_path: importlib.import_module(m),
            f"FTBENCH_PLUGINS_EXTRA names {module_path}, which cannot be imported (fix the module path or add "
            "its folder to PYTHONPATH)")
    for obj in extra:
        add(getattr(obj, "__name__", None) or type(obj).__name__, lambda o=obj: o, "cannot register")
    _drop_invalid(pm, broken)
    return pm


def _drop_invalid(pm: pluggy.PluginManager, broken: dict) -> None:
    """pluggy's validation (a misspelled hook such as ``register_task``), plugin by plugin: each plugin
    it rejects is unregistered and listed as broken, and the rest is checked again."""
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as e:
            name = pm.get_name(e.plugin) or repr(e.plugin)
            broken[name] = f"invalid hook: {shorten(str(e), 300)}"
            pm.unregister(e.plugin)


def broken_plugins(pm: pluggy.PluginManager | None) -> dict[str, str]:
    """Plugins left out because they failed to import, validate or register: name -> error."""
    return getattr(pm, "ftbench_broken", {}) if pm is not None else {}
