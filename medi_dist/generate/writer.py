"""One shard of synthetic tiles: sample it, write it atomically, verify it, and assemble the dataset.

Plain PyTorch and files, no Ray: job.py runs `ShardGenerator` inside Ray Data actors, tests and
benchmarks can call it directly. A shard is written under a temporary name and renamed when
complete, so a shard file that exists was written whole; `read_shard` still checks that it holds
exactly the planned tiles of this plan (a re-run with another plan must not adopt it).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.shards import SHARD_DIR, check_image, sha256, write_tar_atomic
from ..metadata import UNKNOWN, SchemaError
from .tile_list import task_tiles

SITE = "tissue_source_site"  # a required tile column: `Unknown` for a model not conditioned on it
COMPOSITIONS = ("joint", "owner-site", "stain")
SPLIT = "train"  # synthetic tiles are training material: the stream reads split "train" by default


@dataclass
class SamplingSettings:
    sampler: str = "dpmsolver++"
    steps: int = 25
    guidance: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guided where lo <= t / T <= hi (model.sampling)
    weights: str = "ema"  # ema | raw | auto
    batch_size: int = 32  # tiles per denoiser call (GPU memory bound)
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast)
    compile: bool = False  # torch.compile the denoiser (GPU)
    # joint: eps(type, site) as trained. owner-site: eps(type, no site) + scale * (eps(owner, site) -
    # eps(owner, no site)), the site's stain taken at the type that owns the site, where the model saw it.
    # stain: the type drawn at one of its own training sites, moved to the requested site by the sites'
    # estimated stains (data/site_stains.py): the network only draws pairs it was trained on
    composition: str = "joint"
    composition_scale: float = 1.0
    # stain composition: the network's draws per training site that measure its concentrations there, which
    # are then mapped onto the site's real ones (data/site_stains.py `calibrated`); 0: not calibrated. Off by
    # default: closer stains at every pair, but in the demo's world the classifiers gained less (RESULTS.md
    # "Calibrated draws")
    calibration_tiles: int = 0


def shard_path(index: int) -> str:
    return f"{SHARD_DIR}/{SPLIT}/shard-{index:06d}.tar"


def _own_site(own: dict[str, list[str]], conditions: dict, tile: dict, stains=None) -> str:
    """The requested site where the type was trained there, else one of the type's training sites:
    where a stain-composed tile is drawn. With the sites' stains (`SiteStains`), the one nearest the
    requested site in stain direction; without, one chosen by the tile's seed."""
    sites, want = own[conditions["cancer_type"]], conditions.get(SITE)
    if want in sites:
        return want
    if stains is not None and want in stains.stains and all(d in stains.stains for d in sites):
        return stains.nearest(want, sites)
    return sites[tile["seed"] % len(sites)]


