"""Refusal directions: difference of means of residuals, and projections between directions.

Shapes: `n` prompts, `P` probe points (embedding output + one per decoder layer = layers + 1),
`d` hidden size. All statistics accumulate in float64 whatever the model's dtype.

Direction files (compute-directions -> orthogonalize-categories -> optimize, export-lora).

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from clawly.errors import ClawlyError, reading
from clawly.io import write_safetensors
from clawly.model.architecture import hidden_size, num_layers

EPS = 1e-12


def winsorize(residuals: torch.Tensor, quantile: float) -> torch.Tensor:
    """Clamp each coordinate of `[n, P, d]` residuals to its [q, 1-q] quantiles over the n prompts.

    Tames the few "massive activation" coordinates that otherwise dominate a mean difference.
    """
    if not 0.0 < quantile < 0.5:
        raise ValueError(f"winsorize quantile must be in (0, 0.5), got {quantile}")
    x = residuals.to(torch.float64)
    lo = torch.quantile(x, quantile, dim=0, keepdim=True)
    hi = torch.quantile(x, 1.0 - quantile, dim=0, keepdim=True)
    return torch.maximum(torch.minimum(x, hi), lo)


def normalize(v: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last axis (zero vectors stay zero)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)


def project_out(v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Remove from each `v[..., :]` its component along `u[..., :]` (same leading shape)."""
    u_hat = normalize(u.to(torch.float64))
    v = v.to(torch.float64)
    return v - (v * u_hat).sum(-1, keepdim=True) * u_hat


def refusal_directions(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, projected: bool = True) -> torch.Tensor:
    """Unit refusal direction per probe point, `[P, d]`, from means `[P, d]`.

    r = mean(harmful) - mean(harmless); with `projected`, the component of r along the
    harmless mean is removed first, so ablating r leaves the "ordinary prompt" direction alone.
    """
    diff = harmful_mean.to(torch.float64) - harmless_mean.to(torch.float64)
    if projected:
        diff = project_out(diff, harmless_mean)
    return normalize(diff)


