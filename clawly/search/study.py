"""The Optuna study over ablation plans: fewest refusals, least KL divergence, kept refusals kept.

Each trial draws a plan from the search space (`suggest_plan`), applies its weight change in place
(`ablated`), is scored by a `clawly.measure.scoring.TrialScorer` (KL first, so `prune_kl` can stop it before
any generation; then refusals) and restores the weights. The study resumes from its storage, with
the sampler seeded per trial (`TrialSeededSampler`); `choose_trial` is the choice rule.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
import torch
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage
from transformers import PreTrainedModel

from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, weight_deltas
from clawly.ablate.directions import AblationBasis
from clawly.ablate.edits import WriterInputs, suggest_edit
from clawly.errors import ClawlyError, first_line
from clawly.io import pid_alive
from clawly.measure.decoding import DecodeStats
from clawly.measure.scoring import Scores, TrialScorer
from clawly.redact import masked_url
from clawly.settings import REFUSAL_MEASURES, EditSettings, OptimizeSettings


@dataclass
class Objectives:
    """Turns a trial's result into Optuna values and constraint values.

    values[0]: refusals (optimize.refusal_measure) on targeted categories (all in global mode), minimized;
    values[1]: KL divergence, minimized; with kept categories and keep_rule 'objective',
    values[2]: refusals on kept categories, maximized. Kept categories always get one
    violation value each, min_retention * base - after (<= 0: enough refusals kept), which is
    the Optuna constraint with keep_rule 'constraint' and part of the choice rule either way.
    """

    targeted: list[str] | None = None
    kept: list[str] = field(default_factory=list)
    keep_rule: str = "constraint"
    min_retention: float = 0.8
    base_refusals: dict[str, int] = field(default_factory=dict)

    @property
    def directions(self) -> list[str]:
        third = ["maximize"] if self.kept and self.keep_rule == "objective" else []
        return ["minimize", "minimize", *third]

    @property
    def constrained(self) -> bool:
        return bool(self.kept) and self.keep_rule == "constraint"

    def values(self, r: Scores) -> tuple[float, ...]:
        cats = self.targeted if self.targeted is not None else list(r.refusals_by_category)
        targeted = float(sum(r.refusals_by_category.get(c, 0) for c in cats))
        if self.kept and self.keep_rule == "objective":
            return targeted, r.kl, float(sum(r.refusals_by_category.get(c, 0) for c in self.kept))
        return targeted, r.kl

    def violations(self, r: Scores) -> list[float]:
        return [self.min_retention * self.base_refusals.get(c, 0) - r.refusals_by_category.get(c, 0) for c in self.kept]


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return trial.user_attrs.get("kept_violations", [])


def _suggest_kernel(trial: optuna.Trial, num_layers: int, s: OptimizeSettings, name: str) -> LayerKernel:
    last = num_layers - 1
    peak = trial.suggest_float(f"{name}.peak_weight", *s.peak_weight_range)
    position = trial.suggest_float(
        f"{name}.peak_position", s.peak_position_range[0] * last, s.peak_position_range[1] * last
    )
    floor = trial.suggest_float(f"{name}.floor_fraction", *s.floor_fraction_range) * peak
    reach = trial.suggest_float(
        f"{name}.reach", max(s.reach_range[0] * num_layers, 1.0), max(s.reach_range[1] * num_layers, 1.0)
    )
    return LayerKernel(peak, position, floor, reach)


def suggest_plan(
    trial: optuna.Trial,
    num_layers: int,
    s: OptimizeSettings,
    categories: list[str] | None = None,
    edit: EditSettings | None = None,
) -> AblationPlan:
    """Draw one ablation plan from the search space (ranges are fractions of the layer count).
    With optimize.kernels=per_category and the targeted `categories`, each category gets its own
    kernel per component (parameters named `<category>.<component>.*`); with an input-conditional
    `edit` method, its parameter too (`keep_energy` or `ridge`)."""
    scope = trial.suggest_categorical("direction_scope", list(s.direction_scopes))
    index = None
    if scope == "global":
        lo, hi = s.direction_index_range
        index = trial.suggest_float("direction_index", lo * num_layers, hi * num_layers)
    change = suggest_edit(trial, edit) if edit is not None else {}
    if s.kernels == "per_category" and categories:
        by_category = {
            cat: {c: _suggest_kernel(trial, num_layers, s, f"{cat}.{c}") for c in s.components} for cat in categories
        }
        return AblationPlan(
            kernels={}, direction_index=index, norm_preserve=s.norm_preserve, category_kernels=by_category, edit=change
        )
    kernels = {c: _suggest_kernel(trial, num_layers, s, c) for c in s.components}
    return AblationPlan(kernels=kernels, direction_index=index, norm_preserve=s.norm_preserve, edit=change)


WORKER = "worker"  # user attr of every trial: {"host", "pid"} of the process that runs it


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Optuna's TPE sampler, with its randomness a function of (seed, trial number).

    A `TPESampler(seed)` built again on resume starts its random stream over and re-draws the
    first trials; here each trial gets a TPE sampler seeded by its own number, so a resumed study
    draws what an uninterrupted one draws (same history, same seed, same trial), and workers
    sharing one study draw different trials."""

    def __init__(self, seed: int, **tpe_options) -> None:
        self.seed, self.tpe_options = seed, tpe_options
        self._by_trial: dict[int, optuna.samplers.TPESampler] = {}

    def _sampler(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.TPESampler:
        if trial.number not in self._by_trial:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate
                self._by_trial[trial.number] = optuna.samplers.TPESampler(seed=seed, **self.tpe_options)
        return self._by_trial[trial.number]

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:  # the seed is the point: nothing to reseed
        pass


def this_worker() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _gone(worker: dict | None) -> bool:
    """Is the process that ran a trial known to have ended? Only a process on this machine can be
    checked; a trial of another machine stays RUNNING (it never counts as finished)."""
    if not isinstance(worker, dict):
        return True  # interrupted before the trial recorded its worker
    return worker.get("host") == socket.gethostname() and not pid_alive(int(worker["pid"]))


HEARTBEAT_SECONDS, GRACE_SECONDS = 60, 180  # an RDB study fails a trial whose worker was silent this long


def open_study(
    storage: str, study_name: str, seed: int, n_startup_trials: int, objectives: Objectives | None = None
) -> optuna.Study:
    """Create or resume a study. Trials left RUNNING by a process that has ended (on this machine, or
    on any machine with an RDB storage, by its heartbeat) are failed and redone; trials of live
    workers sharing the storage are left alone."""
    objectives = objectives or Objectives()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = TrialSeededSampler(seed, n_startup_trials=n_startup_trials, multivariate=True)
    backend = _storage(storage)
    try:
        study = optuna.create_study(
            storage=backend,
            study_name=study_name,
            sampler=sampler,
            directions=objectives.directions,
            load_if_exists=True,
        )
    except Exception as e:  # noqa: BLE001 - a database's errors are many classes and lines: one line naming it
        # from None: the cause may hold the URL's password (its first line, masked, is the message)
        raise StorageError(
            f"optimize.storage {masked_url(storage)}: cannot open study {study_name!r}: {first_line(e)}"
        ) from None
    fail_stale(study)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _gone(t.user_attrs.get(WORKER)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return study


class StorageError(ClawlyError):
    """The study's storage cannot be reached or read; the message names it (password masked)."""


def fail_stale(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose worker's heartbeat stopped (RDB storages; Optuna does this too,
    but only when a worker starts a trial, and the count of running trials must not wait for that)."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without a heartbeat (journal files)


def _storage(url: str) -> optuna.storages.BaseStorage:
    """A plain path means an Optuna journal file; anything with '://' is an Optuna RDB URL
    (sqlite:///file.db, postgresql+psycopg://user@host/db, mysql+pymysql://...), with a heartbeat so
    that a trial of a worker killed on any machine is failed and redone."""
    if "://" in url:
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna: said once, not per run
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                    engine_kwargs={"pool_pre_ping": True},
                )
        except Exception as e:  # noqa: BLE001 - see open_study
            missing = e if isinstance(e, ModuleNotFoundError) else e.__cause__
            # from None: the cause may hold the URL's password (see open_study)
            if isinstance(missing, ModuleNotFoundError):  # Optuna wraps the driver's import error
                raise StorageError(
                    f"optimize.storage {masked_url(url)}: the database driver {missing.name!r} is not "
                    "installed: pip install 'clawly[cluster]' (PostgreSQL through psycopg)"
                ) from None
            raise StorageError(
                f"optimize.storage {masked_url(url)}: {first_line(e)} (is the server up, and the "
                "URL dialect+driver://user@host:port/database?)"
            ) from None
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(url)  # Optuna's default lock, kept to repair under it
    backend = JournalFileBackend(url, lock_obj=lock)
    repair_journal(Path(url), lock)
    return JournalStorage(backend)


def repair_journal(path: Path, lock: JournalFileSymlinkLock) -> int:
    """Drop a last line a killed writer left half-written (no newline), under the journal's lock so no
    live writer is mid-append; else the next append would glue onto it and make the journal unreadable.
    Returns the bytes dropped. Any other undecodable line is damage clawly did not make: one clear error."""
    lock.acquire()
    try:
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        for number, line in enumerate(data[:keep].splitlines(), 1):
            try:
                json.loads(line)
            except ValueError as e:
                raise ClawlyError(
                    f"{path} is damaged at line {number} (not an Optuna journal entry): restore it, or "
                    "delete it to start the study again"
                ) from e
    finally:
        lock.release()
    return len(data) - keep


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ran to a verdict: complete, or pruned (KL above prune_kl)."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


def iter_study(
    study: optuna.Study,
    model: PreTrainedModel,
    scorer: TrialScorer,
    basis: AblationBasis,
    num_layers: int,
    settings: OptimizeSettings,
    objectives: Objectives | None = None,
    strengths: torch.Tensor | None = None,
    category_weights: dict[str, float] | None = None,
    edit: EditSettings | None = None,
    inputs: WriterInputs | None = None,
) -> Iterator[optuna.trial.FrozenTrial]:
    """Run trials one at a time until the study holds `settings.n_trials` finished ones (complete
    or pruned), yielding each as it finishes; stopping the iteration early leaves a resumable study.

    basis: what is ablated, with `strengths` `[m]` (category weights; default ones). With
    `settings.prune_kl`, a trial whose KL exceeds it is pruned before any generation. With an
    input-conditional `edit`, `inputs` are the writers' input statistics (probe-writers)."""
    objectives = objectives or Objectives()

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        trial.set_user_attr(WORKER, this_worker())
        if ahead_of(study, trial.number) >= settings.n_trials:  # other workers took the last ones first
            trial.set_user_attr(SURPLUS, True)
            raise SurplusTrial(trial.number)
        plan = suggest_plan(trial, num_layers, settings, list(category_weights or {}), edit)
        plan.category_weights = dict(category_weights or {})
        trial.set_user_attr("plan", plan.to_dict())
        scorer.stats = DecodeStats()
        clock = PhaseClock()
        deltas = weight_deltas(model, basis, plan, strengths, inputs)
        clock.lap("edit")
        with ablated(model, deltas):
            kl = scorer.kl()
            clock.lap("kl")
            trial.set_user_attr("kl_divergence", kl)
            if settings.prune_kl is not None and kl > settings.prune_kl:
                trial.set_user_attr("tokens", scorer.stats.total)
                trial.set_user_attr("phase_seconds", clock.laps)
                raise optuna.TrialPruned(f"KL {kl:.3f} > prune_kl {settings.prune_kl}")
            result = scorer.refusals(kl)
            clock.lap("answers")
        clock.lap("restore")
        trial.set_user_attr("phase_seconds", clock.laps)
        trial.set_user_attr("tokens", result.tokens)
        trial.set_user_attr("keyword_refusals", result.keyword_refusals)
        trial.set_user_attr("refusals_by_category", result.refusals_by_category)
        trial.set_user_attr("prompts_by_category", result.prompts_by_category)
        violations = objectives.violations(result)
        trial.set_user_attr("kept_violations", violations)
        if objectives.constrained:  # feasible when <= 0; TPE and the Pareto front read these
            for category, shortfall in zip(objectives.kept, violations, strict=True):
                trial.set_constraint(category, shortfall)
        return objectives.values(result)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    while True:
        fail_stale(study)
        if len(finished(study)) + len(running(study)) >= settings.n_trials:
            return
        done: list[optuna.trial.FrozenTrial] = []  # this process's trial, even with other workers on the storage
        study.optimize(
            objective,
            n_trials=1,
            callbacks=[lambda s, t, done=done: done.append(t)],
            gc_after_trial=True,
            catch=(SurplusTrial,),
        )
        if any(t.user_attrs.get(SURPLUS) for t in done):
            return
        yield from done


class PhaseClock:
    """Wall seconds of a trial's phases, each from the end of the one before: `laps` maps a phase
    (edit: the weight change computed; kl: harmless first-token distributions; answers: the
    harmful answers generated and counted; restore: the weights put back) to its seconds."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round(now - self.t, 3)
        self.t = now


SURPLUS = "surplus"  # user attr of a trial a worker asked for when n_trials were already finished or running


class SurplusTrial(Exception):
    """Two workers asked for the last trial at once: the later one gives its trial up (failed, no work done)."""


def _live(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose process may still finish it: not known to have ended. One that has not
    recorded its worker yet was asked for a moment ago (a process killed before it recorded one has
    its trials failed when the study is opened again)."""
    worker = trial.user_attrs.get(WORKER)
    return worker is None or not _gone(worker)


def running(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials running now in live processes."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if _live(t)]


def ahead_of(study: optuna.Study, number: int) -> int:
    """Trials numbered before `number` that finished or are running in a live process: with n_trials of
    them, a trial of this number is not needed. Trial numbers are handed out by the storage, so every
    worker ranks trials the same way and exactly n_trials finish."""
    return sum(1 for t in [*finished(study), *running(study)] if t.number < number)


def violation(trial: optuna.trial.FrozenTrial) -> float:
    """How far a trial falls short of keeping kept categories' refusals (0: not at all)."""
    return max([0.0, *_constraints(trial)])


def choose_trial(trials: list[optuna.trial.FrozenTrial], kl_cap: float) -> optuna.trial.FrozenTrial:
    """The rule: among trials that keep enough refusals in kept categories (if none does: those
    that fall least short), the fewest targeted refusals with KL <= kl_cap (ties: lower KL);
    when no such trial is under the cap, the one with the lowest KL."""
    if not trials:
        raise ValueError("the study has no complete trial to choose from")
    least = min(violation(t) for t in trials)
    trials = [t for t in trials if violation(t) == least]
    under = [t for t in trials if t.values[1] <= kl_cap]
    if under:
        return min(under, key=lambda t: (t.values[0], t.values[1], t.number))
    return min(trials, key=lambda t: (t.values[1], t.values[0], t.number))


def trials_table(trials: list[optuna.trial.FrozenTrial], pareto_numbers: set[int]) -> pd.DataFrame:
    """One row per complete trial: number, refusals, kl, pareto flag, parameters."""
    rows = []
    for t in trials:
        row = {
            "trial": t.number,
            "refusals": int(t.values[0]),
            "kl_divergence": float(t.values[1]),
            "pareto": t.number in pareto_numbers,
            "feasible": violation(t) == 0,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else math.nan,
        }
        row.update({f"refusals.{c}": n for c, n in sorted(t.user_attrs.get("refusals_by_category", {}).items())})
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)


def pareto_figure(
    table: pd.DataFrame,
    chosen: int,
    baseline_refusals: int,
    n_harmful: int,
    what: str = "harmful eval prompts",
    measure: str = "keywords",
):
    """Plotly scatter of all trials (infeasible ones apart), the Pareto front, the chosen trial."""
    front = table[table.pareto & table.feasible].sort_values("kl_divergence")
    fig = go.Figure()
    for feasible, name, color in ((True, "trials", "#9aa5b1"), (False, "lost kept refusals", "#f0b37e")):
        part = table[table.feasible == feasible]
        if len(part):
            fig.add_trace(
                go.Scatter(
                    x=part.kl_divergence,
                    y=part.refusals,
                    mode="markers",
                    name=name,
                    text=[f"trial {n}" for n in part.trial],
                    marker={"color": color},
                )
            )
    fig.add_trace(
        go.Scatter(
            x=front.kl_divergence,
            y=front.refusals,
            mode="lines+markers",
            name="Pareto front",
            line={"shape": "hv"},
            marker={"color": "#1f77b4", "size": 9},
        )
    )
    pick = table[table.trial == chosen]
    fig.add_trace(
        go.Scatter(
            x=pick.kl_divergence,
            y=pick.refusals,
            mode="markers",
            name=f"chosen (trial {chosen})",
            marker={"color": "#d62728", "size": 14, "symbol": "star"},
        )
    )
    fig.add_hline(y=baseline_refusals, line_dash="dot", annotation_text=f"base model: {baseline_refusals}")
    label = REFUSAL_MEASURES[measure][0]
    fig.update_layout(
        title=f"{label.capitalize()} on {n_harmful} {what} vs first-token KL on harmless prompts",
        xaxis_title="KL divergence (nats)",
        yaxis_title=label,
        template="plotly_white",
    )
    return fig
