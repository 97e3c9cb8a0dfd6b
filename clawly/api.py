"""The Python API: the pipeline's steps as methods of one object, for notebooks and scripts.

    from clawly import Pipeline, Settings

    pipe = Pipeline(Settings(model="Qwen/Qwen2.5-0.5B-Instruct", n_trials=30))
    pipe.load_model(); pipe.load_datasets(); pipe.compute_refusal_directions()
    for trial in pipe.run_optimization_iter():
        print(trial)                                   # trial 3: 7 refusals, KL 0.1210
    front = pipe.get_pareto_front()
    pipe.restore_trial(front[1])                       # the model now holds that trial's weights
    pipe.save_adapter("out/adapter"); pipe.save_model("out/model")

Each step runs the steps it needs first when they have not run yet, so any one can be called
alone. The steps call the same functions as the DVC stages (`clawly.steps.*`, `clawly.save.export`) and
write the same files under `settings.artifacts_dir` and `settings.data.out_dir`; an interrupted
optimization resumes from its Optuna journal there.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from clawly.ablate.ablation import AblationPlan, LayerKernel, ablated, weight_deltas
from clawly.ablate.categories import category_table, check_categories
from clawly.ablate.directions import AblationDirections, check_fits, read_ablation_directions
from clawly.ablate.distill import read_factors
from clawly.ablate.edits import WriterInputs, load_writer_inputs
from clawly.data.prompts import instructed_categories, row_systems
from clawly.errors import ClawlyError
from clawly.io import atomic_dir, read_json, write_json, write_text
from clawly.log import StageLogger, get_logger
from clawly.measure.scoring import Scores
from clawly.measure.templating import chat_prompts
from clawly.model.architecture import holds_quantized
from clawly.model.architecture import num_layers as decoder_layer_count
from clawly.model.loading import full_precision, load_model, model_provenance, resolve_model_source
from clawly.paths import Paths
from clawly.save import export as ex
from clawly.search import study as st
from clawly.search.workers import extra_workers, worker_model
from clawly.settings import REFUSAL_MEASURES, Settings
from clawly.steps import (
    analyze,
    compute_directions,
    distill,
    generate_datasets,
    optimize,
    orthogonalize_categories,
    probe_activations,
    probe_writers,
)

TrialOutcome = optimize.TrialOutcome


class Pipeline:
    """One abliteration job held in memory: model, prompts, directions, study, restored trial.

    `trial_progress = True` also reports progress inside each trial (one `log.progress` bar per
    generation pass), so a logger can show it, or stop a run mid-trial by raising from `update`
    (Optuna then fails that trial and a rerun redoes it): the web UI does both."""

    trial_progress = False

    def __init__(self, settings: Settings | None = None, log: StageLogger | None = None, **keys):
        if settings is not None and keys:
            settings = Settings(**{**settings.to_dict(), **keys})
        self.settings = settings if settings is not None else Settings(**keys)
        self.log = log or get_logger("pipeline", Paths.of(self.settings).logs)
        self.model = self.tokenizer = None
        self.harmful: pd.DataFrame | None = None
        self.harmless: pd.DataFrame | None = None
        self.directions: AblationDirections | None = None
        self.inputs: WriterInputs | None = None  # the writers' input statistics (edit.method nullspace, least_squares)
        self.response_prefix: str | None = None
        self.batch_size: int | None = None
        self.search: optimize.Search | None = None
        self._evaluation: optimize.Evaluation | None = None  # init_evaluator's: the base scores
        self.trial: TrialOutcome | None = None  # the trial whose weights the model holds (None: base)
        self._change: ex.SavedChange | None = None  # the restored trial's change as it is saved
        self._distilled = False  # the change is a distilled adapter (distill()), not the trial's own
        self._deltas: dict | None = None  # ... and as applied (its model_deltas, formed once)
        self._geometry: analyze.Geometry | None = None
        self._applied = contextlib.ExitStack()

    # ------------------------------------------------------------ inputs

    def load_model(self):
        """Load the model and tokenizer of `settings.model` (packaged default, directory, .gguf, hub id)."""
        if self.model is None:
            self.model, self.tokenizer = load_model(worker_model(self.settings, 0), self.log)
        return self.model, self.tokenizer

    def load_datasets(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Generate the harmful and harmless prompt tables (id, text, category, split, system) and write them."""
        if self.harmful is None:
            harmful, harmless = generate_datasets.run(self.settings, self.log)
            check_categories(self.settings.categories, sorted(harmful.category.unique()))  # before any probing
            self.harmful, self.harmless = harmful, harmless
        return self.harmful, self.harmless

    def compute_refusal_directions(self) -> AblationDirections:
        """Probe activations, compute the refusal directions and (category mode) orthogonalize them:
        the directions the trials ablate, `[m, P, d]`. Directions already on disk from the same
        model, prompts and settings are reused (as `dvc repro` would), so a rerun resumes its study."""
        if self.directions is None:
            self.load_datasets()
            model, tokenizer = self.load_model()
            p = Paths.of(self.settings)
            inputs = self._direction_inputs()
            if p.orthogonalized.exists() and p.direction_inputs.exists() and read_json(p.direction_inputs) == inputs:
                self.log.event("directions_reused", f"reusing {p.orthogonalized} (same model, prompts and settings)")
            else:
                probe_activations.run(self.settings, self.log, model, tokenizer)
                compute_directions.run(self.settings, self.log)
                orthogonalize_categories.run(self.settings, self.log)
                if self.settings.edit.conditional:
                    probe_writers.run(self.settings, self.log, model, tokenizer)
                write_json(p.direction_inputs, inputs)
            self.directions = read_ablation_directions(p.orthogonalized)
            self.inputs = load_writer_inputs(self.settings)
        return self.directions

    def _direction_inputs(self) -> dict:
        s = self.settings.to_dict()
        return {
            "model": model_provenance(self.settings.model)["fingerprint"],
            "harmful": ex.prompts_fingerprint(self.harmful),
            "harmless": ex.prompts_fingerprint(self.harmless),
            **{k: s[k] for k in ("probe", "directions", "orthogonalize", "categories")},
            **({"edit": s["edit"]} if self.settings.edit.conditional else {}),
        }

    # ------------------------------------------------------------ scoring setup

    def detect_response_prefix(self) -> str:
        """The text every answer is scored after (optimize.response_prefix; 'auto' detects it)."""
        if self.response_prefix is None:
            self.load_datasets()
            model, tokenizer = self.load_model()
            harmful, harmless = optimize.optimizer_prompts(self.settings)
            self.response_prefix = optimize.response_prefix(
                self.settings, model, tokenizer, harmful.text.tolist(), harmless.text.tolist(), self.log
            )
        return self.response_prefix

    def auto_batch_size(self) -> int:
        """Time a few batch sizes once per model and machine (cached) and keep the fastest."""
        if self.batch_size is None:
            self.load_datasets()
            model, tokenizer = self.load_model()
            harmful, _ = optimize.optimizer_prompts(self.settings)
            systems = row_systems(harmful, self.settings.model.system_prompt)
            prompts = chat_prompts(tokenizer, harmful.text.tolist(), systems, self.detect_response_prefix())
            self.batch_size = optimize.scoring_batch_size(
                self.settings, model, tokenizer, prompts, self.log, timed=True
            )
        return self.batch_size

    def _batch_size(self) -> int | None:
        """optimize.batch_size unless `auto_batch_size()` ran (None: the setting is 'auto', timed then)."""
        if self.batch_size is not None:
            return self.batch_size
        return None if self.settings.optimize.batch_size == "auto" else int(self.settings.optimize.batch_size)

    def init_evaluator(self) -> Scores:
        """Score the base model on the optimizer's prompts once (its refusals per category, the first-token
        distributions KL is taken against): what every trial is measured against. Needs no directions,
        so it may come before `compute_refusal_directions` (Clawly's order); `start_search` reuses it."""
        if self.search is not None:
            return self.search.base
        if self._evaluation is None:
            self.load_datasets()
            model, tokenizer = self.load_model()
            self._restore_base()
            self._evaluation = optimize.evaluation(
                self.settings, self.log, model, tokenizer, self.detect_response_prefix(), self._batch_size()
            )
            self.batch_size = self._evaluation.batch_size
        return self._evaluation.base

    def start_search(self) -> optimize.Search:
        """Score the base model once (`init_evaluator`) and open (or resume) the study. The batch size
        is optimize.batch_size unless `auto_batch_size()` ran (or the setting is 'auto')."""
        if self.search is None:
            directions = self.compute_refusal_directions()
            self._restore_base()
            self.search = optimize.start_search(
                self.settings,
                self.log,
                self.model,
                self.tokenizer,
                directions,
                self.detect_response_prefix(),
                self._batch_size(),
                measured=self._evaluation,
            )
            self.batch_size = self.search.batch_size
        self.search.scorer.progress = self.log.progress if self.trial_progress else None
        return self.search

    # ------------------------------------------------------------ optimization

    def run_optimization_iter(self) -> Iterator[TrialOutcome]:
        """Run the missing trials (up to optimize.n_trials), yielding each as it finishes here; with
        optimize.workers > 1, that many processes add trials to the study at once (`trials()` lists
        them all once the iteration ends)."""
        search = self.start_search()
        self._restore_base()
        with extra_workers(self.settings, self.log, optimize.worker, optimize.handed(search)):
            for t in optimize.search_trials(search, self.settings, self.model, self.log):
                yield TrialOutcome.of(t)

    def get_pareto_front(self) -> list[TrialOutcome]:
        """The Pareto-optimal trials (refusals vs KL), by KL."""
        return [TrialOutcome.of(t) for t in self.start_search().pareto_front()]

    def trials(self) -> list[TrialOutcome]:
        """Every finished trial (complete or pruned), by index."""
        return [TrialOutcome.of(t) for t in sorted(st.finished(self.start_search().study), key=lambda t: t.number)]

    def choose_trial(self) -> TrialOutcome:
        """The trial the stages would choose (fewest refusals with KL <= optimize.kl_cap)."""
        return TrialOutcome.of(self.start_search().chosen(self.settings.optimize.kl_cap))

    def write_outputs(self) -> dict:
        """The optimize stage's files: trials table, Pareto plot, chosen trial, metrics."""
        return optimize.write_search_outputs(self.settings, self.start_search(), self.log)

    def pareto_figure(self) -> go.Figure:
        """The trials so far as a plotly scatter: refusals (the optimizer's measure) against KL, the
        Pareto front, the rule's choice and the base model's refusals; every point carries its trial
        number as `customdata` (for click-to-select)."""
        search = self.start_search()
        label = REFUSAL_MEASURES[self.settings.optimize.refusal_measure][0]
        what = "targeted-category prompts" if self.settings.categories.enabled else "harmful eval prompts"
        trials = st.completed(search.study)
        if not trials:
            fig = go.Figure()
            base = search.base_refusals
            fig.add_hline(y=base, line_dash="dot", annotation_text=f"base model: {base}")
            fig.update_layout(
                title=f"{label.capitalize()} on {search.scored_prompts} {what}: no finished trial yet",
                xaxis_title="KL divergence (nats)",
                yaxis_title=label,
                template="plotly_white",
            )
            return fig
        table = st.trials_table(trials, {t.number for t in search.study.best_trials})
        fig = st.pareto_figure(
            table,
            self.choose_trial().index,
            search.base_refusals,
            search.scored_prompts,
            what,
            self.settings.optimize.refusal_measure,
        )
        number = {(kl, r): n for n, kl, r in zip(table.trial, table.kl_divergence, table.refusals, strict=True)}
        for trace in fig.data:  # every trace was drawn from the table's rows: look each point up
            trace.customdata = [number[x, y] for x, y in zip(trace.x, trace.y, strict=True)]
        return fig

    def category_report(self, trial: TrialOutcome | None = None) -> pd.DataFrame:
        """Per category of the optimizer's prompts: role (targeted, kept, untargeted), weight, prompts,
        refusals and rate with its 95% Wilson interval for the base model and for `trial` (default:
        the restored one), and the kept categories' retention (after / base). These are the
        optimizer's own prompts, so the trial's figures are selection-biased: the evaluate stage
        re-measures on held-out ones."""
        search = self.start_search()
        trial = trial or self.trial
        if trial is None or trial.refusals is None:
            raise ClawlyError("no scored trial to report: restore or pick a finished (not pruned) trial")
        table = category_table(
            search.base.prompts_by_category,
            search.base.refusals_by_category,
            trial.refusals_by_category,
            self.settings.categories.weights,
            instructed_categories(self.load_datasets()[0]),
        )
        frame = pd.DataFrame.from_dict(table, orient="index").rename_axis("category").reset_index()
        return frame if "retention" in frame else frame.assign(retention=None)

    # ------------------------------------------------------------ research views

    def residual_geometry(self) -> pd.DataFrame:
        """Per probe point: norms of the harmful and harmless means and of their difference, their
        cosines with each other and with the refusal direction, the direction's cosine with the
        previous point's, the silhouettes (harmful vs harmless; the harmful residuals by category;
        each category's) and the mean and largest cosine between category directions. Probes and
        computes the directions first if needed; writes artifacts/research/geometry.{parquet,csv}."""
        return self._research().table

    def category_cosines(self) -> pd.DataFrame:
        """The category x category cosine of the category directions per probe point (long form)."""
        return self._research().cosines

    def plot_residuals(self, out_dir: str | Path | None = None) -> list[Path]:
        """PaCMAP projections of the residuals (research extra): `residuals.html` with a slider over
        the probe points, coloured by harmful/harmless and by category, `embedding.parquet` and PNGs
        of a few probe points, in `out_dir` (default artifacts/research/projections). Returns the files."""
        out = Path(out_dir) if out_dir is not None else Paths.of(self.settings).projections
        return analyze.write_projections(self.settings, self._research(), out, self.log)

    def _research(self) -> analyze.Geometry:
        if self._geometry is None:
            self.compute_refusal_directions()
            self._geometry = analyze.geometry(self.settings)
            analyze.write_tables(self.settings, self._geometry)
        return self._geometry

    # ------------------------------------------------------------ a trial's model

    def restore_trial(self, trial: TrialOutcome | int | AblationPlan) -> TrialOutcome:
        """Put a trial's weights into the model (undoing the previous one). A plan not from the
        study (direct mode) becomes a trial with index -1 and no figures until `score()`."""
        directions = self.compute_refusal_directions()
        if isinstance(trial, int):
            found = self.start_search().trial(trial)
            if found is None or "plan" not in found.user_attrs:
                raise ClawlyError(
                    f"no finished trial {trial} in the study: pick one of {[t.index for t in self.trials()]}"
                )
            trial = TrialOutcome.of(found)
        elif isinstance(trial, AblationPlan):
            trial = TrialOutcome(-1, None, None, {}, {}, {}, trial)
        self._restore_base()
        change = ex.saved_change(
            self.model, directions.basis, trial.plan, directions.strengths, self.settings.export, self.inputs
        )
        self._change, self._deltas = change, change.model_deltas
        self._applied.enter_context(ablated(self.model, self._deltas))
        self.trial = trial
        return trial

    def distill(self) -> TrialOutcome:
        """Selective distillation (`distill.steps` > 0): the adapter retrained from the global change
        so that targeted requests follow the globally abliterated model and kept ones the base model
        (`clawly.ablate.distill`); the model then holds the trained adapter, which save_adapter and save_model
        write. Runs on the base weights, from the chosen trial's kernels."""
        if not self.settings.distill.enabled:
            raise ClawlyError("distill.steps is 0: set it (e.g. 60) to distill the adapter")
        trial = self._current()
        self.write_outputs()  # the chosen trial's file the step starts from
        self._restore_base()
        self.trial = None
        distill.run(self.settings, self.log, self.model, self.tokenizer)
        change = ex.distilled_change(self.model, read_factors(Paths.of(self.settings).distilled)[0])
        self._change, self._deltas = change, change.model_deltas
        self._applied.enter_context(ablated(self.model, self._deltas))
        self._distilled = True
        self.trial = trial
        return trial

    def score(self) -> TrialOutcome:
        """Refusals and KL of the model as it is now (the restored trial, or the base model)."""
        if self.search is None:  # the base scores come first, on the base weights
            current = self.trial
            self.start_search()
            if current is not None:
                self.restore_trial(current)
        search = self.search
        t0 = time.perf_counter()
        result = search.scorer.score()
        refusals = int(search.objectives.values(result)[0])
        trial = self.trial or TrialOutcome(-1, None, None, {}, {}, {}, AblationPlan(kernels={}))
        self.trial = TrialOutcome(
            trial.index,
            refusals,
            result.kl,
            result.refusals_by_category,
            result.prompts_by_category,
            trial.parameters,
            trial.plan,
            seconds=time.perf_counter() - t0,
        )
        return self.trial

    def direct_plan(
        self,
        layers: tuple[int, int] | None = None,
        use_layer: int | None = None,
        strength: float = 1.0,
        components: list[str] | None = None,
    ) -> AblationPlan:
        """A plan without optimization: ablate with `strength` in decoder layers `layers` (inclusive
        range; default all), using the direction probed at the output of layer `use_layer` (default:
        per-layer directions, each layer its own)."""
        num_layers = decoder_layer_count(self.load_model()[0])
        lo, hi = layers if layers is not None else (0, num_layers - 1)
        if not 0 <= lo <= hi < num_layers:
            raise ClawlyError(f"layers {lo}-{hi} are outside the model's decoder layers 0-{num_layers - 1}")
        if use_layer is not None and not 0 <= use_layer < num_layers:
            raise ClawlyError(f"use_layer {use_layer} is outside the model's decoder layers 0-{num_layers - 1}")
        kernel = LayerKernel(strength, (lo + hi) / 2, strength, (hi - lo) / 2)
        return AblationPlan(
            kernels={c: kernel for c in components or self.settings.optimize.components},
            direction_index=None if use_layer is None else float(use_layer + 1),
            norm_preserve=self.settings.optimize.norm_preserve,
        )

    def _restore_base(self) -> None:
        self._applied.close()
        self._applied = contextlib.ExitStack()
        self.trial, self._change, self._deltas, self._distilled = None, None, None, False

    @contextlib.contextmanager
    def base_weights(self) -> Iterator[torch.nn.Module]:
        """The base model's weights for the duration of the block; the restored trial's (the same
        bytes) come back on exit."""
        deltas = self._deltas
        self._applied.close()
        self._applied = contextlib.ExitStack()
        try:
            yield self.load_model()[0]
        finally:
            if deltas is not None:
                self._applied.enter_context(ablated(self.model, deltas))

    # ------------------------------------------------------------ chat

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, base: bool = False) -> Iterator[str]:
        """Stream the greedy answer to a conversation (`[{"role": "user", "content": ...}, ...]`; the
        settings' system prompt goes first unless the conversation has one) from the model as it is
        now, the restored trial, or with `base=True` the base model: yields the answer so far after
        each new piece of text. The model is busy until the generator is exhausted or closed (closing
        it stops generation at the next token)."""
        model, tokenizer = self.load_model()
        system = self.settings.model.system_prompt
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        closed = threading.Event()
        with self.base_weights() if base else contextlib.nullcontext():
            worker = threading.Thread(
                target=_generate,
                daemon=True,
                args=(model, streamer),
                kwargs=dict(
                    **ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    stopping_criteria=StoppingCriteriaList([_Until(closed)]),
                ),
            )
            worker.start()
            try:
                text = ""
                for piece in streamer:
                    if piece:
                        text += piece
                        yield text.strip()
            finally:
                closed.set()
                worker.join()  # the weights change back only once generation has stopped

    def _current(self) -> TrialOutcome:
        if self.trial is None:
            self.restore_trial(self.choose_trial())
        return self.trial

    # ------------------------------------------------------------ saving

    def _record(self, out: Path, kind: str) -> None:
        trial = self._current()
        harmful, harmless = self.load_datasets()
        ex.write_record(
            out,
            kind,
            self.settings,
            trial.plan,
            self.compute_refusal_directions(),
            {"harmful": harmful, "harmless": harmless},
            None
            if trial.index < 0
            else {
                "index": trial.index,
                "parameters": trial.parameters,
                "refusals": trial.refusals,
                "kl_divergence": trial.kl_divergence,
            },
            self._change,
            {n: (d.b, d.a) for n, d in self._change.deltas.items()} if self._distilled else None,
        )

    def _card(self, kind: str) -> str:
        summary = {}
        if self.search is not None and self.trial is not None and self.trial.index >= 0:
            chosen = self.search.trial(self.trial.index)
            if chosen is not None and chosen.values:
                summary = optimize.search_summary(self.settings, self.search, chosen)
                summary["rule"] = "picked by the user"
        return ex.model_card(self.settings, summary, kind=kind)

    def save_adapter(self, path: str | Path) -> Path:
        """Write the restored trial (default: the chosen one) as a PEFT LoRA adapter, with model card
        and reproduction record."""
        trial = self._current()
        if trial.plan.norm_preserve and (warning := ex.adapter_warning(self._change.factors, self.settings.export)):
            self.log.event("warning", warning)
        with atomic_dir(path) as tmp:
            ex.write_adapter(self.model, self._change.factors, tmp, str(resolve_model_source(self.settings.model)))
            write_text(tmp / "README.md", self._card("adapter"))
            self._record(tmp, "adapter")
        self.log.event("saved", kind="adapter", path=str(path))
        return Path(path)

    @contextlib.contextmanager
    def _merged_model(self) -> Iterator[torch.nn.Module]:
        """The model with the restored trial's change in its weights. A 4-bit model cannot hold it: the base
        is loaded again without 4-bit for the block and changed as the merge stage changes it (the adapter's
        B A, or the plan's exact change recomputed on these weights where no adapter holds it)."""
        if not holds_quantized(self.model):
            yield self.model
            return
        full, _ = load_model(full_precision(self.settings.model), self.log)
        if self._change.exact:  # the change itself, recomputed on the full-precision weights
            directions = self.compute_refusal_directions()
            deltas = weight_deltas(full, directions.basis, self._current().plan, directions.strengths, self.inputs)
        else:  # the adapter's B A, as applied to the 4-bit model and as the merge stage adds it
            deltas = self._deltas
        with ablated(full, deltas):
            yield full

    def save_model(self, path: str | Path) -> Path:
        """Write the model with the restored trial (default: the chosen one) merged into its weights:
        safetensors shards, config, tokenizer, model card, reproduction record. A 4-bit model's change is
        merged into the base loaded in full precision (see `_merged_model`)."""
        self._current()
        with atomic_dir(path) as tmp, self._merged_model() as model:
            ex.write_model(model, self.tokenizer, tmp, self.settings, Path(resolve_model_source(self.settings.model)))
            write_text(tmp / "README.md", self._card("model"))
            self._record(tmp, "model")
        self.log.event("saved", kind="model", path=str(path))
        return Path(path)

    # ------------------------------------------------------------ reproduction

    @classmethod
    def reproduce(cls, record_file: str | Path, out_dir: str | Path, log: StageLogger | None = None) -> Path:
        """Rebuild a saved adapter or model from its reproduction record into `out_dir`: same
        settings, same model (checked by fingerprint), the recorded directions and plan."""
        record, directions_file = ex.read_record(record_file)
        settings = Settings.from_dict(record["settings"])
        pipe = cls(settings, log)
        recorded = (record.get("model") or {}).get("fingerprint")
        found = model_provenance(settings.model)["fingerprint"]
        if recorded and recorded != found:
            raise ClawlyError(
                f"the model {settings.model.name!r} is not the one recorded ({found} here, {recorded} "
                "in the record): load the same weights (model.name / model.revision)"
            )
        pipe.directions = read_ablation_directions(directions_file)
        pipe.inputs = ex.recorded_inputs(Path(directions_file).parent)  # an input-conditional edit's rows
        check_fits(pipe.directions.directions, pipe.load_model()[0], directions_file)
        trial = record.get("trial") or {}
        pipe.restore_trial(AblationPlan.from_dict(record["plan"]))
        trained = ex.recorded_distillation(Path(directions_file).parent)
        if trained:  # the saved change was the distilled adapter: rebuild that
            restored = pipe.trial
            pipe._restore_base()
            change = ex.distilled_change(pipe.model, trained)
            pipe._change, pipe._deltas, pipe._distilled = change, change.model_deltas, True
            pipe._applied.enter_context(ablated(pipe.model, pipe._deltas))
            pipe.trial = restored
        pipe.trial = TrialOutcome(
            trial.get("index", -1),
            trial.get("refusals"),
            trial.get("kl_divergence"),
            {},
            {},
            trial.get("parameters", {}),
            pipe.trial.plan,
        )
        kind = record.get("kind", "model")
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            if kind == "adapter":
                ex.write_adapter(pipe.model, pipe._change.factors, tmp, str(resolve_model_source(settings.model)))
            else:
                with pipe._merged_model() as model:
                    ex.write_model(model, pipe.tokenizer, tmp, settings, Path(resolve_model_source(settings.model)))
            write_text(tmp / "README.md", ex.model_card(settings, {}, kind=kind))
            ex.copy_record(Path(directions_file).parent, tmp, kind)
        pipe.log.event("reproduced", kind=kind, path=str(out))
        return out

    def close(self) -> None:
        """Restore the base weights and free the model."""
        self._restore_base()
        self.model = self.tokenizer = None
        self.search = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _Until(StoppingCriteria):
    """Stops generation once `event` is set (the chat stream was closed)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate(model, streamer: TextIteratorStreamer, **kwargs) -> None:
    """`model.generate` into a streamer; an error ends the stream instead of leaving the reader waiting."""
    try:
        with torch.no_grad():
            model.generate(**kwargs, streamer=streamer)
    except BaseException:
        streamer.end()
        raise
