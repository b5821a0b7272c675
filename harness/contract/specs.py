"""Task and backend specs (``NAME`` or ``NAME:key=value,key=value``), parsed once.

A spec arrives as text from the command line or a grid file and is parsed
into a :class:`Spec` when a cell is made; everything downstream reads its
``name`` and ``options`` and never splits the text again.  ``str(spec)`` is
the canonical spelling: the name and the options in the order written, with
the spaces around names, keys and values dropped.  Cell ids hash that
spelling, so a spec written without stray spaces keeps the id it always had.

Example::

    spec = Spec.parse("deepspeed:stage=3,offload=cpu")
    spec.name, spec.options    # 'deepspeed', {'stage': 3, 'offload': 'cpu'}
    str(spec)                  # 'deepspeed:stage=3,offload=cpu'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ftbench.harness.contract.api import FtbenchError


@dataclass(frozen=True)
class Spec:
    """A task or backend: its registered name and its options as written.

    ``pairs`` keeps each option's value text as written (``1e-4`` stays
    ``1e-4``), so the spelling, and the cell id built on it, never changes
    by a round trip; ``options`` gives the values parsed as JSON scalars
    where they look like one (3, 1e-4, true), else as strings.

    Example: ``Spec.parse("compile:mode=max-autotune").options == {"mode": "max-autotune"}``.
    """

    name: str
    pairs: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: "str | Spec", what: str = "backend") -> "Spec":
        """The spec ``text`` spells; ``what`` (task, backend) names it in errors."""
        if isinstance(text, Spec):
            return text
        if not isinstance(text, str) or not text.strip():
            raise FtbenchError(f"empty {what} name; write NAME or NAME:key=value,key=value")
        name, _, rest = text.strip().partition(":")
        name = name.strip()
        if not name:
            raise FtbenchError(f"{what} {text!r} has no name before ':'; write NAME:key=value,key=value")
        pairs: list[tuple[str, str]] = []
        if rest:
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq or not key:
                    raise FtbenchError(
                        f"malformed {what} option {item!r} in {text!r}: write NAME:key=value,key=value "
                        f"(e.g. deepspeed:stage=3,offload=cpu)")
                if any(k == key for k, _ in pairs):
                    raise FtbenchError(f"{what} {text!r} sets option {key!r} twice; keep one")
                pairs.append((key, value.strip()))
        return cls(name, tuple(pairs))

    @classmethod
    def of(cls, name: str, options: dict | None = None) -> "Spec":
        """The spec of ``name`` with ``options`` (values spelled as :meth:`parse` reads them back)."""
        return cls(name, tuple((k, _spell(v)) for k, v in (options or {}).items()))

    @property
    def options(self) -> dict[str, Any]:
        return {k: _scalar(v) for k, v in self.pairs}

    def __str__(self) -> str:
        if not self.pairs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.pairs)


def _scalar(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def _spell(v: Any) -> str:
    return json.dumps(v) if isinstance(v, bool) or v is None else str(v)
