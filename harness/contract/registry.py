"""What the plugins registered: tasks, backends, model presets and record sinks by name."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import pluggy

from ftbench.harness.contract.api import BackendSpec, FtbenchError, ModelPreset, Task, Unavailable
from ftbench.harness.contract.optimization import Optimization
from ftbench.harness.contract.format import shorten, shown
from ftbench.harness.contract.plugins import broken_plugins, get_plugin_manager
from ftbench.harness.contract.sinks import SinkSpec


class DuplicateName(FtbenchError):
    """Two plugins registered the same name."""


@dataclass
class Entry:
    """A registered thing and the plugin that gave it."""

    name: str
    obj: Any
    plugin: str


@dataclass
class Registry:
    """Tasks, backends, model presets, optimizations and record sinks, each by name.

    Example::

        reg = Registry.load()
        reg.task("generation").metric   # 'perplexity'
    """

    tasks: dict[str, Entry] = field(default_factory=dict)
    backends: dict[str, Entry] = field(default_factory=dict)
    models: dict[str, Entry] = field(default_factory=dict)
    sinks: dict[str, Entry] = field(default_factory=dict)
    optimizations: dict[str, Entry] = field(default_factory=dict)
    pm: pluggy.PluginManager | None = None

    @classmethod
    def load(cls, pm: pluggy.PluginManager | None = None) -> "Registry":
        pm = pm or get_plugin_manager()
        reg = cls(pm=pm)
        for hook_name, table, kind in (
            ("register_tasks", reg.tasks, Task),
            ("register_backends", reg.backends, BackendSpec),
            ("register_models", reg.models, ModelPreset),
            ("register_sinks", reg.sinks, SinkSpec),
            ("register_optimizations", reg.optimizations, Optimization),
        ):
            hook = getattr(pm.hook, hook_name)
            # Call each implementation separately so we know who registered what.
            for impl in hook.get_hookimpls():
                plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
                if plugin in broken_plugins(pm):
                    continue
                _refuse_wrapper(impl, hook_name, plugin)
                try:
                    impl.function(register=_registrar(table, kind, plugin))
                except DuplicateName:
                    raise  # two plugins disagree: the user must choose (the message names both)
                except Exception as e:  # noqa: BLE001 - one plugin's bug leaves the others working
                    reg._set_broken(plugin, f"{hook_name} raised {type(e).__name__}: {shorten(str(e), 300)}")
        return reg

    @property
    def broken(self) -> dict[str, str]:
        """Plugins left out, with their errors (listed by ``ftbench list``)."""
        return broken_plugins(self.pm)

    def _set_broken(self, plugin: str, error: str) -> None:
        # What the plugin registered before it failed goes too: it is broken as a whole.
        self.broken[plugin] = error
        for table in (self.tasks, self.backends, self.models, self.sinks, self.optimizations):
            for name in [n for n, e in table.items() if e.plugin == plugin]:
                del table[name]

    # ------------------------------------------------------------ lookups

    def task(self, name: str) -> Task:
        return _lookup(self.tasks, name, "task", "--task", self.broken).obj

    def backend(self, name: str) -> BackendSpec:
        return _lookup(self.backends, name, "backend", "--backend", self.broken).obj

    def model(self, name: str) -> ModelPreset:
        return _lookup(self.models, name, "model preset", "--model", self.broken).obj

    def sink(self, name: str) -> SinkSpec:
        return _lookup(self.sinks, name, "sink", "--sink", self.broken).obj

    def optimization(self, name: str) -> Optimization:
        return _lookup(self.optimizations, name, "optimization", "--opt").obj

    def optimization_availability(self, name: str, device: str, options: dict | None = None) -> str | None:
        """None if the optimization can run on ``device`` here, else why not (with the install hint)."""
        opt = self.optimization(name)
        try:
            opt.check_available({**dict(opt.defaults), **(options or {})}, device)
        except Unavailable as e:
            return str(e)
        return None

    def backend_availability(self, name: str, options: dict | None = None) -> str | None:
        """None if the backend can run here, else why not (with the install hint)."""
        spec = self.backend(name)
        try:
            spec.engine.check_available({**spec.defaults, **(options or {})})
        except Unavailable as e:
            return str(e)
        return None


def _refuse_wrapper(impl, hook_name: str, plugin: str) -> None:
    # A wrapper's function is a generator: called directly it would do nothing,
    # silently.  Registration hooks are called per plugin (to name who
    # registered what), so there is nothing for a wrapper to wrap.
    if getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False):
        raise FtbenchError(f"plugin {plugin!r} implements {hook_name} as a hook wrapper; registration hooks "
                           "cannot be wrapped (each plugin's is called on its own so that ftbench knows who "
                           f"registered what): declare it with a plain @hookimpl. Wrappers work for "
                           "collect_environment.")


def _registrar(table: dict, kind: type, plugin: str):
    def register(obj):
        if not isinstance(obj, kind):
            raise TypeError(f"plugin {plugin!r} registered {obj!r}, expected a {kind.__name__}")
        name = obj.name
        if not name:
            raise FtbenchError(f"plugin {plugin!r} registered a {kind.__name__} without a name")
        if name in table:
            raise DuplicateName(
                f"{kind.__name__} name {name!r} is registered twice: by plugin {table[name].plugin!r} "
                f"and by plugin {plugin!r}. Uninstall or block one of them "
                f"(FTBENCH_BLOCK_PLUGINS={plugin})."
            )
        table[name] = Entry(name, obj, plugin)

    return register


def _lookup(table: dict[str, Entry], name: str, what: str, flag: str, broken: dict | None = None) -> Entry:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name)[:100], list(table), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    available = ", ".join(sorted(table)) or "(none: are the plugins blocked?)"
    left_out = (f" Broken plugins, left out (their {what}s are missing): "
                f"{'; '.join(f'{p}: {e}' for p, e in sorted(broken.items()))}." if broken else "")
    raise FtbenchError(f"unknown {what} {shown(name)}.{hint} Available: {available}.{left_out} "
                       f"Run 'ftbench list' to see them, then pass one to {flag}.")
