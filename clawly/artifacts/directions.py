"""Direction files (compute-directions -> orthogonalize-categories -> optimize, export-lora).

- `directions/directions.safetensors` (`RefusalDirections`, float32): per probe point the unit
  `refusal_direction` `[P, d]`, the raw difference of means `refusal_direction_raw`, `harmful_mean`,
  `harmless_mean`, and `category_direction.<category>` for every harmful category (each against the
  same harmless mean); model, counts and direction settings in the metadata.
- `directions/orthogonalized.safetensors` (`AblationDirections`, float64; and the copy beside every
  saved adapter or model): `directions` `[m, P, d]` and `retained` `[m, P]` (what is ablated at each
  probe point), `removed` `[m, P, d]` and `protected` `[k, P, d]` (what they are made from, so a
  fractional probe index is orthogonalized where it is used); names, weights, kept categories and
  mode in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from clawly.architecture import hidden_size, num_layers
from clawly.directions import AblationBasis
from clawly.errors import ClawlyError, reading
from clawly.io import write_safetensors


@dataclass
class RefusalDirections:
    """What compute-directions wrote, per probe point (`[P, d]` each)."""

    refusal_direction: torch.Tensor  # unit
    raw_difference: torch.Tensor  # harmful mean - harmless mean
    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    category_directions: dict[str, torch.Tensor]  # unit, each category's mean against the harmless mean
    meta: dict[str, str]

    @property
    def categories(self) -> list[str]:
        return sorted(self.category_directions)


def write_refusal_directions(path: Path, d: RefusalDirections) -> None:
    tensors = {"refusal_direction": d.refusal_direction, "refusal_direction_raw": d.raw_difference,
               "harmful_mean": d.harmful_mean, "harmless_mean": d.harmless_mean,
               **{f"category_direction.{c}": v for c, v in sorted(d.category_directions.items())}}
    write_safetensors(path, {k: v.float() for k, v in tensors.items()}, d.meta)


def read_refusal_directions(path: Path) -> RefusalDirections:
    prefix = "category_direction."
    with reading(path, "compute-directions"):
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
            t = {k: f.get_tensor(k) for k in f.keys()}
        return RefusalDirections(t["refusal_direction"], t["refusal_direction_raw"], t["harmful_mean"],
                                 t["harmless_mean"],
                                 {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}, meta)


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
    write_safetensors(path, {"directions": b.directions, "retained": b.retained, "removed": b.removed,
                             "protected": b.protected}, meta)


def read_ablation_directions(path: Path) -> AblationDirections:
    """The inverse of `write_ablation_directions` (the basis is rebuilt from removed and protected)."""
    with reading(path, "orthogonalize-categories"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            keys = set(f.keys())
            if not {"removed", "protected"} <= keys:
                raise ClawlyError(f"{path} holds no removed/protected directions: it was written by an older "
                                  "clawly; rerun orthogonalize-categories (dvc repro does), or reproduce with that "
                                  "version")
            basis = AblationBasis(f.get_tensor("removed").double(), f.get_tensor("protected").double())
        return AblationDirections(basis, json.loads(meta["names"]), json.loads(meta["weights"]),
                                  json.loads(meta.get("kept", "[]")), meta["mode"])


def check_fits(directions: torch.Tensor, model, path: str | Path) -> None:
    """Raise one clear error unless directions `[m, P, d]` (or `[P, d]`) were probed on a model of this
    shape: P = decoder layers + 1 probe points, d = the residual stream's width."""
    layers, hidden = num_layers(model), hidden_size(model)
    points, width = directions.shape[-2], directions.shape[-1]
    if (points, width) != (layers + 1, hidden):
        raise ClawlyError(f"{path} was computed on a model with {points - 1} decoder layers and hidden size {width}, "
                          f"but {type(model).__name__} here has {layers} and {hidden}: rerun probe-activations and "
                          "compute-directions for this model (dvc repro does), or load the model they were made on")
