"""Model directories in MLflow: logged as a pyfunc (pyfunc_model.py, stored as code, not pickled) with
the directory as its artifact, registered in the Model Registry, and resolved back to a local,
checksum-verified directory from `models:/NAME/VERSION` or `runs:/RUN_ID/PATH`.

The MLflow model is an MLflow 3 logged model (as `mlflow.pyfunc.log_model` makes it): made by its
training run, an output of that run and of the run's parent (the demo, a named job), so each run
page lists the model and its registered versions."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from .model.model_dir import ModelDirError, read_model_info, verify_checksums
from .tracking import PARENT_TAG, RunLogger, client

MODEL_ARTIFACT = "medi_model"  # the MLflow model's path in its run
MODEL_ID_TAG = "medi_dist.model_id"  # the model directory's id (model_info.json), on run, logged model, version
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a logged model's registered versions, as the UI reads them
MODEL_URI_SCHEMES = ("models:/", "runs:/")
DEFAULT_CACHE = "medi-dist-cache/models"


def log_model_dir(log: RunLogger, model_dir: str | Path, registered_name: str | None = None) -> str | None:
    """Log `model_dir` (a local folder) as an MLflow pyfunc under the run; register it as
    `registered_name` (returns the new version) when given. Upload and registration go through the
    run's retrying sender: a server that is briefly down delays them (up to run_logger.FINAL_WAIT_S,
    then TrackingUnavailable); a registration retried after a lost answer does not add a version."""
    import mlflow.pyfunc

    from . import pyfunc_model
    from .metadata import ConditioningSpec

    info = read_model_info(model_dir)
    spec = ConditioningSpec.load(Path(model_dir) / "conditioning.json")
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")  # predict samples: slow
        local = Path(d) / MODEL_ARTIFACT
        # pip_requirements given: MLflow would otherwise load the model to infer them
        mlflow.pyfunc.save_model(
            str(local),
            python_model=pyfunc_model.__file__,
            artifacts={pyfunc_model.MODEL_DIR_ARTIFACT: str(model_dir)},
            pip_requirements=_requirements(),
            signature=pyfunc_model.signature(spec),
            metadata={
                "medi_dist_model_id": info["model_id"],
                "weights": info["weights"],
            },
        )
        # waits for the upload: the folder goes with this block
        model_id = log.call(
            "the MLflow model upload",
            lambda c: _upload(c, log.run_id, local, info["model_id"]),
        )
    log.tags({MODEL_ID_TAG: info["model_id"]})
    if not registered_name:
        return None
    version = log.call(
        f"registering the model as {registered_name!r}",
        lambda c: _register(c, registered_name, log.run_id, model_id, info["model_id"]),
    )
    log.tags({"medi_dist.registered_model": f"{registered_name}/{version}"})
    return version


def _logged_models(c, run_id: str, name: str = MODEL_ARTIFACT) -> list:
    """The logged models named `name` that run `run_id` made."""
    exp = c.get_run(run_id).info.experiment_id
    return list(c.search_logged_models([exp], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'"))


def _upload(c, run_id: str, local: Path, medi_id: str) -> str:
    """The logged model of this run holding the model directory `medi_id`: found (a retry after a
    lost answer, or a re-run) or created, its files uploaded and it marked READY; linked to the run
    and its parent. Returns its MLflow model id."""
    mine = [m for m in _logged_models(c, run_id) if m.tags.get(MODEL_ID_TAG) == medi_id]
    exp = c.get_run(run_id).info.experiment_id
    model = mine[0] if mine else c.create_logged_model(exp, MODEL_ARTIFACT, run_id, tags={MODEL_ID_TAG: medi_id})
    if str(model.status) != "READY":  # new, or an upload cut short: (again) whole
        c.log_model_artifacts(model.model_id, str(local))
        c.finalize_logged_model(model.model_id, "READY")
    link_model(c, run_id, model.model_id)
    return model.model_id


def link_model(c, run_id: str, model_id: str) -> None:
    """The logged model as an output of run `run_id` and of its parent run, if any (once each)."""
    from mlflow.entities import LoggedModelOutput

    run = c.get_run(run_id)
    for rid in (run_id, run.data.tags.get(PARENT_TAG)):
        outputs = rid and c.get_run(rid).outputs
        if rid and model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
            c.log_outputs(rid, [LoggedModelOutput(model_id, 0)])


def link_run_models(uri: str, run_id: str | None) -> None:
    """Link the models run `run_id` made to its (new) parent run: a demo that reuses an earlier
    demo's finished training."""
    if run_id:
        c = client(uri)
        for m in _logged_models(c, run_id):
            link_model(c, run_id, m.model_id)