def png_bytes(tile: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="PNG")  # lossless: the tile is stored exactly as sampled
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes, dict]]) -> None:
    """(key, png, meta) -> tar sorted by key; temp name + fsync + rename."""
    write_tar_atomic(
        path,
        [
            m
            for key, png, meta in sorted(members, key=lambda m: m[0])
            for m in ((f"{key}.png", png), (f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
        ],
    )


def read_shard(path: Path, task: dict, decode: bool = True) -> list[dict]:
    """Index rows of a complete shard; SchemaError if it lacks, adds or alters a planned tile."""
    want = {t["key"]: t for t in task_tiles(task)}
    try:
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SchemaError(f"shard {path} is unreadable ({e})") from None
    expected = {f"{k}.{ext}" for k in want for ext in ("png", "json")}
    if set(files) != expected:
        raise SchemaError(f"shard {path} holds {len(files)} members, not the {len(expected)} planned ones")
    rows = []
    for key, tile in sorted(want.items()):
        meta, png = json.loads(files[f"{key}.json"]), files[f"{key}.png"]
        if meta.get("generation") != task["generation"] or meta.get("seed") != tile["seed"]:
            raise SchemaError(f"shard {path}: tile {key} was made by another plan ({meta.get('generation')})")
        if decode:
            check_image(png)
        rows.append({**meta, "shard": task["path"], "image_format": "png", "sha256": sha256(png)})
    return rows


def shard_complete(root: Path, task: dict) -> bool:
    p = root / task["path"]
    if not p.exists():
        return False
    try:
        read_shard(p, task)
        return True
    except SchemaError:
        return False


class ShardGenerator:
    """Loads the model once (per worker); `run(task)` samples one shard and writes it."""

    guided_steps = 0  # sampling steps that take the unconditional pass too (none without a model)

    def __init__(
        self, model_dir: str, settings: SamplingSettings, out_dir: str, device: str = "cpu", threads: int | None = None
    ):
        from ..data.site_stains import SiteStains
        from ..model import load_model_dir, make_sampler
        from ..model.model_dir import read_model_info
        from ..model.sampling import guided

        if threads:
            torch.set_num_threads(threads)  # pinned, so results do not depend on the host's core count
        self.s, self.out, self.device = settings, Path(out_dir), torch.device(device)
        self.model, self.config, self.spec = load_model_dir(model_dir, settings.weights, device=self.device)
        if settings.compile:
            self.model = torch.compile(self.model)
        self.autocast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[settings.precision]
        sched = make_sampler(self.config, settings.sampler)
        sched.set_timesteps(settings.steps)
        on = guided(sched.timesteps, settings.guidance_interval, self.config.num_train_timesteps)
        self.guided_steps = sum(on) if settings.guidance != 1.0 else 0
        stains = read_model_info(model_dir)["info"].get("site_stains")  # a model trained in the reference stain
        self.reference = SiteStains.from_dict(stains) if stains else None

    def _conditions(self, chunk: list[dict], owners: dict) -> tuple[dict, list]:
        from ..model import encode_conditions

        rows = [t["conditions"] for t in chunk]
        if self.s.composition in ("joint", "stain"):
            return encode_conditions(self.spec, rows, strict=True), []
        enc = lambda rs: encode_conditions(self.spec, rs, strict=True)  # noqa: E731
        no_site = [{k: v for k, v in r.items() if k != SITE} for r in rows]
        at_owner = [{**r, "cancer_type": owners[r[SITE]]} for r in rows]
        return enc(no_site), [
            (
                enc(at_owner),
                enc([{k: v for k, v in r.items() if k != SITE} for r in at_owner]),
                self.s.composition_scale,
            )
        ]

    def sample_tiles(self, tiles: list[dict], task: dict | None = None) -> np.ndarray:
        """uint8 tiles for `tiles`; `task` holds what a composition needs (owners, site stains)."""
        if self.reference is not None:
            return self._rendered(tiles, task)
        if self.s.composition == "stain":
            return self._restained(tiles, task)
        return self._sample(tiles, (task or {}).get("owners", {}))

    def _restained(self, tiles: list[dict], task: dict) -> np.ndarray:
        """Each tile drawn at a training site of its type (the requested one where the pair was
        trained, else the type's site nearest it in stain direction), then rendered in the requested
        site's stain (moved there, or at its own site with the network's off-plane colour dropped) with the
        site's scanner pattern, which the network does not draw (`patterned=False`)."""
        from ..data.site_stains import SiteStains

        if getattr(self, "_stains_of", None) != task["generation"]:  # parsed once per plan, not per shard
            self._stains_of, self._stains = task["generation"], SiteStains.from_dict(task["stains"])
            self._drawn = self._calibration(task, self._stains)
        want = [t["conditions"] for t in tiles]
        donors = [_own_site(task["own_sites"], c, t, self._stains) for c, t in zip(want, tiles)]
        drawn = self._sample([{**t, "conditions": {**c, SITE: d}} for t, c, d in zip(tiles, want, donors)], {})
        types, sites = [c["cancer_type"] for c in want], [c[SITE] for c in want]
        return self._stains.transfer(drawn, types, donors, sites, own="render", patterned=False, drawn=self._drawn)

    def _calibration(self, task: dict, site_stains) -> dict | None:
        """The network's concentration quantiles at each training site of the plan's types, from
        `calibration_tiles` draws there with seeds of their own: every worker draws the same, so the
        pool's bytes do not depend on how many there are."""
        k, stains = self.s.calibration_tiles, site_stains.stains
        pairs = [(t, d) for t, sites in sorted(task["own_sites"].items()) for d in sites if d in stains]
        if not k or not pairs or any(stains[d].quantiles is None for _, d in pairs):
            return None  # or stains recorded before their quantiles were
        seed = zlib.crc32(f"calibration/{task['plan_seed']}".encode())
        at = [(t, d) for t, d in pairs for _ in range(k)]
        tiles = [{"conditions": {"cancer_type": t, SITE: d}, "seed": seed + i} for i, (t, d) in enumerate(at)]
        return site_stains.drawn_quantiles(self._sample(tiles, {}), [d for _, d in at])

    def _rendered(self, tiles: list[dict], task: dict) -> np.ndarray:
        """A reference-stain model's tiles, each rendered once in the requested site's stain at its type's
        scale there. Composition stain: drawn at a training site of the type, chosen by the tile's seed (the
        network draws every site in the one reference stain, so no donor is nearer the target). A row
        without a site (site-nulled) is rendered at one of its type's training sites."""
        own, want = task["own_sites"], [t["conditions"] for t in tiles]
        targets = [c[SITE] if c.get(SITE, UNKNOWN) != UNKNOWN else _own_site(own, c, t) for c, t in zip(want, tiles)]
        if self.s.composition == "stain":
            donors = [_own_site(own, {**c, SITE: s}, t) for c, t, s in zip(want, tiles, targets)]
            tiles = [{**t, "conditions": {**c, SITE: d}} for t, c, d in zip(tiles, want, donors)]
        drawn = self._sample(tiles, task.get("owners", {}))
        return self.reference.from_reference(drawn, [c["cancer_type"] for c in want], targets)

    def _sample(self, tiles: list[dict], owners: dict) -> np.ndarray:
        from ..model import sample

        out = []
        for i in range(0, len(tiles), self.s.batch_size):  # fixed micro-batches: same on any worker count
            chunk = tiles[i : i + self.s.batch_size]
            cond, directions = self._conditions(chunk, owners)
            out.append(
                sample(
                    self.model,
                    cond,
                    seeds=[t["seed"] for t in chunk],
                    sampler=self.s.sampler,
                    steps=self.s.steps,
                    guidance_scale=self.s.guidance,
                    guidance_interval=tuple(self.s.guidance_interval),
                    autocast_dtype=self.autocast,
                    directions=directions,
                )
            )
        return np.concatenate(out)

    def sample_aligned(self, tiles: list[dict], first: int, task: dict | None = None) -> np.ndarray:
        """`tiles` are consecutive in plan order from plan position `first`. Batched kernels (oneDNN,
        cuDNN) may sum in a batch-size-dependent order, so a tile's bytes would depend on the
        micro-batch it lands in (before: 5 of 64 small-preset DDPM tiles changed between 8 and 256
        tiles per shard). Micro-batches are aligned to plan positions (tile k is always at position
        k % batch_size of its call) and every call has exactly batch_size rows (a partial one at a
        shard edge is padded with copies, computed and dropped): the bytes do not depend on tiles per
        shard or workers. They still depend on batch_size, torch threads and device."""
        b, out, i = self.s.batch_size, [], 0
        while i < len(tiles):
            pos = (first + i) % b
            chunk = tiles[i : i + b - pos]
            padded = [chunk[0]] * pos + chunk + [chunk[-1]] * (b - pos - len(chunk))
            out.append(self.sample_tiles(padded, task)[pos : pos + len(chunk)])
            i += len(chunk)
        return np.concatenate(out)

    def run(self, task: dict) -> dict:
        t0 = time.perf_counter()
        tiles = task_tiles(task)
        images = self.sample_aligned(tiles, task["first"], task)
        t_sample = time.perf_counter() - t0
        members = []
        for t, img in zip(tiles, images):
            # a class-only model has no site condition: its tiles carry the explicit Unknown site
            meta = {
                SITE: UNKNOWN,
                **t["conditions"],
                **task["meta"],
                "key": t["key"],
                "slide_id": t["slide_id"],
                "seed": t["seed"],
                "plan_row": t["row"],
                "plan_index": t["index"],
                "seen": t["seen"],
                "generation": task["generation"],
                "split": SPLIT,
            }
            members.append((t["key"], png_bytes(img), meta))
        write_shard(self.out / task["path"], members)
        per_step = 1 + (2 if self.s.composition == "owner-site" else 0)  # + the unconditional pass where guided
        evals = len(images) * (self.s.steps * per_step + self.guided_steps)
        return {
            "path": task["path"],
            "tiles": len(images),
            "sample_s": t_sample,
            "total_s": time.perf_counter() - t0,
            "evaluations": evals,
        }
