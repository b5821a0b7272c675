"""A flagged change explained: what differed between the two sides, software and phases first."""

from __future__ import annotations

import json
import subprocess
import sys

from ftbench.harness.analysis.compare import compare_sets
from ftbench.harness.analysis.explain import explain

from conftest import ROOT
from results_factory import ENV, grid_records, modified, write_set

PHASES = {"forward": 0.004, "backward": 0.008, "optimizer": 0.002, "communication": 0.0, "other": 0.001}


def _sets(tmp_path, slow_backward=True, torch_version="2.13.1+cpu"):
    base = grid_records(tasks=("generation",), backends=("eager",), repeats=3)
    base = modified(base, profile={"phases_s": PHASES})
    env = {**ENV, "versions": {**ENV["versions"], "torch": torch_version}}
    phases = {**PHASES, "backward": 0.024} if slow_backward else PHASES
    new = modified(base, tokens_per_s=lambda r: r["tokens_per_s"] * 0.55, environment=env,
                   profile={"phases_s": phases})
    return write_set(tmp_path / "base", base), write_set(tmp_path / "new", new)


def test_a_planted_regression_names_the_software_and_the_phase_that_moved(tmp_path):
    b, n = _sets(tmp_path)
    cmp = compare_sets(b, n)
    (speed,) = [r for r in cmp.rows if r.figure == "speed"]
    assert speed.verdict == "regression"
    kinds = [d.kind for d in speed.why]
    assert kinds[0] == "software" and "torch 2.13.0+cpu -> 2.13.1+cpu" in speed.why[0].what
    profile = [d.what for d in speed.why if d.kind == "profile"]
    assert profile[0].startswith("backward 8.00 -> 24.00 ms/step (+200%)")
    md = cmp.markdown(str(b), str(n))
    assert "What differed between the two sides" in md and "backward 8.00 -&gt; 24.00" in md  # escaped Markdown
    # the same, for bots
    proc = subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "compare", str(b), str(n), "--json", "-"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    rows = json.loads(proc.stdout)["rows"]
    why = next(r for r in rows if r["figure"] == "speed")["why"]
    assert {"kind": "software", "what": "torch 2.13.0+cpu -> 2.13.1+cpu"} in why


def test_nothing_differs_is_said_too(tmp_path):
    b, n = _sets(tmp_path, slow_backward=False, torch_version="2.13.0+cpu")
    cmp = compare_sets(b, n)
    (speed,) = [r for r in cmp.rows if r.figure == "speed"]
    assert speed.verdict == "regression" and speed.why == []
    assert "nothing recorded differs" in cmp.markdown("b", "n")


def test_commits_between_two_sides_are_listed_from_the_repository(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    parent = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD~1"], capture_output=True,
                            text=True).stdout.strip()
    if not head or not parent:
        import pytest

        pytest.skip("not a git checkout with history")
    rb = [{"environment": {**ENV, "git_commit": parent}}]
    rn = [{"environment": {**ENV, "git_commit": head + "-dirty"}}]
    (d,) = [d for d in explain(rb, rn, ROOT) if "commit" in d.what]
    subject = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%s"], capture_output=True,
                             text=True).stdout.strip()
    count = subprocess.run(["git", "-C", str(ROOT), "rev-list", "--count", f"{parent}..{head}"], capture_output=True,
                           text=True).stdout.strip()
    assert f"{count} commit(s)" in d.what and subject[:40] in d.what
