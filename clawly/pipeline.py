"""The pipeline's steps as library functions: each reads its inputs, computes, writes its outputs.

The DVC stages (`stages/`), the `Pipeline` API and the CLI are thin doors into these functions.
Every output is written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from clawly import __version__
from clawly.ablation import AblationPlan, weight_deltas
from clawly.activations import ActivationWriter, generation_marker, probe_residuals, read_activations
from clawly.decoding import PromptSet
from clawly.directions import (
    RunningMean,
    cosine,
    direction_report,
    refusal_directions,
    winsorize,
)
from clawly.errors import ClawlyError, require
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
        directions, retained = cm.global_directions(t, o.against_harmless)
        names, weights, kept, report = ["global"], [1.0], [], {"mode": "global"}
    else:
        cm.check_categories(c, sorted(k.split(".", 1)[1] for k in t if k.startswith("category_direction.")))
        cd = cm.category_directions(t, c, o.orthogonalize_categories, o.against_harmless)
        directions, retained, names, weights, kept = cd.directions, cd.retained, cd.names, cd.weights, cd.kept
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
    meta = {"mode": report["mode"], "names": json.dumps(names), "weights": json.dumps(weights),
            "kept": json.dumps(kept), "against_harmless": str(o.against_harmless)}
    with atomic_path(p.orthogonalized) as tmp:
        save_file({"directions": directions.float().contiguous(), "retained": retained.float().contiguous()},
                  str(tmp), metadata=meta)
    write_json(p.metric("orthogonalize"), report)
    log.event("orthogonalized", mode=report["mode"], directions=names,
              min_retained=round(float(retained[:, 1:].min()), 4) if retained.shape[1] > 1 else 1.0)
    return report


@dataclass
class AblationDirections:
    """What orthogonalize-categories wrote: directions `[m, P, d]`, their names and weights."""

    directions: torch.Tensor
    names: list[str]
    weights: list[float]
    kept: list[str]
    mode: str

    @property
    def strengths(self) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float64)

    @property
    def category_weights(self) -> dict[str, float]:
        return {} if self.mode == "global" else dict(zip(self.names, self.weights, strict=True))


def read_directions(settings: Settings) -> AblationDirections:
    from safetensors import safe_open

    p = paths_of(settings)
    require(p.orthogonalized, "orthogonalize-categories")
    with safe_open(str(p.orthogonalized), "pt") as f:
        meta = f.metadata()
        directions = f.get_tensor("directions").double()
    return AblationDirections(directions, json.loads(meta["names"]), json.loads(meta["weights"]),
                              json.loads(meta.get("kept", "[]")), meta["mode"])


# ---------------------------------------------------------------- optimize

def stratified_sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` rows spread evenly over categories (earlier categories get the remainder)."""
    cats = sorted(df.category.unique())
    base, extra = divmod(n, len(cats))
    parts = []
    for i, cat in enumerate(cats):
        rows = df[df.category == cat]
        k = min(len(rows), base + (1 if i < extra else 0))
        parts.append(rows.sample(n=k, random_state=seed) if k else rows.iloc[:0])
    return pd.concat(parts).reset_index(drop=True)


