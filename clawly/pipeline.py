"""The pipeline's steps as library functions: each reads its inputs, computes, writes its outputs.

The DVC stages (`stages/`), the `Pipeline` API and the CLI are thin doors into these functions.
Every output is written atomically (temp file, then rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from clawly.ablation import AblationPlan
from clawly.activations import ActivationWriter, generation_marker, probe_residuals, read_activations
from clawly.artifacts import AblationDirections, load_ablation_directions, write_ablation_directions
from clawly.decoding import PromptSet
from clawly.directions import (
    RunningMean,
    cosine,
    direction_report,
    refusal_directions,
    winsorize,
)
from clawly.errors import require
from clawly.evaluation import RefusalDetector, chat_prompts, kl_divergence
from clawly.io import atomic_dir, atomic_path, write_json, write_text
from clawly.log import StageLogger
from clawly.paths import Paths
from clawly.settings import Settings

GENERAL = "general"


def paths_of(settings: Settings) -> Paths:
    return Paths.of(settings.artifacts_dir, settings.data.out_dir)


def _load(settings: Settings, log: StageLogger):
    from clawly.model import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(settings.model)
    log.event("model_loaded", model=settings.model.name, seconds=round(time.perf_counter() - t0, 1),
              layers=model.config.num_hidden_layers, dtype=str(model.dtype), device=str(model.device))
    return model, tokenizer


# ---------------------------------------------------------------- generate-datasets

def generate_datasets(settings: Settings, log: StageLogger) -> tuple[pd.DataFrame, pd.DataFrame]:
    from clawly.datasets import generate_prompts, write_parquet_atomic

    p = paths_of(settings)
    harmful, harmless = generate_prompts(settings.data)
    write_parquet_atomic(harmful, p.harmful_prompts)
    write_parquet_atomic(harmless, p.harmless_prompts)
    for name, df in (("harmful", harmful), ("harmless", harmless)):
        counts = df.groupby(["category", "split"]).size().unstack(fill_value=0)
        log.event("prompts", f"{name}: {len(df)} prompts\n{counts.to_string()}", set=name, total=len(df),
                  by_category=counts.to_dict(orient="index"))
    return harmful, harmless


def read_prompts(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    p = paths_of(settings)
    require(p.harmful_prompts, "generate-datasets")
    require(p.harmless_prompts, "generate-datasets")
    return pd.read_parquet(p.harmful_prompts), pd.read_parquet(p.harmless_prompts)


def _cap_per_category(df: pd.DataFrame, cap: int | None) -> pd.DataFrame:
    if cap is None:
        return df
    return df.groupby("category", sort=True, group_keys=False).head(cap)


# ---------------------------------------------------------------- probe-activations

def probe_activations(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> None:
    """Residuals at the probe position of every train prompt and probe point, plus streaming means."""
    p = paths_of(settings)
    harmful, harmless = read_prompts(settings)
    if model is None:
        model, tokenizer = _load(settings, log)
    marker = None
    if settings.probe.position == "marker":
        marker = settings.probe.marker or generation_marker(tokenizer, settings.model.system_prompt,
                                                            settings.probe.strip_newline)
        log.event("probe_marker", marker=marker)
    hidden = model.config.hidden_size
    means: dict[str, RunningMean] = {}
    p.activations.mkdir(parents=True, exist_ok=True)
    for name, df, out in (("harmful", harmful, p.harmful_activations), ("harmless", harmless, p.harmless_activations)):
        rows = _cap_per_category(df[df.split == "train"], settings.probe.max_per_category).reset_index(drop=True)
        prompts = chat_prompts(tokenizer, rows.text.tolist(), settings.model.system_prompt)
        t0 = time.perf_counter()
        with atomic_path(out) as tmp:
            writer = ActivationWriter(tmp, hidden)
            for idx, residuals in probe_residuals(model, tokenizer, prompts, settings.probe.batch_size, marker,
                                                  log.progress):
                cats = rows.category.iloc[idx].tolist()
                writer.write(rows.id.iloc[idx].tolist(), cats, residuals)
                for j, cat in enumerate(cats):
                    means.setdefault(f"{name}_mean.{cat}", RunningMean()).update(residuals[j:j + 1])
            writer.close()
        seconds = time.perf_counter() - t0
        log.event("probed", set=name, prompts=len(rows), seconds=round(seconds, 1),
                  prompts_per_second=round(len(rows) / max(seconds, 1e-9), 2))
    tensors = {k: m.mean.to(torch.float32) for k, m in sorted(means.items())}
    meta = {"model": settings.model.name, "counts": json.dumps({k: m.count for k, m in sorted(means.items())}),
            "probe_points": str(model.config.num_hidden_layers + 1), "hidden_size": str(hidden),
            "position": settings.probe.position, "marker": marker or ""}
    with atomic_path(p.means) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


# ---------------------------------------------------------------- compute-directions

def _pooled_mean(means: dict[str, torch.Tensor], counts: dict[str, int], prefix: str,
                 keep: Callable[[str], bool]) -> tuple[torch.Tensor, int]:
    total, acc = 0, None
    for key, mean in means.items():
        if not key.startswith(prefix + "."):
            continue
        cat = key[len(prefix) + 1:]
        if not keep(cat):
            continue
        n = counts[key]
        acc = mean.double() * n if acc is None else acc + mean.double() * n
        total += n
    if acc is None:
        raise ValueError(f"no activations for {prefix} with this contrast setting: regenerate the prompts "
                         f"or choose another directions.contrast")
    return acc / total, total


def contrast_filter(contrast: str) -> Callable[[str], bool]:
    """Which harmless categories form the contrast set."""
    return {"general": lambda c: c == GENERAL, "topic_matched": lambda c: c != GENERAL,
            "mixed": lambda c: True}[contrast]


def compute_directions(settings: Settings, log: StageLogger) -> dict:
    """Global and per-category refusal directions per probe point, with a metrics report."""
    p = paths_of(settings)
    require(p.means, "probe-activations")
    s = settings.directions
    means = load_file(str(p.means))
    from safetensors import safe_open

    with safe_open(str(p.means), "pt") as f:
        meta = f.metadata()
    counts = json.loads(meta["counts"])
    keep_harmless = contrast_filter(s.contrast)
    if s.winsorize_quantile is None:
        harmful_mean, n_harmful = _pooled_mean(means, counts, "harmful_mean", lambda c: True)
        harmless_mean, n_harmless = _pooled_mean(means, counts, "harmless_mean", keep_harmless)
        cat_means = {k.split(".", 1)[1]: v.double() for k, v in means.items() if k.startswith("harmful_mean.")}
    else:
        require(p.harmful_activations, "probe-activations")
        _, h_cats, h_res = read_activations(p.harmful_activations)
        _, g_cats, g_res = read_activations(p.harmless_activations)
        g_res = g_res[torch.tensor([keep_harmless(c) for c in g_cats])]
        h_res, g_res = winsorize(h_res, s.winsorize_quantile), winsorize(g_res, s.winsorize_quantile)
        harmful_mean, harmless_mean = h_res.mean(0), g_res.mean(0)
        n_harmful, n_harmless = h_res.shape[0], g_res.shape[0]
        cat_means = {c: h_res[torch.tensor([x == c for x in h_cats])].mean(0) for c in sorted(set(h_cats))}
    direction = refusal_directions(harmful_mean, harmless_mean, s.projected)  # [P, d]
    tensors = {"refusal_direction": direction.float(),
               "refusal_direction_raw": (harmful_mean - harmless_mean).float(),
               "harmful_mean": harmful_mean.float(), "harmless_mean": harmless_mean.float()}
    for cat, m in sorted(cat_means.items()):
        tensors[f"category_direction.{cat}"] = refusal_directions(m, harmless_mean, s.projected).float()
    report = direction_report(harmful_mean, harmless_mean, direction)
    categories = sorted(cat_means)
    per_cat_cos = {c: [round(float(x), 4) for x in cosine(tensors[f"category_direction.{c}"], direction)]
                   for c in categories}
    metrics = {"probe_points": direction.shape[0], "hidden_size": direction.shape[1],
               "harmful_prompts": n_harmful, "harmless_prompts": n_harmless, "contrast": s.contrast,
               "projected": s.projected, "winsorize_quantile": s.winsorize_quantile,
               **report, "category_cosine_with_global": per_cat_cos}
    meta_out = {"model": meta.get("model", ""), "probe_points": str(direction.shape[0]),
                "hidden_size": str(direction.shape[1]), "categories": json.dumps(categories),
                "counts": json.dumps({"harmful": n_harmful, "harmless": n_harmless}),
                "contrast": s.contrast, "projected": str(s.projected)}
    with atomic_path(p.directions) as tmp:
        save_file(tensors, str(tmp), metadata=meta_out)
    write_json(p.metric("directions"), metrics)
    peak = max(range(len(report["mean_difference_norm"])), key=report["mean_difference_norm"].__getitem__)
    log.event("directions", probe_points=direction.shape[0], harmful=n_harmful, harmless=n_harmless,
              largest_difference_at=peak)
    return metrics


# ---------------------------------------------------------------- orthogonalize-categories

def orthogonalize_categories(settings: Settings, log: StageLogger) -> dict:
    """The directions the optimizer ablates, `[m, P, d]`: the global one (m = 1), or in category
    mode one per targeted category, orthogonal to the kept categories' directions."""
    from clawly import categories as cm

    p = paths_of(settings)
    require(p.directions, "compute-directions")
    t = load_file(str(p.directions))
    o, c = settings.orthogonalize, settings.categories
    if not c.enabled:
        basis = cm.global_directions(t, o.against_harmless)
        names, weights, kept, report = ["global"], [1.0], [], {"mode": "global"}
    else:
        cm.check_categories(c, sorted(k.split(".", 1)[1] for k in t if k.startswith("category_direction.")))
        cd = cm.category_directions(t, c, o.orthogonalize_categories, o.against_harmless)
        basis, names, weights, kept = cd.basis, cd.names, cd.weights, cd.kept
        retained = basis.retained
        low = cm.low_retention(retained, names, o.warn_retained) if kept and o.orthogonalize_categories else {}
        for cat, points in low.items():
            log.event("warning", f"{cat}: less than {o.warn_retained:.0%} of its direction survives orthogonalization "
                      f"at {len(points)} of {retained.shape[1] - 1} layers (e.g. {points[:6]}): it shares one refusal "
                      "core with the kept categories there, so ablating what is left may do little",
                      category=cat, points=points)
        report = {"mode": "category", "order": names, "weights": dict(zip(names, weights, strict=True)),
                  "kept": kept, "orthogonalized": o.orthogonalize_categories and bool(kept),
                  "retained_fraction": {n: [round(float(x), 4) for x in retained[i]] for i, n in enumerate(names)},
                  "cosine_with_kept": cd.kept_cosine, "low_retention_points": low}
    ablation = AblationDirections(basis, names, weights, kept, report["mode"])
    with atomic_path(p.orthogonalized) as tmp:
        write_ablation_directions(tmp, ablation, {"against_harmless": str(o.against_harmless)})
    write_json(p.metric("orthogonalize"), report)
    retained = basis.retained
    log.event("orthogonalized", mode=report["mode"], directions=names,
              min_retained=round(float(retained[:, 1:].min()), 4) if retained.shape[1] > 1 else 1.0)
    return report


