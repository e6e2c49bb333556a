"""The planned tile list: per-tile seeds, keys, and the partition into shards (plan-only functions).

Every tile's seed is a hash of (plan seed, row, index) and the partition into shards depends only on
the plan, so the same plan gives the same tiles however they are spread over workers and shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from .plan import PlanError, PlanRow


def tile_seed(plan_seed: int, row: int, index: int) -> int:
    """A 63-bit seed from (plan seed, row, index): independent of workers, shards and batches."""
    h = hashlib.blake2b(f"{plan_seed}:{row}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def plan_id(rows: list[PlanRow], plan_seed: int, settings: dict) -> str:
    """Names exactly which tiles a plan makes (rows, seed, model, sampler settings)."""
    blob = json.dumps({"rows": [asdict(r) for r in rows], "seed": plan_seed, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def shard_spans(counts: list[int], per_shard: int) -> list[list[tuple[int, int, int]]]:
    """Each shard as (row, first index, stop) runs over consecutive planned tiles in plan order: the
    partition depends only on the plan, and a plan of millions of tiles costs O(rows + shards)."""
    if per_shard < 1:
        raise PlanError(f"tiles per shard must be >= 1, got {per_shard}")
    shards, current, room = [], [], per_shard
    for row, n in enumerate(counts):
        j = 0
        while j < n:
            take = min(room, n - j)
            current.append((row, j, j + take))
            j, room = j + take, room - take
            if room == 0:
                shards.append(current)
                current, room = [], per_shard
    return shards + ([current] if current else [])


def task_tiles(task: dict) -> list[dict]:
    """The tiles of a shard task, expanded from its spans where they are used (worker, resume check)."""
    pid, out = task["generation"], []
    for row, start, stop in task["spans"]:
        r = task["rows"][str(row)]
        out += [
            {
                "key": f"syn-{pid}-r{row:05d}-{j:06d}",
                "row": row,
                "index": j,
                "seed": tile_seed(task["plan_seed"], row, j),
                "seen": r["seen"],
                "conditions": r["conditions"],
                "slide_id": f"syn-{pid}-r{row:05d}",
            }
            for j in range(start, stop)
        ]
    return out
