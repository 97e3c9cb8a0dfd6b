"""optimize: search ablation parameters with Optuna, step by step (the stage, the API and the CLI).

    search = start_search(settings, log, model, tokenizer, ablation)   # prompts, base scores, study
    for trial in search_trials(search, settings, model, log): ...      # one finished trial at a time
    summary = write_search_outputs(settings, search, log)              # trials table, Pareto plot, choice

`start_search` resolves the response prefix and batch size unless given, scores the base model
once and opens (or resumes) the Optuna study named by `study_fingerprint`. `run` is all three.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
import pandas as pd
import torch

from clawly.ablate.ablation import AblationPlan
from clawly.ablate.categories import category_table
from clawly.ablate.directions import AblationDirections, check_fits, read_ablation_directions
from clawly.ablate.edits import WriterInputs, load_writer_inputs
from clawly.data.prompts import instructed_categories, read_prompts, row_systems
from clawly.errors import ClawlyError
from clawly.io import atomic_path, write_json
from clawly.log import StageLogger, get_logger
from clawly.measure.classify import FEATURES, response_classifier
from clawly.measure.decoding import PromptSet, auto_batch_size, detect_response_prefix
from clawly.measure.scoring import Scores, ScoringPrompts, TrialScorer
from clawly.measure.templating import chat_prompts
from clawly.model.architecture import num_layers
from clawly.model.loading import cache_root, load_model
from clawly.paths import Paths, project_file
from clawly.search import study as st
from clawly.search.chosen import ChosenTrial, write_chosen_trial, write_optimizer_prompts
from clawly.search.workers import extra_workers, worker_model
from clawly.settings import REFUSAL_MEASURES, Settings


@dataclass(frozen=True)
class TrialOutcome:
    """One finished trial as users see it. `refusals` counts the optimizer's refusal measure on
    the targeted (in global mode: all) harmful prompts; None for a pruned trial."""

    index: int
    refusals: int | None
    kl_divergence: float | None
    refusals_by_category: dict[str, int]
    prompts_by_category: dict[str, int]
    parameters: dict
    plan: AblationPlan
    pruned: bool = False
    feasible: bool = True
    seconds: float | None = None

    @classmethod
    def of(cls, t: optuna.trial.FrozenTrial) -> TrialOutcome:
        pruned = t.state == optuna.trial.TrialState.PRUNED
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        kl = t.values[1] if t.values else t.user_attrs.get("kl_divergence")
        return cls(
            t.number,
            None if pruned or not t.values else int(t.values[0]),
            None if kl is None else float(kl),
            dict(t.user_attrs.get("refusals_by_category", {})),
            dict(t.user_attrs.get("prompts_by_category", {})),
            dict(t.params),
            AblationPlan.from_dict(t.user_attrs["plan"]),
            pruned,
            pruned or st.violation(t) == 0,
            seconds,
        )

    def __str__(self) -> str:
        if self.pruned:
            return f"trial {self.index}: pruned (KL {self.kl_divergence:.4f})"
        return f"trial {self.index}: {self.refusals} refusals, KL {self.kl_divergence:.4f}"


@dataclass
class Evaluation:
    """What trials are measured against: the optimizer's prompts, rendered and batched, the scorer
    and the base model's scores. Needs no directions."""

    harmful: pd.DataFrame
    harmless: pd.DataFrame
    prefix: str
    batch_size: int
    prompts: ScoringPrompts
    scorer: TrialScorer
    base: Scores


