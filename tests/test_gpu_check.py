"""benchmarks/gpu_check.py on the CPU: the same code path as on a GPU lease, its budget, its
records written as it goes (also when killed), and its verdict when a package is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, assert_none_left

CHECK = ROOT / "benchmarks" / "gpu_check.py"


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    env.update(extra)
    return env


def _summary(out: Path) -> dict:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _states(out: Path) -> dict:
    return {s["step"]: s["status"] for s in _summary(out).get("steps", [])}


BLOCK_DEEPSPEED = '''\
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Missing())
'''


def test_a_step_skipped_for_a_missing_package_makes_the_check_incomplete(tmp_path):
    """Without DeepSpeed (hidden here as on the device image before its wheels are carried) the
    deepspeed step is skipped, saying why, and the check exits non-zero with verdict incomplete."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_DEEPSPEED)
    out = tmp_path / "out"
    env = _env(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--only", "deepspeed", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = _summary(out)
    assert summary["verdict"] == "incomplete"
    (ds,) = [s for s in summary["steps"] if s["step"] == "deepspeed"]
    assert ds["status"] == "skipped-missing" and "deepspeed" in ds["note"].lower()
    assert "verdict: incomplete" in proc.stdout
    assert json.loads((out / "backends.json").read_text())["zero2"]  # the reason ftbench list gave


def test_the_check_killed_midway_leaves_its_records_and_summary(tmp_path):
    """SIGKILL while a cell runs: the finished steps' records, step.json files, progress log and a
    summary naming the running step are all in --out, and the check's ftbench run does not outlive it."""
    out, mark = tmp_path / "out", uuid.uuid4().hex
    bundle = tmp_path / "bring-back.tgz"
    proc = subprocess.Popen([sys.executable, str(CHECK), "--device", "cpu", "--budget", "120", "--out", str(out),
                             "--bundle", str(bundle)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(FTBENCH_TEST_MARK=mark))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and _states(out).get("fp32") != "running":
            assert proc.poll() is None, "the check ended before its first cell"
            time.sleep(0.5)
        assert _states(out).get("fp32") == "running", _states(out)
        time.sleep(3)  # the ftbench run has started its cell
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    states = _states(out)
    assert states["install"] == "passed" and states["matmul"] == "passed" and states["fp32"] == "running"
    step_files = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/step.json")}
    assert step_files["01-matmul"]["status"] == "passed" and step_files["01-matmul"]["cells"]
    assert step_files["02-fp32"]["status"] == "running"
    assert (out / "summary.md").read_text().startswith("# ftbench GPU check: incomplete")
    assert "matmul: passed" in (out / "progress.log").read_text()
    # The bundle a device lease brings back holds the same, as of the last step's summary.
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        assert "out/summary.md" in names and "out/01-matmul/step.json" in names, names
        assert tar.extractfile("out/summary.md").read().startswith(b"# ftbench GPU check: incomplete")
    assert_none_left(timeout=60, FTBENCH_TEST_MARK=mark)


@pytest.mark.slow
def test_the_check_on_cpu_stops_within_budget_plus_one_step_timeout(tmp_path):
    """The Done-when command: runs the GPU path on the CPU, ends within --budget + one step's timeout,
    and leaves each step's records and the summary."""
    out, budget, step_timeout = tmp_path / "out", 120, 90
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(CHECK), "--device", "cpu", "--budget", str(budget),
                           "--step-timeout", str(step_timeout), "--out", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=budget + 2 * step_timeout + 120)
    wall = time.monotonic() - t0
    # Start-up and the stop of a timed-out step (10 s grace) on top of budget + one step.
    assert wall < budget + step_timeout + 45, wall
    summary = _summary(out)
    assert proc.returncode == {"passed": 0, "failed": 1, "incomplete": 3}[summary["verdict"]]
    states = {s["step"]: s["status"] for s in summary["steps"]}
    assert states["install"] == "passed" and states["matmul"] == "passed"
    assert states["fp16"] == states["cuda-graphs"] == "n/a"
    ran = [s for s in summary["steps"] if s["status"] in ("passed", "failed", "timeout")]
    for s in ran:
        folder = next(out.glob(f"*-{s['step']}"))
        assert json.loads((folder / "step.json").read_text())["status"] == s["status"]
    assert any((r.get("launch") or {}).get("mode") == "fork" for s in ran for r in s["cells"])


#: What the device image has (docs/gpu.md) that matters here; their dependencies come along.
IMAGE = ("torch", "transformers", "accelerate", "peft", "pytest", "setuptools")


def _image_closure() -> set[str]:
    """The image's distributions and their dependencies, as installed here (names normalised)."""
    import re
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), list(IMAGE)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or ():
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _fake_image(root: Path) -> Path:
    """A folder holding only the image's packages (links into this environment's site-packages)."""
    import re
    from importlib import metadata

    root.mkdir()
    wanted = _image_closure()
    for dist in metadata.distributions():
        if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() not in wanted:
            continue
        site = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:
            src, dst = site / top, root / top
            if src.exists() and not dst.exists() and top != "__pycache__" and not top.endswith(".pth"):
                dst.symlink_to(src)
    return root


@pytest.mark.slow
def test_the_wheel_folder_installs_offline_and_deepspeed_becomes_available(tmp_path):
    """gpu_wheels.sh's folder (for this machine's Python: the mechanism the device's 3.12 uses),
    installed with --no-index into a fresh environment that has only the image's packages, then
    ftbench installed editable without build isolation or dependencies: the DeepSpeed backends
    are listed as available."""
    wheels = tmp_path / "wheels"
    pyv = f"{sys.version_info.major}.{sys.version_info.minor}"
    build = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_wheels.sh"), "--out", str(wheels),
                            "--python-version", pyv], capture_output=True, text=True, timeout=1200,
                           env={**os.environ, "PYTHON": sys.executable})
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    files = list(wheels.glob("*.whl"))
    assert sum(f.stat().st_size for f in files) < 64 * 2**20
    names = {f.name.split("-")[0].lower() for f in files}
    assert {"deepspeed", "pydantic", "pydantic_core", "hjson", "annotated_types", "typing_inspection"} <= names
    assert "--find-links" in build.stdout and "--no-build-isolation --no-deps -e ." in build.stdout

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # pip from ensurepip, offline
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    image = _fake_image(tmp_path / "image")
    (site / "image.pth").write_text(str(image) + "\n")
    probe = subprocess.run([str(py), "-c", "import torch, transformers, pip; import deepspeed"], capture_output=True,
                           text=True)
    assert "No module named 'deepspeed'" in probe.stderr, probe.stderr[-1000:]  # the image lacks it

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1")
    install = f"{py} -m pip install --no-index --find-links {wheels} {wheels}/*.whl && " \
              f"{py} -m pip install --no-build-isolation --no-deps -e {ROOT}"
    proc = subprocess.run(["bash", "-c", install], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    listed = subprocess.run([str(py), "-m", "ftbench.harness.cli", "list", "--json"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert listed.returncode == 0, listed.stderr[-2000:]
    backends = {b["name"]: b for b in json.loads(listed.stdout)["backends"]}
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2-offload", "zero3-offload"):
        assert backends[name]["available"], (name, backends[name]["unavailable_because"])