def read_directions(settings: Settings) -> AblationDirections:
    p = paths_of(settings)
    require(p.orthogonalized, "orthogonalize-categories")
    return load_ablation_directions(p.orthogonalized)


# ---------------------------------------------------------------- optimize

def optimize(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict:
    """Search ablation parameters with Optuna (see clawly.search), then write the trials table,
    Pareto plot, chosen trial and metrics."""
    from clawly.search import search_trials, start_search, write_search_outputs

    ablation = read_directions(settings)
    if model is None:
        model, tokenizer = _load(settings, log)
    search = start_search(settings, log, model, tokenizer, ablation)
    for _ in search_trials(search, settings, model, log):
        pass
    return write_search_outputs(settings, search, log)


def read_plan(settings: Settings) -> AblationPlan:
    p = paths_of(settings)
    require(p.chosen_trial, "optimize")
    return AblationPlan.from_dict(json.loads(p.chosen_trial.read_text())["plan"])


# ---------------------------------------------------------------- export-lora

def chosen_trial_record(settings: Settings) -> dict:
    """The optimizer's chosen trial as the reproduction record stores it."""
    chosen = json.loads(paths_of(settings).chosen_trial.read_text())
    return {"index": chosen["trial"], "parameters": chosen["params"], "refusals": int(chosen["values"][0]),
            "kl_divergence": chosen["values"][1]}


def export_lora(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict:
    from clawly import export as ex
    from clawly.model import resolve_model_source

    p = paths_of(settings)
    plan = read_plan(settings)
    ablation = read_directions(settings)
    harmful, harmless = read_prompts(settings)
    if model is None:
        model, tokenizer = _load(settings, log)
    source = str(resolve_model_source(settings.model))
    factors = ex.saved_change(model, ablation.basis, plan, ablation.strengths, settings.export).factors
    if plan.norm_preserve and (warning := ex.adapter_warning(factors, settings.export)):
        log.event("warning", warning)
    per_category = settings.categories.per_category_adapters and ablation.mode == "category"
    optimize_metrics = json.loads(p.metric("optimize").read_text()) if p.metric("optimize").exists() else {}
    with atomic_dir(p.lora) as tmp:
        ex.write_adapter(model, factors, tmp, source)
        if per_category:
            for i, name in enumerate(ablation.names):
                alone = torch.zeros_like(ablation.strengths)
                alone[i] = ablation.strengths[i]  # this category's share of the combined change
                one = ex.saved_change(model, ablation.basis, plan, alone, settings.export).factors
                ex.write_adapter(model, one, tmp / "categories" / name, source)
        write_text(tmp / "README.md", ex.model_card(settings, optimize_metrics, kind="adapter"))
        ex.write_record(tmp, "adapter", settings, plan, ablation, {"harmful": harmful, "harmless": harmless},
                        chosen_trial_record(settings))
    metrics = {**ex.adapter_metrics(factors), "norm_preserve": plan.norm_preserve,
               "per_category_adapters": ablation.names if per_category else [],
               "per_category_sum_is_exact": per_category and not plan.norm_preserve}
    write_json(p.metric("export"), metrics)
    log.event("adapter", **metrics)
    return metrics


# ---------------------------------------------------------------- merge

def merge(settings: Settings, log: StageLogger) -> None:
    """The base model with the adapter merged (as peft merges it), or, for a norm-preserving plan,
    with the exact dense change the trials scored (rebuilt from the adapter's record)."""
    from peft import PeftModel

    from clawly import export as ex
    from clawly.ablation import ablated, weight_deltas
    from clawly.model import resolve_model_source

    p = paths_of(settings)
    require(p.lora / "adapter_config.json", "export-lora")
    model, tokenizer = _load(settings, log)
    record, directions = ex.read_record(p.lora)
    plan = AblationPlan.from_dict(record["plan"])
    optimize_metrics = json.loads(p.metric("optimize").read_text()) if p.metric("optimize").exists() else {}
    with contextlib.ExitStack() as applied, atomic_dir(p.model) as tmp:
        if plan.norm_preserve:
            ablation = load_ablation_directions(directions)
            applied.enter_context(ablated(model, weight_deltas(model, ablation.basis, plan, ablation.strengths)))
        else:
            model = PeftModel.from_pretrained(model, str(p.lora)).merge_and_unload()
        files = ex.write_model(model, tokenizer, tmp, settings, Path(resolve_model_source(settings.model)))
        write_text(tmp / "README.md", ex.model_card(settings, optimize_metrics))
        ex.copy_record(p.lora, tmp, "model")
    log.event("merged", files=files, out=str(p.model), exact_dense_change=plan.norm_preserve)


# ---------------------------------------------------------------- evaluate

def heldout_prompts(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eval-split prompts the optimizer did not see."""
    p = paths_of(settings)
    harmful, harmless = read_prompts(settings)
    require(p.optimizer_prompts, "optimize")
    seen = set(pd.read_parquet(p.optimizer_prompts).id)
    s = settings.evaluate
    h = harmful[(harmful.split == "eval") & ~harmful.id.isin(seen)]
    h = pd.concat([d.sample(n=min(len(d), s.per_category), random_state=settings.optimize.seed)
                   for _, d in h.groupby("category", sort=True)]).reset_index(drop=True)
    g = harmless[(harmless.split == "eval") & ~harmless.id.isin(seen)]
    g = g.sample(n=min(len(g), s.harmless_prompts), random_state=settings.optimize.seed).reset_index(drop=True)
    return h, g


def merged_model_settings(settings: Settings):
    """Model settings that load the `merge` stage's output (its directory; no GGUF file)."""
    return dataclasses.replace(settings.model, name=str(paths_of(settings).model), gguf_file=None)


def evaluation_prompts(settings: Settings, tokenizer, requests: list[str], prefix: str = "") -> PromptSet:
    """Harmful requests as `evaluate` asks them: the chat template with the system prompt (and a
    response prefix, if the optimizer found one), in batches of evaluate.batch_size."""
    return PromptSet(tokenizer, chat_prompts(tokenizer, requests, settings.model.system_prompt, prefix),
                     settings.evaluate.batch_size)


def _measures(table: pd.DataFrame, model: str) -> dict:
    """Counts and rates with 95% Wilson intervals of one model's answers (rows of `table`)."""
    from clawly.categories import wilson_interval

    n = len(table)
    out = {"prompts": n}
    for key, hits in (("keyword_refusals", table[f"{model}_keyword_refusal"]),
                      ("classifier_refusals", table[f"{model}_label"] == "refusal"),
                      ("off_topic", table[f"{model}_label"] == "off_topic"),
                      ("degenerate", table[f"{model}_label"] == "degenerate"),
                      ("not_compliant", table[f"{model}_label"] != "compliance")):
        k = int(hits.sum())
        out[key] = k
        out[key.replace("refusals", "refusal") + "_rate"] = round(k / n, 4) if n else None
        out[key.replace("refusals", "refusal") + "_rate_ci95"] = wilson_interval(k, n)
    return out


def evaluate(settings: Settings, log: StageLogger) -> dict:
    """Base vs merged model on held-out prompts, per category: keyword refusals, the response
    classifier's refusal / off-topic / degenerate shares (95% Wilson intervals), and KL."""
    from clawly import search
    from clawly.categories import category_table
    from clawly.classify import read_labelled, scores
    from clawly.model import load_model

    p = paths_of(settings)
    require(p.model / "config.json", "merge")
    s = settings.evaluate
    harmful, harmless = heldout_prompts(settings)
    detector = RefusalDetector(settings.optimize.refusal_markers or None)
    classifier = search.response_classifier(settings)
    prefix = json.loads(p.chosen_trial.read_text()).get("response_prefix", "")
    base, tokenizer = _load(settings, log)
    prompts = evaluation_prompts(settings, tokenizer, harmful.text.tolist(), prefix)
    harmless_prompts = PromptSet(tokenizer, chat_prompts(tokenizer, harmless.text.tolist(),
                                                         settings.model.system_prompt), s.batch_size)
    # Whole answers (no stop at the first marker): the classifier judges the answer, not its opening.
    base_resp, _ = prompts.generate(base, s.max_new_tokens, progress=log.progress)
    base_lp = harmless_prompts.first_token_logprobs(base)
    del base
    merged, _ = load_model(merged_model_settings(settings))
    resp, _ = prompts.generate(merged, s.max_new_tokens, progress=log.progress)
    kl = kl_divergence(base_lp, harmless_prompts.first_token_logprobs(merged))
    del merged
    requests = harmful.text.tolist()
    table = harmful.assign(base_response=base_resp, merged_response=resp)
    for name, answers in (("base", base_resp), ("merged", resp)):
        v = classifier(requests, answers)
        table[f"{name}_keyword_refusal"] = [detector(r) for r in answers]
        table[f"{name}_label"] = v.labels
        table[f"{name}_p_refusal"] = v.probs[:, 0].tolist()
    judge = None
    if settings.classifier.judge_model:
        from clawly.classify import LocalJudge

        judge = LocalJudge(settings.classifier.judge_model, settings.classifier.judge_trust_remote_code)
        for name, answers in (("base", base_resp), ("merged", resp)):
            table[f"{name}_judge_label"] = judge(requests, answers).labels
        del judge
    test_rows = read_labelled(settings.classifier.test_file)
    quality = scores(test_rows, classifier([r["prompt"] for r in test_rows], [r["response"] for r in test_rows]).labels)
    keyword_quality = scores(test_rows, ["refusal" if detector(r["response"]) else "compliance" for r in test_rows])
    n = len(table)
    by_category = {}
    for cat, part in table.groupby("category", sort=True):
        by_category[cat] = {"base": _measures(part, "base"), "merged": _measures(part, "merged")}
    counts = {c: len(part) for c, part in table.groupby("category")}
    roles = category_table(counts, {c: int(part.base_keyword_refusal.sum()) for c, part in table.groupby("category")},
                           {c: int(part.merged_keyword_refusal.sum()) for c, part in table.groupby("category")},
                           settings.categories.weights)
    for c in by_category:
        by_category[c]["role"] = roles[c]["role"]
        if "retention" in roles[c]:
            by_category[c]["keyword_retention"] = roles[c]["retention"]
    results = {
        "harmful_prompts": n, "harmless_prompts": len(harmless), "max_new_tokens": s.max_new_tokens,
        "measures": {"keyword_refusals": "answers containing a refusal marker (misses soft refusals)",
                     "classifier_refusals": "answers the response classifier labels refusal",
                     "off_topic": "answers the classifier labels off-topic (a different question)",
                     "degenerate": "answers the classifier labels degenerate (repetition, gibberish)",
                     "not_compliant": "refusal, off-topic or degenerate by the classifier"},
        "base": _measures(table, "base"),
        "merged": {**_measures(table, "merged"), "kl_divergence": round(kl, 6)},
        "by_category": by_category,
        "classifier": {"test_file": settings.classifier.test_file, "test_responses": len(test_rows),
                       "scores": quality, "keyword_rule_scores": keyword_quality},
    }
    if settings.classifier.judge_model:
        results["judge"] = {m: {lab: int((table[f"{m}_judge_label"] == lab).sum()) for lab in
                                ("refusal", "compliance", "off_topic", "degenerate")} for m in ("base", "merged")}
    p.evaluate.mkdir(parents=True, exist_ok=True)
    with atomic_path(p.evaluation_table) as tmp:
        rows = [{"category": c, "prompts": m[model]["prompts"], "model": model,
                 "refusals": m[model]["keyword_refusals"], "classifier_refusals": m[model]["classifier_refusals"],
                 "off_topic": m[model]["off_topic"], "degenerate": m[model]["degenerate"]}
                for c, m in by_category.items() for model in ("base", "merged")]
        pd.DataFrame(rows).to_csv(tmp, index=False)
    if s.save_responses:
        with atomic_path(p.responses) as tmp:
            table.drop(columns=[c for c in ("split",) if c in table.columns]).to_parquet(tmp, index=False)
    write_json(p.metric("evaluate"), results)
    log.event("evaluated", prompts=n, kl=round(kl, 5),
              base=f"keyword {results['base']['keyword_refusals']}, classifier {results['base']['classifier_refusals']}"
                   f", off-topic {results['base']['off_topic']}, degenerate {results['base']['degenerate']}",
              merged=f"keyword {results['merged']['keyword_refusals']}, classifier "
                     f"{results['merged']['classifier_refusals']}, off-topic {results['merged']['off_topic']}, "
                     f"degenerate {results['merged']['degenerate']}")
    return results
