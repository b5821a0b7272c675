"""Record sinks for the experiment trackers people already keep open: MLflow, TensorBoard, W&B (offline).

Each is an ordinary plugin: ``--sink mlflow:uri=http://127.0.0.1:5000``,
``--sink tensorboard:dir=tb``, ``--sink wandb:project=ftbench``; the
libraries are imported only when a sink is used, so a missing one only makes
that sink unavailable.  What each logs per record (one run per cell and
repeat): the cell and its recipe as parameters, the figures and quality
metrics, the loss and step-time curves per optimizer step, and the record
itself (MLflow: ``record.json`` artifact; TensorBoard: a text summary).
docs/tracking.md has the details.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import ftbench

#: MLflow's client retries a failed request for minutes by default; a sink must fail fast instead.
MLFLOW_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
#: log_batch accepts at most this many metrics, and this many parameters, per call.
MLFLOW_BATCH = 1000
MLFLOW_PARAMS = 100


def _record_key(result_dir: Path, record: dict) -> str:
    # one record of one result set: replaying the set again finds it and does not log it twice
    return f"{result_dir.resolve()}|{record.get('cell_id')}|{record.get('repeat')}|{record.get('started_at')}"


class MlflowSink(ftbench.Sink):
    """One MLflow run per record, through MlflowClient (no global active run)."""

    def start(self, environment):
        for k, v in MLFLOW_RETRY_ENV.items():
            os.environ.setdefault(k, v)
        from mlflow.tracking import MlflowClient  # optional dependency, imported only when used

        uri = self.options.get("uri") or f"sqlite:///{(self.result_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=str(uri))
        name = str(self.options.get("experiment", "ftbench"))
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            local = not str(uri).startswith(("http://", "https://", "databricks"))
            where = (self.result_dir / "mlartifacts").resolve().as_uri() if local else None
            self.experiment = self.client.create_experiment(name, artifact_location=where)
        else:
            self.experiment = exp.experiment_id
        self.commit = environment.get("git_commit") if isinstance(environment, dict) else None

    def record(self, record):
        from mlflow.entities import Metric, Param, RunTag  # optional dependency, imported only when used

        key = _record_key(self.result_dir, record)
        found = self.client.search_runs([self.experiment], filter_string=f"tags.`ftbench.record` = '{key}'",
                                        max_results=1)
        if found:
            return
        tags = {"ftbench.record": key, "ftbench.cell_id": str(record.get("cell_id")),
                "ftbench.status": str(record.get("status")), "ftbench.result_set": str(self.result_dir.resolve())}
        if self.commit:
            tags["ftbench.git_commit"] = str(self.commit)
        run = self.client.create_run(self.experiment, run_name=ftbench.run_name(record), tags=tags)
        rid = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in ftbench.sink_metrics(record).items()]
        for name, values in ftbench.sink_curves(record).items():
            metrics += [Metric(name, v, now, i + 1) for i, v in enumerate(values) if v is not None]
        params = [Param(k, v[:6000]) for k, v in ftbench.sink_params(record).items()]
        self.client.log_batch(rid, metrics=metrics[:MLFLOW_BATCH], params=params[:MLFLOW_PARAMS],
                              tags=[RunTag("ftbench.repeat", str(record.get("repeat")))])
        for i in range(MLFLOW_BATCH, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(rid, metrics=metrics[i:i + MLFLOW_BATCH])
        for i in range(MLFLOW_PARAMS, len(params), MLFLOW_PARAMS):
            self.client.log_batch(rid, params=params[i:i + MLFLOW_PARAMS])
        self.client.log_text(rid, json.dumps(record, indent=1, default=str), "record.json")
        self.client.set_terminated(rid, status="FINISHED" if record.get("status") == "ok" else "FAILED")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


class TensorBoardSink(ftbench.Sink):
    """Event files per record under ``dir`` (default ``OUT/tensorboard``): curves, figures, the record."""

    def start(self, environment):
        from torch.utils.tensorboard import SummaryWriter  # optional dependency (the tensorboard package)

        self.writer_class = SummaryWriter
        self.root = Path(self.options.get("dir") or self.result_dir / "tensorboard")

    def record(self, record):
        logdir = self.root / _safe(ftbench.run_name(record))
        w = self.writer_class(log_dir=str(logdir))
        try:
            curves = ftbench.sink_curves(record)
            for name, values in curves.items():
                for i, v in enumerate(values):
                    if v is not None:
                        w.add_scalar(f"train/{name}", v, i + 1)
            last = max((len(v) for v in curves.values()), default=0)
            for k, v in ftbench.sink_metrics(record).items():
                w.add_scalar(f"result/{k}", v, last)
            w.add_text("record", "```json\n" + json.dumps(record, indent=1, default=str)[:60000] + "\n```", last)
            w.add_text("params", json.dumps(ftbench.sink_params(record), indent=1), last)
        finally:
            w.close()


class WandbSink(ftbench.Sink):
    """Weights & Biases runs in offline mode (sync later with ``wandb sync``); nothing leaves the machine."""

    def start(self, environment):
        import wandb  # optional dependency, imported only when used

        self.wandb = wandb
        self.dir = Path(self.options.get("dir") or self.result_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.project = str(self.options.get("project", "ftbench"))

    def record(self, record):
        run = self.wandb.init(mode="offline", dir=str(self.dir), project=self.project,
                              name=ftbench.run_name(record), config=ftbench.sink_params(record),
                              reinit="create_new", settings=self.wandb.Settings(silent=True))
        try:
            curves = ftbench.sink_curves(record)
            for i in range(max((len(v) for v in curves.values()), default=0)):
                row = {f"train/{k}": v[i] for k, v in curves.items() if i < len(v) and v[i] is not None}
                if row:
                    run.log(row, step=i + 1)
            run.summary.update(ftbench.sink_metrics(record))
        finally:
            run.finish(exit_code=0 if record.get("status") == "ok" else 1)


@ftbench.hookimpl
def register_sinks(register):
    register(ftbench.SinkSpec(
        "mlflow", MlflowSink, requires=("mlflow",), install="pip install 'ftbench[tracking]'",
        description="one MLflow run per record: recipe as parameters, curves and figures as metrics, the record "
                    "as an artifact",
        options={"uri": "tracking URI, e.g. http://127.0.0.1:5000 (default: a SQLite store in OUT)",
                 "experiment": "experiment name (default ftbench)"}))
    register(ftbench.SinkSpec(
        "tensorboard", TensorBoardSink, requires=("tensorboard",), install="pip install 'ftbench[tracking]'",
        description="TensorBoard event files per record: loss and step-time curves, figures, the record as text",
        options={"dir": "log directory (default OUT/tensorboard)"}))
    register(ftbench.SinkSpec(
        "wandb", WandbSink, requires=("wandb",), install="pip install 'ftbench[tracking]'",
        description="Weights & Biases runs in offline mode (wandb sync uploads them later)",
        options={"dir": "where the offline runs go (default OUT)", "project": "project name (default ftbench)"}))
