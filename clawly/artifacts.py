"""Files passed between stages, with their typed readers and writers.

`AblationDirections` (orthogonalize-categories -> optimize, export-lora; and the copy beside every
saved adapter or model): safetensors with `directions` `[m, P, d]` and `retained` `[m, P]` (what is
ablated at each probe point), `removed` `[m, P, d]` and `protected` `[k, P, d]` (what they are made
from, so a fractional probe index is orthogonalized where it is used), all float64; names, weights,
kept categories and mode in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clawly.directions import AblationBasis
from clawly.errors import ClawlyError


@dataclass
class AblationDirections:
    """What orthogonalize-categories wrote: the basis the trials ablate, its names and weights."""

    basis: AblationBasis
    names: list[str]
    weights: list[float]
    kept: list[str]
    mode: str

    @property
    def directions(self) -> torch.Tensor:
        """The ablated directions per probe point, `[m, P, d]`."""
        return self.basis.directions

    @property
    def strengths(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float64)

    @property
    def category_weights(self) -> dict[str, float]:
        return {} if self.mode == "global" else dict(zip(self.names, self.weights, strict=True))


def write_ablation_directions(path: Path, ablation: AblationDirections, extra: dict[str, str] | None = None) -> None:
    """Safetensors: `directions` `[m, P, d]` and `retained` `[m, P]` (what is ablated per probe point),
    `removed` `[m, P, d]` and `protected` `[k, P, d]` (what they are made from); names, weights,
    kept categories and mode in the metadata."""
    b = ablation.basis
    meta = {"mode": ablation.mode, "names": json.dumps(ablation.names), "weights": json.dumps(ablation.weights),
            "kept": json.dumps(ablation.kept), **(extra or {})}
    save_file({"directions": b.directions.contiguous(), "retained": b.retained.contiguous(),
               "removed": b.removed.contiguous(), "protected": b.protected.contiguous()},
              str(path), metadata=meta)


def load_ablation_directions(path: Path) -> AblationDirections:
    """The inverse of `write_ablation_directions` (the basis is rebuilt from removed and protected)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        if not {"removed", "protected"} <= keys:
            raise ClawlyError(f"{path} holds no removed/protected directions: it was written by an older clawly; "
                              "rerun orthogonalize-categories (dvc repro does), or reproduce with that version")
        basis = AblationBasis(f.get_tensor("removed").double(), f.get_tensor("protected").double())
    return AblationDirections(basis, json.loads(meta["names"]), json.loads(meta["weights"]),
                              json.loads(meta.get("kept", "[]")), meta["mode"])
