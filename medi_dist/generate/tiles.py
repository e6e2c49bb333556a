"""The planned tile list: per-tile seeds, keys, and the partition into shards (plan-only functions).

Every tile's seed is a hash of (plan seed, row, index) and the partition into shards depends only on
the plan, so the same plan gives the same tiles however they are spread over workers and shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .plan import PlanError, PlanRow


def tile_seed(plan_seed: int, row: int, index: int) -> int:
    """A 63-bit seed from (plan seed, row, index): independent of workers, shards and batches."""
    h = hashlib.blake2b(f"{plan_seed}:{row}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def plan_id(rows: list[PlanRow], plan_seed: int, settings: dict) -> str:
    """Names exactly which tiles a plan makes (rows, seed, model, sampler settings)."""
    blob = json.dumps({"rows": [asdict(r) for r in rows], "seed": plan_seed, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Tile:
    key: str
    row: int
    index: int
    seed: int


def plan_tiles(rows: list[PlanRow], plan_seed: int, pid: str) -> list[Tile]:
    """Every planned tile in plan order; keys sort in that order and carry the plan id."""
    return [Tile(f"syn-{pid}-r{i:05d}-{j:06d}", i, j, tile_seed(plan_seed, i, j))
            for i, r in enumerate(rows) for j in range(r.count)]


def shard_partition(tiles: list[Tile], per_shard: int) -> list[list[Tile]]:
    """Consecutive runs of `per_shard` tiles: the partition depends only on the plan."""
    if per_shard < 1:
        raise PlanError(f"tiles per shard must be >= 1, got {per_shard}")
    return [tiles[i:i + per_shard] for i in range(0, len(tiles), per_shard)]
