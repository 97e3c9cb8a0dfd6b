"""distill: the chosen trial's change retrained so that it depends on the request (`clawly.ablate.distill`).

With `distill.steps` 0 (the default) nothing is trained and the file holds no tensors: export-lora
then exports the chosen trial's change as it is.
"""

from __future__ import annotations

import random
import time

import pandas as pd
import torch

from clawly.ablate.ablation import AblationPlan, ablated, weight_deltas
from clawly.ablate.directions import AblationBasis, read_refusal_directions
from clawly.ablate.distill import DistillTargets, greedy_answers, initial_factors, train, write_factors
from clawly.data.prompts import instructed_categories, read_prompts, row_systems
from clawly.io import write_json
from clawly.log import StageLogger
from clawly.measure.logprobs import answer_logprobs
from clawly.measure.templating import chat_prompts
from clawly.model.loading import load_model
from clawly.paths import Paths
from clawly.search.chosen import read_chosen_trial
from clawly.settings import Settings


def global_plan(plan: AblationPlan) -> AblationPlan:
    """The chosen plan as a global abliteration: its kernels (per-category kernels: the first
    targeted category's) on one direction, no input-conditional edit."""
    kernels = plan.kernels or next(iter(plan.category_kernels.values()))
    return AblationPlan(kernels=dict(kernels), direction_index=plan.direction_index)


def sample(rows: pd.DataFrame, n: int, seed: int, by_category: bool = True) -> pd.DataFrame:
    if not by_category:
        return rows.sample(n=min(n, len(rows)), random_state=seed)
    parts = [g.sample(n=min(n, len(g)), random_state=seed) for _, g in rows.groupby("category")]
    return pd.concat(parts) if parts else rows.iloc[:0]


def run(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict | None:
    p, d, c = Paths.of(settings), settings.distill, settings.categories
    if not d.enabled:
        write_factors(p.distilled, {}, {"steps": "0"})
        write_json(p.report("distill"), {"steps": 0})
        log.event("distill", "distill.steps=0: the chosen trial's change is exported as it is")
        return None
    harmful, harmless = read_prompts(p)
    train_rows = harmful[harmful.split == "train"]
    targeted_cats = c.targeted if c.enabled else sorted(set(train_rows.category) - instructed_categories(harmful))
    targeted = sample(train_rows[train_rows.category.isin(targeted_cats)], d.targeted_prompts, settings.data.seed)
    kept = sample(train_rows[train_rows.category.isin(c.kept)], d.kept_prompts, settings.data.seed)
    calm = sample(harmless[harmless.split == "train"], d.harmless_prompts, settings.data.seed, by_category=False)
    if model is None:
        model, tokenizer = load_model(settings.model, log)
    system = settings.model.system_prompt

    def rendered(rows: pd.DataFrame) -> list[str]:
        return chat_prompts(tokenizer, rows.text.tolist(), row_systems(rows, system)) if len(rows) else []

    t0 = time.perf_counter()
    directions = read_refusal_directions(p.directions)
    basis = AblationBasis(directions.refusal_direction[None].double())
    plan = global_plan(read_chosen_trial(p.chosen_trial).plan)
    start = weight_deltas(model, basis, plan)
    bs = settings.probe.batch_size
    with torch.no_grad():
        with ablated(model, start):  # the globally abliterated model answers the targeted requests
            t_prompts = rendered(targeted)
            t_answers = greedy_answers(model, tokenizer, t_prompts, d.answer_tokens, bs)
        k_prompts, h_prompts = rendered(kept), rendered(calm)
        k_answers = greedy_answers(model, tokenizer, k_prompts, d.answer_tokens, bs) if k_prompts else []
        h_answers = greedy_answers(model, tokenizer, h_prompts, d.kl_tokens, bs) if h_prompts else []
        h_logprobs = [
            lp
            for i in range(0, len(h_prompts), bs)
            for lp in answer_logprobs(model, tokenizer, h_prompts[i : i + bs], h_answers[i : i + bs])
        ]
    targets = DistillTargets(
        list(zip(t_prompts, t_answers, strict=True)),
        list(zip(k_prompts, k_answers, strict=True)),
        list(zip(h_prompts, h_answers, h_logprobs, strict=True)),
    )
    teachers = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = train(
        model,
        tokenizer,
        initial_factors(start, d.rank, settings.data.seed),
        targets,
        d.steps,
        d.lr,
        d.batch_size,
        d.kept_weight,
        d.harmless_weight,
        seed=random.Random(settings.data.seed).randrange(2**31),
        progress=log.progress,
    )
    seconds = time.perf_counter() - t1
    write_factors(p.distilled, result.factors, {"steps": str(d.steps), "rank": str(d.rank)})
    report = {
        "steps": d.steps,
        "rank": d.rank,
        "start": plan.to_dict(),
        "targeted_requests": len(targeted),
        "kept_requests": len(kept),
        "harmless_requests": len(calm),
        "teacher_seconds": round(teachers, 1),
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / d.steps, 2),
        "first": result.history[0],
        "last": result.history[-1],
        "history": result.history,
    }
    write_json(p.report("distill"), report)
    log.event(
        "distilled",
        f"{d.steps} steps in {seconds:.0f} s: loss {result.history[0]['loss']:.4f} -> {result.history[-1]['loss']:.4f}",
        last=result.history[-1],
    )
    return report
