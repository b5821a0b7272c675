"""The fairness check: what two cells *actually* computed, from what each recorded.

Two cells with the same recipe fingerprint were *configured* alike; this
check reads what each run reported doing (``as_run``, ``lr_per_step``,
``step_tokens``: see docs/fairness.md) and names every way they differ:

| check | from the record | changes the math |
| --- | --- | --- |
| tokens per optimizer step (real, loss-bearing) | ``step_tokens`` | yes |
| padded tokens per optimizer step | ``step_tokens.padded`` | no (speed only) |
| loss normalisation over micro-batches and ranks | ``as_run.loss_normalisation`` | yes |
| precision policy (weights, autocast, reduction, optimizer) | ``as_run.precision_policy`` | yes |
| learning rate of each step | ``lr_per_step`` | yes |
| data order | ``as_run.data_order_digest`` | yes |
| optimizer class | ``as_run.optimizer`` | yes |
| weight decay and the share of weights it applies to | ``as_run.weight_decay`` | yes |
| optimizer kernel (default, foreach, fused) | ``as_run.optimizer`` | no (rounding only) |
| attention implementation | ``as_run.attention`` | no (rounding only) |
| the stack's own semantics | ``as_run.differences`` | named, not judged |

Example::

    diffs = compare_cells(eager_record, trainer_record)
    differs_label(diffs)          # "math: lr; speed: optimizer kernel"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ftbench.harness.contract.api import FtbenchError

#: Relative difference of two learning rates that counts as different (float round trips agree to ~1e-16).
LR_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Difference:
    """One way two cells differ: what, each side's value, and whether it changes what is computed.

    Example: ``Difference("attention", "attention implementation", "sdpa", "eager", changes_math=False)``.
    """

    key: str
    what: str
    a: object
    b: object
    changes_math: bool

    def describe(self) -> str:
        kind = "changes the math" if self.changes_math else \
            "named by the stack" if self.key == "semantics" else "speed/rounding only"
        return f"{self.what}: {self.a} ≠ {self.b} ({kind})"


def compare_cells(a: dict, b: dict) -> list[Difference]:
    """Every recorded difference between cells ``a`` and ``b`` (empty: they computed the same)."""
    out: list[Difference] = []
    out += _tokens(a, b)
    fa, fb = a.get("as_run") or {}, b.get("as_run") or {}
    for key, what in (("loss_normalisation", "loss normalisation"), ("precision_policy", "precision policy"),
                      ("data_order_digest", "data order (digest of the rows, in order)"),
                      ("weight_decay", "weight decay (rate on share of the trainable weights)")):
        if fa.get(key) and fb.get(key) and fa[key] != fb[key]:
            out.append(Difference(key, what, fa[key], fb[key], changes_math=True))
    out += _lr(a, b)
    out += _optimizer(fa.get("optimizer"), fb.get("optimizer"))
    if fa.get("attention") and fb.get("attention") and fa["attention"] != fb["attention"]:
        out.append(Difference("attention", "attention implementation", fa["attention"], fb["attention"],
                              changes_math=False))
    sa, sb = fa.get("differences") or [], fb.get("differences") or []
    if sa != sb:
        out.append(Difference("semantics", "the stack's own semantics (as_run.differences)",
                              "; ".join(sa) or "the recipe's", "; ".join(sb) or "the recipe's", changes_math=False))
    return out


def _tokens(a: dict, b: dict) -> list[Difference]:
    ta, tb = a.get("step_tokens") or {}, b.get("step_tokens") or {}
    out = []
    for key, what, math_ in (("nonpad", "real tokens per step", True), ("loss", "loss-bearing tokens per step", True),
                             ("padded", "padded tokens per step", False)):
        xa, xb = ta.get(key), tb.get(key)
        if not xa or not xb:
            continue
        n = min(len(xa), len(xb))
        step = next((i for i in range(n) if xa[i] != xb[i]), None)
        if step is not None:
            out.append(Difference(f"tokens.{key}", what, f"{xa[step]} at step {step}", f"{xb[step]} at step {step}",
                                  changes_math=math_))
    return out


def _lr(a: dict, b: dict) -> list[Difference]:
    la, lb = a.get("lr_per_step") or [], b.get("lr_per_step") or []
    for i, (x, y) in enumerate(zip(la, lb)):
        if x is None or y is None:
            continue
        if not math.isclose(x, y, rel_tol=LR_TOLERANCE, abs_tol=0.0):
            return [Difference("lr", "learning rate per step", f"{x:.6g} at step {i}", f"{y:.6g} at step {i}",
                               changes_math=True)]
    return []


def _optimizer(a: str | None, b: str | None) -> list[Difference]:
    # A stack may append its own name for the optimizer ("[optim=adamw_torch]"): only class and kernel count.
    a, b = (a or "").split(" [")[0], (b or "").split(" [")[0]
    if not a or not b or a == b:
        return []
    cls_a, cls_b = a.split(" (")[0], b.split(" (")[0]
    if cls_a != cls_b:
        return [Difference("optimizer", "optimizer", a, b, changes_math=True)]
    return [Difference("optimizer_kernel", "optimizer kernel", a, b, changes_math=False)]


def differs_label(diffs: list[Difference] | None) -> str:
    """The report's "differs" cell: ``none``, or what changes the math, then what only changes speed.

    ``None`` (nothing to compare with, or records from before this check) shows as ``-``.
    """
    if diffs is None:
        return "-"
    if not diffs:
        return "none"
    short = {"tokens.nonpad": "tokens", "tokens.loss": "loss tokens", "tokens.padded": "padding",
             "loss_normalisation": "loss norm", "precision_policy": "precision", "data_order_digest": "data order",
             "weight_decay": "weight decay",
             "optimizer_kernel": "optimizer kernel"}
    math_ = [short.get(d.key, d.key) for d in diffs if d.changes_math]
    other = [short.get(d.key, d.key) for d in diffs if not d.changes_math]
    parts = ([f"math: {', '.join(math_)}"] if math_ else []) + ([f"other: {', '.join(other)}"] if other else [])
    return "; ".join(parts)


def counterpart(record: dict, records: list[dict]) -> dict | None:
    """The cell ``record`` is put beside: its parity reference, found by cell id in ``records``."""
    ref_id = (record.get("parity") or {}).get("reference_cell_id")
    if not ref_id or ref_id == record.get("cell_id"):
        return None
    return next((r for r in records if r.get("cell_id") == ref_id and r.get("status") == "ok"), None)


def has_account(record: dict) -> bool:
    """Whether the record carries what the check reads (records from before it do not)."""
    return bool(record.get("as_run"))


def explain(a: dict, b: dict) -> list[str]:
    """Lines for ``ftbench explain``: the differences, math-changing first, or that there are none."""
    if not (has_account(a) and has_account(b)):
        missing = " and ".join(r.get("backend", "?") for r in (a, b) if not has_account(r))
        return [f"cannot check: {missing} recorded no account of what it computed (a record from before "
                "this check); rerun the cell"]
    diffs = sorted(compare_cells(a, b), key=lambda d: not d.changes_math)
    if not diffs:
        return ["no differences: same tokens per step, loss normalisation, precision policy, learning rates, "
                "data order, optimizer and attention implementation"]
    lines = [f"- {d.describe()}" for d in diffs]
    if any(d.changes_math for d in diffs):
        lines.append("these cells did not compute the same training run: do not rank their speeds without "
                     "this note")
    return lines


def select_cell(records: list[dict], selector: str, where: str) -> dict:
    """The record ``selector`` names in a result set: a cell id (or a unique prefix of one), a
    backend as written on the command line (``trainer``, ``accelerate:dist=fsdp``) or
    ``TASK/BACKEND``; the first finished repeat.  An unknown or ambiguous name is an
    :class:`FtbenchError` that lists the candidates."""
    ok = [r for r in records if r.get("status") == "ok"] or records

    def matches(r: dict) -> bool:
        cid, task, backend = str(r.get("cell_id", "")), r.get("task"), r.get("backend")
        return (selector == cid or (len(selector) >= 4 and cid.startswith(selector)) or selector == backend
                or selector == f"{task}/{backend}")

    found = [r for r in ok if matches(r)]
    cells = {r["cell_id"]: r for r in reversed(found)}  # one per cell: its first finished repeat
    if len(cells) == 1:
        return next(iter(cells.values()))
    listing = ", ".join(sorted(f"{r.get('task')}/{r.get('backend')} ({str(r.get('cell_id'))[:10]})" for r in ok))
    if not cells:
        raise FtbenchError(f"no cell {selector!r} in {where}; name one by cell id, BACKEND or TASK/BACKEND: "
                           f"{listing or 'the set has no records'}")
    raise FtbenchError(f"{selector!r} names {len(cells)} cells in {where}; name one by TASK/BACKEND or cell id: "
                       + ", ".join(sorted(f"{r.get('task')}/{r.get('backend')} ({str(r.get('cell_id'))[:10]})"
                                          for r in cells.values())))