def orthogonalize_against(directions: torch.Tensor, protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make each direction orthogonal to the span of protected directions, per probe point.

    directions: `[m, P, d]`; protected: `[k, P, d]`. For each point p an orthonormal basis K of
    the protected vectors (QR) gives u = (I - K K^T) v. Returns (unit u `[m, P, d]`,
    retained fraction ||u|| / ||v|| `[m, P]`). A retained fraction near 0 means the direction
    lies (almost) inside the protected span: ablating what is left would do little.
    """
    v = directions.to(torch.float64)
    if protected.numel() == 0:
        return normalize(v), torch.ones(v.shape[:2], dtype=torch.float64)
    k = protected.to(torch.float64).permute(1, 2, 0)  # [P, d, k]
    basis, r = torch.linalg.qr(k, mode="reduced")  # [P, d, k]
    # drop numerically-zero protected vectors so they do not inject noise into the basis
    keep = (r.diagonal(dim1=-2, dim2=-1).abs() > 1e-10).to(torch.float64).unsqueeze(1)  # [P, 1, k]
    basis = basis * keep
    vp = v.permute(1, 2, 0)  # [P, d, m]
    u = vp - basis @ (basis.transpose(1, 2) @ vp)
    u = u.permute(2, 0, 1)  # [m, P, d]
    retained = u.norm(dim=-1) / v.norm(dim=-1).clamp_min(EPS)
    return normalize(u), retained


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis."""
    return (normalize(a.to(torch.float64)) * normalize(b.to(torch.float64))).sum(-1)


def direction_report(
    harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, directions: torch.Tensor
) -> dict[str, list[float]]:
    """Per probe point: raw mean-difference norm, and cosine with the next point's direction."""
    diff = harmful_mean.to(torch.float64) - harmless_mean.to(torch.float64)
    adjacent = cosine(directions[:-1], directions[1:])
    return {
        "mean_difference_norm": [round(float(x), 6) for x in diff.norm(dim=-1)],
        "adjacent_cosine": [round(float(x), 6) for x in adjacent],
    }


def interpolated_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """Unit vector at a fractional probe index: the normalized blend of the two neighbouring points'
    unit vectors (clamped to the points there are). `[..., P, d]` -> `[..., d]`."""
    points = directions.shape[-2]
    index = min(max(index, 0.0), points - 1.0)
    lo = int(index)
    hi = min(lo + 1, points - 1)
    frac = index - lo
    unit = normalize(directions.to(torch.float64))
    return normalize((1 - frac) * unit[..., lo, :] + frac * unit[..., hi, :])


def orthonormalize(directions: torch.Tensor) -> torch.Tensor:
    """Orthonormal set spanning the same space per probe point (QR in the given order), `[m, P, d]`.

    Each q_c keeps the sign of its input v_c (q_c . v_c >= 0); a vector that lies in the span of
    the ones before it (or is zero) becomes the zero vector instead of numerical noise.
    """
    v = directions.to(torch.float64).permute(1, 2, 0)  # [P, d, m]
    q, r = torch.linalg.qr(v, mode="reduced")
    diag = r.diagonal(dim1=-2, dim2=-1)  # [P, m]
    scale = v.norm(dim=1).clamp_min(EPS)  # [P, m]
    sign = torch.where(diag < 0, -1.0, 1.0).to(torch.float64)
    alive = (diag.abs() > 1e-8 * scale).to(torch.float64)
    q = q * (sign * alive).unsqueeze(1)
    return q.permute(2, 0, 1)


def orthogonalize_categories(removed: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions to ablate for uncensored categories, protecting the kept ones, per probe point.

    removed: `[m, P, d]` category directions v_c to remove; kept: `[k, P, d]` directions whose
    component must survive. With K an orthonormal basis of the kept span (QR),
    u_c = (I - K K^T) v_c, and the u_c are then orthonormalized (in the given order), so that
    W' = W - sum_c q_c q_c^T W changes nothing along any kept direction.
    Returns (q `[m, P, d]` orthonormal per point, retained fraction ||u_c|| / ||v_c|| `[m, P]`).
    """
    u, retained = orthogonalize_against(removed, kept)
    return orthonormalize(u * retained.unsqueeze(-1)), retained


def ablated_directions(removed: torch.Tensor, protected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What is ablated per probe point: the removed directions made orthogonal to the protected span
    (when there is one) and orthonormalized in order. `[m, P, d]`, `[k, P, d]` (k may be 0) ->
    (q `[m, P, d]`, retained fraction `[m, P]`)."""
    if protected.shape[0] == 0:
        return orthonormalize(removed), torch.ones(removed.shape[:2], dtype=torch.float64)
    return orthogonalize_categories(removed, protected)


@dataclass
class AblationBasis:
    """The directions a trial ablates, kept with what they were made from.

    removed: `[m, P, d]` directions to remove (one per targeted category, or the global refusal
    direction); protected: `[k, P, d]` directions whose component must survive (kept categories'
    directions, the harmless mean), k >= 0. `directions` `[m, P, d]` is `ablated_directions` at every
    probe point; `at_index` does the same at a fractional probe index, interpolating the inputs
    first, so the ablated directions stay orthonormal and orthogonal to the protected span there too
    (blending the orthogonalized directions of two points would be neither)."""

    removed: torch.Tensor
    protected: torch.Tensor | None = None
    directions: torch.Tensor = field(init=False, repr=False)
    retained: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.removed = self.removed.to(torch.float64)
        if self.protected is None:
            self.protected = self.removed.new_zeros((0, *self.removed.shape[1:]))
        self.protected = self.protected.to(torch.float64)
        self.directions, self.retained = ablated_directions(self.removed, self.protected)

    def at_index(self, index: float) -> torch.Tensor:
        """Orthonormal directions `[m, d]` at a fractional probe index, orthogonal to the protected
        vectors interpolated at the same index."""
        removed = interpolated_direction(self.removed, index).unsqueeze(1)  # [m, 1, d]
        protected = interpolated_direction(self.protected, index).unsqueeze(1)  # [k, 1, d]
        return ablated_directions(removed, protected)[0][:, 0]


# ------------------------------------------------------------------ the direction files


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
    tensors = {
        "refusal_direction": d.refusal_direction,
        "refusal_direction_raw": d.raw_difference,
        "harmful_mean": d.harmful_mean,
        "harmless_mean": d.harmless_mean,
        **{f"category_direction.{c}": v for c, v in sorted(d.category_directions.items())},
    }
    write_safetensors(path, {k: v.float() for k, v in tensors.items()}, d.meta)


def read_refusal_directions(path: Path) -> RefusalDirections:
    prefix = "category_direction."
    with reading(path, "compute-directions"):
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata())
            t = {k: f.get_tensor(k) for k in f.keys()}
        return RefusalDirections(
            t["refusal_direction"],
            t["refusal_direction_raw"],
            t["harmful_mean"],
            t["harmless_mean"],
            {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)},
            meta,
        )


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
    meta = {
        "mode": ablation.mode,
        "names": json.dumps(ablation.names),
        "weights": json.dumps(ablation.weights),
        "kept": json.dumps(ablation.kept),
        **(extra or {}),
    }
    write_safetensors(
        path, {"directions": b.directions, "retained": b.retained, "removed": b.removed, "protected": b.protected}, meta
    )


def read_ablation_directions(path: Path) -> AblationDirections:
    """The inverse of `write_ablation_directions` (the basis is rebuilt from removed and protected)."""
    with reading(path, "orthogonalize-categories"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            keys = set(f.keys())
            if not {"removed", "protected"} <= keys:
                raise ClawlyError(
                    f"{path} holds no removed/protected directions: it was written by an older "
                    "clawly; rerun orthogonalize-categories (dvc repro does), or reproduce with that "
                    "version"
                )
            basis = AblationBasis(f.get_tensor("removed").double(), f.get_tensor("protected").double())
        return AblationDirections(
            basis,
            json.loads(meta["names"]),
            json.loads(meta["weights"]),
            json.loads(meta.get("kept", "[]")),
            meta["mode"],
        )


def check_fits(directions: torch.Tensor, model, path: str | Path) -> None:
    """Raise one clear error unless directions `[m, P, d]` (or `[P, d]`) were probed on a model of this
    shape: P = decoder layers + 1 probe points, d = the residual stream's width."""
    layers, hidden = num_layers(model), hidden_size(model)
    points, width = directions.shape[-2], directions.shape[-1]
    if (points, width) != (layers + 1, hidden):
        raise ClawlyError(
            f"{path} was computed on a model with {points - 1} decoder layers and hidden size {width}, "
            f"but {type(model).__name__} here has {layers} and {hidden}: rerun probe-activations and "
            "compute-directions for this model (dvc repro does), or load the model they were made on"
        )