def optimizer_prompts(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eval-split prompts the optimizer scores trials on (deterministic by optimize.seed). In
    category mode only the preset's categories (targeted and kept) are scored."""
    harmful, harmless = read_prompts(settings)
    s = settings.optimize
    pool = harmful[harmful.split == "eval"]
    if settings.categories.enabled:
        pool = pool[pool.category.isin(list(settings.categories.weights))]
    h = stratified_sample(pool, s.harmful_prompts, s.seed)
    g = harmless[harmless.split == "eval"]
    g = g.sample(n=min(len(g), s.harmless_prompts), random_state=s.seed).reset_index(drop=True)
    return h, g


def study_fingerprint(settings: Settings, harmful: pd.DataFrame, harmless: pd.DataFrame) -> str:
    """Identifies what trials measure: same fingerprint, same study (resumed); else a new study.

    Everything that changes a trial's outcome goes in (model, prompts, directions, search space,
    category rules); n_trials, storage and batch size do not, so raising n_trials continues the
    same study."""
    import dataclasses
    import hashlib

    search = {k: v for k, v in dataclasses.asdict(settings.optimize).items()
              if k not in ("n_trials", "storage", "study_name", "batch_size", "prefix_cache")}
    directions = hashlib.sha256(paths_of(settings).orthogonalized.read_bytes()).hexdigest()
    key = {"model": dataclasses.asdict(settings.model), "search": search, "directions": directions,
           "categories": dataclasses.asdict(settings.categories),
           "harmful": harmful.id.tolist(), "harmless": harmless.id.tolist()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def optimize(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict:
    import optuna

    from clawly import optimize as opt
    from clawly.categories import category_table

    p = paths_of(settings)
    s, c = settings.optimize, settings.categories
    ablation = read_directions(settings)
    if ablation.mode == "category" and not c.enabled:
        raise ClawlyError("the directions were computed in category mode but no categories.weights are set: "
                          "rerun orthogonalize-categories (dvc repro does)")
    harmful, harmless = optimizer_prompts(settings)
    if model is None:
        model, tokenizer = _load(settings, log)
    sys_prompt = settings.model.system_prompt
    prefix = response_prefix(settings, model, tokenizer, harmful.text.tolist(), harmless.text.tolist(), log)
    prompts = opt.EvalPrompts(chat_prompts(tokenizer, harmful.text.tolist(), sys_prompt, prefix),
                              harmful.category.tolist(), chat_prompts(tokenizer, harmless.text.tolist(), sys_prompt),
                              harmful.text.tolist())
    batch_size = scoring_batch_size(settings, model, tokenizer, prompts.harmful, log)
    classifier = response_classifier(settings) if s.refusal_measure == "classifier" else None
    evaluator = opt.TrialEvaluator(model, tokenizer, prompts, s, batch_size=batch_size, classifier=classifier)
    t0 = time.perf_counter()
    base = evaluator.evaluate()
    log.event("baseline", refusals=base.refusals, prompts=len(prompts.harmful),
              seconds=round(time.perf_counter() - t0, 1), tokens=base.tokens, by_category=base.refusals_by_category)
    objectives = opt.Objectives(targeted=c.targeted if c.enabled else None, kept=c.kept, keep_rule=c.keep_rule,
                                min_retention=c.min_retention, base_refusals=base.refusals_by_category)
    storage = s.storage or str(p.journal)
    study_name = f"{s.study_name}-{study_fingerprint(settings, harmful, harmless)}"
    study = opt.open_study(storage, study_name, s.seed, s.n_startup_trials, objectives)
    done = len(opt.finished(study))
    if done:
        log.event("resume", f"resuming study '{study_name}' with {done} finished trial(s)", finished=done)
    bar = log.progress(total=s.n_trials, desc="trials", unit="trial")
    bar.update(min(done, s.n_trials))

    def on_trial(t) -> None:
        bar.update(1)
        seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
        if t.values is not None:
            log.event("trial", number=t.number, refusals=int(t.values[0]), kl=round(t.values[1], 5),
                      by_category=t.user_attrs.get("refusals_by_category"), feasible=opt.violation(t) == 0,
                      seconds=seconds, tokens=t.user_attrs.get("tokens"))
        elif t.state == optuna.trial.TrialState.PRUNED:
            log.event("pruned", number=t.number, kl=round(t.user_attrs.get("kl_divergence", float("nan")), 5),
                      prune_kl=s.prune_kl, seconds=seconds)

    num_layers = model.config.num_hidden_layers
    opt.run_study(study, model, evaluator, ablation.directions, num_layers, s, on_trial, objectives,
                  ablation.strengths, ablation.category_weights)
    bar.close()
    trials = opt.completed(study)
    if not trials:
        raise ClawlyError(f"all {len(opt.finished(study))} trials were pruned (KL above optimize.prune_kl="
                          f"{s.prune_kl}): raise prune_kl, set it to null, or narrow peak_weight_range")
    chosen = opt.choose_trial(trials, s.kl_cap)
    pareto = {t.number for t in study.best_trials}
    table = opt.trials_table(trials, pareto)
    p.optimize.mkdir(parents=True, exist_ok=True)
    with atomic_path(p.trials_parquet) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(p.trials_csv) as tmp:
        table[["trial", "refusals", "kl_divergence", "pareto", "feasible"]].to_csv(tmp, index=False)
    what = "targeted-category prompts" if c.enabled else "harmful eval prompts"
    n_targeted = sum(n for cat, n in base.prompts_by_category.items() if not c.enabled or cat in c.targeted)
    base_targeted = int(objectives.values(base)[0])
    fig = opt.pareto_figure(table, chosen.number, base_targeted, n_targeted, what)
    with atomic_path(p.pareto_html) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="cdn")
    used = pd.concat([harmful.assign(set="harmful"), harmless.assign(set="harmless")])[["id", "set", "category"]]
    with atomic_path(p.optimizer_prompts) as tmp:
        used.to_parquet(tmp, index=False)
    metrics = {
        "mode": ablation.mode,
        "rule": (f"among trials keeping >= {c.min_retention:.0%} of each kept category's base refusals (else those "
                 "falling least short): " if c.kept else "") +
                f"fewest keyword refusals{' on targeted categories' if c.enabled else ''} with KL <= {s.kl_cap}; "
                "else lowest KL",
        "keep_rule": c.keep_rule if c.kept else None,
        "chosen_trial": chosen.number, "trials": len(trials),
        "pruned_trials": len(opt.finished(study)) - len(trials), "response_prefix": prefix,
        "batch_size": batch_size, "harmful_prompts": len(prompts.harmful),
        "targeted_prompts": n_targeted, "harmless_prompts": len(prompts.harmless),
        "base": {"keyword_refusals": base_targeted, "keyword_refusal_rate": round(base_targeted / n_targeted, 4)},
        "chosen": {"keyword_refusals": int(chosen.values[0]),
                   "keyword_refusal_rate": round(chosen.values[0] / n_targeted, 4),
                   "kl_divergence": round(float(chosen.values[1]), 6),
                   "keeps_kept_refusals": opt.violation(chosen) == 0},
        "by_category": category_table(base.prompts_by_category, base.refusals_by_category,
                                      chosen.user_attrs["refusals_by_category"], c.weights),
        "pareto_front": [{"trial": t.number, "refusals": int(t.values[0]), "kl_divergence": round(t.values[1], 6)}
                         for t in sorted(study.best_trials, key=lambda t: t.values[1])],
    }
    write_json(p.chosen_trial, {"trial": chosen.number, "values": list(chosen.values), "params": chosen.params,
                                "plan": chosen.user_attrs["plan"], "response_prefix": prefix})
    write_json(p.metric("optimize"), metrics)
    log.event("chosen", trial=chosen.number, refusals=int(chosen.values[0]), kl=round(chosen.values[1], 5),
              base_refusals=base_targeted, by_category=chosen.user_attrs["refusals_by_category"])
    return metrics


def response_classifier(settings: Settings):
    """The response classifier of the `classifier` settings (trained once, then cached)."""
    from clawly.classify import ClassifierError, build_classifier
    from clawly.model import cache_root

    try:
        return build_classifier(settings.classifier.train_file, settings.optimize.refusal_markers or None,
                                settings.classifier.embedder, cache_root(settings.model) / "classifier")
    except ClassifierError as e:
        raise ClawlyError(str(e)) from e


def response_prefix(settings: Settings, model, tokenizer, harmful: list[str], harmless: list[str],
                    log: StageLogger, sample: int = 8, max_new_tokens: int = 24) -> str:
    """optimize.response_prefix resolved: 'auto' generates a few base-model answers and takes
    what they all start with (an opening chain of thought is closed empty instead)."""
    from clawly.decoding import PromptSet, detect_response_prefix

    setting = settings.optimize.response_prefix
    if setting != "auto":
        return setting or ""
    texts = harmful[:sample] + harmless[:sample]
    ps = PromptSet(tokenizer, chat_prompts(tokenizer, texts, settings.model.system_prompt), len(texts))
    responses, _ = ps.generate(model, max_new_tokens)
    prefix = detect_response_prefix(responses)
    log.event("response_prefix", f"response prefix: {prefix!r}" if prefix else "no shared response prefix",
              prefix=prefix)
    return prefix


def scoring_batch_size(settings: Settings, model, tokenizer, prompts: list[str], log: StageLogger) -> int:
    """optimize.batch_size, with 'auto' timed once per model and machine and cached."""
    from clawly.decoding import auto_batch_size
    from clawly.model import cache_root

    bs = settings.optimize.batch_size
    if bs != "auto":
        return int(bs)
    n = len(prompts)  # no batch wider than the prompt count; the whole set in one batch is a candidate
    sizes = sorted({b for b in (8, 16, 32, 64, 128) if b < n} | {min(n, 128)})
    return auto_batch_size(model, tokenizer, prompts[:16], cache_file=cache_root(settings.model) / "batch_size.json",
                           candidates=sizes, log=lambda m: log.event("batch_size", m))


def read_plan(settings: Settings) -> AblationPlan:
    p = paths_of(settings)
    require(p.chosen_trial, "optimize")
    return AblationPlan.from_dict(json.loads(p.chosen_trial.read_text())["plan"])


# ---------------------------------------------------------------- export-lora

def export_lora(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict:
    from clawly.lora import lora_factors, save_adapter
    from clawly.model import resolve_model_source

    p = paths_of(settings)
    plan = read_plan(settings)
    ablation = read_directions(settings)
    if model is None:
        model, tokenizer = _load(settings, log)
    source = str(resolve_model_source(settings.model))
    e = settings.export
    deltas = weight_deltas(model, ablation.directions, plan, ablation.strengths)
    factors = lora_factors(deltas, e.energy, e.max_rank)
    per_category = settings.categories.per_category_adapters and ablation.mode == "category"
    with atomic_dir(p.lora) as tmp:
        save_adapter(model, factors, tmp, base_model_name_or_path=source)
        if per_category:
            for i, name in enumerate(ablation.names):
                one = weight_deltas(model, ablation.directions[i:i + 1], plan, ablation.strengths[i:i + 1])
                save_adapter(model, lora_factors(one, e.energy, e.max_rank), tmp / "categories" / name,
                             base_model_name_or_path=source)
    errors = [f.relative_error for f in factors.values()]
    metrics = {"modules": len(factors), "ranks": sorted({f.rank for f in factors.values()}),
               "max_relative_error": round(max(errors), 8), "mean_relative_error": round(sum(errors) / len(errors), 8),
               "norm_preserve": plan.norm_preserve,
               "per_category_adapters": ablation.names if per_category else [],
               "per_category_sum_is_exact": per_category and not plan.norm_preserve}
    write_json(p.metric("export"), metrics)
    log.event("adapter", **metrics)
    return metrics


# ---------------------------------------------------------------- merge

def merge(settings: Settings, log: StageLogger) -> None:
    from peft import PeftModel

    from clawly.checkpoint import save_sharded, source_weight_map
    from clawly.model import resolve_model_source

    p = paths_of(settings)
    require(p.lora / "adapter_config.json", "export-lora")
    model, tokenizer = _load(settings, log)
    merged = PeftModel.from_pretrained(model, str(p.lora)).merge_and_unload()
    source = Path(resolve_model_source(settings.model))
    weight_map = source_weight_map(source)
    optimize_metrics = json.loads(p.metric("optimize").read_text()) if p.metric("optimize").exists() else {}
    with atomic_dir(p.model) as tmp:
        files = save_sharded(merged.state_dict(), tmp, settings.merge.max_shard_size, weight_map)
        merged.config.save_pretrained(tmp)
        if merged.generation_config is not None:
            merged.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_text(tmp / "README.md", model_card(settings, optimize_metrics))
        write_json(tmp / "clawly_reproduction.json", reproduction_record(settings, read_plan(settings), source))
    log.event("merged", files=files, out=str(p.model))


def category_markdown(by_category: dict[str, dict], after: str = "after") -> list[str]:
    """A markdown table of `categories.category_table` rows."""
    lines = [f"| category | role | prompts | base refusals | {after} | retention |", "|---|---|---|---|---|---|"]
    for cat, r in by_category.items():
        lo, hi = r["after_rate_ci95"]
        retention = "" if r.get("retention") is None else f"{r['retention']:.0%}"
        lines.append(f"| {cat} | {r['role']} | {r['prompts']} | {r['base_refusals']} ({r['base_rate']:.0%}) "
                     f"| {r['after_refusals']} ({r['after_rate']:.0%}, 95% CI {lo:.0%}-{hi:.0%}) | {retention} |")
    return lines


def model_title(settings: Settings) -> str:
    from clawly.model import DEFAULT_MODEL, DEFAULT_MODEL_DESCRIPTION

    return DEFAULT_MODEL_DESCRIPTION if settings.model.name == DEFAULT_MODEL else settings.model.name


def model_card(settings: Settings, metrics: dict) -> str:
    lines = ["---", "library_name: transformers", "tags: [clawly, abliteration]", "---", "",
             f"# {model_title(settings)} — abliterated with clawly", "",
             "Refusal directions were ablated from the weights (directional ablation) by "
             f"clawly {__version__}.", "",
             "**Dual-use warning:** this model refuses fewer harmful requests than its base model.", ""]
    if settings.categories.enabled:
        weights = ", ".join(f"{c} {w:g}" for c, w in settings.categories.weights.items())
        lines += [f"Category weights (1 uncensors, 0 keeps refusals): {weights}.", ""]
    if metrics:
        n = metrics["targeted_prompts"]
        lines += ["## Optimizer figures", "",
                  f"Keyword refusals (a marker list, which misses soft refusals and counts gibberish as "
                  f"compliance) on {n} {'targeted-category' if metrics['mode'] == 'category' else 'harmful'} "
                  f"eval prompts, and first-token KL divergence on {metrics['harmless_prompts']} harmless ones:", "",
                  "| | keyword refusals | KL divergence |", "|---|---|---|",
                  f"| base | {metrics['base']['keyword_refusals']}/{n} | 0 |",
                  f"| this model | {metrics['chosen']['keyword_refusals']}/{n} "
                  f"| {metrics['chosen']['kl_divergence']} |", "", *category_markdown(metrics["by_category"]),
                  "", f"Chosen by: {metrics['rule']} (trial {metrics['chosen_trial']} of {metrics['trials']})."]
    lines += ["", "Everything needed to reproduce this model is in `clawly_reproduction.json`.", ""]
    return "\n".join(lines)


def reproduction_record(settings: Settings, plan: AblationPlan, source: Path) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "optuna", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"clawly": __version__, "settings": settings.to_dict(), "plan": plan.to_dict(),
            "source_model": str(source), "python": platform.python_version(), "packages": versions}


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
    from clawly.categories import category_table
    from clawly.classify import read_labelled, scores
    from clawly.model import load_model

    p = paths_of(settings)
    require(p.model / "config.json", "merge")
    s = settings.evaluate
    harmful, harmless = heldout_prompts(settings)
    detector = RefusalDetector(settings.optimize.refusal_markers or None)
    classifier = response_classifier(settings)
    prefix = json.loads(p.chosen_trial.read_text()).get("response_prefix", "")
    base, tokenizer = _load(settings, log)
    prompts = PromptSet(tokenizer, chat_prompts(tokenizer, harmful.text.tolist(), settings.model.system_prompt,
                                                prefix), s.batch_size)
    harmless_prompts = PromptSet(tokenizer, chat_prompts(tokenizer, harmless.text.tolist(),
                                                         settings.model.system_prompt), s.batch_size)
    # Whole answers (no stop at the first marker): the classifier judges the answer, not its opening.
    base_resp, _ = prompts.generate(base, s.max_new_tokens, progress=log.progress)
    base_lp = harmless_prompts.first_token_logprobs(base)
    del base
    merged_settings = type(settings.model)(**{**settings.model.__dict__, "name": str(p.model), "gguf_file": None})
    merged, _ = load_model(merged_settings)
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
