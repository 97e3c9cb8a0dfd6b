"""Research views: the geometry numbers on synthetic residuals with known answers, the streamed
sample, the analyze step's files (well-formed HTML and PNGs), the API and CLI doors, and the
clear message without the research extra."""

import builtins
import json
import math
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_api import quiet, tiny_settings

from clawly import cli
from clawly.ablate import research as rs
from clawly.ablate.activations import ActivationWriter, read_activations
from clawly.ablate.directions import RefusalDirections, write_refusal_directions
from clawly.api import Pipeline
from clawly.data.prompts import write_prompts
from clawly.errors import ClawlyError
from clawly.paths import Paths
from clawly.settings import Settings, SettingsError
from clawly.steps import analyze

# ------------------------------------------------------------------ the numbers


def test_silhouette_matches_hand_computed_values():
    # points 0, 1 (a) and 4, 5 (b) on a line: s(0) = (4.5 - 1) / 4.5, s(1) = (3.5 - 1) / 3.5, symmetric
    x = torch.tensor([[0.0], [1.0], [4.0], [5.0]])
    values = rs.silhouette_values(x, ["a", "a", "b", "b"])
    expected = torch.tensor([3.5 / 4.5, 2.5 / 3.5, 2.5 / 3.5, 3.5 / 4.5], dtype=torch.float64)
    torch.testing.assert_close(values, expected)
    assert rs.silhouette(x, ["a", "a", "b", "b"]) == pytest.approx((3.5 / 4.5 + 2.5 / 3.5) / 2)
    # a point alone in its cluster scores 0 (Rousseeuw's convention)
    assert rs.silhouette_values(torch.tensor([[0.0], [1.0], [9.0]]), ["a", "a", "b"])[2] == 0
    with pytest.raises(ValueError, match="two clusters"):
        rs.silhouette(x, ["a"] * 4)


def test_silhouette_is_near_one_for_separated_clusters_and_near_zero_for_identical_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=g)
    far = torch.cat([a, a[:30] + 100.0])
    assert rs.silhouette(far, ["a"] * 40 + ["b"] * 30) > 0.97
    same = torch.cat([a, a.clone()])  # the same points twice, under two labels
    assert abs(rs.silhouette(same, ["a"] * 40 + ["b"] * 40)) < 0.05
    mixed = torch.randn(200, 8, generator=g)  # one distribution, labels at random
    assert abs(rs.silhouette(mixed, ["a", "b"] * 100)) < 0.05


def _known_means():
    # probe point 0: harmful = harmless (no direction); point 1: harmless e1, harmful e1 + e2; point 2: e1 vs 3 e2
    harmless = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]])
    harmful = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0.0, 3.0, 0]])
    diff = harmful - harmless
    direction = diff / diff.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return harmful, harmless, direction