@dataclass
class Search(Evaluation):
    """One optimization run: what trials are measured against (`Evaluation`) and the study."""

    objectives: st.Objectives
    study: optuna.Study
    ablation: AblationDirections
    num_layers: int
    inputs: WriterInputs | None = None  # the writers' input statistics of an input-conditional edit

    @property
    def scored_prompts(self) -> int:
        """Harmful prompts the refusal objective counts (targeted categories; all in global mode)."""
        cats = self.objectives.targeted
        return sum(n for cat, n in self.base.prompts_by_category.items() if cats is None or cat in cats)

    @property
    def base_refusals(self) -> int:
        return int(self.objectives.values(self.base)[0])

    def trial(self, number: int) -> optuna.trial.FrozenTrial | None:
        """The study's trial with this number, if there is one."""
        return next((t for t in self.study.get_trials(deepcopy=False) if t.number == number), None)

    def pareto_front(self) -> list[optuna.trial.FrozenTrial]:
        """Pareto-optimal complete trials, by KL."""
        return sorted(self.study.best_trials, key=lambda t: t.values[1])

    def chosen(self, kl_cap: float) -> optuna.trial.FrozenTrial:
        trials = st.completed(self.study)
        if not trials:
            raise ClawlyError(
                f"all {len(st.finished(self.study))} trials were pruned (KL above optimize.prune_kl): "
                "raise prune_kl, set it to null, or narrow peak_weight_range"
            )
        return st.choose_trial(trials, kl_cap)


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


def tuning_split(prompts: pd.DataFrame) -> str:
    """The split the optimizer draws from: 'tune' when the table has one, else 'eval'."""
    return "tune" if (prompts.split == "tune").any() else "eval"


