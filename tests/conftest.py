"""Shared test helpers: run the real CLI in a subprocess and read its records."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Small, fast recipe for end-to-end cells on a 2-core CPU.
TINY = ["--steps", "12", "--warmup", "2", "--batch-size", "4", "--seq-len", "32", "--eval-examples", "16"]


def with_setting(args: list, flag: str, value) -> list:
    """``args`` with ``flag``'s value replaced: a flag given twice would make its setting an axis."""
    out = list(map(str, args))
    i = out.index(flag)
    out[i + 1] = str(value)
    return out


def ftbench(*args, env: dict | None = None, timeout: float = 600, check: bool = False, cwd=None):
    """Run ``ftbench ARGS`` as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ)
    full_env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    if env:
        full_env.update(env)
    proc = subprocess.run([sys.executable, "-m", "ftbench.harness.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"ftbench {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def records(out_dir) -> list[dict]:
    path = Path(out_dir) / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pip_install_copy(package: Path, tmp_path_factory) -> Path:
    """Install a plugin package offline into a private target dir (put it on PYTHONPATH); built from a
    copy, since setuptools leaves build/ and *.egg-info beside the sources."""
    import shutil

    source = tmp_path_factory.mktemp("src") / package.name
    shutil.copytree(package, source)
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True)
    return target


@pytest.fixture
def run_cli():
    return ftbench


def processes_with_env(**wanted: str) -> list[psutil.Process]:
    """Live processes whose environment holds every ``NAME=VALUE`` given (a test's mark)."""
    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
        except (psutil.Error, OSError):
            continue
        if all(env.get(k) == v for k, v in wanted.items()):
            found.append(p)
    return found


def assert_none_left(timeout: float = 10, poll: float = 0.2, **wanted: str) -> None:
    """Wait up to ``timeout`` s for the marked processes to end; fail naming any left behind."""
    deadline = time.time() + timeout
    while processes_with_env(**wanted) and time.time() < deadline:
        time.sleep(poll)
    left = processes_with_env(**wanted)
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def make_repo(tmp_path: Path, extra: tuple[str, ...] = ()) -> Path:
    """A small git repository holding this source tree, committed once (a version ``ftbench ab`` can name)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("ftbench", "harness", "plugins", "tasks", *extra):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "base"], check=True)
    return repo


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs: room for the records of a small grid, until the test fills it."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_up(directory: Path) -> None:
    """Write zeros into ``directory`` until its file system is full (it must be the small tmpfs)."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            for _ in range(16384):  # at most 64 MiB: never fill a real disk if the mount went wrong
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            return
    raise AssertionError(f"{directory} did not fill up: is it the small tmpfs?")
