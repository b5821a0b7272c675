"""Record sinks: a real MLflow tracking server, TensorBoard event files read back with TensorBoard's
own reader, W&B offline runs, and sinks that fail without costing a record."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ftbench

TINY = ["--task", "generation", "--task", "classification", "--backend", "eager", "--steps", "6", "--warmup", "2",
        "--batch-size", "4", "--seq-len", "32", "--eval-examples", "8"]
#: A fresh MLflow server migrates its database first: on 2 busy cores that took 30 s.
SERVER_START_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def result_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sinks") / "run"
    proc = ftbench("run", *TINY, "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


class MlflowServer:
    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        exe = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.log = open(self.root / "server.log", "w")
        self.proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{self.root / 'm.db'}",
                                      "--artifacts-destination", str(self.root / "artifacts"),
                                      "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + SERVER_START_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.skip(f"mlflow server exited {self.proc.returncode}: {(self.root / 'server.log').read_text()[-500:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        self.stop()
        pytest.skip(f"mlflow server did not answer on {self.uri} within {SERVER_START_S} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow", reason="the mlflow package is not installed (pip install 'ftbench[tracking]')")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ftbench")
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def test_replay_into_a_real_mlflow_server(result_set, mlflow_server):
    proc = ftbench("sink", result_set, "--to", f"mlflow:uri={mlflow_server.uri}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (result_set / "results.jsonl").read_text().splitlines()]
    client, runs = _runs(mlflow_server.uri)
    assert len(runs) == len(records) == 2
    by_cell = {r.data.tags["ftbench.cell_id"]: r for r in runs}
    for rec in records:
        run = by_cell[rec["cell_id"]]
        assert run.data.params["task"] == rec["task"] and run.data.params["recipe.lr"] == str(rec["config"]["recipe"]["lr"])
        assert run.data.metrics["tokens_per_s"] == pytest.approx(rec["tokens_per_s"])
        loss = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.value for m in sorted(loss, key=lambda m: m.step)] == pytest.approx(rec["train_loss"])
        assert len(client.get_metric_history(run.info.run_id, "step_times_s")) == len(rec["step_times_s"])
        art = client.download_artifacts(run.info.run_id, "record.json", str(result_set.parent / run.info.run_id))
        assert json.loads(Path(art).read_text())["cell_id"] == rec["cell_id"]
    # replaying the same set again does not log its records twice
    assert ftbench("sink", result_set, "--to", f"mlflow:uri={mlflow_server.uri}").returncode == 0
    assert len(_runs(mlflow_server.uri)[1]) == 2


def test_tensorboard_files_read_back_with_tensorboards_reader(result_set, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc = ftbench("sink", result_set, "--to", f"tensorboard:dir={tmp_path / 'tb'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = {r["task"]: r for r in map(json.loads, (result_set / "results.jsonl").read_text().splitlines())}
    dirs = sorted((tmp_path / "tb").iterdir())
    assert len(dirs) == 2
    for d in dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        rec = records["generation" if d.name.startswith("generation") else "classification"]
        loss = [e.value for e in acc.Scalars("train/train_loss")]
        assert loss == pytest.approx(rec["train_loss"], rel=1e-6)
        assert acc.Scalars("result/peak_memory_bytes")[0].value == pytest.approx(rec["peak_memory_bytes"], rel=1e-6)
        assert "record" in " ".join(acc.Tags()["tensors"])


@pytest.mark.slow
def test_wandb_offline_runs(result_set, tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    proc = ftbench("sink", result_set, "--to", f"wandb:dir={tmp_path / 'w'}", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = sorted((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    for run in runs:
        (log,) = run.glob("*.wandb")  # the offline run's own log, which `wandb sync` uploads
        data = log.read_bytes()
        assert b"train/train_loss" in data and b"tokens_per_s" in data and b"recipe.lr" in data


def test_a_sink_that_fails_is_reported_once_and_the_replay_says_so(result_set):
    port = _free_port()  # nothing listens here
    proc = ftbench("sink", result_set, "--to", f"mlflow:uri=http://127.0.0.1:{port}", "--to", "tensorboard")
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert out.count("sink mlflow:") == 1 and "replay them later" in out
    assert "tensorboard: 2 of 2 record(s) (ok)" in out


def test_an_unknown_sink_or_option_is_refused(result_set):
    proc = ftbench("sink", result_set, "--to", "mlflw")
    assert proc.returncode == 2 and "Did you mean 'mlflow'" in proc.stdout + proc.stderr
    proc = ftbench("sink", result_set, "--to", "tensorboard:path=x")
    assert proc.returncode == 2 and "unknown option 'path'" in proc.stdout + proc.stderr


def test_a_tracking_server_stopped_mid_grid_costs_no_record_and_is_reported_once(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow package is not installed (pip install 'ftbench[tracking]')")
    server = MlflowServer(tmp_path)
    server.start()
    out = tmp_path / "run"
    env = {**os.environ, "FTBENCH_CACHE": os.environ.get("FTBENCH_CACHE", str(tmp_path / "cache"))}
    proc = subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "run", *TINY, "--sink",
                             f"mlflow:uri={server.uri}", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if (out / "results.jsonl").exists() and (out / "results.jsonl").read_text().count("\n") >= 1:
                break
            time.sleep(0.2)
    finally:
        server.stop()  # the tracking server goes away after the first cell
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output  # the grid's exit status does not depend on a sink
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs)
    assert output.count("sink mlflow:") == 1 and "replay them later" in output, output
