"""Where do harm categories separate? Category directions per layer at two probe positions.

Refusal directions are nearly shared across categories at the last template token; Zhao et al.
(2025, arXiv 2507.11878) find harmfulness encoded at the instruction's last token, distinct by risk
category. This probes train-split prompts of every category with the default model at both
positions (`probe.position=last` and `instruction`), takes each category's difference-of-means
direction against the general harmless prompts at every probe point, and reports the
category-by-category cosine per point and position: how shared the directions are (mean cosine
over category pairs), and how close the kept category (self-harm) is to the targeted ones.

    python bench/category_separation.py [PER_CATEGORY]    # default 24 prompts per category

Writes bench/results/category-separation.{json,csv} and category-separation.html (plotly).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from bench.common import machine, project_settings  # noqa: E402
from clawly.ablate.activations import instruction_suffix, probe_residuals  # noqa: E402
from clawly.ablate.directions import cosine  # noqa: E402
from clawly.data.prompts import GENERAL  # noqa: E402
from clawly.data.templates import generate_prompts  # noqa: E402
from clawly.measure.templating import chat_prompts  # noqa: E402
from clawly.model.loading import load_model  # noqa: E402

KEPT = "self_harm_suicide"
TARGETED = ("violence_weapons", "drugs_substances", "adult_content")


def category_means(model, tokenizer, prompts: list[str], cats: list[str], suffix) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for idx, res in probe_residuals(model, tokenizer, prompts, 16, suffix=suffix):
        for j, i in enumerate(idx):
            c = cats[i]
            sums[c] = sums.get(c, 0) + res[j].double()
            counts[c] = counts.get(c, 0) + 1
    return {c: sums[c] / counts[c] for c in sums}


def main() -> None:
    per = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    settings = project_settings()
    harmful, harmless = generate_prompts(settings.data)
    h = harmful[harmful.split == "train"].groupby("category", sort=True).head(per)
    g = harmless[(harmless.split == "train") & (harmless.category == GENERAL)].head(2 * per)
    model, tok = load_model(settings.model)
    system = settings.model.system_prompt
    prompts = chat_prompts(tok, h.text.tolist() + g.text.tolist(), system)
    cats = h.category.tolist() + [GENERAL] * len(g)
    rows, summary = [], {}
    t0 = time.perf_counter()
    for position in ("last", "instruction"):
        suffix = instruction_suffix(tok, system) if position == "instruction" else None
        means = category_means(model, tok, prompts, cats, suffix)
        base = means.pop(GENERAL)
        directions = {c: m - base for c, m in means.items()}  # [P, d] each
        names = sorted(directions)
        points = base.shape[0]
        per_point = []
        for p in range(1, points):
            pair = {
                (a, b): float(cosine(directions[a][p], directions[b][p])) for a, b in itertools.combinations(names, 2)
            }
            for (a, b), c in pair.items():
                rows.append({"position": position, "probe_point": p, "category_a": a, "category_b": b, "cosine": c})
            kept = [pair[tuple(sorted((KEPT, t)))] for t in TARGETED]
            per_point.append(
                {
                    "probe_point": p,
                    "mean_pair_cosine": round(sum(pair.values()) / len(pair), 4),
                    "kept_vs_targeted": round(sum(kept) / len(kept), 4),
                }
            )
        most = min(per_point, key=lambda r: r["kept_vs_targeted"])
        summary[position] = {"most_distinct_point": most, "by_point": per_point}
        print(
            f"{position:>11}: self-harm vs targeted cosine lowest at point {most['probe_point']} "
            f"({most['kept_vs_targeted']:.3f}; all pairs {most['mean_pair_cosine']:.3f}); "
            f"at 60% depth {per_point[round(0.6 * (points - 1)) - 1]['kept_vs_targeted']:.3f}"
        )
    out = {
        "prompts_per_category": per,
        "harmless_prompts": len(g),
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        **summary,
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "category-separation.json").write_text(json.dumps(out, indent=2) + "\n")
    table = pd.DataFrame(rows)
    table.to_csv(ROOT / "results" / "category-separation.csv", index=False)
    import plotly.graph_objects as go

    fig = go.Figure()
    for position in ("last", "instruction"):
        by = pd.DataFrame(summary[position]["by_point"])
        fig.add_scatter(x=by.probe_point, y=by.mean_pair_cosine, name=f"{position}: all category pairs")
        fig.add_scatter(
            x=by.probe_point, y=by.kept_vs_targeted, name=f"{position}: self-harm vs targeted", line={"dash": "dot"}
        )
    fig.update_layout(
        title="Cosine between category refusal directions, by probe point and position",
        xaxis_title="probe point (l + 1 = output of layer l)",
        yaxis_title="cosine",
    )
    fig.write_html(str(ROOT / "results" / "category-separation.html"), include_plotlyjs="cdn")
    print(f"wrote bench/results/category-separation.{{json,csv,html}} in {out['seconds']} s")


if __name__ == "__main__":
    main()
