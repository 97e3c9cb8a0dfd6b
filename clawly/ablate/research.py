"""Research views: the geometry of the residual stream per probe point, and where harm categories separate.

Everything here reads what probe-activations and compute-directions wrote; no model is loaded.

- `geometry_table`: per probe point the norms of the harmful mean, the harmless mean and their
  difference (the unnormalized refusal direction), the cosines harmful mean vs harmless mean, each
  mean vs the refusal direction and the direction vs the previous point's, the silhouette
  coefficient of harmful vs harmless residuals, and (two or more categories) the silhouette of the
  harmful residuals labelled by category, each category's mean silhouette value in it, and the
  mean and largest cosine between two categories' directions.
- `category_cosines`: the category x category cosine of the category directions, per probe point.
- `sample_residuals`: the residuals the silhouettes and projections use, streamed from the
  activations Parquet: at most `max_per_category` prompts of each category (harmful and harmless
  alike), chosen by a seeded draw, so memory is the sample's size whatever the prompt count.
- `projections` (PaCMAP), `projection_figure` (one plotly figure with a probe-point slider) and
  `write_projection_pngs` (matplotlib) need the `research` extra.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from sklearn.metrics import silhouette_samples

from clawly.ablate.directions import cosine, direction_report
from clawly.errors import ClawlyError, reading
from clawly.io import atomic_path

RESEARCH_EXTRA = "pip install 'clawly[research]'"
HARMFUL, HARMLESS, INSTRUCTED = "harmful", "harmless", "instructed"


def require_research_extra() -> None:
    """Raise one clear error when the research extra (pacmap, matplotlib) is missing."""
    missing = []
    for module in ("pacmap", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ClawlyError(
            f"the residual projections need {' and '.join(missing)}, from the research extra: "
            f"{RESEARCH_EXTRA} (the geometry table needs neither)"
        )


# ------------------------------------------------------------------ math


def silhouette_values(x: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """The silhouette value of every point (Rousseeuw 1987; `sklearn.metrics.silhouette_samples`),
    Euclidean distance: s = (b - a) / max(a, b), a the mean distance to the other points of its
    cluster, b the smallest mean distance to another cluster's points; 0 for a point alone in its
    cluster. `x`: `[n, d]`; needs two or more labels. The distances are exact differences (scikit-learn's
    own Euclidean shortcut puts identical points about 1e-6 apart, which gives a cluster of them a
    made-up silhouette), passed to scikit-learn precomputed."""
    if len(set(labels)) < 2:
        raise ValueError("a silhouette needs at least two clusters")
    dist = torch.cdist(x.double(), x.double(), compute_mode="donot_use_mm_for_euclid_dist")
    dist.fill_diagonal_(0.0)
    return torch.from_numpy(silhouette_samples(dist.numpy(), list(labels), metric="precomputed"))


def silhouette(x: torch.Tensor, labels: Sequence[str]) -> float:
    """The silhouette coefficient: the mean silhouette value over all points (1: tight, far-apart
    clusters; 0: overlapping; negative: points nearer another cluster than their own)."""
    return float(silhouette_values(x, labels).mean())


# ------------------------------------------------------------------ the sample


@dataclass
class ResidualSample:
    """Sampled residuals `[n, P, d]` (float32) with each row's prompt id, category and set."""

    residuals: torch.Tensor
    ids: list[str]
    categories: list[str]
    sets: list[str]  # harmful, harmless or instructed

    @property
    def probe_points(self) -> int:
        return self.residuals.shape[1]


def _choose(path: Path, max_per_category: int, seed: int) -> tuple[dict[str, str], int]:
    """(id -> category of the prompts drawn from one activations file, at most max_per_category of
    each; the number of probe points)."""
    table = pq.read_table(str(path), columns=["id", "category", "layer"])
    first = table.filter(pc.equal(table.column("layer"), 0))
    points = int(pc.max(table.column("layer")).as_py()) + 1 if table.num_rows else 0
    ids, cats = first.column("id").to_pylist(), first.column("category").to_pylist()
    rng = np.random.default_rng(seed)
    chosen: dict[str, str] = {}
    for cat in sorted(set(cats)):
        members = [i for i, c in zip(ids, cats, strict=True) if c == cat]
        pick = rng.permutation(len(members))[:max_per_category]
        chosen.update({members[j]: cat for j in sorted(pick)})
    return chosen, points


