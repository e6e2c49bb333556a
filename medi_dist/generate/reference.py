"""Reference pools made without a generative model, in the same plan and pool format as a generator's:

- ``oracle``: ground truth. On a procedural dataset the renderer can draw any (type, site) pair, so
  this is what a perfect MeDi generator would return for the plan (the ceiling of every table).
  Refused for any other dataset: real data has no renderer.
- ``noise``: a control. Smoothed noise in the colours of the requested site (per-channel optical
  density mean and spread of its real training tiles), labelled with the requested type. It carries
  stain colour and labels but no morphology: an arm must beat it before its gain is about the tiles.

Tiles are a function of (dataset, plan, tile seed) only, like a generator's, and go through the same
shard writer, resume and dataset files (generate/job.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from ..data.shards import VOCAB, load_manifest
from ..metadata import ConditioningSpec
from .plan import PlanError, SITE, TYPE
from .writer import SamplingSettings, ShardGenerator

KINDS = ("oracle", "noise")


def check_reference(kind: str, dataset: str | Path) -> dict:
    """The dataset's manifest, after refusing what cannot work (message says what to use instead)."""
    if kind not in KINDS:
        raise PlanError(f"reference pool must be one of {KINDS}, got {kind!r}")
    manifest = load_manifest(dataset)
    if manifest.get("synthetic"):
        raise PlanError(f"{dataset} is a synthetic pool; the {kind} pool is made from the real dataset it imitates")
    if kind == "oracle" and manifest.get("source") != "procedural":
        raise PlanError(f"an oracle pool renders ground truth with the procedural renderer, but {dataset} was "
                        f"ingested from {manifest.get('source')!r} data, which has no renderer; use --reference "
                        "noise for a control, or a generator model (--model)")
    return manifest


def reference_spec(dataset: str | Path) -> ConditioningSpec:
    """Pools are planned over (type, site) only: other columns are not rendered."""
    return ConditioningSpec.load(Path(dataset) / VOCAB).subset([TYPE, SITE])


def tile_size(dataset: str | Path) -> int:
    from ..evaluate.fidelity_job import read_tiles

    return int(read_tiles(dataset, ["train"], None, limit=1)[0].shape[1])


def site_colours(dataset: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per training site: optical-density mean and standard deviation per RGB channel."""
    from ..evaluate.fidelity_job import read_tiles

    images, index = read_tiles(dataset, ["train"], None)
    od = -np.log((images.reshape(len(images), -1, 3).astype(np.float64) + 1) / 256)
    out = {}
    for site, rows in index.groupby(SITE).indices.items():
        px = od[rows].reshape(-1, 3)
        out[str(site)] = (px.mean(0), px.std(0))
    return out


class ReferenceGenerator(ShardGenerator):
    """`ShardGenerator` whose tiles come from the renderer (oracle) or coloured noise (noise)."""

    def __init__(self, kind: str, dataset: str | Path, out_dir: str | Path):
        self.kind, self.out = kind, Path(out_dir)
        self.s = SamplingSettings(sampler=kind, steps=0)
        self.size = tile_size(dataset)
        self.colours = site_colours(dataset) if kind == "noise" else {}

    def sample_tiles(self, tiles: list[dict]) -> np.ndarray:
        from ..data.procedural import render_jpeg

        out = np.empty((len(tiles), self.size, self.size, 3), np.uint8)
        for i, t in enumerate(tiles):
            rng = np.random.default_rng(t["seed"])
            c = t["conditions"]
            if self.kind == "oracle":
                with Image.open(io.BytesIO(render_jpeg(c[TYPE], c[SITE], rng, self.size))) as im:
                    out[i] = np.asarray(im.convert("RGB"))
            else:
                mean, std = self.colours[c[SITE]]
                z = gaussian_filter(rng.standard_normal((self.size, self.size, 3)), (1, 1, 0))
                od = mean + std * z / (z.std(axis=(0, 1)) + 1e-6)
                out[i] = np.clip(256 * np.exp(-od) - 1 + 0.5, 0, 255).astype(np.uint8)
        return out
