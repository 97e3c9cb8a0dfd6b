"""orthogonalize-categories: the directions the optimizer ablates, made safe for kept categories."""

from __future__ import annotations

from clawly.ablate import categories as cm
from clawly.ablate.directions import AblationDirections, read_refusal_directions, write_ablation_directions
from clawly.io import write_json
from clawly.log import StageLogger
from clawly.paths import Paths
from clawly.settings import Settings


def run(settings: Settings, log: StageLogger) -> dict:
    """The global direction (m = 1), or in category mode one direction per targeted category,
    orthogonal to the kept categories' directions; with a report of what survived."""
    p = Paths.of(settings)
    directions = read_refusal_directions(p.directions)
    o, c = settings.orthogonalize, settings.categories
    if not c.enabled:
        basis = cm.global_directions(directions, o.against_harmless)
        names, weights, kept, report = ["global"], [1.0], [], {"mode": "global"}
    else:
        cm.check_categories(c, directions.categories)
        cd = cm.category_directions(directions, c, o.orthogonalize_categories, o.against_harmless)
        basis, names, weights, kept = cd.basis, cd.names, cd.weights, cd.kept
        retained = basis.retained
        low = cm.low_retention(retained, names, o.warn_retained) if kept and o.orthogonalize_categories else {}
        for cat, points in low.items():
            log.event(
                "warning",
                f"{cat}: less than {o.warn_retained:.0%} of its direction survives orthogonalization "
                f"at {len(points)} of {retained.shape[1] - 1} layers (e.g. {points[:6]}): it shares one refusal "
                "core with the kept categories there, so ablating what is left may do little",
                category=cat,
                points=points,
            )
        report = {
            "mode": "category",
            "order": names,
            "weights": dict(zip(names, weights, strict=True)),
            "kept": kept,
            "orthogonalized": o.orthogonalize_categories and bool(kept),
            "retained_fraction": {n: [round(float(x), 4) for x in retained[i]] for i, n in enumerate(names)},
            "cosine_with_kept": cd.kept_cosine,
            "low_retention_points": low,
        }
    write_ablation_directions(
        p.orthogonalized,
        AblationDirections(basis, names, weights, kept, report["mode"]),
        {"against_harmless": str(o.against_harmless)},
    )
    write_json(p.report("orthogonalize"), report)
    retained = basis.retained
    log.event(
        "orthogonalized",
        mode=report["mode"],
        directions=names,
        min_retained=round(float(retained[:, 1:].min()), 4) if retained.shape[1] > 1 else 1.0,
    )
    return report
