"""compute-directions: difference-of-means refusal directions per probe point, global and per category;
with directions.method=rdo the targeted ones then learned by refusal direction optimization."""

from __future__ import annotations

import json
from collections.abc import Callable

import pandas as pd
import torch

from clawly.ablate.activations import read_activations, read_means
from clawly.ablate.directions import (
    RefusalDirections,
    cosine,
    direction_report,
    refusal_directions,
    winsorize,
    write_refusal_directions,
)
from clawly.ablate.rdo import base_targets, optimize_direction
from clawly.data.prompts import GENERAL, instructed_categories, read_prompts, row_systems
from clawly.errors import ClawlyError, require
from clawly.io import atomic_path, write_json
from clawly.log import StageLogger
from clawly.measure.stance import RefusalDetector, StrictKeywordRule
from clawly.measure.templating import chat_prompts
from clawly.model.loading import load_model
from clawly.paths import Paths
from clawly.settings import Settings


def contrast_filter(contrast: str) -> Callable[[str], bool]:
    """Which harmless categories form the contrast set."""
    return {"general": lambda c: c == GENERAL, "topic_matched": lambda c: c != GENERAL, "mixed": lambda c: True}[
        contrast
    ]


def pooled_mean(
    means: dict[str, torch.Tensor], counts: dict[str, int], prefix: str, keep: Callable[[str], bool]
) -> tuple[torch.Tensor, int]:
    """The mean over the categories `keep` accepts of `<prefix>.<category>` means, weighted by count."""
    total, acc = 0, None
    for key, mean in means.items():
        if not key.startswith(prefix + "."):
            continue
        cat = key[len(prefix) + 1 :]
        if not keep(cat):
            continue
        n = counts[key]
        acc = mean.double() * n if acc is None else acc + mean.double() * n
        total += n
    if acc is None:
        raise ClawlyError(
            f"no activations for {prefix} with this contrast setting: regenerate the prompts "
            f"or choose another directions.contrast"
        )
    return acc / total, total


def run(settings: Settings, log: StageLogger) -> dict:
    """Refusal directions (global and per category) and their report: per probe point the norm of the
    mean difference and the cosine with the next point's direction (`by_layer.csv`, a dvc plot).
    The global refusal direction leaves out the instructed categories (refusals a system prompt asks
    for); each of them still gets its own category direction."""
    p = Paths.of(settings)
    s = settings.directions
    stored = read_means(p.means)
    keep_harmless = contrast_filter(s.contrast)
    instructed = instructed_categories(read_prompts(p)[0])
    if s.winsorize_quantile is None:
        harmful_mean, n_harmful = pooled_mean(
            stored.means, stored.counts, "harmful_mean", lambda c: c not in instructed
        )
        harmless_mean, n_harmless = pooled_mean(stored.means, stored.counts, "harmless_mean", keep_harmless)
        cat_means = {k.split(".", 1)[1]: v.double() for k, v in stored.means.items() if k.startswith("harmful_mean.")}
    else:
        require(p.harmful_activations, "probe-activations")
        _, h_cats, h_res = read_activations(p.harmful_activations)
        _, g_cats, g_res = read_activations(p.harmless_activations)
        g_res = g_res[torch.tensor([keep_harmless(c) for c in g_cats])]
        h_res, g_res = winsorize(h_res, s.winsorize_quantile), winsorize(g_res, s.winsorize_quantile)
        safety = torch.tensor([c not in instructed for c in h_cats])
        harmful_mean, harmless_mean = h_res[safety].mean(0), g_res.mean(0)
        n_harmful, n_harmless = int(safety.sum()), g_res.shape[0]
        cat_means = {c: h_res[torch.tensor([x == c for x in h_cats])].mean(0) for c in sorted(set(h_cats))}
    direction = refusal_directions(harmful_mean, harmless_mean, s.projected)  # [P, d]
    categories = sorted(cat_means)
    result = RefusalDirections(
        direction,
        harmful_mean - harmless_mean,
        harmful_mean,
        harmless_mean,
        {c: refusal_directions(cat_means[c], harmless_mean, s.projected) for c in categories},
        {
            "model": stored.meta.get("model", ""),
            "probe_points": str(direction.shape[0]),
            "hidden_size": str(direction.shape[1]),
            "categories": json.dumps(categories),
            "counts": json.dumps({"harmful": n_harmful, "harmless": n_harmless}),
            "contrast": s.contrast,
            "projected": str(s.projected),
            "method": s.method,
        },
    )
    rdo = optimized_directions(settings, result, log) if s.method == "rdo" else None
    write_refusal_directions(p.directions, result)
    by_layer = direction_report(harmful_mean, harmless_mean, direction)
    table = pd.DataFrame(
        {
            "probe_point": range(direction.shape[0]),
            "mean_difference_norm": by_layer["mean_difference_norm"],
            "cosine_with_next": by_layer["adjacent_cosine"] + [None],
        }
    )
    for c in categories:  # the category direction as the file holds it (float32)
        cos = cosine(result.category_directions[c].float(), direction)
        table[f"cosine_with_global.{c}"] = [round(float(x), 4) for x in cos]
    with atomic_path(p.directions_by_layer) as tmp:
        table.to_csv(tmp, index=False)
    report = {
        "probe_points": direction.shape[0],
        "hidden_size": direction.shape[1],
        "harmful_prompts": n_harmful,
        "harmless_prompts": n_harmless,
        "contrast": s.contrast,
        "projected": s.projected,
        "winsorize_quantile": s.winsorize_quantile,
        "largest_difference_at": max(range(len(table)), key=lambda i: table.mean_difference_norm[i]),
        "method": s.method,
    }
    if rdo is not None:
        report["rdo"] = rdo
    write_json(p.report("directions"), report)
    log.event(
        "directions",
        probe_points=direction.shape[0],
        harmful=n_harmful,
        harmless=n_harmless,
        largest_difference_at=report["largest_difference_at"],
    )
    return report


