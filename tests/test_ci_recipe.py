"""The CI recipe of examples/ci/, run step by step here (not through GitHub): the pull-request check
produces the comment's Markdown, and the history site is built from stored result sets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import make_repo

CELL = ["--task", "generation", "--backend", "eager", "--steps", "4", "--warmup", "1", "--batch-size", "4",
        "--seq-len", "32", "--eval-examples", "8"]


def _env(tmp_path: Path) -> dict:
    bindir = os.path.dirname(sys.executable)  # the ftbench console script of this installation
    return {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "FTBENCH_CACHE": str(tmp_path / "cache"), "FTBENCH_AB_ROUNDS": "1"}


def test_the_pull_request_check_writes_the_comment(tmp_path):
    repo = make_repo(tmp_path, extra=("examples",))
    proc = subprocess.run(["bash", "examples/ci/pr_check.sh", "HEAD", str(tmp_path / "ab"), "--", *CELL],
                          cwd=repo, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    comment = (tmp_path / "ab" / "comment.md").read_text()
    assert comment.startswith("<!-- ftbench-pr-check -->") and "# ftbench compare" in comment
    # one round each on a machine that may be busy: the verdict is the run's own; the text is the recipe's
    assert "- verdict: **" in comment and "| generation |" in comment and "paired n=1" in comment
    assert (tmp_path / "ab" / "report" / "report.html").exists()


def test_the_history_site_is_built_per_commit(tmp_path):
    repo = make_repo(tmp_path, extra=("examples",))
    env = _env(tmp_path)
    commits = []
    for i in range(2):  # two pushes to main, one commit each
        if i:
            subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                            "--allow-empty", "-m", "second"], check=True)
        proc = subprocess.run(["bash", "examples/ci/history_site.sh", str(tmp_path / "store"),
                               str(tmp_path / "site"), "--", *CELL], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        commits.append(subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                                      capture_output=True, text=True).stdout.strip())
    assert all((tmp_path / "store" / c / "results.jsonl").exists() for c in commits)
    page = (tmp_path / "site" / "index.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "<img" in page and (tmp_path / "site" / "history.sqlite").exists()
