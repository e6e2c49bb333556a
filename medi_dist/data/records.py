"""What a source yields: one encoded tile plus its metadata, and a ledger of skipped inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("medi_dist.data")


@dataclass
class TileRecord:
    key: str  # unique, dot-free (metadata.check_key)
    image_bytes: bytes  # encoded image, stored in the shard as is
    image_format: str  # "jpg" or "png"
    meta: dict[str, Any]  # slide_id, cancer_type, tissue_source_site, optional sex/race/age/...
    origin: str = ""  # file path or table row, for error messages


@dataclass
class SkipLog:
    """Inputs a stage skipped, each with where it came from and why; summarised at the end."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, origin: str, reason: str) -> None:
        log.warning("skipped %s: %s", origin, reason)
        self.entries.append((origin, reason))

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self, limit: int = 10) -> str:
        lines = [f"{len(self.entries)} input(s) skipped:"]
        lines += [f"  {o}: {r}" for o, r in self.entries[:limit]]
        if len(self.entries) > limit:
            lines.append(f"  ... and {len(self.entries) - limit} more")
        return "\n".join(lines)
