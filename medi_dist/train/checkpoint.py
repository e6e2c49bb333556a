"""Training-state checkpoints: weights as safetensors, optimizer/scheduler/RNG state loaded with
`weights_only=True`, and sha256 checksums checked before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..model.model_dir import sha256_file

STATE = "state.json"
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: Path, model_state: dict, ema_state: dict, trainer_state: dict, info: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(path / "model.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, str(path / "ema.safetensors"))
    torch.save(trainer_state, path / "trainer_state.pt")
    (path / STATE).write_text(json.dumps(info, indent=2))
    files = ["model.safetensors", "ema.safetensors", "trainer_state.pt", STATE]
    (path / CHECKSUMS).write_text(json.dumps({f: sha256_file(path / f) for f in files}, indent=2))


def load_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(model_state, ema_state, trainer_state, info); refuses a file whose checksum does not match."""
    sums_file = path / CHECKSUMS
    if not sums_file.exists():
        raise CheckpointError(f"checkpoint {path} has no {CHECKSUMS}; it was not written completely")
    for name, digest in json.loads(sums_file.read_text()).items():
        f = path / name
        if not f.exists() or sha256_file(f) != digest:
            raise CheckpointError(
                f"checkpoint file {f} is missing or fails its sha256 check; "
                "delete this checkpoint folder to resume from an earlier one"
            )
    try:
        trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickled code
        raise CheckpointError(
            f"checkpoint file {path / 'trainer_state.pt'} is not a plain tensor state "
            f"(weights_only load refused: {type(e).__name__}); refusing to load it"
        ) from None
    return (
        load_file(str(path / "model.safetensors")),
        load_file(str(path / "ema.safetensors")),
        trainer_state,
        json.loads((path / STATE).read_text()),
    )