def sample_residuals(
    harmful: Path,
    harmless: Path,
    max_per_category: int,
    seed: int = 0,
    instructed: Sequence[str] = (),
    batch_rows: int = 4096,
) -> ResidualSample:
    """At most `max_per_category` prompts per category from each activations file, all probe points,
    streamed in row batches (memory: the sample, not the file). Categories in `instructed` (refusals
    a system prompt asks for) get the set 'instructed'."""
    parts, ids_out, cats_out, sets_out = [], [], [], []
    for path, set_name in ((harmful, HARMFUL), (harmless, HARMLESS)):
        with reading(path, "probe-activations"):
            chosen, points = _choose(path, max_per_category, seed)
            if not chosen:
                raise ClawlyError(f"{path} holds no residuals: rerun probe-activations")
            order = {i: k for k, i in enumerate(chosen)}
            # no pre-buffering, one thread: otherwise pyarrow holds read-ahead buffers that grow with the
            # file (bench/research_memory.py: 302 -> 462 MiB above imports for 4x the prompts, same sample)
            f = pq.ParquetFile(str(path), pre_buffer=False)
            d = f.schema_arrow.field("residual").type.list_size
            out = np.zeros((len(order), points, d), np.float32)
            batches = f.iter_batches(batch_size=batch_rows, columns=["id", "layer", "residual"], use_threads=False)
            for batch in batches:
                bid = batch.column(0).to_pylist()
                keep = [k for k, i in enumerate(bid) if i in order]
                if keep:
                    layer = batch.column(1).to_numpy()[keep]
                    values = batch.column(2).flatten().to_numpy().reshape(-1, d)[keep]
                    out[[order[bid[k]] for k in keep], layer] = values
        parts.append(torch.from_numpy(out))
        ids_out += list(chosen)
        cats_out += list(chosen.values())
        sets_out += [INSTRUCTED if set_name == HARMFUL and c in instructed else set_name for c in chosen.values()]
    if parts[0].shape[1:] != parts[1].shape[1:]:
        raise ClawlyError(
            f"{harmful} and {harmless} hold different probe points or hidden sizes: rerun probe-activations"
        )
    return ResidualSample(torch.cat(parts), ids_out, cats_out, sets_out)


# ------------------------------------------------------------------ tables


def geometry_table(
    harmful_mean: torch.Tensor,
    harmless_mean: torch.Tensor,
    direction: torch.Tensor,
    category_directions: dict[str, torch.Tensor],
    sample: ResidualSample | None,
) -> pd.DataFrame:
    """One row per probe point (see the module docstring). Means and directions `[P, d]`; the
    silhouettes come from `sample` (None: left out)."""
    p = harmful_mean.shape[0]
    report = direction_report(harmful_mean, harmless_mean, direction)  # what compute-directions reports
    table = pd.DataFrame(
        {
            "probe_point": range(p),
            "harmful_mean_norm": harmful_mean.double().norm(dim=-1).numpy(),
            "harmless_mean_norm": harmless_mean.double().norm(dim=-1).numpy(),
            "difference_norm": report["mean_difference_norm"],
            "cos_harmful_harmless": cosine(harmful_mean, harmless_mean).numpy(),
            "cos_harmful_direction": cosine(harmful_mean, direction).numpy(),
            "cos_harmless_direction": cosine(harmless_mean, direction).numpy(),
            "cos_direction_previous": [float("nan"), *report["adjacent_cosine"]],
        }
    )
    cats = sorted(category_directions)
    if sample is not None:
        both = [k for k, s in enumerate(sample.sets) if s in (HARMFUL, HARMLESS)]
        labels = [sample.sets[k] for k in both]
        if len(set(labels)) == 2:
            table["silhouette"] = [silhouette(sample.residuals[both, i], labels) for i in range(p)]
        harmful_rows = [k for k, s in enumerate(sample.sets) if s != HARMLESS]
        sample_cats = [sample.categories[k] for k in harmful_rows]
        if len(set(sample_cats)) >= 2:
            values = [silhouette_values(sample.residuals[harmful_rows, i], sample_cats) for i in range(p)]
            table["category_silhouette"] = [float(v.mean()) for v in values]
            for cat in sorted(set(sample_cats)):
                mask = torch.tensor([c == cat for c in sample_cats])
                table[f"silhouette.{cat}"] = [float(v[mask].mean()) for v in values]
    if len(cats) >= 2:
        pairs = torch.stack(
            [cosine(category_directions[a], category_directions[b]) for a, b in itertools.combinations(cats, 2)]
        )  # [pairs, P]
        table["category_cosine_mean"] = pairs.mean(0).numpy()
        table["category_cosine_max"] = pairs.max(0).values.numpy()
    return table.round(6)


