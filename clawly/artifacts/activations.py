"""Activations (probe-activations -> compute-directions).

`artifacts/activations/{harmful,harmless}.parquet`: one row per prompt and probe point, columns id,
category, layer (the probe point, int16) and residual (fixed-size list of float32, the hidden
size), streamed batch by batch. `means.safetensors`: the float32 mean residual per set and
category (`harmful_mean.<category>`, `harmless_mean.<category>`, each `[P, d]`), with the prompt
counts and the probe settings in its metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from clawly.errors import reading
from clawly.io import write_safetensors


def activation_schema(hidden: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("category", pa.string()), ("layer", pa.int16()),
                      ("residual", pa.list_(pa.float32(), hidden))])


class ActivationWriter:
    """Streams rows (one per prompt x probe point) into a Parquet file."""

    def __init__(self, path: str | Path, hidden: int):
        self.schema = activation_schema(hidden)
        self.writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")

    def write(self, ids: Sequence[str], categories: Sequence[str], residuals: torch.Tensor) -> None:
        """residuals: `[b, P, d]`."""
        b, p, d = residuals.shape
        flat = pa.array(residuals.reshape(-1).numpy(), type=pa.float32())
        table = pa.table({
            "id": pa.array([i for i in ids for _ in range(p)], pa.string()),
            "category": pa.array([c for c in categories for _ in range(p)], pa.string()),
            "layer": pa.array(list(range(p)) * b, pa.int16()),
            "residual": pa.FixedSizeListArray.from_arrays(flat, d),
        }, schema=self.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        self.writer.close()


def read_activations(path: str | Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(ids, categories, residuals `[n, P, d]` float32) from an activations Parquet file."""
    with reading(path, "probe-activations"):
        table = pq.read_table(str(path))
        layer = table.column("layer").to_numpy()
        p = int(layer.max()) + 1
        d = table.schema.field("residual").type.list_size
        values = table.column("residual").combine_chunks().flatten().to_numpy()
        residuals = torch.from_numpy(values.reshape(-1, p, d).copy())
        ids = table.column("id").to_pylist()[::p]
        cats = table.column("category").to_pylist()[::p]
    return ids, cats, residuals


@dataclass
class ResidualMeans:
    """Mean residuals `[P, d]` by `<set>_mean.<category>`, their prompt counts, and metadata."""

    means: dict[str, torch.Tensor]
    counts: dict[str, int]
    meta: dict[str, str]


def write_means(path: Path, means: ResidualMeans) -> None:
    meta = {**means.meta, "counts": json.dumps(dict(sorted(means.counts.items())))}
    write_safetensors(path, {k: v.to(torch.float32) for k, v in sorted(means.means.items())}, meta)


def read_means(path: Path) -> ResidualMeans:
    with reading(path, "probe-activations"):
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
        return ResidualMeans(load_file(str(path)), json.loads(meta.pop("counts")), meta)
