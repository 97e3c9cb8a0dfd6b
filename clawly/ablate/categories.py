"""Category mode: uncensor chosen harm categories, keep the refusals of others.

Weights come from a preset (category -> weight in [0, 1]): weight > 0 targets a category, weight 0
keeps it. The directions removed for targeted categories are made orthogonal to the span of the
kept categories' directions (see `directions.orthogonalize_categories`), so the weight change
leaves every kept direction's component of every writer's output exactly unchanged.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch

from clawly.ablate.directions import AblationBasis, RefusalDirections, cosine
from clawly.errors import ClawlyError
from clawly.settings import CategorySettings


@dataclass
class CategoryDirections:
    """What the optimizer ablates in category mode."""

    basis: AblationBasis  # removed: targeted categories' directions (preset order); protected: kept ones
    names: list[str]  # targeted categories, in the order of the basis
    weights: list[float]  # their weights
    kept: list[str]
    kept_cosine: dict[str, dict[str, list[float]]]  # targeted -> kept -> cos(v_c, v_k) per point


def check_categories(settings: CategorySettings, available: list[str]) -> None:
    """Every weighted category has prompts (a preset's typo, or a category of a file not given)."""
    unknown = [c for c in settings.weights if c not in available]
    if unknown:
        named = [
            c + (f" (did you mean {close[0]}?)" if (close := difflib.get_close_matches(c, available, n=1)) else "")
            for c in unknown
        ]
        raise ClawlyError(
            f"categories.weights names categor{'y' if len(unknown) == 1 else 'ies'} with no prompts: "
            f"{', '.join(named)}; the prompts have: {', '.join(available)}"
        )


def category_directions(
    directions: RefusalDirections, settings: CategorySettings, orthogonalize: bool, protect_harmless: bool
) -> CategoryDirections:
    """Targeted directions, to be made orthogonal to kept ones (and the harmless mean if asked)."""
    names, kept = settings.targeted, settings.kept
    by_category = {c: v.double() for c, v in directions.category_directions.items()}
    v = torch.stack([by_category[c] for c in names])  # [m, P, d]
    protected = [by_category[c] for c in kept] if orthogonalize else []
    if protect_harmless:
        protected.append(directions.harmless_mean.double())
    basis = AblationBasis(v, torch.stack(protected) if protected else None)
    cos = {
        c: {k: [round(float(x), 4) for x in cosine(v[i], by_category[k])] for k in kept} for i, c in enumerate(names)
    }
    return CategoryDirections(basis, names, [settings.weights[c] for c in names], kept, cos)


def global_directions(directions: RefusalDirections, protect_harmless: bool) -> AblationBasis:
    """The single global refusal direction, `[1, P, d]`, optionally orthogonal to the harmless mean."""
    d = directions.refusal_direction.double().unsqueeze(0)
    return AblationBasis(d, directions.harmless_mean.double().unsqueeze(0) if protect_harmless else None)


def low_retention(retained: torch.Tensor, names: list[str], threshold: float) -> dict[str, list[int]]:
    """Category -> probe points where less than `threshold` of its direction survived."""
    out = {}
    for i, c in enumerate(names):
        points = [p for p in range(1, retained.shape[1]) if float(retained[i, p]) < threshold]
        if points:
            out[c] = points
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def category_table(
    prompts: dict[str, int],
    base: dict[str, int],
    after: dict[str, int],
    weights: dict[str, float],
    instructed: set[str] = frozenset(),
) -> dict[str, dict]:
    """Per category: role, prompts, base and after refusal rates (with 95% Wilson intervals), and for
    kept categories the retention ratio after / base. Empty `weights` (global mode): every
    category is targeted but the `instructed` ones (refusals a system prompt asks for), which are
    untargeted."""
    table = {}
    for c in sorted(prompts):
        n, b, a = prompts[c], base.get(c, 0), after.get(c, 0)
        if not weights:
            role = "untargeted" if c in instructed else "targeted"
        else:
            role = "untargeted" if c not in weights else ("kept" if weights[c] == 0 else "targeted")
        row = {
            "role": role,
            "weight": weights.get(c),
            "prompts": n,
            "base_refusals": b,
            "after_refusals": a,
            "base_rate": round(b / n, 4) if n else None,
            "after_rate": round(a / n, 4) if n else None,
            "base_rate_ci95": wilson_interval(b, n),
            "after_rate_ci95": wilson_interval(a, n),
        }
        if role == "kept":
            row["retention"] = round(a / b, 4) if b else None
        table[c] = row
    return table
