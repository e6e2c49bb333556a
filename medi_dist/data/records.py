"""What a source yields: one encoded tile plus its metadata, and a ledger of skipped inputs."""

from __future__ import annotations

import logging
import re
from collections import Counter
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


def reason_kind(reason: str) -> str:
    """A reason without its particulars (exception text in parentheses, quoted names, numbers), so
    that 300 missing files count as one kind of problem."""
    k = re.sub(r"\s*\([^()]*\)", "", reason)
    k = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", k)
    return re.sub(r"\d+", "N", k).strip()


@dataclass
class SkipLog:
    """Inputs a stage skipped, each with where it came from and why, and metadata values it could
    not use; summarised once at the end (each skip is logged at debug level only)."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # inputs each entry stands for (a slide folder: its tiles)
    kinds: list[str] = field(default_factory=list)
    unparsed: Counter = field(default_factory=Counter)  # (column, value) -> rows read as missing

    def skip(self, origin: str, reason: str, count: int = 1, kind: str | None = None) -> None:
        log.debug("skipped %s: %s", origin, reason)
        self.entries.append((origin, reason))
        self.counts.append(count)
        self.kinds.append(kind or reason_kind(reason))

    def unparsed_value(self, column: str, value: Any) -> None:
        self.unparsed[(column, str(value))] += 1

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def skipped_inputs(self) -> int:
        return sum(self.counts)

    def by_kind(self) -> list[tuple[str, int, list[int]]]:
        """(kind, inputs, entry positions), most inputs first."""
        groups: dict[str, list[int]] = {}
        for i, k in enumerate(self.kinds):
            groups.setdefault(k, []).append(i)
        rows = [(k, sum(self.counts[i] for i in ix), ix) for k, ix in groups.items()]
        return sorted(rows, key=lambda r: -r[1])

    def top_reasons(self, n: int = 3) -> str:
        """The n most common kinds, each with its count and one example input, on one line."""
        return "; ".join(f"{k} ({c}, e.g. {self.entries[ix[0]][0]})" for k, c, ix in self.by_kind()[:n])

    def unparsed_rows(self) -> list[dict[str, Any]]:
        return [{"column": c, "value": v, "count": n} for (c, v), n in self.unparsed.most_common()]

    def summary(self, examples: int = 3, kinds: int = 10) -> str:
        lines = [f"{self.skipped_inputs} input(s) skipped (all listed in dataset.json):"]
        groups = self.by_kind()
        for k, c, ix in groups[:kinds]:
            lines.append(f"  {c} x {k}")
            lines += [f"      e.g. {self.entries[i][0]}: {self.entries[i][1]}" for i in ix[:examples]]
        if len(groups) > kinds:
            lines.append(f"  ... and {len(groups) - kinds} more kinds of reason")
        return "\n".join(lines)
