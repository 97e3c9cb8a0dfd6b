"""The pipeline's steps as library functions: each reads its inputs, computes, writes its outputs.

The DVC stages (`stages/`), the `Pipeline` API and the CLI are thin doors into these functions.
Every output is written atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from clawly import __version__
from clawly.ablation import AblationPlan, weight_deltas
from clawly.activations import ActivationWriter, generation_marker, probe_residuals, read_activations
from clawly.directions import (
    RunningMean,
    cosine,
    direction_report,
    orthogonalize_against,
    refusal_directions,
    winsorize,
)
from clawly.errors import require
from clawly.evaluation import RefusalDetector, chat_prompts, first_token_logprobs, kl_divergence, refusal_flags
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

def orthogonalize_categories(settings: Settings, log: StageLogger) -> None:
    """The directions the optimizer ablates, `[m, P, d]` (global mode: m = 1)."""
    p = paths_of(settings)
    require(p.directions, "compute-directions")
    t = load_file(str(p.directions))
    directions = t["refusal_direction"].double().unsqueeze(0)
    retained = torch.ones(directions.shape[:2], dtype=torch.float64)
    if settings.orthogonalize.against_harmless:
        directions, retained = orthogonalize_against(directions, t["harmless_mean"].double().unsqueeze(0))
    meta = {"mode": "global", "names": json.dumps(["global"]), "weights": json.dumps([1.0]),
            "against_harmless": str(settings.orthogonalize.against_harmless)}
    with atomic_path(p.orthogonalized) as tmp:
        save_file({"directions": directions.float().contiguous(), "retained": retained.float()}, str(tmp),
                  metadata=meta)
    log.event("orthogonalized", mode="global", min_retained=round(float(retained.min()), 4))


def read_directions(settings: Settings) -> torch.Tensor:
    p = paths_of(settings)
    require(p.orthogonalized, "orthogonalize-categories")
    return load_file(str(p.orthogonalized))["directions"].double()


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
    """Eval-split prompts the optimizer scores trials on (deterministic by optimize.seed)."""
    harmful, harmless = read_prompts(settings)
    s = settings.optimize
    h = stratified_sample(harmful[harmful.split == "eval"], s.harmful_prompts, s.seed)
    g = harmless[harmless.split == "eval"]
    g = g.sample(n=min(len(g), s.harmless_prompts), random_state=s.seed).reset_index(drop=True)
    return h, g


def study_fingerprint(settings: Settings, harmful: pd.DataFrame, harmless: pd.DataFrame) -> str:
    """Identifies what trials measure: same fingerprint, same study (resumed); else a new study.

    Everything that changes a trial's outcome goes in (model, prompts, directions, search space);
    n_trials, storage and batch size do not, so raising n_trials continues the same study."""
    import dataclasses
    import hashlib

    search = {k: v for k, v in dataclasses.asdict(settings.optimize).items()
              if k not in ("n_trials", "storage", "study_name", "batch_size")}
    directions = hashlib.sha256(paths_of(settings).orthogonalized.read_bytes()).hexdigest()
    key = {"model": dataclasses.asdict(settings.model), "search": search, "directions": directions,
           "harmful": harmful.id.tolist(), "harmless": harmless.id.tolist()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def optimize(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict:
    from clawly import optimize as opt

    p = paths_of(settings)
    s = settings.optimize
    directions = read_directions(settings)
    harmful, harmless = optimizer_prompts(settings)
    if model is None:
        model, tokenizer = _load(settings, log)
    sys_prompt = settings.model.system_prompt
    prompts = opt.EvalPrompts(chat_prompts(tokenizer, harmful.text.tolist(), sys_prompt), harmful.category.tolist(),
                              chat_prompts(tokenizer, harmless.text.tolist(), sys_prompt))
    evaluator = opt.TrialEvaluator(model, tokenizer, prompts, s)
    t0 = time.perf_counter()
    base = evaluator.evaluate()
    log.event("baseline", refusals=base.refusals, prompts=len(prompts.harmful),
              seconds=round(time.perf_counter() - t0, 1), by_category=base.refusals_by_category)
    storage = s.storage or str(p.journal)
    study_name = f"{s.study_name}-{study_fingerprint(settings, harmful, harmless)}"
    study = opt.open_study(storage, study_name, s.seed, s.n_startup_trials)
    done = len(opt.completed(study))
    if done:
        log.event("resume", f"resuming study '{study_name}' with {done} complete trial(s)", complete=done)
    bar = log.progress(total=s.n_trials, desc="trials", unit="trial")
    bar.update(min(done, s.n_trials))

    def on_trial(t) -> None:
        bar.update(1)
        if t.values is not None:
            log.event("trial", number=t.number, refusals=int(t.values[0]), kl=round(t.values[1], 5),
                      seconds=round((t.datetime_complete - t.datetime_start).total_seconds(), 1))

    num_layers = model.config.num_hidden_layers
    opt.run_study(study, model, evaluator, directions, num_layers, s, on_trial)
    bar.close()
    trials = opt.completed(study)
    chosen = opt.choose_trial(trials, s.kl_cap)
    pareto = {t.number for t in study.best_trials}
    table = opt.trials_table(trials, pareto)
    p.optimize.mkdir(parents=True, exist_ok=True)
    with atomic_path(p.trials_parquet) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(p.trials_csv) as tmp:
        table[["trial", "refusals", "kl_divergence", "pareto"]].to_csv(tmp, index=False)
    fig = opt.pareto_figure(table, chosen.number, base.refusals, len(prompts.harmful))
    with atomic_path(p.pareto_html) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="cdn")
    used = pd.concat([harmful.assign(set="harmful"), harmless.assign(set="harmless")])[["id", "set", "category"]]
    with atomic_path(p.optimizer_prompts) as tmp:
        used.to_parquet(tmp, index=False)
    n = len(prompts.harmful)
    metrics = {
        "rule": f"fewest keyword refusals among trials with KL <= {s.kl_cap}; else lowest KL",
        "chosen_trial": chosen.number, "trials": len(trials), "harmful_prompts": n,
        "harmless_prompts": len(prompts.harmless),
        "base": {"keyword_refusals": base.refusals, "keyword_refusal_rate": round(base.refusals / n, 4)},
        "chosen": {"keyword_refusals": int(chosen.values[0]), "keyword_refusal_rate": round(chosen.values[0] / n, 4),
                   "kl_divergence": round(float(chosen.values[1]), 6)},
        "by_category": {c: {"prompts": base.prompts_by_category[c], "base_refusals": base.refusals_by_category[c],
                            "chosen_refusals": chosen.user_attrs["refusals_by_category"].get(c, 0)}
                        for c in sorted(base.prompts_by_category)},
        "pareto_front": [{"trial": t.number, "refusals": int(t.values[0]), "kl_divergence": round(t.values[1], 6)}
                         for t in sorted(study.best_trials, key=lambda t: t.values[1])],
    }
    write_json(p.chosen_trial, {"trial": chosen.number, "values": list(chosen.values), "params": chosen.params,
                                "plan": chosen.user_attrs["plan"]})
    write_json(p.metric("optimize"), metrics)
    log.event("chosen", trial=chosen.number, refusals=int(chosen.values[0]), kl=round(chosen.values[1], 5),
              base_refusals=base.refusals)
    return metrics


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
    directions = read_directions(settings)
    if model is None:
        model, tokenizer = _load(settings, log)
    deltas = weight_deltas(model, directions, plan)
    factors = lora_factors(deltas, settings.export.energy, settings.export.max_rank)
    with atomic_dir(p.lora) as tmp:
        save_adapter(model, factors, tmp, base_model_name_or_path=str(resolve_model_source(settings.model)))
    errors = [f.relative_error for f in factors.values()]
    metrics = {"modules": len(factors), "ranks": sorted({f.rank for f in factors.values()}),
               "max_relative_error": round(max(errors), 8), "mean_relative_error": round(sum(errors) / len(errors), 8),
               "norm_preserve": plan.norm_preserve}
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


def model_card(settings: Settings, metrics: dict) -> str:
    lines = ["---", "library_name: transformers", "tags: [clawly, abliteration]", "---", "",
             f"# {settings.model.name} — abliterated with clawly", "",
             "Refusal directions were ablated from the weights (directional ablation) by "
             f"[clawly](https://pypi.org/project/clawly/) {__version__}.", "",
             "**Dual-use warning:** this model refuses fewer harmful requests than its base model.", ""]
    if metrics:
        n = metrics["harmful_prompts"]
        lines += ["## Optimizer figures", "",
                  f"On {n} harmful eval prompts and {metrics['harmless_prompts']} harmless ones "
                  "(keyword refusal count: a marker list, which misses soft refusals and counts "
                  "gibberish as compliance):", "",
                  "| | keyword refusals | KL divergence (first token, harmless) |", "|---|---|---|",
                  f"| base | {metrics['base']['keyword_refusals']}/{n} | 0 |",
                  f"| this model | {metrics['chosen']['keyword_refusals']}/{n} "
                  f"| {metrics['chosen']['kl_divergence']} |",
                  "", "| category | prompts | base refusals | refusals after |", "|---|---|---|---|"]
        for cat, row in metrics["by_category"].items():
            lines.append(f"| {cat} | {row['prompts']} | {row['base_refusals']} | {row['chosen_refusals']} |")
        lines += ["", f"Chosen by: {metrics['rule']} (trial {metrics['chosen_trial']} of {metrics['trials']})."]
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


def evaluate(settings: Settings, log: StageLogger) -> dict:
    """Base vs merged model on held-out prompts: keyword refusals per category and KL."""
    from clawly.model import load_model

    p = paths_of(settings)
    require(p.model / "config.json", "merge")
    s = settings.evaluate
    harmful, harmless = heldout_prompts(settings)
    detector = (RefusalDetector(settings.optimize.refusal_markers) if settings.optimize.refusal_markers
                else RefusalDetector())
    base, tokenizer = _load(settings, log)
    prompts = chat_prompts(tokenizer, harmful.text.tolist(), settings.model.system_prompt)
    harmless_prompts = chat_prompts(tokenizer, harmless.text.tolist(), settings.model.system_prompt)
    base_flags, base_resp = refusal_flags(base, tokenizer, prompts, detector, s.max_new_tokens, s.batch_size,
                                          log.progress)
    base_lp = first_token_logprobs(base, tokenizer, harmless_prompts, s.batch_size)
    del base
    merged_settings = type(settings.model)(**{**settings.model.__dict__, "name": str(p.model), "gguf_file": None})
    merged, _ = load_model(merged_settings)
    flags, resp = refusal_flags(merged, tokenizer, prompts, detector, s.max_new_tokens, s.batch_size, log.progress)
    kl = kl_divergence(base_lp, first_token_logprobs(merged, tokenizer, harmless_prompts, s.batch_size))
    table = harmful.assign(base_refusal=base_flags, merged_refusal=flags)
    by_cat = table.groupby("category").agg(prompts=("id", "size"), base_refusals=("base_refusal", "sum"),
                                           merged_refusals=("merged_refusal", "sum")).reset_index()
    n = len(table)
    results = {
        "harmful_prompts": n, "harmless_prompts": len(harmless), "max_new_tokens": s.max_new_tokens,
        "measure": "keyword refusals (marker list; misses soft refusals, counts gibberish as compliance)",
        "base": {"keyword_refusals": int(sum(base_flags)), "keyword_refusal_rate": round(sum(base_flags) / n, 4)},
        "merged": {"keyword_refusals": int(sum(flags)), "keyword_refusal_rate": round(sum(flags) / n, 4),
                   "kl_divergence": round(kl, 6)},
        "by_category": {r.category: {"prompts": int(r.prompts), "base_refusals": int(r.base_refusals),
                                     "merged_refusals": int(r.merged_refusals)} for r in by_cat.itertuples()},
    }
    p.evaluate.mkdir(parents=True, exist_ok=True)
    with atomic_path(p.evaluation_table) as tmp:
        long = by_cat.melt(id_vars=["category", "prompts"], var_name="model", value_name="refusals")
        long["model"] = long.model.str.replace("_refusals", "")
        long.to_csv(tmp, index=False)
    if s.save_responses:
        with atomic_path(p.responses) as tmp:
            table.assign(base_response=base_resp, merged_response=resp)[
                ["id", "category", "text", "base_refusal", "merged_refusal", "base_response", "merged_response"]
            ].to_parquet(tmp, index=False)
    write_json(p.metric("evaluate"), results)
    log.event("evaluated", base_refusals=results["base"]["keyword_refusals"],
              merged_refusals=results["merged"]["keyword_refusals"], prompts=n, kl=round(kl, 5))
    return results
