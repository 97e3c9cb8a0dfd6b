"""The web UI's run: one `Pipeline` job in a server thread, whose state any page can read.

    run = WebRun(output_dir)
    run.start(settings)           # refused (message) while a job runs
    run.snapshot()                # status, phase, progress, trials, Pareto figure: what a page draws
    run.stop()                    # the running trial is abandoned at its next generation pass
    with run.model() as pipe:     # export, chat, research once no job holds the model
        pipe.save_adapter(...)

The job belongs to the server process, not to a page: reloading the page or opening a second tab
reads the same `snapshot()`. A job holds the model lock while it runs; `model()` refuses at once
instead of waiting behind it, so no handler blocks the UI. A new start with the same settings but
`optimize.n_trials` reuses the loaded model and continues the study; other settings load anew.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from clawly.api import Pipeline, TrialOutcome
from clawly.errors import ClawlyError
from clawly.log import StageLogger, short
from clawly.paths import Paths
from clawly.redact import is_secret_key, masked_url
from clawly.settings import Settings

IDLE, RUNNING, STOPPING, FINISHED, STOPPED, FAILED = "idle", "running", "stopping", "finished", "stopped", "failed"
EVENTS_KEPT = 300  # the newest lines of the page's event log (web.jsonl has them all)
JOBS = {"optimize": "optimization", "directions": "directions only (for the research views)"}


class RunStopped(ClawlyError):
    """The user stopped the run (the study keeps every finished trial; starting again continues it)."""


class ModelBusy(ClawlyError):
    """The model is in use by the running job."""


@dataclass
class Bar:
    """One progress bar of the pipeline (trials, probe, generate, rdo)."""

    desc: str
    total: int | None
    done: int = 0


@dataclass
class RunState:
    """What a page shows. Copied whole by `snapshot()`; the copy is never changed afterwards."""

    run_id: int = 0
    status: str = IDLE
    job: str = ""
    phase: str = ""
    message: str = ""
    error: str | None = None
    started: float | None = None
    ended: float | None = None
    model: str = ""
    n_trials: int = 0
    bars: list[Bar] = field(default_factory=list)
    trials: list[TrialOutcome] = field(default_factory=list)
    chosen: int | None = None
    figure: go.Figure | None = None
    reports: dict[int, pd.DataFrame] = field(default_factory=dict)  # trial -> Pipeline.category_report
    base_refusals: int | None = None
    scored_prompts: int | None = None
    refusal_label: str = ""
    events: list[str] = field(default_factory=list)
    trials_version: int = 0  # bumped when trials (and so the figure) change: pages redraw the plot only then
    version: int = 0  # bumped on every change

    @property
    def active(self) -> bool:
        return self.status in (RUNNING, STOPPING)

    @property
    def elapsed(self) -> float:
        return ((self.ended or time.time()) - self.started) if self.started else 0.0

    def fraction(self) -> float:
        """Overall progress in [0, 1]: finished trials plus the running trial's share, else the current step's."""
        if self.status == FINISHED:
            return 1.0
        trials = next((b for b in self.bars if b.desc == "trials"), None)
        inner = next((b for b in reversed(self.bars) if b.desc != "trials" and b.total), None)
        part = min(1.0, inner.done / inner.total) if inner else 0.0
        if trials and trials.total:
            done = min(trials.done, trials.total)
            return min(1.0, (done + (part if done < trials.total else 0)) / trials.total)
        return part


class _Progress:
    """A progress bar the pipeline drives (`log.progress`): it updates the run's state, and in the
    job's thread it raises `RunStopped` once a stop was asked for."""

    def __init__(self, run: WebRun, iterable: Any, total: int | None, desc: str):
        self.run, self.iterable = run, iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.bar = Bar(desc, total)
        run._check_stop()
        run._update(lambda s: s.bars.append(self.bar))

    def update(self, n: int = 1) -> None:
        self.run._update(lambda s: setattr(self.bar, "done", self.bar.done + n))
        self.run._check_stop()

    def close(self) -> None:
        self.run._update(lambda s: s.bars.remove(self.bar) if self.bar in s.bars else None)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunLog(StageLogger):
    """The job's logger: events go to the console and `web.jsonl` as usual and into the page's
    event log; progress bars go to the page (no terminal bars)."""

    def __init__(self, run: WebRun, log_dir: Path):
        super().__init__("web", log_dir)
        self.run = run

    def event(self, name: str, message: str | None = None, **fields: Any) -> None:
        super().event(name, message, **fields)
        shown = {k: v for k, v in fields.items() if not is_secret_key(k)}
        text = message if message is not None else " ".join(f"{k}={short(v)}" for k, v in shown.items())
        line = masked_url(f"{time.strftime('%H:%M:%S')} {name}: {text}")

        def add(s: RunState) -> None:
            s.events.append(line)
            del s.events[:-EVENTS_KEPT]

        self.run._update(add)

    def progress(self, iterable: Any = None, total: int | None = None, desc: str = "", unit: str = "it") -> _Progress:
        return _Progress(self.run, iterable, total, desc)


