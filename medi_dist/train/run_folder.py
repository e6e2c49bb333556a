"""The run folder <storage_path>/<run.name>: Ray Train's checkpoint_* folders and snapshot, plus
medi-dist-run.json, which records what the run trains (a re-run with other settings is refused),
its steps target, its MLflow run and, once finished, the final step and model directory."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import asdict

from ..paths import absolute, is_uri
from ..storage import filesystem
from ..tracking import flatten
from .config import TrainConfig

log = logging.getLogger("medi_dist.train")

RUN_FILE = "medi-dist-run.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of registered checkpoints

# Settings that may change between starts of one run: where and how it runs, not what it learns.
# - run.*: workers, CPUs, threads, log/sample/checkpoint frequencies, stop_after, tracking, output.
#   use_gpu / mixed_precision / channels_last / compile too: moving a preempted run between GPU and
#   CPU is a supported resume (the loop re-seeds generators across device types), and precision
#   changes rounding, not the objective. num_workers scales elastically (the global batch is
#   optim.batch_size x run.num_workers).
# - data.cpus_per_decode: a resource slice; data.max_bad_fraction: an abort threshold one raises to
#   get past a few bad tiles; optim.fused: the same AdamW in another kernel; data.deterministic:
#   the same data distribution, only reproducible or not; data.decode: where the tiles are decoded
#   (read tasks or the GPU), the same tiles up to the resize's rounding.
# `steps` is checked on its own: it may be raised (continue training), never lowered.
RUN_ONLY_PREFIXES = ("run.",)
RUN_ONLY_FIELDS = (
    "data.cpus_per_decode",
    "data.max_bad_fraction",
    "data.deterministic",
    "data.decode",
    "optim.fused",
    "steps",
)


def training_fields(cfg: TrainConfig) -> dict:
    """The whole config, flattened (data.dataset, optim.lr, ...) and JSON-normal (tuples -> lists).
    The dataset is recorded absolute: `data/x` and `/work/data/x` are the same training."""
    fields = json.loads(json.dumps(flatten(asdict(cfg))))
    fields["data.dataset"] = absolute(fields["data.dataset"])
    return fields


def is_run_only(key: str) -> bool:
    return key.startswith(RUN_ONLY_PREFIXES) or key in RUN_ONLY_FIELDS


class RunFolder:
    """<storage>/<name> on a local disk or object storage (pyarrow filesystems, as Ray Train uses)."""

    def __init__(self, storage: str, name: str):
        import pyarrow.fs as pafs

        self._pafs = pafs
        # the filesystem every medi-dist reader uses (a gs:// emulator, an S3 endpoint), given to Ray
        # Train too (trainer.py): checkpoints and this record live in the same place
        self.fs, root = filesystem(storage) if is_uri(storage) else (pafs.LocalFileSystem(), storage)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{name}"
        self.display = f"{storage.rstrip('/')}/{name}"

    def _file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def read_json(self, name: str) -> dict | None:
        """None when missing or unreadable (a snapshot cut short by a kill)."""
        if self.fs.get_file_info(self._file(name)).type == self._pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(self._file(name)) as f:
                data = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, name: str, data: dict) -> None:
        self.fs.create_dir(self.path, recursive=True)
        tmp = self._file(f"{name}.tmp-{uuid.uuid4().hex[:8]}")  # unique: two drivers may write at once
        with self.fs.open_output_stream(tmp) as f:  # then renamed: never a half-written record
            f.write(json.dumps(data, indent=1).encode())
        self.fs.move(tmp, self._file(name))

    def checkpoint_dirs(self) -> list[str]:
        # from a recursive listing: a GCS emulator lists no "directories" (prefixes) one level down
        sel = self._pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        n = len(self.path.rstrip("/")) + 1
        tops = {
            i.path[n:].split("/", 1)[0]
            for i in self.fs.get_file_info(sel)
            if "/" in i.path[n:] or i.type == self._pafs.FileType.Directory
        }
        return sorted(t for t in tops if t.startswith("checkpoint_"))

    def remove_file(self, name: str) -> None:
        self.fs.delete_file(self._file(name))

    def remove_dir(self, name: str) -> None:
        self.fs.delete_dir(self._file(name))


def registered(snapshot: dict) -> set[str]:
    """Checkpoint folder names Ray Train's snapshot lists (kept, pending validation, or latest)."""
    results = [
        *snapshot.get("checkpoint_results", []),
        *snapshot.get("pending_training_results", []),
        snapshot.get("latest_checkpoint_result") or {},
    ]
    return {r["checkpoint_dir_name"] for r in results if isinstance(r, dict) and r.get("checkpoint_dir_name")}


def registered_step(folder: RunFolder) -> int | None:
    """The step of the checkpoint a re-run resumes from (None: none registered)."""
    snap = folder.read_json(SNAPSHOT) or {}
    metrics = (snap.get("latest_checkpoint_result") or {}).get("metrics") or {}
    return metrics.get("step")


def remove_unregistered(folder: RunFolder) -> list[str]:
    """checkpoint_* folders the snapshot does not list were written but never registered (driver
    interrupted or killed mid-report): Ray never resumes from them nor deletes them. Only with a
    readable snapshot; listed folders are never touched."""
    snap = folder.read_json(SNAPSHOT)
    if snap is None or "checkpoint_results" not in snap:
        return []
    keep = registered(snap)
    orphans = [d for d in folder.checkpoint_dirs() if d not in keep]
    for d in orphans:
        folder.remove_dir(d)
    if orphans:
        log.warning(
            "removed %d checkpoint folder(s) of run %s that were never registered (interrupted while saving): %s",
            len(orphans),
            folder.display,
            ", ".join(orphans),
        )
    return orphans


def training_changes(before: dict, now: dict) -> list[str]:
    """`field old -> new` for every setting that changes what is trained."""
    keys = sorted(k for k in set(before) | set(now) if not is_run_only(k))
    return [f"{k} {json.dumps(before.get(k))} -> {json.dumps(now.get(k))}" for k in keys if before.get(k) != now.get(k)]


def check_same_training(folder: RunFolder, name: str, record: dict, cfg: TrainConfig) -> None:
    """A run name stands for one training: data, model, optimizer and seed must not change, and steps
    may only go up (the LR schedule and everything logged so far belong to the first settings)."""
    before = record.get("config")
    if before is None:  # a record from before settings were recorded: nothing to compare
        return
    now = training_fields(cfg)
    changed = training_changes(before, now)
    if cfg.steps < before["steps"] and not finished_at(record, cfg.steps):
        changed.append(f"steps {before['steps']} -> {cfg.steps} (steps can only be raised)")
    if changed:
        raise ValueError(
            f"run.name={name!r} was started with other training settings: {'; '.join(changed)}; "
            f"use a new run.name (or delete {folder.display} to start over)"
        )


def finished_at(record: dict, steps: int) -> dict | None:
    """The finished record ({step, model_dir}) when the run already reached `steps`."""
    fin = record.get("finished")
    return fin if fin and steps <= fin["step"] else None