def test_geometry_table_norms_and_cosines_are_the_hand_computed_ones():
    harmful, harmless, direction = _known_means()
    cats = {
        "a": torch.tensor([[0.0, 0, 1], [1.0, 0, 0], [1.0, 0, 0]]),
        "b": torch.tensor([[0.0, 0, 1], [0.0, 1.0, 0], [1.0, 1.0, 0]]),
        "c": torch.tensor([[0.0, 0, 1], [0.0, 0, 1.0], [1.0, 0, 0]]),
    }
    t = rs.geometry_table(harmful, harmless, direction, cats, None)
    r2 = 1 / math.sqrt(2)
    assert list(t.probe_point) == [0, 1, 2]
    np.testing.assert_allclose(t.harmful_mean_norm, [1, math.sqrt(2), 3], atol=1e-6)
    np.testing.assert_allclose(t.harmless_mean_norm, [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(t.difference_norm, [0, 1, math.sqrt(10)], atol=1e-6)
    np.testing.assert_allclose(t.cos_harmful_harmless, [1, r2, 0], atol=1e-6)
    # point 2: direction (-1, 3, 0) / sqrt(10)
    np.testing.assert_allclose(t.cos_harmful_direction, [0, r2, 3 / math.sqrt(10)], atol=1e-6)
    np.testing.assert_allclose(t.cos_harmless_direction, [0, 0, -1 / math.sqrt(10)], atol=1e-6)
    assert math.isnan(t.cos_direction_previous[0])
    np.testing.assert_allclose(t.cos_direction_previous[1:], [0, 3 / math.sqrt(10)], atol=1e-6)
    # pairs (a, b), (a, c), (b, c): point 1 cosines 0, 0, 0; point 2: 1/sqrt2, 1, 1/sqrt2
    np.testing.assert_allclose(t.category_cosine_mean, [1, 0, (2 * r2 + 1) / 3], atol=1e-6)
    np.testing.assert_allclose(t.category_cosine_max, [1, 0, 1], atol=1e-6)
    assert "silhouette" not in t  # no sample given


def test_category_cosine_matrix_is_symmetric_with_a_unit_diagonal():
    g = torch.Generator().manual_seed(1)
    cats = {c: torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1) for c in "xyz"}
    m = rs.category_cosines(cats)
    assert len(m) == 4 * 9 and set(m.columns) == {"probe_point", "category_a", "category_b", "cosine"}
    at = m[m.probe_point == 2].pivot(index="category_a", columns="category_b", values="cosine")
    np.testing.assert_allclose(at.to_numpy(), at.to_numpy().T, atol=1e-6)
    np.testing.assert_allclose(np.diag(at.to_numpy()), 1, atol=1e-6)
    assert at.loc["x", "z"] == pytest.approx(float(cats["x"][2] @ cats["z"][2]), abs=1e-6)


# ------------------------------------------------------------------ synthetic activations on disk

HIDDEN, POINTS, SEPARATES_AT = 12, 4, 2  # categories separate at probe point 2 only


def _residuals(cats: list[str], g: torch.Generator, shift: float) -> torch.Tensor:
    """[n, P, d]: noise everywhere; at SEPARATES_AT each category moved far along its own axis."""
    x = torch.randn(len(cats), POINTS, HIDDEN, generator=g)
    names = sorted(set(cats))
    for k, c in enumerate(cats):
        x[k, SEPARATES_AT, names.index(c)] += shift
        x[k, 3, -1] += 2.0  # point 3: harmful and harmless apart along one axis (see _write_project)
    return x


def _write_project(tmp: Path, per_category: int = 12) -> Settings:
    settings = Settings(
        artifacts_dir=str(tmp / "artifacts"),
        **{
            "data.out_dir": str(tmp / "prompts"),
            "research.sample_per_category": 5,
            "research.projection_points": [0, 2, 3],
        },
    )
    p = Paths.of(settings)
    g = torch.Generator().manual_seed(0)
    h_cats = [c for c in ("drugs", "self_harm", "violence") for _ in range(per_category)]
    g_cats = ["general"] * (2 * per_category)
    rows = {"harmful": (h_cats, _residuals(h_cats, g, 25.0)), "harmless": (g_cats, _residuals(g_cats, g, 0.0))}
    rows["harmless"][1][:, 3, -1] -= 4.0
    p.activations.mkdir(parents=True)
    for name, (cats, res) in rows.items():
        w = ActivationWriter(p.activations / f"{name}.parquet", HIDDEN)
        ids = [f"{name}-{k}" for k in range(len(cats))]
        for start in range(0, len(cats), 7):  # several row groups, as probe-activations writes them
            w.write(ids[start : start + 7], cats[start : start + 7], res[start : start + 7])
        w.close()
    harmful = pd.DataFrame(
        {
            "id": [f"harmful-{k}" for k in range(len(h_cats))],
            "text": "x",
            "category": h_cats,
            "split": "train",
            "system": "",
        }
    )
    harmless = pd.DataFrame(
        {
            "id": [f"harmless-{k}" for k in range(len(g_cats))],
            "text": "x",
            "category": g_cats,
            "split": "train",
            "system": "",
        }
    )
    write_prompts(p, harmful, harmless)
    h_mean, g_mean = rows["harmful"][1].mean(0), rows["harmless"][1].mean(0)
    unit = torch.nn.functional.normalize
    cat_dirs = {
        c: unit(rows["harmful"][1][[k for k, x in enumerate(h_cats) if x == c]].mean(0) - g_mean, dim=-1)
        for c in sorted(set(h_cats))
    }
    write_refusal_directions(
        p.directions,
        RefusalDirections(
            unit(h_mean - g_mean, dim=-1), h_mean - g_mean, h_mean, g_mean, cat_dirs, {"model": "synthetic"}
        ),
    )
    return settings


def test_the_sample_streams_at_most_the_cap_per_category_with_the_written_residuals(tmp_path):
    settings = _write_project(tmp_path)
    p = Paths.of(settings)
    sample = rs.sample_residuals(p.harmful_activations, p.harmless_activations, 5, seed=3, batch_rows=5)
    counts = pd.Series(sample.categories).value_counts().to_dict()
    assert counts == {"drugs": 5, "self_harm": 5, "violence": 5, "general": 5}
    assert sample.residuals.shape == (20, POINTS, HIDDEN) and len(set(sample.ids)) == 20
    ids, _, full = read_activations(p.harmful_activations)
    g_ids, _, g_full = read_activations(p.harmless_activations)
    by_id = {**dict(zip(ids, full, strict=True)), **dict(zip(g_ids, g_full, strict=True))}
    for pid, res in zip(sample.ids, sample.residuals, strict=True):
        torch.testing.assert_close(res, by_id[pid])  # every probe point of the row, from any row batch
    again = rs.sample_residuals(p.harmful_activations, p.harmless_activations, 5, seed=3, batch_rows=4096)
    assert again.ids == sample.ids and torch.equal(again.residuals, sample.residuals)
    other = rs.sample_residuals(p.harmful_activations, p.harmless_activations, 5, seed=4)
    assert other.ids != sample.ids  # the seed draws another sample
    marked = rs.sample_residuals(p.harmful_activations, p.harmless_activations, 5, instructed=["self_harm"])
    assert {s for s, c in zip(marked.sets, marked.categories, strict=True) if c == "self_harm"} == {"instructed"}


def test_silhouettes_find_where_the_categories_separate(tmp_path):
    settings = _write_project(tmp_path)
    g = analyze.geometry(settings)
    t = g.table
    assert t.category_silhouette.idxmax() == SEPARATES_AT and t.category_silhouette[SEPARATES_AT] > 0.8
    assert abs(t.category_silhouette[0]) < 0.2  # noise alone
    for cat in ("drugs", "self_harm", "violence"):
        assert t[f"silhouette.{cat}"][SEPARATES_AT] > 0.8
    # harmful vs harmless: apart at point 3 (and at 2, where the harmful points moved away)
    assert t.silhouette[3] > t.silhouette[0] + 0.1
    assert rs.telling_points(t) == sorted({int(t.silhouette.idxmax()), SEPARATES_AT, POINTS - 1})


def test_analyze_writes_tables_metrics_and_well_formed_html_and_pngs(tmp_path):
    settings = _write_project(tmp_path)
    summary = analyze.run(settings, quiet(tmp_path))
    p = Paths.of(settings)
    table = pd.read_parquet(p.geometry)
    pd.testing.assert_frame_equal(table, pd.read_csv(p.geometry_csv), check_dtype=False, atol=1e-6)
    assert len(table) == POINTS and {"silhouette", "category_silhouette", "category_cosine_mean"} <= set(table)
    cos = pd.read_csv(p.category_cosines_csv)
    assert len(cos) == POINTS * 9
    metrics = json.loads(p.report("analyze").read_text())
    assert metrics == summary and metrics["category_silhouette_max_at"] == SEPARATES_AT
    assert json.loads(p.metric("analyze").read_text()) == {
        "silhouette": metrics["silhouette_max"],
        "category_silhouette": metrics["category_silhouette_max"],
    }
    assert metrics["sampled_residuals"] == 20
    assert metrics["category_cosine_mean_min"] == pytest.approx(table.category_cosine_mean[1:].min(), abs=1e-4)

    files = sorted(f.name for f in p.projections.iterdir())
    pngs = [f"pacmap_point_{i:02d}.png" for i in rs.telling_points(table)]
    heat = f"category_cosines_point_{metrics['category_cosine_mean_min_at']:02d}.png"
    assert files == sorted(["residuals.html", "embedding.parquet", heat, *pngs])
    for name in [*pngs, heat]:
        data = (p.projections / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 300 and height > 200
        assert data.endswith(b"IEND\xaeB`\x82")

    html = (p.projections / "residuals.html").read_text()
    checker = _TagBalance()
    checker.feed(html)
    assert checker.balanced() and checker.seen >= {"html", "head", "body", "script", "div"}
    # self-contained, so it opens offline: plotly.js inside, no script fetched
    assert 'id="clawly-residuals"' in html and "* plotly.js v" in html and not re.search(r"<script[^>]+src=", html)
    fig = _figure_json(html)
    slider = fig["layout"]["sliders"][0]
    assert [s["label"] for s in slider["steps"]] == ["0", "2", "3"]  # research.projection_points
    # each step shows one probe point's traces: both views, every set and category
    shown = [sum(s["args"][0]["visible"]) for s in slider["steps"]]
    assert shown == [2 + 4] * 3 and len(fig["data"]) == 3 * 6
    points = pd.read_parquet(p.projections / "embedding.parquet")
    assert set(points.probe_point) == {0, 2, 3} | set(rs.telling_points(table))
    assert len(points) == 20 * points.probe_point.nunique() and np.isfinite(points[["x", "y"]]).all().all()
    # at the separating point PaCMAP keeps the categories apart: each category's centre is far from the others
    at = points[(points.probe_point == SEPARATES_AT) & (points.set == "harmful")]
    centres = at.groupby("category")[["x", "y"]].mean()
    spread = at.groupby("category")[["x", "y"]].std().to_numpy().max()
    gaps = [np.linalg.norm(centres.iloc[i] - centres.iloc[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > 2 * spread


class _TagBalance(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.seen, self.errors = [], set(), 0

    def handle_starttag(self, tag, attrs):
        self.seen.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # <meta ... />
        self.seen.add(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors += 1

    def balanced(self) -> bool:
        return not self.stack and not self.errors


def _figure_json(html: str) -> dict:
    """The figure plotly embedded: Plotly.newPlot(div, data, layout, config)."""
    start = html.index('"clawly-residuals",') + len('"clawly-residuals",')
    decoder = json.JSONDecoder()
    rest = html[start:].lstrip()
    data, used = decoder.raw_decode(rest)
    layout, _ = decoder.raw_decode(rest[used:].lstrip().lstrip(",").lstrip())
    return {"data": data, "layout": layout}


def test_bad_probe_points_and_mismatched_directions_are_clear_errors(tmp_path):
    settings = _write_project(tmp_path)
    bad = Settings(**{**settings.to_dict(), "research.png_points": [9]})
    with pytest.raises(ClawlyError, match=r"research.png_points names probe points \[9\].*0 to 3"):
        analyze.run(bad, quiet(tmp_path))
    assert not Paths.of(bad).projections.exists()  # nothing half-written
    with pytest.raises(SettingsError, match="research.projection_points"):
        Settings(**{"research.projection_points": []})
    p = Paths.of(settings)
    d = [torch.zeros(POINTS + 1, HIDDEN) for _ in range(4)]  # one probe point too many
    write_refusal_directions(p.directions, RefusalDirections(*d, {}, {}))
    with pytest.raises(ClawlyError, match="disagree on probe points or hidden size: rerun compute-directions"):
        analyze.geometry(settings)


def without_research_extra(monkeypatch):
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name.split(".")[0] in ("pacmap", "matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_without_the_research_extra_the_stage_names_it_and_writes_nothing(tmp_path, monkeypatch):
    settings = _write_project(tmp_path)
    without_research_extra(monkeypatch)
    with pytest.raises(
        ClawlyError,
        match=r"pacmap and matplotlib, from the research extra: pip install "
        r"'clawly\[research\]'",
    ):
        analyze.run(settings, quiet(tmp_path))
    assert not Paths.of(settings).research.exists()
    # the table needs neither
    assert len(analyze.geometry(settings).table) == POINTS


# ------------------------------------------------------------------ the API and CLI doors (tiny model)


def test_api_residual_geometry_and_plot_residuals_on_a_tiny_model(make_tiny_model, tmp_path):
    model_dir = make_tiny_model("llama", num_layers=3)
    pipe = Pipeline(
        tiny_settings(model_dir, tmp_path, **{"probe.max_per_category": 8, "research.sample_per_category": 8}),
        log=quiet(tmp_path),
    )
    table = pipe.residual_geometry()
    assert list(table.probe_point) == [0, 1, 2, 3]  # embeddings + 3 layers
    assert table.difference_norm[1:].gt(0).all()
    check_silhouettes_against_sklearn(table, analyze.geometry(pipe.settings).sample)
    p = Paths.of(pipe.settings)
    pd.testing.assert_frame_equal(pd.read_parquet(p.geometry), table)
    assert set(pipe.category_cosines().category_a) == set(pipe.load_datasets()[0].category)
    files = pipe.plot_residuals(tmp_path / "views")
    assert {f.name for f in files} >= {"residuals.html", "embedding.parquet"}
    assert all(f.exists() and f.parent == tmp_path / "views" for f in files)
    assert any(f.suffix == ".png" for f in files)


def check_silhouettes_against_sklearn(table: pd.DataFrame, sample: rs.ResidualSample) -> None:
    """The table's silhouettes are scikit-learn's on the same sampled residuals: harmful vs harmless,
    the harmful (and instructed) residuals by category, and each category's mean value among them."""
    from scipy.spatial.distance import pdist, squareform  # deferred: scikit-learn's, the research extra
    from sklearn.metrics import silhouette_samples, silhouette_score  # deferred: pacmap's, the research extra

    both = [k for k, s in enumerate(sample.sets) if s in ("harmful", "harmless")]
    harmful = [k for k, s in enumerate(sample.sets) if s != "harmless"]
    cats = np.array([sample.categories[k] for k in harmful])
    assert len(set(cats)) >= 2 and {"silhouette", "category_silhouette"} <= set(table)
    for point in table.probe_point:  # the embeddings point included, where all residuals may be the same
        x = sample.residuals[:, point].double().numpy()
        # exact distances (scipy): scikit-learn's own Euclidean shortcut gives identical points ~1e-6
        # apart, and so a cluster of them a made-up silhouette
        exact = squareform(pdist(x))
        expected = silhouette_score(exact[np.ix_(both, both)], [sample.sets[k] for k in both], metric="precomputed")
        assert table.silhouette[point] == pytest.approx(expected, abs=1e-5), point
        values = silhouette_samples(exact[np.ix_(harmful, harmful)], cats, metric="precomputed")
        assert table.category_silhouette[point] == pytest.approx(values.mean(), abs=1e-5), point
        for cat in set(cats):
            assert table[f"silhouette.{cat}"][point] == pytest.approx(values[cats == cat].mean(), abs=1e-5)


def test_research_settings_are_cli_options():
    parser = cli.build_parser()
    args = parser.parse_args(["--sample-per-category", "30", "--research.png-points", "[1, 2]"])
    settings = cli.settings_from_args(args)
    assert settings.research.sample_per_category == 30 and settings.research.png_points == [1, 2]
