"""analyze: the research views of a run, from the activations and directions alone (no model).

Writes under `artifacts/research/`: `geometry.{parquet,csv}` (one row per probe point, see
`clawly.ablate.research.geometry_table`), `category_cosines.{parquet,csv}` (the category x category cosine
of the directions per probe point), and `projections/`: `residuals.html` (PaCMAP per probe point,
coloured by set and by category, one plotly page with a slider), `embedding.parquet` (the 2-D
points behind it), `pacmap_point_NN.png` for a few probe points and `category_cosines_point_NN.png`
where the categories' directions differ most. The summary (where harmful and harmless separate most, where
the categories do) goes to `reports/analyze.json`, its two peaks to `metrics/analyze.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from clawly.ablate import research as rs
from clawly.ablate.directions import read_refusal_directions
from clawly.data.prompts import instructed_categories, read_prompts
from clawly.errors import ClawlyError, require
from clawly.io import atomic_dir, atomic_path, write_json
from clawly.log import StageLogger
from clawly.paths import Paths
from clawly.settings import Settings


@dataclass
class Geometry:
    table: pd.DataFrame  # one row per probe point
    cosines: pd.DataFrame  # probe_point, category_a, category_b, cosine
    sample: rs.ResidualSample


def geometry(settings: Settings) -> Geometry:
    """The geometry table and category cosines of the run's probe and directions outputs."""
    p = Paths.of(settings)
    require(p.harmful_activations, "probe-activations")
    directions = read_refusal_directions(p.directions)
    instructed = instructed_categories(read_prompts(p)[0]) if p.harmful_prompts.exists() else set()
    r = settings.research
    sample = rs.sample_residuals(
        p.harmful_activations, p.harmless_activations, r.sample_per_category, r.seed, sorted(instructed)
    )
    if sample.residuals.shape[1:] != directions.refusal_direction.shape:
        raise ClawlyError(
            f"{p.activations} ({tuple(sample.residuals.shape[1:])}) and {p.directions} "
            f"({tuple(directions.refusal_direction.shape)}) disagree on probe points or hidden size: "
            "rerun compute-directions (dvc repro does)"
        )
    table = rs.geometry_table(
        directions.harmful_mean,
        directions.harmless_mean,
        directions.refusal_direction,
        directions.category_directions,
        sample,
    )
    return Geometry(table, rs.category_cosines(directions.category_directions), sample)


def write_tables(settings: Settings, g: Geometry) -> None:
    p = Paths.of(settings)
    for frame, parquet, csv in (
        (g.table, p.geometry, p.geometry_csv),
        (g.cosines, p.category_cosines, p.category_cosines_csv),
    ):
        with atomic_path(parquet) as tmp:
            frame.to_parquet(tmp, index=False)
        with atomic_path(csv) as tmp:
            frame.to_csv(tmp, index=False)


def _points(requested: list[int] | None, default: list[int], available: int, key: str) -> list[int]:
    points = sorted(set(requested if requested is not None else default))
    bad = [i for i in points if i >= available]
    if bad:
        raise ClawlyError(
            f"research.{key} names probe points {bad}, but the activations have {available} (0 to {available - 1})"
        )
    return points


def write_projections(settings: Settings, g: Geometry, out_dir: Path, log: StageLogger | None = None) -> list[Path]:
    """PaCMAP the sample at the chosen probe points; write the HTML, the 2-D points and the PNGs into
    `out_dir` (replaced whole, atomically). Returns the files written."""
    r = settings.research
    available = g.sample.probe_points
    html_points = _points(r.projection_points, list(range(available)), available, "projection_points")
    png_points = _points(r.png_points, rs.telling_points(g.table), available, "png_points")
    varying = set(rs.varying_points(g.sample))
    same = sorted((set(html_points) | set(png_points)) - varying)
    if same and log is not None:
        log.event("not_projected", f"probe points {same}: every sampled residual is the same there", points=same)
    html_points = [i for i in html_points if i in varying]
    png_points = [i for i in png_points if i in varying]
    if not html_points and not png_points:
        raise ClawlyError("the sampled residuals are the same at every chosen probe point: nothing to project")
    if log is not None:
        log.event(
            "projecting",
            f"PaCMAP of {g.sample.residuals.shape[0]} residuals at "
            f"{len(set(html_points) | set(png_points))} probe points",
        )
    embedded = rs.projections(g.sample, sorted(set(html_points) | set(png_points)), r.seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        fig = rs.projection_figure(g.sample, {i: embedded[i] for i in html_points}, g.table)
        fig.write_html(str(tmp / "residuals.html"), include_plotlyjs=True, full_html=True, div_id="clawly-residuals")
        rows = [
            {"probe_point": i, "id": pid, "category": cat, "set": st, "x": float(xy[0]), "y": float(xy[1])}
            for i in sorted(embedded)
            for pid, cat, st, xy in zip(g.sample.ids, g.sample.categories, g.sample.sets, embedded[i], strict=True)
        ]
        pd.DataFrame(rows).to_parquet(tmp / "embedding.parquet", index=False)
        rs.write_projection_pngs(g.sample, embedded, png_points, tmp, g.table)
        if "category_cosine_mean" in g.table:
            at = rs.summary(g.table)["category_cosine_mean_min_at"]
            rs.write_cosine_heatmap(g.cosines, at, tmp / f"category_cosines_point_{at:02d}.png")
        names = sorted(f.name for f in tmp.iterdir())
    return [out_dir / n for n in names]


def run(settings: Settings, log: StageLogger) -> dict:
    """The geometry table, the category cosines and the projections; the summary as metrics."""
    rs.require_research_extra()  # before any work, so a missing extra leaves nothing half-written
    p = Paths.of(settings)
    g = geometry(settings)
    write_tables(settings, g)
    files = write_projections(settings, g, p.projections, log)
    summary = {**rs.summary(g.table), "sampled_residuals": int(g.sample.residuals.shape[0])}
    write_json(p.report("analyze"), summary)
    # `dvc metrics show` stays one terminal wide: the two figures, where they peak is in the report
    write_json(
        p.metric("analyze"),
        {k: summary[f"{k}_max"] for k in ("silhouette", "category_silhouette") if f"{k}_max" in summary},
    )
    log.event("analyzed", **summary, files=[f.name for f in files])
    return summary