def category_cosines(category_directions: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Long form: probe_point, category_a, category_b, cosine (every ordered pair, the diagonal too)."""
    cats = sorted(category_directions)
    rows = []
    for a in cats:
        for b in cats:
            cos = cosine(category_directions[a], category_directions[b])
            rows += [(i, a, b, round(float(c), 6)) for i, c in enumerate(cos)]
    return pd.DataFrame(rows, columns=["probe_point", "category_a", "category_b", "cosine"])


def summary(table: pd.DataFrame) -> dict:
    """A few headline figures: where harmful and harmless separate most, where the categories do."""
    out: dict = {"probe_points": len(table), "difference_norm_max_at": int(table.difference_norm.idxmax())}
    for col, key in (("silhouette", "silhouette"), ("category_silhouette", "category_silhouette")):
        if col in table:
            at = int(table[col].idxmax())
            out[f"{key}_max"], out[f"{key}_max_at"] = round(float(table[col][at]), 4), at
    if "category_cosine_mean" in table:
        rest = table.iloc[1:] if len(table) > 1 else table  # the embeddings hold no direction worth naming
        at = int(rest.category_cosine_mean.idxmin())
        out["category_cosine_mean_min"], out["category_cosine_mean_min_at"] = (
            round(float(table.category_cosine_mean[at]), 4),
            at,
        )
    return out


def telling_points(table: pd.DataFrame) -> list[int]:
    """The probe points most worth a picture: where harmful and harmless separate most, where the
    categories separate most, and the last."""
    points = {len(table) - 1}
    for col in ("silhouette", "category_silhouette"):
        if col in table:
            points.add(int(table[col].idxmax()))
    return sorted(points)


# ------------------------------------------------------------------ projections (research extra)


def varying_points(sample: ResidualSample) -> list[int]:
    """The probe points where the sampled residuals differ at all (at the embeddings every prompt's
    last template token is the same token: one point, nothing to project)."""
    x = sample.residuals.double()
    spread = (x - x.mean(0)).abs().amax(dim=(0, 2))  # [P]
    scale = x.abs().amax(dim=(0, 2)).clamp(min=1e-30)
    return [i for i in range(x.shape[1]) if spread[i] > 1e-6 * scale[i]]


def projections(sample: ResidualSample, points: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """PaCMAP 2-D embedding of the sampled residuals at each probe point in `points`: `{point: [n, 2]}`."""
    require_research_extra()
    import pacmap  # optional: the research extra, checked above

    logging.getLogger("pacmap").setLevel(logging.ERROR)  # "random state is set", "NN backend": not news
    n = sample.residuals.shape[0]
    if n < 8:
        raise ClawlyError(
            f"only {n} sampled residuals: PaCMAP needs at least 8 (probe more prompts or raise "
            "research.sample_per_category)"
        )
    out = {}
    for i in points:
        x = sample.residuals[:, i].double()
        x = (x - x.mean(0)).numpy()
        reducer = pacmap.PaCMAP(
            n_components=2, n_neighbors=min(10, n // 3), random_state=seed, apply_pca=x.shape[1] > 100
        )
        with contextlib.redirect_stdout(io.StringIO()):  # PaCMAP's notes (seeded, NN backend) are not news
            out[i] = reducer.fit_transform(x, init="pca").astype(np.float32)
    return out


def _palette(names: Sequence[str]) -> dict[str, str]:
    colours = [
        "#1f77b4",
        "#d62728",
        "#2ca02c",
        "#9467bd",
        "#ff7f0e",
        "#8c564b",
        "#e377c2",
        "#17becf",
        "#bcbd22",
        "#7f7f7f",
    ]
    out = {name: colours[k % len(colours)] for k, name in enumerate(n for n in names if n != HARMLESS)}
    out[HARMLESS] = "#b0b0b0"
    return out


def _views(sample: ResidualSample) -> list[tuple[str, list[str]]]:
    """(title, label of every point): by set, and by category (every harmless prompt one colour)."""
    by_category = [c if s != HARMLESS else HARMLESS for c, s in zip(sample.categories, sample.sets, strict=True)]
    return [("harmful vs harmless", sample.sets), ("by harm category", by_category)]


def projection_figure(
    sample: ResidualSample,
    embedded: dict[int, np.ndarray],
    table: pd.DataFrame | None = None,
    title: str = "PaCMAP projection of the residual stream",
):
    """One plotly figure: left coloured by set, right by category, a slider over the probe points."""
    import plotly.graph_objects as go  # deferred: a second to import, and only this view draws
    from plotly.subplots import make_subplots  # deferred, as above

    views = _views(sample)
    fig = make_subplots(rows=1, cols=2, subplot_titles=[v[0] for v in views], horizontal_spacing=0.06)
    points = sorted(embedded)
    hover = [f"{i} ({c})" for i, c in zip(sample.ids, sample.categories, strict=True)]
    trace_ranges = []
    for point in points:
        start = len(fig.data)
        xy = embedded[point]
        for col, (_, labels) in enumerate(views, start=1):
            palette = _palette(sorted(set(labels)))
            for name in sorted(set(labels), key=lambda n: (n == HARMLESS, n)):
                idx = [k for k, lab in enumerate(labels) if lab == name]
                fig.add_trace(
                    go.Scatter(
                        x=xy[idx, 0],
                        y=xy[idx, 1],
                        mode="markers",
                        name=name,
                        legendgroup=f"{col}:{name}",
                        showlegend=col == 2 or name in (HARMFUL, HARMLESS, INSTRUCTED),
                        marker={"size": 5, "color": palette[name], "opacity": 0.75},
                        text=[hover[k] for k in idx],
                        hoverinfo="text",
                        visible=False,
                    ),
                    row=1,
                    col=col,
                )
        trace_ranges.append((start, len(fig.data)))
    start_at = telling_points(table)[0] if table is not None else None
    first = points.index(start_at) if start_at in points else 0
    for k in range(*trace_ranges[first]):
        fig.data[k].visible = True
    steps = []
    for j, point in enumerate(points):
        visible = [False] * len(fig.data)
        for k in range(*trace_ranges[j]):
            visible[k] = True
        note = ""
        if table is not None and "silhouette" in table:
            note = f" (silhouette {table.silhouette[point]:.2f}"
            note += f", categories {table.category_silhouette[point]:.2f})" if "category_silhouette" in table else ")"
        steps.append(
            {
                "method": "update",
                "label": str(point),
                "args": [{"visible": visible}, {"title.text": f"{title}: probe point {point}{note}"}],
            }
        )
    fig.update_layout(
        sliders=[{"active": first, "currentvalue": {"prefix": "probe point "}, "steps": steps, "pad": {"t": 30}}],
        title={"text": steps[first]["args"][1]["title.text"]},
        height=620,
        template="plotly_white",
        legend={"itemsizing": "constant"},
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def _pyplot():
    """matplotlib's pyplot on the Agg backend (offline, no display)."""
    require_research_extra()
    import matplotlib  # optional: the research extra, checked above

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional, as above

    return plt


def write_projection_pngs(
    sample: ResidualSample,
    embedded: dict[int, np.ndarray],
    points: Sequence[int],
    out_dir: Path,
    table: pd.DataFrame | None = None,
) -> list[Path]:
    """`pacmap_point_NN.png` per probe point in `points` (two panels: by set, by category), written by
    matplotlib's Agg backend (offline, no browser)."""
    plt = _pyplot()
    written = []
    for point in points:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
        xy = embedded[point]
        for ax, (view_title, labels) in zip(axes, _views(sample), strict=True):
            palette = _palette(sorted(set(labels)))
            for name in sorted(set(labels), key=lambda n: (n != HARMLESS, n)):  # harmless underneath
                idx = [k for k, lab in enumerate(labels) if lab == name]
                ax.scatter(xy[idx, 0], xy[idx, 1], s=9, c=palette[name], label=name, alpha=0.75, linewidths=0)
            ax.set_title(view_title)
            ax.set_xticks([]), ax.set_yticks([])
            ax.legend(fontsize=7, markerscale=1.6, loc="best")
        note = ""
        if table is not None and "silhouette" in table:
            note = f": silhouette {table.silhouette[point]:.2f}"
            if "category_silhouette" in table:
                note += f", between categories {table.category_silhouette[point]:.2f}"
        fig.suptitle(f"PaCMAP of the residual stream at probe point {point}{note}")
        fig.tight_layout()
        path = Path(out_dir) / f"pacmap_point_{point:02d}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        written.append(path)
    return written


def write_cosine_heatmap(cosines: pd.DataFrame, point: int, path: Path) -> Path:
    """The category x category cosine matrix at one probe point, as a PNG heatmap."""
    plt = _pyplot()
    at = cosines[cosines.probe_point == point].pivot(index="category_a", columns="category_b", values="cosine")
    fig, ax = plt.subplots(figsize=(1.1 * len(at) + 3, 0.9 * len(at) + 2))
    im = ax.imshow(at.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(at)), at.columns, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(at)), at.index, fontsize=8)
    for (r, c), v in np.ndenumerate(at.to_numpy()):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(f"Cosine between category directions at probe point {point}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
