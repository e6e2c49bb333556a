"""MLflow store basics: the default store (a sqlite file in the working directory, artifacts beside
it), the experiment, runs found by their name tag, parent runs, UI links, and which errors mean the
server is down. Each call here is one try; run_logger retries them.

Workers log through `MlflowClient` with an explicit run id, so only rank 0 writes and a resumed job
keeps writing into the same MLflow run. `MLFLOW_TRACKING_URI` points everything at a server.

A user-level job is one parent run (current_parent): `tracking.job()` (the demo) makes every run
created inside its block a child; `MEDI_DIST_PARENT_RUN=NAME` (or `--parent-run NAME`) does the same
across separate commands (train, generate, evaluate), the parent running from its first stage's
start to its last stage's end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# MLflow's client retries a refused connection itself for about 4 minutes (7 tries, backoff up to
# 120 s) before a call returns; our retries (retrying, RunLogger) bound the waits, so MLflow's own
# are kept short (about 5 s) unless the user set them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

DEFAULT_EXPERIMENT = "medi-dist"
SPILL_DIR = "mlflow-spill"  # where calls the server did not take wait (upload_spills delivers them)
RUN_NAME_TAG = "medi_dist.run_name"
KIND_TAG = "medi_dist.kind"
PARENT_TAG = "mlflow.parentRunId"
PARENT_ENV = "MEDI_DIST_PARENT_RUN"  # name of a user-level job run that the runs of this process join
# The experiment's kind as MLflow records it: "Model training" (server JS: CUSTOM_MODEL_DEVELOPMENT).
# MLflow 3.17.2's UI stores it but picks its mode from the browser or ?workflowType= (see ui_link).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# MLflow error codes of a server that is down, restarting or overloaded (retried; others are the caller's)
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
# The RunLogger of the tracking.job() block this process is in (set by job(); its run made later if
# the server was down). Read as mlflow_store._job_parent, never imported by name: job() replaces it.
_job_parent: Any = None


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
    if exp is None:
        return c.create_experiment(
            name, artifact_location=artifact_root(c.tracking_uri), tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before this tag (or by someone else): a user's choice stays
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def _find_or_create_run(uri, run_name, experiment, tags, parent_run_id, key) -> str:
    c = client(uri)
    exp = experiment_id(c, experiment)
    if parent_run_id is None:
        parent_run_id = current_parent(uri, experiment)
    key = key or run_name
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        if parent_run_id and parent_run_id != run_id and found[0].data.tags.get(PARENT_TAG) != parent_run_id:
            c.set_tag(run_id, PARENT_TAG, parent_run_id)
        return run_id
    return new_run(c, exp, run_name, {RUN_NAME_TAG: key, **(tags or {})}, parent_run_id)


def new_run(c, exp: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """A run with MLflow's context tags (user, source command, git commit), as the fluent API sets them."""
    from mlflow.tracking.context.registry import resolve_tags

    if parent_run_id:
        tags = {**tags, PARENT_TAG: parent_run_id}
    return c.create_run(exp, run_name=run_name, tags=resolve_tags(tags)).info.run_id


def ui_link(uri: str, run_id: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """A UI address that opens in "Model training" mode: MLflow 3.17's UI takes the mode from the
    browser (its GenAI | Model training switch, GenAI until switched) or this URL parameter, not
    from the experiment tag."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"  # `mlflow ui` on a local store
    try:
        exp = client(uri).get_experiment_by_name(experiment)
    except Exception as e:  # a server that is down: the link without the experiment's id, not an error
        if not transient(e):
            raise
        exp = None
    where = f"/runs/{run_id}" if run_id else ""
    return f"{base}/#/experiments/{exp.experiment_id if exp else 0}{where}?workflowType=machine_learning"


def current_parent(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The run id of the job this process works for: a `job()` block's (made now if the server was
    down when the block began), else the run named by $MEDI_DIST_PARENT_RUN (created by the first
    stage, set RUNNING again by each later one)."""
    if _job_parent is not None:
        return _job_parent.make_run()
    name = os.environ.get(PARENT_ENV)
    if not name:
        return None
    c = client(uri)
    exp = experiment_id(c, experiment)
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = 'job/{name}'", max_results=1)
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    return new_run(c, exp, name, {RUN_NAME_TAG: f"job/{name}", KIND_TAG: "job"})


def transient(e: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in TRANSIENT_CODES
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or type(e).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy")
    )


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