def optimized_directions(
    settings: Settings, result: RefusalDirections, log: StageLogger, model=None, tokenizer=None
) -> dict:
    """Replace each targeted category's direction (in global mode the refusal direction) in
    `result` by the one refusal direction optimization learns from it (the same vector at every
    probe point); return what each optimization did (loss history, cosine with its start)."""
    s, c = settings.directions, settings.categories
    harmful, harmless = read_prompts(Paths.of(settings))
    train, general = harmful[harmful.split == "train"], harmless[harmless.split == "train"]
    if model is None:
        model, tokenizer = load_model(settings.model, log)
    system = settings.model.system_prompt

    def sample(df, n):
        rows = df.sample(n=min(n, len(df)), random_state=settings.optimize.seed)
        return chat_prompts(tokenizer, rows.text.tolist(), row_systems(rows, system))

    kept = [x for k in (c.kept if c.enabled else []) for x in sample(train[train.category == k], s.rdo_prompts)]
    harmless_prompts = sample(general[general.category == GENERAL], s.rdo_prompts)
    point = round(s.rdo_init_point * (result.refusal_direction.shape[0] - 1))
    rule = StrictKeywordRule(RefusalDetector(settings.optimize.refusal_markers or None))
    out = {"init_point": point, "steps": s.rdo_steps, "lr": s.rdo_lr, "by_direction": {}}
    jobs = (
        [(name, train[train.category == name]) for name in c.targeted]
        if c.enabled
        else [("global", train[~train.category.isin(instructed_categories(harmful))])]
    )
    for name, rows in jobs:
        targeted = sample(rows, s.rdo_prompts * (1 if c.enabled else 4))
        targets = base_targets(model, tokenizer, targeted, kept, harmless_prompts, rule)
        init = (result.category_directions[name] if c.enabled else result.refusal_direction)[point]
        learned = optimize_direction(
            model,
            tokenizer,
            init,
            targeted,
            targets,
            harmless_prompts,
            s.rdo_steps,
            s.rdo_lr,
            s.rdo_kept_weight,
            s.rdo_harmless_weight,
            log.progress,
        )
        spread = learned.direction.unsqueeze(0).expand_as(result.refusal_direction).clone()
        if c.enabled:
            result.category_directions[name] = spread
        else:
            result.refusal_direction = spread
        first, last = learned.history[0], learned.history[-1]
        out["by_direction"][name] = {
            "cosine_with_start": round(float(cosine(learned.direction.double(), init.double())), 4),
            "refusal_tokens": len(targets.refusal_tokens),
            "kept_refusals": len(targets.kept_prompts),
            "first": first,
            "last": last,
        }
        log.event(
            "rdo",
            direction=name,
            loss=f"{first['loss']:.3f} -> {last['loss']:.3f}",
            refusal_probability=f"{first['refusal_probability']:.3f} -> {last['refusal_probability']:.3f}",
            kept=f"{first['kept']:.3f} -> {last['kept']:.3f}",
            harmless_kl=f"{first['harmless_kl']:.4f} -> {last['harmless_kl']:.4f}",
        )
    return out