def _register(c, name: str, run_id: str, model_id: str, medi_id: str) -> str:
    """The version of registered model `name` made from this run's logged model: found (a retry
    after the server made it but its answer was lost) or created."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = [
        v
        for v in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if v.tags.get(MODEL_ID_TAG) == medi_id
    ]
    if found:
        version = found[0].version
    else:  # the source is the logged model's files (a models:/ source needs the global tracking URI)
        source = c.get_logged_model(model_id).artifact_location
        tags = {MODEL_ID_TAG: medi_id}
        version = c.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model_id).version
    # the run pages list a logged model's versions from this tag: a server sets it, a local store does not
    versions = json.loads(c.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
    if not any(v.get("name") == name and str(v.get("version")) == str(version) for v in versions):
        versions.append({"name": name, "version": str(version)})
        c.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
    return version


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "diffusers", "safetensors", "pandas", "Pillow", "medi-dist"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def is_model_uri(model: str) -> bool:
    return str(model).startswith(MODEL_URI_SCHEMES)


def resolve_model(model: str, cache_dir: str | Path = DEFAULT_CACHE, tracking_uri: str | None = None) -> str:
    """A model directory path for `model`: a path as is; `models:/NAME/VERSION` or `runs:/RUN_ID/PATH`
    (an MLflow model logged by medi-dist, or a plain model directory artifact) downloaded once into
    `cache_dir` and checked against its checksums.json, as the loader checks it."""
    if not is_model_uri(model):
        return model
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from .tracking import tracking_uri as default_uri

    uri = tracking_uri or default_uri()
    dest = Path(cache_dir) / (
        re.sub(r"[^A-Za-z0-9._-]+", "_", model.split(":/", 1)[1]).strip("_")[:80]
        + "-"
        + hashlib.sha256(f"{uri} {model}".encode()).hexdigest()[:8]
    )
    if not (dest / "done").exists():  # a finished download; a broken one is fetched again
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=_artifact_uri(model, uri),
                dst_path=str(dest / "files"),
                tracking_uri=uri,
            )
        except MlflowException as e:
            shutil.rmtree(dest, ignore_errors=True)
            raise ModelDirError(
                f"--model {model}: {str(e).splitlines()[0]} (tracking URI {uri}); check the name and "
                "version (the Models page of the MLflow UI) or set MLFLOW_TRACKING_URI"
            ) from None
        (dest / "done").touch()
    found = [p.parent for p in sorted((dest / "files").rglob("checksums.json"))]
    if len(found) != 1:
        raise ModelDirError(
            f"--model {model} holds {len(found)} medi-dist model directories (checksums.json), "
            f"expected one; pass a runs:/RUN_ID/PATH that names one model"
        )
    info = read_model_info(found[0])
    verify_checksums(found[0], ["config.json", "conditioning.json", *info["weights"]])
    return str(found[0])


def _artifact_uri(model: str, uri: str) -> str:
    """models:/NAME/VERSION (or NAME/latest, NAME@ALIAS) and runs:/RUN_ID/NAME of a logged model -> where
    its files are, asked of the tracking server and registry at `uri` (MLflow would ask the default
    ones); other runs:/ URIs (a run's artifacts) resolve through `uri` already."""
    c = client(uri)
    if model.startswith("runs:/"):
        run_id, _, path = model[len("runs:/") :].partition("/")
        name, _, rest = path.strip("/").partition("/")
        found = _logged_models(c, run_id, name) if name else []
        return f"{found[0].artifact_location.rstrip('/')}/{rest}".rstrip("/") if found else model
    ref = model[len("models:/") :].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = c.get_model_version_by_alias(name, alias).version
    else:
        name, _, version = ref.rpartition("/")
        if not name:
            raise ModelDirError(
                f"--model {model}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"
            )
        if version == "latest":
            versions = c.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelDirError(f"--model {model}: registered model {name!r} has no versions (tracking URI {uri})")
            version = str(max(int(v.version) for v in versions))
    return c.get_model_version_download_uri(name, version)
