"""``ftbench ab``: two code versions of ftbench, one grid, interleaved in one run, judged on paired evidence.

``compare`` judges two result sets made at different times.  On a shared
runner the load changes between them, every repeat of one run shifts
together, and the comparison calls the machine's mood a regression.  ``ab``
runs both versions in one session instead, cell by cell and round by round
in the order A B B A A B … (each run a fresh ``ftbench run`` process of the
version under test, each cell in its own process as always), so that load
which comes and goes falls on both sides alike.  Each cell is then judged on
the per-round **ratio** of the two sides' median step times: the bootstrap
interval of the mean log ratio must lie beyond the threshold, as in
``compare``; memory and quality are compared as ``compare`` does.

The two versions are the working tree of the checkout (``B``, "new") and a
git ref (``A``, ``--base``), or two refs.  Each ref is extracted once into
the cache (``git archive``) and reused by later runs.  When its dependencies
are those of the running installation, it runs as an *overlay*: a folder of
links that, first on ``PYTHONPATH``, makes ``import ftbench`` load that tree
with the installed packages; otherwise it gets its own virtual environment,
built once, that sees the installed packages and adds what differs.

Example::

    ftbench ab --base main -- --task generation --backend eager --steps 30
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftbench.harness.analysis.compare import (CONFIDENCE, DEFAULT_ALPHA, RESAMPLES, UNCHANGED, Comparison, Judgement,
                                              Row, by_cell, compare_result_sets, explain_flagged, pair_cells,
                                              verdict_of_change, whole_run_shift)
from ftbench.harness.analysis.resultset import ResultSet, as_float, load_result_set, repeat_of
from ftbench.harness.cell.tokenization import cache_root
from ftbench.harness.contract.api import FtbenchError

#: Options of ``ftbench run`` that ``ab`` sets itself for every run it starts.
OWNED = ("--out", "--repeat", "--shard", "--force")
#: The package folders a tree maps into the ``ftbench`` namespace.
FOLDERS = ("harness", "plugins", "tasks")
#: A finished extraction; an interrupted one is redone.
COMPLETE = ".complete"


@dataclass
class Side:
    """One code version and how to run it.

    Example: ``Side("A", ref="main", commit="3f2c…", python=sys.executable,
    env={"PYTHONPATH": "…/shim"}, how="overlay of main (3f2c1a9)")``.
    """

    name: str
    ref: str | None
    commit: str | None
    python: str
    env: dict
    how: str
    tree: Path | None = None
    #: Seconds spent making the environment in this invocation (0 when reused).
    build_s: float = 0.0


@dataclass
class ABRun:
    """Everything one ``ftbench ab`` made: the two result sets, the paired comparison and the order it ran."""

    out: Path
    base: Side
    new: Side
    comparison: Comparison
    order: list[tuple[int, int, str]] = field(default_factory=list)


# ------------------------------------------------------------------ environments


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FtbenchError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def checkout_root(start: Path) -> Path:
    """The root of the git checkout of ftbench that holds ``start``."""
    proc = subprocess.run(["git", "-C", str(start), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    root = Path(proc.stdout.strip()) if proc.returncode == 0 else None
    if root is None or not all((root / f).is_dir() for f in (*FOLDERS, "ftbench")):
        raise FtbenchError(f"ftbench ab compares versions of ftbench's own source: run it inside a git checkout of "
                           f"ftbench (one with harness/, plugins/, tasks/ and ftbench/); {start} is not in one")
    return root


def dependencies(tree: Path) -> dict:
    """What a tree's pyproject.toml asks to have installed (its dependencies and extras)."""
    try:
        project = tomllib.loads((tree / "pyproject.toml").read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise FtbenchError(f"cannot read {tree / 'pyproject.toml'}: {e}") from None
    return {"dependencies": sorted(project.get("dependencies", [])),
            "optional": {k: sorted(v) for k, v in sorted(project.get("optional-dependencies", {}).items())}}


def make_shim(tree: Path, where: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import ftbench`` load ``tree`` (links only)."""
    pkg = where / "ftbench"
    if pkg.exists():
        shutil.rmtree(where)
    pkg.mkdir(parents=True)
    for name in FOLDERS:
        (pkg / name).symlink_to(tree / name)
    for item in (tree / "ftbench").iterdir():
        if item.name != "__pycache__":
            (pkg / item.name).symlink_to(item)
    return where


def _overlay_env(shim: Path) -> dict:
    # PYTHONSAFEPATH keeps `python -m` from putting the current folder first on sys.path, where a
    # checkout's own ftbench/ would shadow the shim.
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])),
            "PYTHONSAFEPATH": "1"}


def working_tree_side(name: str, root: Path, cache: Path) -> Side:
    shim = make_shim(root, cache / "worktree" / "shim")
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    commit = _git(root, "rev-parse", "HEAD")
    how = f"working tree of {root} (at {commit[:9]}{', with uncommitted changes' if dirty else ''})"
    return Side(name, None, commit, sys.executable, _overlay_env(shim), how, root)


def ref_side(name: str, root: Path, ref: str, cache: Path, say: Callable[[str], None]) -> Side:
    """The version at ``ref``, extracted into the cache once and reused afterwards."""
    try:
        commit = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except FtbenchError:
        raise FtbenchError(f"--base {ref!r} is not a commit of {root}: name a branch, tag or commit "
                           f"(git rev-parse {ref} must work)") from None
    home = cache / commit
    tree = home / "tree"
    t0 = time.perf_counter()
    if not (home / COMPLETE).exists():
        say(f"ab: extracting {ref} ({commit[:9]}) into {tree} (once; later runs reuse it)")
        if home.exists():
            shutil.rmtree(home)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", commit], capture_output=True)
        if archive.returncode != 0:
            raise FtbenchError(f"git archive {commit} failed: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        (home / COMPLETE).write_text(commit + "\n")
    if dependencies(tree) == dependencies(root):
        shim = home / "shim"
        if not (shim / "ftbench").exists():
            make_shim(tree, shim)
        how = f"overlay of {ref} ({commit[:9]}) on the installed packages"
        env = {**_overlay_env(shim), "FTBENCH_GIT_COMMIT": commit}
        return Side(name, ref, commit, sys.executable, env, how, tree, time.perf_counter() - t0)
    python = _own_venv(home, tree, say)
    how = f"{ref} ({commit[:9]}) in its own environment {home / 'venv'} (its dependencies differ)"
    env = {"PYTHONSAFEPATH": "1", "FTBENCH_GIT_COMMIT": commit}
    return Side(name, ref, commit, python, env, how, tree, time.perf_counter() - t0)


def _own_venv(home: Path, tree: Path, say: Callable[[str], None]) -> str:
    venv = home / "venv"
    python = venv / "bin" / "python"
    if (venv / COMPLETE).exists():
        return str(python)
    say(f"ab: building an environment for {tree} in {venv} (once; its dependencies differ from this one's)")
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The installed packages stay visible behind the venv's own, so pip adds only what differs
    # (and never pulls a second torch).
    site = next((venv / "lib").glob("python*/site-packages"))
    outer = [p for p in sys.path if p.endswith("site-packages")]
    (site / "ftbench-ab-outer.pth").write_text("\n".join(outer) + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", str(tree)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FtbenchError(f"could not install {tree} into {venv}: {proc.stderr.strip()[-2000:]}")
    (venv / COMPLETE).write_text("ok\n")
    return str(python)


def prepare_sides(root: Path, base: str, new: str | None, say: Callable[[str], None]) -> tuple[Side, Side]:
    cache = cache_root() / "ab"
    a = ref_side("A", root, base, cache, say)
    b = ref_side("B", root, new, cache, say) if new else working_tree_side("B", root, cache)
    return a, b


# ------------------------------------------------------------------ running


def check_run_args(args: list[str]) -> None:
    owned = sorted({a.split("=")[0] for a in args if a.split("=")[0] in OWNED})
    if owned:
        raise FtbenchError(f"ftbench ab sets {', '.join(owned)} itself for every run it starts; leave "
                           f"{'it' if len(owned) == 1 else 'them'} out of the run options (use ab's --out and "
                           "--rounds)")


def round_order(rounds: int) -> list[tuple[int, str]]:
    """``[(1, "A"), (1, "B"), (2, "B"), (2, "A"), …]``: ABBA, so a steady drift falls on both sides alike."""
    out = []
    for r in range(1, rounds + 1):
        out += [(r, s) for s in (("A", "B") if r % 2 else ("B", "A"))]
    return out


def run_one(side: Side, run_args: list[str], shard: str, repeat: int, out: Path, log: Path) -> int:
    env = {**os.environ, **side.env}
    env.setdefault("FTBENCH_CACHE", str(cache_root()))
    cmd = [side.python, "-m", "ftbench.harness.cli", "run", *run_args, "--shard", shard, "--repeat", str(repeat),
           "--out", str(out)]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def run_interleaved(a: Side, b: Side, run_args: list[str], n_cells: int, rounds: int, out: Path,
                    say: Callable[[str], None]) -> list[tuple[int, int, str]]:
    """Every cell, round by round, in ABBA order; returns the order it ran in."""
    sides = {"A": (a, out / "A"), "B": (b, out / "B")}
    log = out / "ab.log"
    done = []
    for cell in range(1, n_cells + 1):
        for r, name in round_order(rounds):
            side, where = sides[name]
            t0 = time.perf_counter()
            say(f"ab: cell {cell}/{n_cells} round {r}/{rounds} {name} ({side.ref or 'working tree'}) starting")
            rc = run_one(side, run_args, f"{cell}/{n_cells}", r, where, log)
            done.append((cell, r, name))
            say(f"ab: cell {cell}/{n_cells} round {r}/{rounds} {name} done in {time.perf_counter() - t0:.1f} s"
                + (f", exit {rc} (see {log})" if rc not in (0, 1) else ""))
            if rc not in (0, 1):  # 1: the run finished with failed cells, which are results
                raise FtbenchError(f"the {name} side's run of cell {cell} exited {rc}; its output is in {log}")
    return done


# ------------------------------------------------------------------ judging


def paired_judgement(base: list[float], new: list[float], threshold: float,
                     alpha: float = DEFAULT_ALPHA) -> Judgement:
    """The speed verdict from per-round step times of the two sides (round i of each paired).

    The change is the geometric mean over rounds of ``base_i / new_i`` (the
    throughput ratio) minus one; with two or more rounds, an interval of it
    (Student-t with few rounds, bootstrap with many); with enough rounds (``2 / 2**n < alpha``) a Wilcoxon signed-rank
    test on the log ratios too.  A change counts only when it passes the
    threshold and its whole interval lies beyond it.

    Example: ``paired_judgement([10, 11, 9], [20, 22, 18], 0.1).verdict == "regression"``.
    """
    import numpy as np

    pairs = [(b, n) for b, n in zip(base, new) if b and n and b > 0 and n > 0]
    if not pairs:
        return Judgement(None, UNCHANGED, "no paired rounds")
    logs = np.log([b / n for b, n in pairs])
    change = math.expm1(float(logs.mean()))
    big = abs(change) >= threshold
    n = len(pairs)
    interval, p = None, None
    if n < 2:
        changed, evidence = big, [f"paired n={n}: threshold only; more --rounds give an interval"]
    else:
        interval = _log_mean_interval(logs)
        lo, hi = interval
        beyond = lo >= threshold or hi <= -threshold
        if 2 / 2 ** n < alpha and np.any(logs != 0):
            from scipy.stats import wilcoxon  # scipy: only where enough rounds allow the test

            p = float(wilcoxon(logs).pvalue)
            evidence = [f"paired n={n} rounds: signed-rank p={p:.2g}"]
            changed = big and beyond and p < alpha
        else:
            evidence = [f"paired n={n} rounds: threshold and interval only"]
            changed = big and beyond
        evidence.append(f"{CONFIDENCE:.0%} CI {lo:+.1%}..{hi:+.1%}")
    return verdict_of_change(change, changed, big, change < 0, evidence, interval, p)


def _log_mean_interval(logs) -> tuple[float, float]:
    """The interval of the mean log ratio, as a relative change.

    With few rounds (too few for the signed-rank test) a Student-t interval: a percentile
    bootstrap of four values cannot be wider than their range, and under a load that came and
    went it called one false alarm in five ``ab_under_load.py`` trials.  With more rounds, the
    bootstrap, which assumes no shape of the distribution.
    """
    import numpy as np
    from scipy.stats import bootstrap, t

    if np.all(logs == logs[0]):
        v = math.expm1(float(logs[0]))
        return v, v
    n = len(logs)
    if 2 / 2 ** n >= DEFAULT_ALPHA:
        half = float(t.ppf((1 + CONFIDENCE) / 2, n - 1) * np.std(logs, ddof=1) / math.sqrt(n))
        mean = float(np.mean(logs))
        return math.expm1(mean - half), math.expm1(mean + half)
    kw = dict(n_resamples=RESAMPLES, method="percentile", confidence_level=CONFIDENCE)
    res = bootstrap((logs,), np.mean, rng=np.random.default_rng(0), **kw)
    return math.expm1(float(res.confidence_interval.low)), math.expm1(float(res.confidence_interval.high))


def _step_times_by_round(rs: ResultSet) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in rs.records:
        t = as_float(r.get("step_time_s"))
        if r.get("status") == "ok" and t:
            out.setdefault(r["cell_id"], {})[repeat_of(r)] = t
    return out


def paired_comparison(base: ResultSet, new: ResultSet, thresholds: dict | None,
                      alpha: float = DEFAULT_ALPHA) -> Comparison:
    """``compare``'s comparison of the two sets, with each speed row judged on the paired rounds."""
    cmp = compare_result_sets(base, new, thresholds, alpha)
    tb, tn = _step_times_by_round(base), _step_times_by_round(new)
    rows = []
    for row in cmp.rows:
        if row.figure == "speed" and row.cell_id in tb:
            rounds = sorted(set(tb[row.cell_id]) & set(tn.get(row.cell_id, {})))
            sb = [tb[row.cell_id][i] for i in rounds]
            sn = [tn[row.cell_id][i] for i in rounds]
            j = paired_judgement(sb, sn, cmp.thresholds["speed"], alpha)
            row = Row(row.cell, row.task, "speed", row.base, row.new, j.change, j.verdict, j.evidence, row.cell_id,
                      row.unit, j.interval, j.p_value)
        rows.append(row)
    old_shift = whole_run_shift(cmp.rows, cmp.thresholds["speed"])
    cmp.rows = rows
    b, n = by_cell(base), by_cell(new)
    explain_flagged(cmp, dict(pair_cells(b, n)[0]), b, n)
    cmp.warnings = [w for w in cmp.warnings if w != old_shift]
    shift = whole_run_shift(rows, cmp.thresholds["speed"])
    if shift:
        cmp.warnings.append(shift)
    return cmp


def run_ab(root: Path, run_args: list[str], count_cells: Callable[[list[str]], int], *, base: str,
           new: str | None = None, rounds: int = 4, out: Path, thresholds: dict | None = None,
           alpha: float = DEFAULT_ALPHA, say: Callable[[str], None] = print) -> ABRun:
    """Build (or reuse) both environments, run every cell interleaved, and judge on paired rounds."""
    check_run_args(run_args)
    if rounds < 1:
        raise FtbenchError(f"--rounds {rounds}: need at least 1 (4 or more give a useful interval)")
    n_cells = count_cells(run_args)
    if n_cells < 1:
        raise FtbenchError("the run options select no cell")
    a, b = prepare_sides(root, base, new, say)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps({
        "base": {"ref": a.ref, "commit": a.commit, "how": a.how},
        "new": {"ref": b.ref, "commit": b.commit, "how": b.how},
        "run_args": run_args, "rounds": rounds, "cells": n_cells}, indent=2) + "\n")
    say(f"ab: A = {a.how}")
    say(f"ab: B = {b.how}")
    say(f"ab: {n_cells} cell(s) x {rounds} round(s) x 2 versions, order ABBA per cell")
    order = run_interleaved(a, b, run_args, n_cells, rounds, out, say)
    sa, sb = load_result_set(out / "A"), load_result_set(out / "B")
    cmp = paired_comparison(sa, sb, thresholds, alpha)
    cmp.threshold_source = (cmp.threshold_source if thresholds is None else "defaults and --threshold")
    cmp.warnings[:0] = [f"A: {p}" for p in sa.problems] + [f"B: {p}" for p in sb.problems]
    return ABRun(out, a, b, cmp, order)
