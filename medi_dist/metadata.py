"""The one tile schema, vocabularies (value <-> index) and the conditioning spec.

Every stage (ingest, stream, train, generate, evaluate) goes through these types, so a value means
the same index everywhere. Missing values become the explicit ``Unknown`` token; a value that a
vocabulary has never seen is an error that lists the valid values (never silently index 0).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

UNKNOWN = "Unknown"
# Spellings of "missing" met in real tables (GDC writes '--), matched case-insensitively.
MISSING_TOKENS = {"", "'--", "--", "nan", "none", "null", "not reported", "unknown"}
# Also missing in a continuous column. Not in categorical ones: 'NA' can be a real two-letter code
# (a tissue source site), and a category must mean the same index in every stage.
NUMBER_MISSING_TOKENS = MISSING_TOKENS | {"na", "n/a", "not available"}
# GDC de-identifies ages above 89 as '>89' (or '90+'); we read them as 90, the lowest age they stand for.
_TOP_CODED_AGE = re.compile(r"^(>\s*89|90\s*\+)$")

CONDITION_PREFIX = "cond_"  # stream column holding a categorical condition index
CONTINUOUS_PREFIX = "cont_"  # stream column holding a normalised continuous condition
# Smallest tile or model resolution accepted from a user: the tiny preset's size. Below it a tile
# holds no tissue structure (a nucleus is ~10-20 px at 0.5 mpp) and a 2-level UNet's coarsest map
# shrinks to a few pixels; 0 or 3 is a slip, not a setting.
MIN_TILE_PX = 16


class SchemaError(ValueError):
    """Bad input data: the message names the file/row and says what to do."""


class UnknownValueError(ValueError):
    """A condition value the model or vocabulary never saw."""


def is_missing(value: Any, tokens: set[str] = MISSING_TOKENS) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in tokens


def clean_category(value: Any) -> str:
    """Normalise one categorical value; missing spellings become UNKNOWN."""
    if is_missing(value):
        return UNKNOWN
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def clean_continuous(value: Any) -> float:
    """Parse a continuous value; missing becomes NaN (handled by the null condition)."""
    if is_missing(value, NUMBER_MISSING_TOKENS):
        return float("nan")
    if isinstance(value, str) and _TOP_CODED_AGE.match(value.strip()):
        return 90.0
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SchemaError(f"not a number: {value!r}") from None


def check_key(key: str) -> str:
    if not key or "." in key or "/" in key or "\\" in key or key.startswith("_"):
        raise SchemaError(
            f"tile key {key!r} is invalid: keys must be non-empty, contain no '.', '/' or '\\' "
            "and not start with '_' (WebDataset groups members by the text before the first dot)"
        )
    return key


@dataclass
class Vocab:
    """Sorted values of one categorical column; the list position is the index."""

    name: str
    values: list[str]

    def __post_init__(self) -> None:
        if len(set(self.values)) != len(self.values):
            raise SchemaError(f"vocabulary {self.name!r} has duplicate values")
        self._index = {v: i for i, v in enumerate(self.values)}

    @classmethod
    def build(cls, name: str, values: Iterable[Any]) -> Vocab:
        return cls(name, sorted({clean_category(v) for v in values}))

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, value: Any) -> bool:
        return clean_category(value) in self._index

    def encode(self, value: Any) -> int:
        v = clean_category(value)
        try:
            return self._index[v]
        except KeyError:
            shown = ", ".join(self.values[:50]) + (" ..." if len(self.values) > 50 else "")
            raise UnknownValueError(f"unknown {self.name} {v!r}; valid values ({len(self.values)}): {shown}") from None

    def decode(self, index: int) -> str:
        return self.values[index]


@dataclass
class ContinuousSpec:
    """A continuous condition (e.g. age), z-scored with statistics from the training split; min/max
    is the range the model saw (None in datasets ingested before it was recorded)."""

    name: str
    mean: float
    std: float
    min: float | None = None
    max: float | None = None

    @classmethod
    def build(cls, name: str, values: Iterable[Any]) -> ContinuousSpec:
        xs = [x for x in (clean_continuous(v) for v in values) if not math.isnan(x)]
        if not xs:
            raise SchemaError(f"continuous column {name!r} has no numeric values")
        mean = sum(xs) / len(xs)
        var = sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)
        return cls(name, mean, math.sqrt(var) or 1.0, min(xs), max(xs))

    def encode(self, value: Any) -> float:
        x = clean_continuous(value)
        return x if math.isnan(x) else (x - self.mean) / self.std


@dataclass
class ConditioningSpec:
    """What a model is conditioned on: categorical vocabularies (cancer type first) and continuous
    columns. Saved as conditioning.json in every dataset and model directory."""

    categorical: list[Vocab]
    continuous: list[ContinuousSpec] = field(default_factory=list)

    @property
    def categorical_names(self) -> list[str]:
        return [v.name for v in self.categorical]

    @property
    def continuous_names(self) -> list[str]:
        return [c.name for c in self.continuous]

    def vocab(self, name: str) -> Vocab:
        for v in self.categorical:
            if v.name == name:
                return v
        raise UnknownValueError(f"no categorical condition {name!r}; have {self.categorical_names}")

    def subset(self, categorical: list[str], continuous: list[str] = ()) -> ConditioningSpec:
        """The same vocabularies restricted to some columns (e.g. a class-only baseline)."""
        cont = {c.name: c for c in self.continuous}
        missing = [c for c in continuous if c not in cont]
        if missing:
            raise UnknownValueError(f"no continuous condition {missing}; have {self.continuous_names}")
        return ConditioningSpec([self.vocab(n) for n in categorical], [cont[n] for n in continuous])

    def encode_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Condition columns for one metadata row (raises UnknownValueError on unseen values)."""
        out: dict[str, Any] = {}
        for v in self.categorical:
            out[CONDITION_PREFIX + v.name] = v.encode(row.get(v.name))
        for c in self.continuous:
            out[CONTINUOUS_PREFIX + c.name] = c.encode(row.get(c.name))
        return out

    def check_compatible(self, other: ConditioningSpec, what: str = "data") -> None:
        """Raise if `other` (e.g. a dataset's spec) would map values to different indices."""
        for v in self.categorical:
            try:
                theirs = other.vocab(v.name)
            except UnknownValueError:
                raise SchemaError(f"{what} has no column {v.name!r} that the model is conditioned on") from None
            extra = sorted(set(theirs.values) - set(v.values))
            if extra:
                raise SchemaError(
                    f"vocabulary mismatch for {v.name!r}: {what} has values the model never saw: {extra[:20]}"
                )

    def to_dict(self) -> dict:
        return {
            "categorical": {v.name: v.values for v in self.categorical},
            "continuous": [asdict(c) for c in self.continuous],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ConditioningSpec:
        return cls(
            [Vocab(name, list(values)) for name, values in d["categorical"].items()],
            [ContinuousSpec(**c) for c in d.get("continuous", [])],
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ConditioningSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def build(
        cls,
        rows: list[Mapping[str, Any]],
        categorical: list[str],
        continuous: list[str] = (),
        continuous_rows: list[Mapping[str, Any]] | None = None,
    ) -> ConditioningSpec:
        """Vocabularies from every row (held-out values included, so indices agree everywhere);
        continuous statistics from `continuous_rows` (the train split) when given: a held-out site's
        ages must not shift the normalisation the model trains with."""
        stats = rows if continuous_rows is None else continuous_rows
        return cls(
            [Vocab.build(name, (r.get(name) for r in rows)) for name in categorical],
            [ContinuousSpec.build(name, (r.get(name) for r in stats)) for name in continuous],
        )
