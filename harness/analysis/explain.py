"""Why a flagged change may have happened: what differed between the two sides, ranked.

``compare`` (and ``history``, at a change point) says *that* a cell moved;
this module says what else moved with it, from what the records hold:

1. **software**: package versions, the project commit (with the commit
   messages in between when the repository is at hand);
2. **the machine**: CPU or GPU model, driver and CUDA stack, thread
   settings, cores, and the load each side ran under;
3. **the cell**: recipe fingerprint and settings;
4. **data and model**: the provenance digests (model, rows read, tokenizer);
5. **where the time went**: with ``--profile`` on both sides, each phase's
   change (forward, backward, optimizer, communication, other), largest first.

Example::

    for d in explain(base_records, new_records):
        print(d.kind, d.what)      # software  torch 2.12.0 -> 2.13.0
"""

from __future__ import annotations

import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ftbench.harness.analysis.resultset import config_diff
from ftbench.harness.cell.machineload import load_differs

#: Order in which kinds of difference are listed (most likely cause of a speed change first).
KINDS = ("software", "machine", "load", "cell", "data", "profile")
#: Commit messages listed at most between two commits.
MAX_COMMITS = 10


@dataclass
class Difference:
    """One thing that differs between the two sides of a flagged change.

    Example: ``Difference("software", "torch 2.12.0 -> 2.13.0")``.
    """

    kind: str
    what: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "what": self.what}


def _env(recs: list[dict]) -> dict:
    env = recs[0].get("environment") if recs else None
    return env if isinstance(env, dict) else {}


def _commit(env: dict) -> str | None:
    c = env.get("git_commit")
    return c.replace("-dirty", "") if isinstance(c, str) else None


def commits_between(base: str, new: str, repo: Path | None = None) -> list[str]:
    """``git log --oneline base..new`` in the ftbench checkout at hand ([] when it does not have them)."""
    repo = repo or Path(__file__).resolve().parent
    proc = subprocess.run(["git", "-C", str(repo), "log", "--oneline", "--no-decorate", f"{base}..{new}"],
                          capture_output=True, text=True)
    return proc.stdout.strip().splitlines() if proc.returncode == 0 else []


def _software(eb: dict, en: dict, repo: Path | None) -> list[Difference]:
    out = []
    vb, vn = eb.get("versions") or {}, en.get("versions") or {}
    for name in sorted(set(vb) | set(vn)):
        if vb.get(name) != vn.get(name):
            out.append(Difference("software", f"{name} {vb.get(name)} -> {vn.get(name)}"))
    if eb.get("python") != en.get("python"):
        out.append(Difference("software", f"python {eb.get('python')} -> {en.get('python')}"))
    cb, cn = eb.get("git_commit"), en.get("git_commit")
    if cb != cn:
        what = f"ftbench commit {str(cb)[:12]} -> {str(cn)[:12]}"
        log = commits_between(_commit(eb), _commit(en), repo) if _commit(eb) and _commit(en) else []
        if log:
            shown = log[:MAX_COMMITS]
            more = f" (and {len(log) - MAX_COMMITS} more)" if len(log) > MAX_COMMITS else ""
            what += f": {len(log)} commit(s): " + "; ".join(shown) + more
        out.append(Difference("software", what))
    return out


def _machine(eb: dict, en: dict, rb: list[dict], rn: list[dict]) -> list[Difference]:
    out = []
    for key in ("cpu", "cpu_count", "cpu_affinity", "omp_num_threads", "hostname"):
        if eb.get(key) != en.get(key):
            out.append(Difference("machine", f"{key} {eb.get(key)} -> {en.get(key)}"))
    db, dn = eb.get("device") or {}, en.get("device") or {}
    for key in sorted(set(db) | set(dn)):
        if key != "cpu" and db.get(key) != dn.get(key):
            out.append(Difference("machine", f"device {key} {db.get(key)} -> {dn.get(key)}"))
    sb = ((rb[0].get("provenance") or {}).get("software") or {}) if rb else {}
    sn = ((rn[0].get("provenance") or {}).get("software") or {}) if rn else {}
    for key in sorted(set(sb) | set(sn)):
        if sb.get(key) != sn.get(key):
            out.append(Difference("machine", f"{key} {sb.get(key)} -> {sn.get(key)}"))
    return out


def _median_share(recs: list[dict]) -> dict | None:
    shares = [r["machine_load"]["other_cpu_share"] for r in recs if isinstance(r.get("machine_load"), dict)
              and isinstance(r["machine_load"].get("other_cpu_share"), (int, float))]
    return {"other_cpu_share": statistics.median(shares)} if shares else None


def _digests(rb: list[dict], rn: list[dict]) -> list[Difference]:
    pb = (rb[0].get("provenance") or {}) if rb else {}
    pn = (rn[0].get("provenance") or {}) if rn else {}
    names = {"model_digest": "model weights or config", "data_digest": "rows read", "tokenizer_digest": "tokenizer"}
    return [Difference("data", f"{label} differ ({str(pb.get(k))[:19]} -> {str(pn.get(k))[:19]})")
            for k, label in names.items() if pb.get(k) and pn.get(k) and pb.get(k) != pn.get(k)]


def _phases(recs: list[dict]) -> dict[str, float]:
    per = [r["profile"]["phases_s"] for r in recs if isinstance(r.get("profile"), dict)
           and isinstance(r["profile"].get("phases_s"), dict)]
    if not per:
        return {}
    return {k: statistics.median(p.get(k) or 0.0 for p in per) for k in per[0]}


def phase_changes(rb: list[dict], rn: list[dict]) -> list[Difference]:
    """Per-phase time per step, both sides profiled: the phases that moved, largest move first."""
    pb, pn = _phases(rb), _phases(rn)
    if not pb or not pn:
        return []
    moves = sorted(((pn.get(k, 0.0) - pb.get(k, 0.0), k) for k in set(pb) | set(pn)), key=lambda m: -abs(m[0]))
    total = sum(pb.values()) or 1.0
    out = []
    for delta, phase in moves:
        if abs(delta) < 0.02 * total:
            continue
        rel = f" ({delta / pb[phase]:+.0%})" if pb.get(phase) else ""
        out.append(Difference("profile", f"{phase} {pb.get(phase, 0) * 1e3:.2f} -> {pn.get(phase, 0) * 1e3:.2f} "
                                         f"ms/step{rel}"))
    return out


def explain(rb: list[dict], rn: list[dict], repo: Path | None = None) -> list[Difference]:
    """Everything that differs between two sides' records of one cell, in :data:`KINDS` order."""
    eb, en = _env(rb), _env(rn)
    found = _software(eb, en, repo) + _machine(eb, en, rb, rn)
    load = load_differs(_median_share(rb), _median_share(rn))
    if load:
        found.append(Difference("load", load))
    if rb and rn and rb[0].get("recipe_fingerprint") != rn[0].get("recipe_fingerprint"):
        found += [Difference("cell", d) for d in config_diff(rb[0], rn[0])]
    found += _digests(rb, rn) + phase_changes(rb, rn)
    return sorted(found, key=lambda d: KINDS.index(d.kind))