class _QuietStop(logging.Filter):
    """Optuna logs a stopped trial as a failure with a traceback; the run says it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], RunStopped)) and "RunStopped" not in str(
            record.getMessage()
        )


logging.getLogger("optuna").addFilter(_QuietStop())
logging.getLogger("optuna.study._optimize").addFilter(_QuietStop())


class WebRun:
    """The server's one job and the pipeline it leaves behind (for results, export and chat)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.pipe: Pipeline | None = None
        self.settings: Settings | None = None  # of the last start: a reloaded page shows them
        self._state = RunState()
        self._lock = threading.Lock()  # guards _state
        self._model_lock = threading.Lock()  # the job, or one export/chat/research call, uses the model
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ state

    def snapshot(self) -> RunState:
        """A copy of the state. Trials, figure and reports are replaced whole when they change, never
        changed in place, so the copy shares them; the bars and events are copied."""
        with self._lock:
            s = self._state
            return dataclasses.replace(s, bars=[dataclasses.replace(b) for b in s.bars], events=list(s.events))

    def _update(self, change) -> None:
        with self._lock:
            change(self._state)
            self._state.version += 1

    def _set(self, **values: Any) -> None:
        self._update(lambda s: [setattr(s, k, v) for k, v in values.items()])

    def _check_stop(self) -> None:
        if self._stop.is_set() and threading.current_thread() is self._thread:
            raise RunStopped("stopped by the user")

    # ------------------------------------------------------------ start and stop

    def start(self, settings: Settings, job: str = "optimize") -> tuple[bool, str]:
        """Start a job in a server thread; (False, why) while one runs."""
        if job not in JOBS:
            raise ValueError(f"unknown job {job!r}; one of {', '.join(JOBS)}")
        with self._lock:
            s = self._state
            if s.status in (RUNNING, STOPPING):
                done = sum(1 for t in s.trials if not t.pruned)
                return False, (
                    f"run {s.run_id} is still {s.status} ({s.phase}; {done}/{s.n_trials} trials): stop it "
                    "or wait for it to finish before starting another"
                )
            run_id = next(self._ids)
            self._state = RunState(
                run_id=run_id,
                status=RUNNING,
                job=job,
                phase="starting",
                started=time.time(),
                model=settings.model.name,
                n_trials=settings.optimize.n_trials,
                version=s.version + 1,
                trials_version=s.trials_version + 1,
            )
            self._stop.clear()
            self.settings = settings
            self._thread = threading.Thread(
                target=self._work, args=(settings, job), name=f"clawly-run-{run_id}", daemon=True
            )
            self._thread.start()
        return True, f"started run {run_id}: {JOBS[job]} of {settings.model.name}"

    def stop(self) -> str:
        with self._lock:
            if self._state.status != RUNNING:
                return f"nothing to stop: the run is {self._state.status}"
            self._state.status, self._state.version = STOPPING, self._state.version + 1
        self._stop.set()
        return "stopping: the running trial ends at its next generation pass (the study keeps every finished trial)"

    def wait(self, timeout: float | None = None) -> RunState:
        """Block until the job ends (tests, scripts); returns the final state."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.snapshot()

    # ------------------------------------------------------------ the job

    def _pipeline(self, settings: Settings) -> Pipeline:
        """The previous pipeline when only n_trials changed (model loaded, study resumed); else a new one."""
        old = self.pipe
        same = old is not None and _without_trials(old.settings) == _without_trials(settings)
        if same:
            old.settings = settings
            return old
        if old is not None:
            old.close()
            self.pipe = None
        pipe = Pipeline(settings, log=RunLog(self, Paths.of(settings).logs))
        pipe.trial_progress = True
        self.pipe = pipe
        return pipe

    def _work(self, settings: Settings, job: str) -> None:
        try:
            self._set(phase="waiting for the model (an export or chat is using it)")
            with self._model_lock:
                pipe = self._pipeline(settings)
                self._set(phase="loading the model")
                pipe.load_model()
                self._set(phase="generating the prompt sets")
                pipe.load_datasets()
                self._set(phase="probing activations and computing the refusal directions")
                pipe.compute_refusal_directions()
                if job == "directions":
                    self._finish(FINISHED, "directions ready: open the Research tab")
                    return
                self._set(phase="scoring the base model")
                pipe.start_search()
                self._publish(pipe)
                self._set(phase="running trials")
                for _ in pipe.run_optimization_iter():
                    self._publish(pipe)
                pipe.write_outputs()
                self._publish(pipe)
            self._finish(
                FINISHED, f"finished: {len(self._state.trials)} trials; outputs in {Paths.of(settings).optimize}"
            )
        except RunStopped:
            self._finish(STOPPED, "stopped: start again with the same settings to continue the study")
        except ClawlyError as e:
            self._finish(FAILED, "failed", error=str(e))
        except Exception as e:  # noqa: BLE001 - the page shows it in one line; the console keeps the traceback
            traceback.print_exc()
            self._finish(FAILED, "failed", error=f"{type(e).__name__}: {e}")

    def _publish(self, pipe: Pipeline) -> None:
        """The study's trials and figure, read in the job's thread (the only one touching the study)."""
        search = pipe.start_search()
        trials = pipe.trials()
        chosen = pipe.choose_trial().index if any(not t.pruned for t in trials) else None
        figure = pipe.pareto_figure()
        label = pipe.settings.optimize.refusal_measure
        reports = dict(self._state.reports)
        reports.update({t.index: pipe.category_report(t) for t in trials if not t.pruned and t.index not in reports})

        def change(s: RunState) -> None:
            s.trials, s.chosen, s.figure, s.reports = trials, chosen, figure, reports
            s.base_refusals, s.scored_prompts, s.refusal_label = search.base_refusals, search.scored_prompts, label
            s.trials_version += 1

        self._update(change)

    def _finish(self, status: str, message: str, error: str | None = None) -> None:
        self._set(
            status=status,
            message=message,
            error=error,
            ended=time.time(),
            bars=[],
            phase="" if status == FINISHED else self._state.phase,
        )

    # ------------------------------------------------------------ the model, for export, chat, research

    @contextlib.contextmanager
    def model(self) -> Iterator[Pipeline]:
        """The pipeline, its model free for this block; `ModelBusy` at once while a job runs."""
        if self._state.active:
            raise ModelBusy("the run is using the model: stop it or wait until it finishes")
        if self.pipe is None:
            raise ModelBusy("no run yet: start one on the Run tab")
        if not self._model_lock.acquire(blocking=False):  # never wait: a handler that blocks freezes its page
            raise ModelBusy("the model is in use by another export, chat or research call: try again when it is done")
        try:
            if self.pipe is None:
                raise ModelBusy("no run yet: start one on the Run tab")
            yield self.pipe
        finally:
            self._model_lock.release()


def _without_trials(settings: Settings) -> dict:
    values = settings.to_dict()
    values["optimize"] = {k: v for k, v in values["optimize"].items() if k != "n_trials"}
    return values