def optimizer_prompts(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prompts the optimizer scores trials on (deterministic by optimize.seed): from the tune split
    where the prompt tables have one (data.tune_per_category, data.harmless_tune), else from the
    eval split (evaluate then skips them). In category mode only the preset's categories
    (targeted and kept) are scored; in global mode every category but the instructed ones.

    With optimize.harmful_choice=base_refusals the harmful table is every train and tune request of
    the scored categories (none is an eval request: evaluate's figures stay held out), or a stratified
    sample of optimize.harmful_pool of them: `evaluation` keeps those the base model refuses."""
    harmful, harmless = read_prompts(Paths.of(settings))
    s = settings.optimize
    split = tuning_split(harmful)
    if settings.categories.enabled:
        scored = harmful[harmful.category.isin(list(settings.categories.weights))]
    else:
        scored = harmful[~harmful.category.isin(instructed_categories(harmful))]
    choose_refused = s.harmful_choice == "base_refusals"
    pool = scored[scored.split != "eval"] if choose_refused else scored[scored.split == split]
    if pool.empty:
        which = f"of {', '.join(settings.categories.weights)} " if settings.categories.enabled else ""
        where = "outside the eval split" if choose_refused else f"in the {split} split"
        raise ClawlyError(
            f"no harmful prompts {which}{where} to score trials on: "
            "check categories.weights and data.eval_per_category / data.tune_per_category"
        )
    if choose_refused:
        h = pool.sort_values("id").reset_index(drop=True)
        if s.harmful_pool is not None and s.harmful_pool < len(h):
            h = stratified_sample(h, s.harmful_pool, s.seed).sort_values("id").reset_index(drop=True)
    else:
        h = stratified_sample(pool, s.harmful_prompts, s.seed)
    g = harmless[harmless.split == tuning_split(harmless)]
    g = g.sample(n=min(len(g), s.harmless_prompts), random_state=s.seed).reset_index(drop=True)
    return h, g


def refused_sample(pool: pd.DataFrame, base: Scores, n: int, seed: int) -> pd.DataFrame:
    """`n` of the pool's requests that the base model's `base` scores count as refusals (the
    optimizer's measure: keywords, or the strict rule on kept categories), spread evenly over
    categories. A category the base never refuses drops out: it has nothing to remove or keep."""
    if len(base.flags) != len(pool):
        raise ValueError(f"{len(base.flags)} base verdicts for {len(pool)} prompts")
    refused = pool[pd.Series(base.flags, index=pool.index)]
    if refused.empty:
        raise ClawlyError(
            f"the base model refuses none of the {len(pool)} train and tune requests, so there is no refusal to "
            "score: check the model and optimize.refusal_markers, or set optimize.harmful_choice=sample"
        )
    return stratified_sample(refused, n, seed)


def study_fingerprint(settings: Settings, harmful: pd.DataFrame, harmless: pd.DataFrame) -> str:
    """Identifies what trials measure: same fingerprint, same study (resumed); else a new study.

    Everything that changes a trial's outcome goes in (model, prompts, directions, search space,
    category rules, and with refusal_measure=classifier the classifier's training file, features and
    embedder); n_trials, storage, batch size, the model cache and export options do not, so raising
    n_trials continues the same study."""
    search = {
        k: v
        for k, v in dataclasses.asdict(settings.optimize).items()
        if k not in ("n_trials", "storage", "study_name", "batch_size", "prefix_cache", "workers")
    }
    directions = hashlib.sha256(Paths.of(settings).orthogonalized.read_bytes()).hexdigest()
    model = {k: v for k, v in dataclasses.asdict(settings.model).items() if k != "cache_dir"}
    categories = {k: v for k, v in dataclasses.asdict(settings.categories).items() if k != "per_category_adapters"}
    key = {
        "model": model,
        "search": search,
        "directions": directions,
        "categories": categories,
        "harmful": harmful.id.tolist(),
        "harmless": harmless.id.tolist(),
    }
    if settings.edit.conditional:  # the edit's settings and the inputs it was measured on change the trials
        key["edit"] = {
            **dataclasses.asdict(settings.edit),
            "inputs": hashlib.sha256(Paths.of(settings).writer_inputs.read_bytes()).hexdigest(),
        }
    if settings.optimize.refusal_measure == "classifier":
        train = project_file(settings.classifier.train_file)
        key["classifier"] = {
            "train": hashlib.sha256(train.read_bytes()).hexdigest() if train.is_file() else None,
            "features": FEATURES,
            "embedder": settings.classifier.embedder,
        }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def evaluation(
    settings: Settings,
    log: StageLogger,
    model,
    tokenizer,
    prefix: str | None = None,
    batch_size: int | None = None,
    base: Scores | None = None,
    harmful_ids: list[str] | None = None,
) -> Evaluation:
    """The optimizer's prompts, response prefix, batch size and scorer, and the base model's scores
    (`model` must hold the base weights) unless given (an extra worker is handed the first worker's,
    with the ids of the harmful prompts chosen: `harmful_ids`)."""
    s, c = settings.optimize, settings.categories
    harmful, harmless = optimizer_prompts(settings)
    if harmful_ids is not None:
        harmful = harmful.set_index("id").loc[harmful_ids].reset_index()
    sys_prompt = settings.model.system_prompt
    if prefix is None:
        prefix = response_prefix(settings, model, tokenizer, harmful.text.tolist(), harmless.text.tolist(), log)
    harmless_texts = chat_prompts(tokenizer, harmless.text.tolist(), sys_prompt)
    classifier = response_classifier(settings) if s.refusal_measure == "classifier" else None

    def scorer_for(h: pd.DataFrame, batch_size: int | None, progress=None) -> TrialScorer:
        prompts = ScoringPrompts(
            chat_prompts(tokenizer, h.text.tolist(), row_systems(h, sys_prompt), prefix),
            h.category.tolist(),
            harmless_texts,
            h.text.tolist(),
        )
        if batch_size is None:
            batch_size = scoring_batch_size(settings, model, tokenizer, prompts.harmful, log)
        kept = c.kept if c.enabled else ()
        return TrialScorer(
            model, tokenizer, prompts, s, progress=progress, batch_size=batch_size, classifier=classifier, kept=kept
        )

    def base_scores(scorer: TrialScorer) -> Scores:
        t0 = time.perf_counter()
        scores = scorer.score()
        log.event(
            "baseline",
            refusals=scores.refusals,
            prompts=len(scorer.prompts.harmful),
            seconds=round(time.perf_counter() - t0, 1),
            tokens=scores.tokens,
            by_category=scores.refusals_by_category,
        )
        return scores

    choosing = s.harmful_choice == "base_refusals" and harmful_ids is None
    scorer = scorer_for(harmful, batch_size, log.progress if choosing else None)  # candidates: minutes, a bar
    if choosing:
        pool = base_scores(scorer)
        chosen = refused_sample(harmful, pool, s.harmful_prompts, s.seed)
        log.event(
            "harmful_choice",
            f"scoring trials on {len(chosen)} of the {pool.refusals} train and tune requests (of {len(harmful)}) "
            "that the base model refuses",
            candidates=len(harmful),
            refused=pool.refusals_by_category,
            chosen=chosen.category.value_counts().sort_index().to_dict(),
        )
        harmful, base = chosen, None
        scorer = scorer_for(harmful, scorer.batch_size)
    if base is None:
        base = base_scores(scorer)
    for cat in c.kept if c.enabled else ():
        n = base.refusals_by_category.get(cat, 0)
        if n < 5:
            log.event(
                "warning",
                f"kept category {cat}: the base model refuses {n} of the requests trials are scored on, too few "
                "for the kept constraint to tell trials apart: raise data.tune_per_category or set "
                "optimize.harmful_choice=base_refusals",
            )
    return Evaluation(harmful, harmless, prefix, scorer.batch_size, scorer.prompts, scorer, base)


def start_search(
    settings: Settings,
    log: StageLogger,
    model,
    tokenizer,
    ablation: AblationDirections,
    prefix: str | None = None,
    batch_size: int | None = None,
    base: Scores | None = None,
    measured: Evaluation | None = None,
    harmful_ids: list[str] | None = None,
) -> Search:
    """The evaluation (`measured`, else made here: prompts, response prefix, batch size, the scorer
    with the base model's scores) and the study (resumed when the same fingerprint already has trials)."""
    p = Paths.of(settings)
    s, c = settings.optimize, settings.categories
    check_fits(ablation.directions, model, p.orthogonalized)
    if ablation.mode == "category" and not c.enabled:
        raise ClawlyError(
            "the directions were computed in category mode but no categories.weights are set: "
            "rerun orthogonalize-categories (dvc repro does)"
        )
    ev = measured or evaluation(settings, log, model, tokenizer, prefix, batch_size, base, harmful_ids)
    objectives = st.Objectives(
        targeted=c.targeted if c.enabled else None,
        kept=c.kept,
        keep_rule=c.keep_rule,
        min_retention=c.min_retention,
        base_refusals=ev.base.refusals_by_category,
    )
    storage = s.storage or str(p.journal)
    study_name = f"{s.study_name}-{study_fingerprint(settings, ev.harmful, ev.harmless)}"
    study = st.open_study(storage, study_name, s.seed, s.n_startup_trials, objectives)
    done = len(st.finished(study))
    if done:
        log.event("resume", f"resuming study '{study_name}' with {done} finished trial(s)", finished=done)
    return Search(
        **vars(ev),
        objectives=objectives,
        study=study,
        ablation=ablation,
        num_layers=num_layers(model),
        inputs=load_writer_inputs(settings),
    )


def search_trials(search: Search, settings: Settings, model, log: StageLogger) -> Iterator[optuna.trial.FrozenTrial]:
    """Run the missing trials (up to optimize.n_trials finished ones) under a progress bar, logging
    and yielding each."""
    s = settings.optimize
    with log.progress(total=s.n_trials, desc="trials", unit="trial") as bar:
        shown = min(len(st.finished(search.study)), s.n_trials)  # a resumed study
        bar.update(shown)
        for t in st.iter_study(
            search.study,
            model,
            search.scorer,
            search.ablation.basis,
            search.num_layers,
            s,
            search.objectives,
            search.ablation.strengths,
            search.ablation.category_weights,
            settings.edit,
            search.inputs,
        ):
            step = max(1, min(len(st.finished(search.study)), s.n_trials) - shown)  # every worker's trials
            bar.update(step)
            shown += step
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
            if t.values is not None:
                log.event(
                    "trial",
                    number=t.number,
                    refusals=int(t.values[0]),
                    kl=round(t.values[1], 5),
                    by_category=t.user_attrs.get("refusals_by_category"),
                    feasible=st.violation(t) == 0,
                    seconds=seconds,
                    tokens=t.user_attrs.get("tokens"),
                )
            elif t.state == optuna.trial.TrialState.PRUNED:
                log.event(
                    "pruned",
                    number=t.number,
                    kl=round(t.user_attrs.get("kl_divergence", float("nan")), 5),
                    prune_kl=s.prune_kl,
                    seconds=seconds,
                )
            yield t


def search_summary(settings: Settings, search: Search, chosen: optuna.trial.FrozenTrial) -> dict:
    """The figures of a search and one of its trials (the optimize report; the model card's table)."""
    s, c = settings.optimize, settings.categories
    base, trials = search.base, st.completed(search.study)
    n_targeted, base_targeted = search.scored_prompts, search.base_refusals
    label, meaning = REFUSAL_MEASURES[s.refusal_measure]
    return {
        "mode": search.ablation.mode,
        "rule": (
            (
                f"among trials keeping >= {c.min_retention:.0%} of each kept category's base refusals "
                f"(real refusals only: no help after the disclaimer, {s.kept_max_new_tokens}-token answers; "
                "else the trials falling least short): "
                if c.kept
                else ""
            )
            + f"fewest {label}{' on targeted categories' if c.enabled else ''} "
            f"with KL <= {s.kl_cap}; else lowest KL"
        ),
        "refusal_measure": s.refusal_measure,
        "refusal_label": label,
        "refusal_meaning": meaning,
        "keep_rule": c.keep_rule if c.kept else None,
        "chosen_trial": chosen.number,
        "trials": len(trials),
        "pruned_trials": len(st.finished(search.study)) - len(trials),
        "response_prefix": search.prefix,
        "batch_size": search.batch_size,
        "harmful_prompts": len(search.prompts.harmful),
        "harmful_choice": s.harmful_choice,  # base_refusals: the base model refuses every harmful prompt scored
        "targeted_prompts": n_targeted,
        "harmless_prompts": len(search.prompts.harmless),
        "base": {"refusals": base_targeted, "refusal_rate": round(base_targeted / n_targeted, 4)},
        "chosen": {
            "refusals": int(chosen.values[0]),
            "refusal_rate": round(chosen.values[0] / n_targeted, 4),
            "kl_divergence": round(float(chosen.values[1]), 6),
            "keeps_kept_refusals": st.violation(chosen) == 0,
        },
        "by_category": category_table(
            base.prompts_by_category, base.refusals_by_category, chosen.user_attrs["refusals_by_category"], c.weights
        ),
        "pareto_front": [
            {"trial": t.number, "refusals": int(t.values[0]), "kl_divergence": round(t.values[1], 6)}
            for t in search.pareto_front()
        ],
    }


RATE_KEYS = {"keywords": "keyword_refusal_rate", "classifier": "not_compliant_rate"}


def headline(summary: dict) -> dict:
    """The optimize metrics: the chosen trial's figures to compare between experiments (`dvc metrics
    show / diff`), named after the refusal measure the optimizer used; the base model's figures and
    everything else are in the report."""
    out = {
        "kl_divergence": summary["chosen"]["kl_divergence"],
        RATE_KEYS[summary["refusal_measure"]]: summary["chosen"]["refusal_rate"],
    }
    kept = [r["retention"] for r in summary["by_category"].values() if r.get("retention") is not None]
    if kept:
        out["kept_retention"] = min(kept)
    return out


def write_search_outputs(settings: Settings, search: Search, log: StageLogger) -> dict:
    """Trials table (Parquet, CSV), Pareto plot, the prompts used, the chosen trial, the report
    (`reports/optimize.json`, returned) and the headline metrics."""
    p = Paths.of(settings)
    c = settings.categories
    chosen = search.chosen(settings.optimize.kl_cap)
    pareto = {t.number for t in search.study.best_trials}
    table = st.trials_table(st.completed(search.study), pareto)
    p.optimize.mkdir(parents=True, exist_ok=True)
    with atomic_path(p.trials_parquet) as tmp:
        table.to_parquet(tmp, index=False)
    with atomic_path(p.trials_csv) as tmp:
        table[["trial", "refusals", "kl_divergence", "pareto", "feasible"]].to_csv(tmp, index=False)
    summary = search_summary(settings, search, chosen)
    what = "targeted-category prompts" if c.enabled else "harmful eval prompts"
    fig = st.pareto_figure(
        table,
        chosen.number,
        summary["base"]["refusals"],
        summary["targeted_prompts"],
        what,
        settings.optimize.refusal_measure,
    )
    with atomic_path(p.pareto_html) as tmp:
        fig.write_html(str(tmp), include_plotlyjs="cdn")
    write_optimizer_prompts(p.optimizer_prompts, search.harmful, search.harmless)
    write_chosen_trial(
        p.chosen_trial,
        ChosenTrial(
            chosen.number,
            list(chosen.values),
            chosen.params,
            AblationPlan.from_dict(chosen.user_attrs["plan"]),
            search.prefix,
        ),
    )
    write_json(p.report("optimize"), summary)
    write_json(p.metric("optimize"), headline(summary))
    log.event(
        "chosen",
        trial=chosen.number,
        refusals=int(chosen.values[0]),
        kl=round(chosen.values[1], 5),
        base_refusals=summary["base"]["refusals"],
        by_category=chosen.user_attrs["refusals_by_category"],
    )
    return summary


def run(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict:
    """The whole stage: start (or resume) the search, run the missing trials (with optimize.workers
    processes), write the outputs."""
    ablation = read_ablation_directions(Paths.of(settings).orthogonalized)
    if model is None:
        model, tokenizer = load_model(worker_model(settings, 0), log)
    search = start_search(settings, log, model, tokenizer, ablation)
    with extra_workers(settings, log, worker, handed(search)):
        for _ in search_trials(search, settings, model, log):
            pass
    return write_search_outputs(settings, search, log)


def handed(search: Search) -> dict:
    """What an extra worker takes from this one instead of measuring it again: the response prefix,
    the batch size, the base model's scores (its refusals: a trial's worth of generation) and the
    harmful prompts they were measured on (with optimize.harmful_choice=base_refusals, chosen by them)."""
    return {
        "prefix": search.prefix,
        "batch_size": search.batch_size,
        "base": search.base,
        "harmful_ids": search.harmful.id.tolist(),
    }


def worker(values: dict, index: int, threads: int, given: dict) -> None:
    """An extra worker (a spawned process, see `clawly.search.workers`): its own model, the same study,
    trials until optimize.n_trials are finished by all workers together."""
    torch.set_num_threads(threads)
    settings = Settings.from_dict(values)
    p = Paths.of(settings)
    log = get_logger(f"optimize-worker-{index}", p.logs, quiet=True)
    try:
        model, tokenizer = load_model(worker_model(settings, index), log)
        search = start_search(settings, log, model, tokenizer, read_ablation_directions(p.orthogonalized), **given)
        for _ in search_trials(search, settings, model, log):
            pass
    except ClawlyError as e:
        print(f"clawly optimize worker {index}: error: {e}", file=sys.stderr)
        sys.exit(2)


def response_prefix(
    settings: Settings,
    model,
    tokenizer,
    harmful: list[str],
    harmless: list[str],
    log: StageLogger,
    sample: int = 8,
    max_new_tokens: int = 24,
) -> str:
    """optimize.response_prefix resolved: 'auto' generates a few base-model answers and takes
    what they all start with (an opening chain of thought is closed empty instead)."""
    setting = settings.optimize.response_prefix
    if setting != "auto":
        return setting or ""
    texts = harmful[:sample] + harmless[:sample]
    ps = PromptSet(tokenizer, chat_prompts(tokenizer, texts, settings.model.system_prompt), len(texts))
    responses, _ = ps.generate(model, max_new_tokens)
    prefix = detect_response_prefix(responses)
    log.event(
        "response_prefix", f"response prefix: {prefix!r}" if prefix else "no shared response prefix", prefix=prefix
    )
    return prefix


def scoring_batch_size(
    settings: Settings, model, tokenizer, prompts: list[str], log: StageLogger, timed: bool = False
) -> int:
    """optimize.batch_size, with 'auto' (or `timed`) timed once per model and machine and cached."""
    bs = settings.optimize.batch_size
    if bs != "auto" and not timed:
        return int(bs)
    n = len(prompts)  # no batch wider than the prompt count; the whole set in one batch is a candidate
    sizes = sorted({b for b in (8, 16, 32, 64, 128) if b < n} | {min(n, 128)})
    return auto_batch_size(
        model,
        tokenizer,
        prompts[:16],
        cache_file=cache_root(settings.model) / "batch_size.json",
        candidates=sizes,
        log=lambda m: log.event("batch_size", m),
    )
