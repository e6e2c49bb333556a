"""MLflow: the default store (a sqlite file in the working directory), run lookup by name, artifacts.

Workers log through `MlflowClient` with an explicit run id, so only rank 0 writes and a resumed job
keeps writing into the same MLflow run. `MLFLOW_TRACKING_URI` points everything at a server.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "medi-dist"
RUN_NAME_TAG = "medi_dist.run_name"


def tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else ./mlflow.db as an absolute sqlite URI (workers
    may run in another directory)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # workers run in other folders
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def artifact_root(uri: str) -> str | None:
    """With a local sqlite store, keep artifacts beside it (absolute, so every process agrees)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None  # a server decides


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def experiment_id(c, name: str = DEFAULT_EXPERIMENT) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_root(c.tracking_uri))


def find_or_create_run(
    uri: str,
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    key: str | None = None,
) -> str:
    """The run tagged with `key` (default: the run name), so a resumed job keeps its run, or a new one."""
    c = client(uri)
    exp = experiment_id(c, experiment)
    key = key or run_name
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {RUN_NAME_TAG: key, **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return c.create_run(exp, run_name=run_name, tags=tags).info.run_id


class RunLogger:
    """Thin wrapper over one MLflow run; safe to pickle into Ray workers (client made lazily)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self._c = uri, run_id, None

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id, "_c": None}

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.c.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(new), 100):
            self.c.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self.c.log_batch(self.run_id, metrics=batch)

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.c.set_tag(self.run_id, k, str(v))

    def artifact_bytes(self, data: bytes, name: str, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_bytes(data)
            self.c.log_artifact(self.run_id, str(p), folder)

    def figure(self, fig, name: str, folder: str | None = None) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        self.artifact_bytes(buf.getvalue(), name, folder)

    def status(self, status: str) -> None:
        self.c.update_run(self.run_id, status=status)

    def finish(self, status: str = "FINISHED") -> None:
        self.c.set_terminated(self.run_id, status)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
