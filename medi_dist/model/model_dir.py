"""One self-describing model directory: weights (safetensors), config, vocabularies, checksums.

    model.safetensors   raw weights            config.json        ModelConfig + format + model id + info
    ema.safetensors     EMA weights (optional) conditioning.json  ConditioningSpec (every vocabulary)
    checksums.json      sha256 of every other file

Loading needs nothing but this directory (no training config, no guessing from paths), never
unpickles anything, and refuses files whose checksum does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..metadata import ConditioningSpec
from .config import ModelConfig
from .ema import EMA
from .unet import ConditionedUNet, unwrap

FORMAT = "medi-dist-model"
FORMAT_VERSION = 1
WEIGHT_FILES = {"raw": "model.safetensors", "ema": "ema.safetensors"}
MODEL_DIR_HINT = "pass the model directory written by medi-dist train (<storage>/<run>/model)"


class ModelDirError(ValueError):
    """A model directory that is missing files, corrupted, or of an unknown format."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def save_model_dir(
    path: str | Path,
    model: nn.Module,
    ema: EMA | None = None,
    *,
    config: ModelConfig | None = None,
    spec: ConditioningSpec | None = None,
    extra_info: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> str:
    """Write the model directory atomically (temp dir + os.replace) and return its model id.

    extra_info (JSON-serialisable: training steps, dataset, run id, `name` ...) lands in config.json.
    """
    path = Path(path)
    base = unwrap(model)
    config = config or base.config
    spec = spec or base.spec
    extra_info = dict(extra_info or {})
    if path.exists() and not overwrite:
        raise FileExistsError(f"model directory {path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_weights(base.state_dict(), tmp / WEIGHT_FILES["raw"])
        if ema is not None:
            _save_weights(ema.averaged_state_dict(base), tmp / WEIGHT_FILES["ema"])
        spec.save(tmp / "conditioning.json")
        weights = [f for f in WEIGHT_FILES.values() if (tmp / f).exists()]
        sums = {f: sha256_file(tmp / f) for f in weights}
        # The id names these exact weights: a short hash of the weight checksums plus a readable name.
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", str(extra_info.get("name", config.preset))).strip("-") or "model"
        digest = hashlib.sha256((name + "".join(sums[f] for f in weights)).encode()).hexdigest()
        model_id = f"{name}-{digest[:12]}"
        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_id": model_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "weights": weights,
            "model": config.to_dict(),
            "info": extra_info,
        }
        (tmp / "config.json").write_text(json.dumps(info, indent=2, default=str))
        sums.update({f: sha256_file(tmp / f) for f in ("config.json", "conditioning.json")})
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=2))
        old = None
        if path.exists():  # os.replace cannot replace a non-empty directory: move the old one aside
            old = path.parent / f"{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_id


def read_model_info(path: str | Path) -> dict[str, Any]:
    """config.json of a model directory (format, model_id, ModelConfig under "model", extra "info")."""
    path = Path(path)
    f = path / "config.json"
    if not f.is_file():
        if (path / "trainer_state.pt").exists() or (path / "state.json").exists():
            raise ModelDirError(f"{path} is a training checkpoint, not a model directory; {MODEL_DIR_HINT}")
        if not path.is_dir():
            raise ModelDirError(f"model directory {path} does not exist; {MODEL_DIR_HINT}")
        raise _incomplete(path, f.name)
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{f} is not valid JSON ({e}); {MODEL_DIR_HINT}") from None
    if info.get("format") != FORMAT or info.get("format_version", 0) > FORMAT_VERSION:
        raise ModelDirError(
            f"{f}: unsupported format {info.get('format')!r} version {info.get('format_version')!r} "
            f"(this code reads {FORMAT!r} up to version {FORMAT_VERSION})"
        )
    return info


def _incomplete(path: Path, name: str) -> ModelDirError:
    return ModelDirError(f"{path} is not a complete model directory ({name} missing); {MODEL_DIR_HINT}")


def verify_checksums(path: str | Path, files: list[str]) -> None:
    path = Path(path)
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        raise ModelDirError(f"{sums_file} is missing; refusing to load unverified weights; {MODEL_DIR_HINT}")
    sums = json.loads(sums_file.read_text())
    for name in files:
        f = path / name
        if not f.is_file():
            raise _incomplete(path, name)
        if name not in sums:
            raise ModelDirError(f"{sums_file} has no checksum for {name}")
        got = sha256_file(f)
        if got != sums[name]:
            raise ModelDirError(
                f"checksum mismatch for {f}: expected sha256 {sums[name][:16]}..., got {got[:16]}... "
                "(file corrupted or modified); copy the model directory again"
            )


def verify_model_dir(path: str | Path, weights_file: str) -> None:
    """What the loader checks (files present, sha256 as recorded), for a driver to run before it starts
    workers: a broken directory is then one line, not a traceback from inside a Ray actor."""
    verify_checksums(path, ["config.json", "conditioning.json", weights_file])


def load_model_dir(
    path: str | Path, weights: str = "auto", device: str | torch.device = "cpu"
) -> tuple[ConditionedUNet, ModelConfig, ConditioningSpec]:
    """Rebuild the model from the directory alone. weights: "ema", "raw", or "auto" (EMA when saved,
    else raw). The returned model is in eval mode and carries `.model_id` and `.weights_kind`."""
    path = Path(path)
    info = read_model_info(path)
    if weights == "auto":
        weights = "ema" if WEIGHT_FILES["ema"] in info["weights"] else "raw"
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be 'ema', 'raw' or 'auto', got {weights!r}")
    wfile = WEIGHT_FILES[weights]
    if wfile not in info["weights"]:
        raise ModelDirError(f"{path} has no {weights} weights ({wfile}); it has {info['weights']}")
    verify_model_dir(path, wfile)
    config = ModelConfig.from_dict(info["model"])
    spec = ConditioningSpec.load(path / "conditioning.json")
    # Build on the meta device and adopt the loaded tensors: no throwaway random init of ~415 M params.
    with torch.device("meta"):
        model = ConditionedUNet(config, spec)
    state = load_file(str(path / wfile), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise ModelDirError(f"{path / wfile} did not provide tensors for {left[:5]}")
    model.model_id = info["model_id"]
    model.weights_kind = weights
    return model.eval(), config, spec
