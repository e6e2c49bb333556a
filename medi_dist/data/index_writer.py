"""index.parquet written in row groups of CHUNK_ROWS tiles, and what ingest needs from the index
(vocabularies, train-split statistics, counts per group, case variants) gathered on the way, so an
ingest never holds the whole index: its memory does not grow with the number of tiles (soak,
benchmarks/RESULTS.md).

The rows come from the units in unit order. A dataset of up to CHUNK_ROWS tiles is one row group,
written exactly as `pd.DataFrame(rows).to_parquet(index=False)` writes it. A larger one is read
twice: first for the columns (in order of first appearance) and each column's type, unified as one
DataFrame of every row would infer it (int and missing -> float64, strings and missing -> str,
mixed kinds -> object), then converted and written chunk by chunk.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..metadata import clean_category, clean_continuous

CHUNK_ROWS = 8192


def chunks(loaders: Iterable[Callable[[], list[dict]]], rows: int | None = None) -> Iterator[list[dict]]:
    """The rows of each loader (a unit's index rows), in order, cut into lists of `rows` rows."""
    rows = rows or CHUNK_ROWS
    buf: list[dict] = []
    for load in loaders:
        buf += load()
        while len(buf) >= rows:
            yield buf[:rows]
            buf = buf[rows:]
    if buf:
        yield buf


def _unified(dtypes: list) -> Any:
    """The dtype one DataFrame of all chunks would infer for a column, from each chunk's."""
    if not dtypes:
        return np.dtype(object)
    if len({str(d) for d in dtypes}) == 1:
        return dtypes[0]
    if all(pd.api.types.is_numeric_dtype(d) and not pd.api.types.is_bool_dtype(d) for d in dtypes):
        return np.dtype("float64")
    return np.dtype(object)


class IndexSummary:
    """What _finish needs from the index, accumulated chunk by chunk (size: the number of distinct
    condition values, plus 8 bytes per train tile and continuous column)."""

    def __init__(self, categorical: list[str], continuous: list[str]):
        self.categorical, self.continuous = categorical, continuous
        self.columns: list[str] = []
        self.tiles = 0
        self.image_formats: set[str] = set()
        self.written: Counter = Counter()  # (cancer_type, tissue_source_site) -> tiles
        self.vocab: dict[str, set[str]] = {c: set() for c in categorical}
        self.values: dict[str, set[str]] = {c: set() for c in categorical}  # non-missing, as str
        self.train_any: dict[str, bool] = {c: False for c in continuous}
        self.train_values: dict[str, array] = {c: array("d") for c in continuous}

    def add(self, df: pd.DataFrame) -> None:
        self.tiles += len(df)
        self.image_formats.update(df["image_format"].unique().tolist())
        for k, n in df.groupby(["cancer_type", "tissue_source_site"]).size().items():
            self.written[k] += int(n)
        for c in self.categorical:
            if c in df.columns:
                self.vocab[c].update(clean_category(v) for v in df[c].tolist())
                self.values[c].update(str(v) for v in df[c].dropna().unique())
            else:
                self.vocab[c].add(clean_category(None))
        train = df[df["split"] == "train"]
        for c in self.continuous:
            if c in df.columns:
                self.train_any[c] = self.train_any[c] or bool(train[c].notna().any())
                self.train_values[c].extend(clean_continuous(v) for v in train[c].tolist())
            else:
                self.train_values[c].extend([math.nan] * len(train))

    def written_groups(self) -> dict:
        return dict(sorted(self.written.items()))


def write_index(path: Path, loaders: list[Callable[[], list[dict]]], summary: IndexSummary) -> None:
    """Write the rows of every loader to `path` (row groups of CHUNK_ROWS), filling `summary`."""
    multi = sum(1 for _ in itertools.islice(chunks(loaders), 2)) > 1
    columns: list[str] = []
    dtypes: dict[str, Any] = {}
    if multi:  # first pass: columns in order of first appearance, one dtype each
        seen: dict[str, list] = {}
        for rows in chunks(loaders):
            df = pd.DataFrame(rows)
            for c in df.columns:
                if c not in seen:
                    seen[c] = []
                    columns.append(c)
                if df[c].notna().any():
                    seen[c].append(df[c].dtype)
        dtypes = {c: _unified(d) for c, d in seen.items()}
    writer = None
    try:
        for rows in chunks(loaders):
            df = pd.DataFrame(rows)
            if multi:
                df = df.reindex(columns=columns)
                for c in columns:
                    if str(df[c].dtype) != str(dtypes[c]):
                        df[c] = df[c].astype(dtypes[c])
            summary.columns = summary.columns or list(df.columns)
            summary.add(df)
            table = pa.Table.from_pandas(df, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="snappy")
            elif not table.schema.equals(writer.schema, check_metadata=False):
                table = table.cast(writer.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
