"""The Gradio app: five tabs over one `WebRun` (the server's job) and its `Pipeline`; no logic of its own.

- Configuration: the model, quantization, trials, the refusal measure, one row per harm category
  (in the run, weight) filled by a preset, and every other setting by section with its help; each
  field shows the settings' own message when its value is invalid.
- Run: start (refused while a job runs), stop, a live progress bar, the Pareto scatter and the
  trial log, redrawn from the server's state once a second, so a reloaded page shows the same run.
- Results: the Pareto chart (click a point to select its trial), the trial's parameters and the
  per-category table before/after with intervals and retention.
- Export: save the selected trial as an adapter or a merged model, upload it to the Hub (the token
  goes to huggingface_hub only), and chat with it beside the base model (streamed).
- Research: the residual-geometry table and the PaCMAP projections of the run's activations.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from clawly.ablate.research import require_research_extra
from clawly.errors import ClawlyError
from clawly.paths import Paths
from clawly.redact import redacted
from clawly.save.hub import push_to_hub
from clawly.settings import REFUSAL_MEASURES, Settings
from clawly.settings_docs import SECTIONS as SECTION_DOCS
from clawly.web import form
from clawly.web.guard import PagePolicy
from clawly.web.run import FAILED, FINISHED, RUNNING, STOPPED, STOPPING, RunState, WebRun

QUANTIZATION = {"none": False, "4-bit NF4 (bitsandbytes, CUDA only)": True}
EXPORT_KINDS = {"LoRA adapter": "adapter", "merged model": "model"}
MAX_CHAT_TOKENS = 1024

CSS = """
.clawly-progress { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; }
.clawly-progress > div { height: 100%; background: var(--color-accent); transition: width .4s; }
.clawly-progress[data-status=failed] > div { background: #d62728; }
.clawly-progress-text { margin-top: 6px; font-size: 0.9em; color: var(--body-text-color-subdued); }
.clawly-invalid { border: 2px solid #d62728 !important; border-radius: 8px; }
.clawly-invalid [data-testid=block-info] + div, .clawly-invalid .info { color: #d62728 !important; }
#run-status { font-weight: 600; }
"""

# Clicking a point of the Results chart writes "<trial>@<time>" into a hidden text box, whose change
# event selects the trial (the time makes a second click on the same point a change too).
JS = """
() => {
  const attach = () => {
    document.querySelectorAll('#results-pareto .js-plotly-plot').forEach(gd => {
      if (gd.__clawlyClick || typeof gd.on !== 'function') return;
      gd.__clawlyClick = true;
      gd.on('plotly_click', ev => {
        const point = ev.points && ev.points[0];
        const box = document.querySelector('#clicked-trial textarea, #clicked-trial input');
        if (!point || point.customdata === undefined || !box) return;
        box.value = `${point.customdata}@${Date.now()}`;
        box.dispatchEvent(new Event('input', {bubbles: true}));
      });
    });
  };
  new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
  attach();
}
"""


# ---------------------------------------------------------------- what the pages draw from a snapshot


def status_line(s: RunState) -> str:
    if not s.run_id:
        return "no run yet: set the configuration, then press Start on the Run tab"
    done = sum(1 for t in s.trials if not t.pruned)
    minutes, seconds = divmod(int(s.elapsed), 60)
    trials = f" · {done}/{s.n_trials} trials" if s.job == "optimize" else " · directions only"
    return f"run {s.run_id} · {s.status} · {s.model}{trials} · {minutes:02d}:{seconds:02d}"


def progress_html(s: RunState) -> str:
    steps = " · ".join(f"{b.desc} {b.done}/{b.total}" if b.total else b.desc for b in s.bars)
    text = {
        RUNNING: s.phase,
        STOPPING: f"stopping ({s.phase})",
        FINISHED: s.message,
        STOPPED: s.message,
        FAILED: f"failed: {s.error}",
    }.get(s.status, "idle")
    detail = f"{text}: {steps}" if steps and s.status in (RUNNING, STOPPING) else text
    return (
        f'<div class="clawly-progress" data-status="{s.status}" data-fraction="{s.fraction():.3f}">'
        f'<div style="width: {100 * s.fraction():.1f}%"></div></div>'
        f'<div class="clawly-progress-text" id="progress-text">{html.escape(detail)}</div>'
    )


def trial_log(s: RunState) -> pd.DataFrame:
    """One row per finished trial, the newest first."""
    rows = []
    for t in reversed(s.trials):
        row = {
            "trial": t.index,
            "refusals": t.refusals,
            "KL": None if t.kl_divergence is None else round(t.kl_divergence, 4),
            "state": "pruned" if t.pruned else ("kept refusals" if t.feasible else "lost kept refusals"),
            "seconds": None if t.seconds is None else round(t.seconds, 1),
        }
        row.update({c: n for c, n in sorted(t.refusals_by_category.items())})
        rows.append(row)
    columns = ["trial", "refusals", "KL", "state", "seconds"]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)


def empty_figure(text: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=text, xaxis_title="KL divergence (nats)", yaxis_title="refusals", template="plotly_white")
    return fig


def compact(fig: go.Figure) -> go.Figure:
    """The study's figure sized for half a page: a smaller title, the legend below the plot."""
    return go.Figure(fig).update_layout(
        title_font_size=13, legend={"orientation": "h", "y": -0.22}, margin={"l": 60, "r": 20, "t": 60, "b": 40}
    )


def live_figure(s: RunState) -> go.Figure:
    return compact(s.figure) if s.figure is not None else empty_figure("the Pareto front appears here as trials finish")


def results_figure(s: RunState, selected: int | None) -> go.Figure:
    """The run's figure with the selected trial ringed."""
    if s.figure is None:
        return empty_figure("no trials yet")
    fig = go.Figure(s.figure)
    trial = next((t for t in s.trials if t.index == selected and not t.pruned), None)
    if trial is not None:
        ring = {"size": 22, "color": "rgba(0,0,0,0)", "line": {"width": 3, "color": "#2ca02c"}}
        fig.add_trace(
            go.Scatter(
                x=[trial.kl_divergence],
                y=[trial.refusals],
                mode="markers",
                customdata=[trial.index],
                name=f"selected (trial {trial.index})",
                hoverinfo="skip",
                marker=ring,
            )
        )
    fig.update_layout(clickmode="event")
    return fig


def effective_trial(s: RunState, selected: int | None) -> int | None:
    """The trial a page works with: its own pick if that trial exists and was scored, else the rule's choice."""
    scored = {t.index for t in s.trials if not t.pruned}
    return selected if selected in scored else s.chosen


def trial_choices(s: RunState) -> list[tuple[str, int]]:
    return [
        (
            f"trial {t.index}: {t.refusals} refusals, KL {t.kl_divergence:.4f}"
            + (" (rule's choice)" if t.index == s.chosen else ""),
            t.index,
        )
        for t in s.trials
        if not t.pruned
    ]


def interval(rate: float | None, ci: Any) -> str:
    if rate is None:
        return ""
    low, high = ci
    return f"{100 * rate:.0f}% ({100 * low:.0f}–{100 * high:.0f}%)"


def category_frame(report: pd.DataFrame) -> pd.DataFrame:
    """The per-category report as a page shows it: counts, rates with their 95% intervals, retention."""
    return pd.DataFrame(
        {
            "category": report.category,
            "role": report.role,
            "weight": report.weight.map(lambda w: "" if w is None or w != w else f"{w:g}"),
            "prompts": report.prompts,
            "base refusals": [
                f"{b} · {interval(r, c)}"
                for b, r, c in zip(report.base_refusals, report.base_rate, report.base_rate_ci95, strict=True)
            ],
            "after refusals": [
                f"{a} · {interval(r, c)}"
                for a, r, c in zip(report.after_refusals, report.after_rate, report.after_rate_ci95, strict=True)
            ],
            "retention": report.retention.map(lambda x: "" if x is None or x != x else f"{100 * x:.0f}%"),
        }
    )


def trial_summary(s: RunState, index: int | None) -> str:
    trial = next((t for t in s.trials if t.index == index), None)
    if trial is None:
        return "No trial selected: finish a trial first."
    label = REFUSAL_MEASURES.get(s.refusal_label, (s.refusal_label,))[0]
    rule = " — the rule's choice" if index == s.chosen else ""
    return (
        f"**Trial {trial.index}**{rule}: {trial.refusals} {label} of {s.scored_prompts} scored prompts "
        f"(base model: {s.base_refusals}), first-token KL {trial.kl_divergence:.4f}. These are the optimizer's "
        "own prompts: the `evaluate` stage re-measures a saved model on held-out ones."
    )


# ---------------------------------------------------------------- the app: one function per tab


@dataclass
class Page:
    """What the tabs share: the server's run, the start settings, the operator's policy, the form's
    fields, and the page-level components (the run's status line, the tabs, the picked trial)."""

    run: WebRun
    base: Settings
    policy: PagePolicy
    fields: list[form.FormField]
    categories: list[str]
    tabs: Any = None
    status: Any = None
    selected: Any = None  # gr.State: the trial this page picked (None: the rule's choice)


@dataclass
class ConfigTab:
    order: list  # the field components, in `page.fields` order
    included: list
    sliders: list
    weights_error: Any
    message: Any

    @property
    def inputs(self) -> list:
        return [*self.order, *self.included, *self.sliders]


def _widget(f: form.FormField, value: Any) -> gr.components.Component:
    common = {"label": f.label, "info": f.help, "elem_id": "field-" + f.key.replace(".", "-")}
    if f.key == "model.load_in_4bit":
        return gr.Dropdown(
            list(QUANTIZATION), value=_quantization(value), **{**common, "label": "quantization (model.load_in_4bit)"}
        )
    if f.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if f.kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if f.kind == "float":
        return gr.Number(value=value, step=0.05, **common)
    if f.kind == "choice":
        return gr.Dropdown(list(f.choices), value=value, **common)
    return gr.Textbox(value=value, **common)


def _field_update(f: form.FormField, error: str | None) -> dict:
    return gr.update(info=f"⚠ {error}" if error else f.help, elem_classes=["clawly-invalid"] if error else [])


def collect(page: Page, values: list[Any]) -> tuple[Settings | None, list[dict], str, str]:
    """The form's values as settings (or None), each field's update (its message), the category
    weights' message and the form's message."""
    fields, names = page.fields, page.categories
    raw = {f.key: _raw(f, v) for f, v in zip(fields, values[: len(fields)], strict=True)}
    rows = values[len(fields) :]
    weights = form.weights_from_rows(names, rows[: len(names)], rows[len(names) :])
    settings, errors, across = form.settings_from_form(raw, weights, page.base, page.policy)
    where = form.error_key(across) if across else None
    if where in raw:
        errors[where] = across
    updates = [_field_update(f, errors.get(f.key)) for f in fields]
    weights_text = f"⚠ {across}" if where == form.WEIGHTS else ""
    if errors:
        text = "⚠ fix the marked settings: " + ", ".join(errors)
    elif across and where != form.WEIGHTS:
        text = f"⚠ {across}"
    elif across:
        text = "⚠ fix the category weights"
    else:
        mode = (
            f"category mode ({', '.join(settings.categories.targeted)} targeted)"
            if settings.categories.enabled
            else "global mode"
        )
        text = f"settings are valid: {settings.model.name}, {settings.optimize.n_trials} trials, {mode}"
    return settings, updates, weights_text, text


def configuration_tab(page: Page) -> ConfigTab:
    """The model, quantization, trials and refusal measure; a row per harm category (in the run,
    weight) filled by a preset; every other setting by section. A field shows its own message."""
    start = form.form_values(page.base, page.policy)
    descriptions = dict(form.categories(page.base))
    components: dict[str, gr.components.Component] = {}
    with gr.Row():
        for f in form.top_fields(page.policy):
            components[f.key] = _widget(f, start[f.key])
    gr.Markdown(
        "### Harm categories\nIn the run with weight 1: uncensor; weight 0: keep its refusals; "
        "between: partly. Categories not in the run are neither (reported only). No category "
        "in the run: global mode, one refusal direction for all."
    )
    preset = gr.Dropdown(
        [form.NO_PRESET, *form.presets()],
        value=form.NO_PRESET,
        label="preset",
        info="fills the rows below (and the settings the preset sets, e.g. the direction method)",
        elem_id="preset",
    )
    included, sliders = [], []
    for name, on, w in zip(
        page.categories, *form.rows_from_weights(page.categories, page.base.categories.weights), strict=True
    ):
        with gr.Row(equal_height=True):
            included.append(gr.Checkbox(value=on, label=name, info=descriptions[name], scale=2, elem_id=f"in-{name}"))
            sliders.append(
                gr.Slider(0, 1, value=w, step=0.05, label=f"{name} weight", scale=3, elem_id=f"weight-{name}")
            )
    weights_error = gr.Markdown(elem_id="weights-error")
    with gr.Accordion("Advanced settings (every setting, by section)", open=False):
        for section, section_fields in form.advanced_fields(page.policy).items():
            with gr.Accordion(f"{section}: {SECTION_DOCS[section]}", open=False):
                for f in section_fields:
                    components[f.key] = _widget(f, start[f.key])
    check = gr.Button("Check the settings")
    message = gr.Markdown(elem_id="config-message")
    tab = ConfigTab([components[f.key] for f in page.fields], included, sliders, weights_error, message)

    for f in page.fields:

        def check_one(value, f=f):
            return _field_update(f, form.field_error(f, _raw(f, value), page.policy))

        comp = components[f.key]
        event = comp.change if isinstance(comp, (gr.Checkbox, gr.Dropdown)) else comp.blur
        event(check_one, comp, comp, show_progress="hidden", queue=False)

    def on_check(*values):
        _, updates, weights_text, text = collect(page, list(values))
        return [*updates, weights_text, text]

    check.click(on_check, tab.inputs, [*tab.order, weights_error, message])

    def on_preset(name: str):
        weights, values = form.apply_preset(name, page.base, page.policy)
        in_run, ws = form.rows_from_weights(page.categories, weights)
        updates = [gr.update(value=_shown(f, values[f.key])) if f.key in values else gr.skip() for f in page.fields]
        return [*updates, *in_run, *ws]

    preset.input(on_preset, preset, tab.inputs)
    return tab


@dataclass
class RunTab:
    message: Any
    progress: Any
    live_plot: Any
    log_table: Any
    events: Any


def run_tab(page: Page, config: ConfigTab) -> RunTab:
    """Start (refused while a job runs), directions only, stop; a live progress bar, the Pareto
    scatter and the trial and event logs (the page's timer redraws them, see `build_app`)."""
    run = page.run
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start")
        directions_only = gr.Button("Directions only (for the research views)", elem_id="directions-only")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    message = gr.Markdown(elem_id="run-message")
    progress = gr.HTML(progress_html(run.snapshot()), elem_id="progress")
    with gr.Row():
        live_plot = gr.Plot(live_figure(run.snapshot()), label="Pareto front (live)", elem_id="live-pareto")
        log_table = gr.Dataframe(
            trial_log(run.snapshot()), label="trial log", elem_id="trial-log", interactive=False, max_height=420
        )
    events = gr.Textbox(
        label="event log (newest first; all of it in OUTPUT/work/logs/web.jsonl)",
        lines=8,
        max_lines=8,
        interactive=False,
        elem_id="event-log",
    )

    def on_start(job: str, *values):
        settings, updates, weights_text, text = collect(page, list(values))
        if settings is None:
            return [*updates, weights_text, text, gr.skip(), gr.Tabs(selected="config")]
        ok, said = run.start(settings, job)
        return [*updates, weights_text, text, ("" if ok else "⚠ ") + said, gr.skip()]

    outputs = [*config.order, config.weights_error, config.message, message, page.tabs]
    start.click(lambda *v: on_start("optimize", *v), config.inputs, outputs)
    directions_only.click(lambda *v: on_start("directions", *v), config.inputs, outputs)
    stop.click(lambda: run.stop(), None, message)
    return RunTab(message, progress, live_plot, log_table, events)


@dataclass
class ResultsTab:
    plot: Any
    picker: Any
    summary: Any
    by_category: Any
    parameters: Any
    clicked: Any


def results_tab(page: Page) -> ResultsTab:
    """The Pareto chart (a click selects a trial), the trial's figures, parameters and per-category table."""
    gr.Markdown("Click a point to select its trial (or pick it below).")
    plot = gr.Plot(results_figure(page.run.snapshot(), None), label="Pareto front", elem_id="results-pareto")
    clicked = gr.Textbox(visible="hidden", elem_id="clicked-trial")
    picker = gr.Dropdown([], label="trial", elem_id="trial-picker", interactive=True)
    summary = gr.Markdown(elem_id="trial-summary")
    by_category = gr.Dataframe(
        label="per category on the optimizer's prompts: refusals of the base model and of "
        "the trial (rate, 95% Wilson interval)",
        interactive=False,
        elem_id="category-table",
    )
    parameters = gr.JSON(label="parameters and ablation plan", elem_id="trial-parameters")
    return ResultsTab(plot, picker, summary, by_category, parameters, clicked)


def export(run: WebRun, kind: str, pick: int | None) -> str:
    """Save the picked trial (else the rule's choice) as an adapter or a merged model under OUTPUT/exports."""
    s = run.snapshot()
    trial = effective_trial(s, pick)
    if trial is None:
        return "⚠ no finished trial to export yet"
    try:
        with run.model() as pipe:
            if pipe.trial is None or pipe.trial.index != trial:
                pipe.restore_trial(trial)
            path = export_dir(run, trial, kind)
            (pipe.save_adapter if kind == "adapter" else pipe.save_model)(path)
    except ClawlyError as e:
        return f"⚠ {e}"
    files = "\n".join(f"- `{p.name}` ({p.stat().st_size:,} bytes)" for p in sorted(path.iterdir()))
    what = "LoRA adapter (load with peft)" if kind == "adapter" else "merged model (load with transformers)"
    return f"Saved trial {trial} as a {what} to `{path}`:\n{files}"


def export_tab(page: Page) -> Any:
    """Save the selected trial, upload it (the token goes to huggingface_hub only), chat with it
    beside the base model; returns the line that names the selected trial."""
    run = page.run
    selected_line = gr.Markdown(elem_id="export-trial")
    with gr.Row():
        save_adapter = gr.Button("Save LoRA adapter", elem_id="save-adapter")
        save_model = gr.Button("Save merged model", elem_id="save-model")
    saved = gr.Markdown(elem_id="saved")
    gr.Markdown("### Upload to the Hugging Face Hub")
    with gr.Row():
        repo = gr.Textbox(label="repo id", placeholder="you/model-abliterated", elem_id="hub-repo")
        token = gr.Textbox(
            label="token (write access; empty: HF_TOKEN or `hf auth login`)", type="password", elem_id="hub-token"
        )
        kind = gr.Dropdown(list(EXPORT_KINDS), value="LoRA adapter", label="upload", elem_id="hub-kind")
        private = gr.Checkbox(label="private repo", elem_id="hub-private")
    upload = gr.Button("Upload", elem_id="upload")
    uploaded = gr.Markdown(elem_id="uploaded")
    gr.Markdown("### Chat with the selected trial, the base model beside it")
    chat_trial, chat_base = gr.State([]), gr.State([])
    with gr.Row():
        trial_chat = gr.Chatbot(label="selected trial", elem_id="chat-trial", height=360)
        base_chat = gr.Chatbot(label="base model", elem_id="chat-base", height=360)
    with gr.Row():
        message = gr.Textbox(
            label="message", placeholder="ask both models; Enter sends", scale=4, elem_id="chat-message"
        )
        max_tokens = gr.Slider(16, MAX_CHAT_TOKENS, value=256, step=16, label="max new tokens", scale=1)
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        clear = gr.Button("Clear", elem_id="chat-clear")
    chat_note = gr.Markdown(elem_id="chat-note")

    save_adapter.click(lambda pick: export(run, "adapter", pick), page.selected, saved)
    save_model.click(lambda pick: export(run, "model", pick), page.selected, saved)

    def on_upload(repo_id: str, secret: str, kind_label: str, private_repo: bool, pick: int | None):
        what = EXPORT_KINDS[kind_label]
        if not repo_id.strip():
            return "⚠ enter a repo id (user/name)", ""
        trial = effective_trial(run.snapshot(), pick)
        folder = export_dir(run, trial, what) if trial is not None else None
        if folder is None or not folder.is_dir():
            said = export(run, what, pick)
            if said.startswith("⚠"):
                return said, ""
        try:
            url = push_to_hub(folder, repo_id.strip(), token=secret.strip() or None, private=private_repo)
        except ClawlyError as e:
            return f"⚠ {redacted(e, secret)}", ""
        return f"Uploaded `{folder}` to {url}", ""  # the token field is emptied: never shown back

    upload.click(on_upload, [repo, token, kind, private, page.selected], [uploaded, token])

    def on_send(text: str, trial_history: list, base_history: list, pick: int | None, budget: float) -> Iterator[list]:
        text = (text or "").strip()
        if not text:
            yield [gr.skip()] * 6
            return
        tokens = min(max(int(budget or 0), 16), MAX_CHAT_TOKENS)  # the slider's range, whatever is sent
        trial = effective_trial(run.snapshot(), pick)
        if trial is None:
            yield [gr.skip(), gr.skip(), gr.skip(), gr.skip(), "⚠ no finished trial to chat with yet", gr.skip()]
            return
        try:
            with run.model() as pipe:
                if pipe.trial is None or pipe.trial.index != trial:
                    pipe.restore_trial(trial)
                asked = {"role": "user", "content": text}
                histories = [[*trial_history, asked], [*base_history, asked]]
                shown = [[*h, {"role": "assistant", "content": ""}] for h in histories]
                note = f"trial {trial} on the left, the base model on the right"
                yield [shown[0], shown[1], shown[0], shown[1], note, ""]
                for side, base_side in ((0, False), (1, True)):
                    for answer in pipe.chat(histories[side], tokens, base=base_side):
                        shown[side][-1] = {"role": "assistant", "content": answer}
                        yield [shown[0], shown[1], shown[0], shown[1], note, gr.skip()]
        except ClawlyError as e:
            yield [gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"⚠ {e}", gr.skip()]

    outputs = [trial_chat, base_chat, chat_trial, chat_base, chat_note, message]
    inputs = [message, chat_trial, chat_base, page.selected, max_tokens]
    send.click(on_send, inputs, outputs)
    message.submit(on_send, inputs, outputs)
    clear.click(lambda: ([], [], [], [], ""), None, outputs[:5])
    return selected_line


def research_tab(page: Page) -> None:
    """The residual-geometry table and the PaCMAP projections of the run's activations (no model needed)."""
    gr.Markdown(
        "Residual geometry per probe point (norms, cosines, silhouettes) and PaCMAP projections of the "
        "residuals by harm category, from the run's activations and directions (`analyze`; no model "
        "needed). Press *Directions only* on the Run tab to get them without an optimization."
    )
    compute = gr.Button("Compute the research views", elem_id="research-compute")
    note = gr.Markdown(elem_id="research-note")
    geometry = gr.Dataframe(label="residual geometry per probe point", interactive=False, elem_id="geometry-table")
    projections = gr.HTML(elem_id="projections")
    pictures = gr.Gallery(
        label="PaCMAP projections and category cosines",
        columns=3,
        height="auto",
        object_fit="contain",
        elem_id="research-gallery",
    )
    compute.click(lambda: research_views(page.run), None, [note, geometry, projections, pictures])


def build_app(run: WebRun, base: Settings, policy: PagePolicy) -> gr.Blocks:
    """The Blocks app over `run`: the five tabs (each its own function above), then what crosses
    them: the timer that redraws a page from the server's state, a reloaded page's form, the
    selected trial shown on the Results and Export tabs. `base` fills the configuration (the CLI-like
    options of clawly-web), `policy` says what the page may change (`clawly.web.guard`)."""
    page = Page(run, base, policy, form.form_fields(policy), [name for name, _ in form.categories(base)])
    with gr.Blocks(title="clawly", analytics_enabled=False) as app:
        seen = gr.State((-1, -1))  # (state version, trials version) this page last drew
        page.selected = gr.State(None)
        gr.Markdown("# clawly\nPer-category abliteration: remove chosen refusal behaviours, keep others.")
        page.status = gr.Markdown(status_line(run.snapshot()), elem_id="run-status")
        with gr.Tabs(selected="config") as page.tabs:
            with gr.Tab("Configuration", id="config"):
                config = configuration_tab(page)
            with gr.Tab("Run", id="run"):
                running = run_tab(page, config)
            with gr.Tab("Results", id="results"):
                results = results_tab(page)
            with gr.Tab("Export", id="export"):
                export_line = export_tab(page)
            with gr.Tab("Research", id="research"):
                research_tab(page)

        def selection(s: RunState, pick: int | None) -> list:
            """What the Results and Export tabs show of the selected trial."""
            trial = effective_trial(s, pick)
            t = next((t for t in s.trials if t.index == trial), None)
            report = category_frame(s.reports[trial]) if trial in s.reports else None
            return [
                results_figure(s, trial),
                gr.update(choices=trial_choices(s), value=trial),
                trial_summary(s, trial),
                {"parameters": t.parameters, "plan": t.plan.to_dict()} if t else None,
                report,
                f"Selected: {trial_summary(s, trial)}",
            ]

        shown_selection = [
            results.plot,
            results.picker,
            results.summary,
            results.parameters,
            results.by_category,
            export_line,
        ]

        def refresh(last: tuple[int, int], pick: int | None):
            s = run.snapshot()
            version, trials_version = last
            if s.version == version:
                return [gr.skip()] * 12
            redraw = s.trials_version != trials_version
            return [
                status_line(s),
                progress_html(s),
                live_figure(s) if redraw else gr.skip(),
                trial_log(s) if redraw else gr.skip(),
                "\n".join(reversed(s.events)),
                (s.version, s.trials_version),
                *(selection(s, pick) if redraw else [gr.skip()] * 6),
            ]

        refresh_outputs = [
            page.status,
            running.progress,
            running.live_plot,
            running.log_table,
            running.events,
            seen,
            *shown_selection,
        ]
        gr.Timer(1.0).tick(refresh, [seen, page.selected], refresh_outputs, show_progress="hidden")

        def on_load():
            s = run.snapshot()
            values, weights = reloaded_form(run.settings, base, policy)
            names = page.categories
            rows = form.rows_from_weights(names, weights) if weights is not None else ([gr.skip()] * len(names),) * 2
            return [
                *(gr.update(value=_shown(f, values[f.key])) if f.key in values else gr.skip() for f in page.fields),
                *rows[0],
                *rows[1],
                (-1, -1),
                gr.Tabs(selected="run" if s.run_id else "config"),
            ]

        app.load(on_load, None, [*config.inputs, seen, page.tabs])

        def select(index: int | None):
            s = run.snapshot()
            return [effective_trial(s, index), *selection(s, index)]

        select_outputs = [page.selected, *shown_selection]
        results.picker.input(select, results.picker, select_outputs)
        results.clicked.change(lambda text: select(_clicked(text)), results.clicked, select_outputs)
        page.tabs.select(select, page.selected, select_outputs)
    return app


def research_views(run: WebRun) -> tuple[str, pd.DataFrame | None, str, list[tuple[str, str]]]:
    """The Research tab: (note, geometry table, the projections page in a frame, the PNGs with captions)."""
    try:
        with run.model() as pipe:
            if pipe.directions is None:
                return (
                    "⚠ the research views need a run's directions: press Start or *Directions only* on the Run "
                    "tab first",
                    None,
                    "",
                    [],
                )
            table = pipe.residual_geometry().round(4)
            try:
                require_research_extra()
            except ClawlyError as e:
                return f"⚠ {e}. The geometry table is below.", table, "", []
            files = pipe.plot_residuals()
            where = Paths.of(pipe.settings).research
    except ClawlyError as e:
        return f"⚠ {e}", None, "", []
    page = next((f for f in files if f.name == "residuals.html"), None)
    frame = (
        (
            f'<iframe src="/gradio_api/file={page}" title="PaCMAP projections per probe point" '
            'style="width: 100%; height: 760px; border: 0"></iframe>'
        )
        if page
        else ""
    )
    images = [(str(f), f.stem.replace("_", " ")) for f in files if f.suffix == ".png"]
    return f"Research views of run {run.snapshot().run_id}, written to `{where}`", table, frame, images


# ---------------------------------------------------------------- small helpers


def reloaded_form(
    run_settings: Settings | None, base: Settings, policy: PagePolicy | None = None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """What a page that (re)loads changes in its form: the fields (and the category weights, else
    None) where the server's last run differs from the start settings the page was drawn with. Only
    those, so typing into a page whose load event is still on its way is never overwritten (with no
    run yet, nothing is)."""
    if run_settings is None:
        return {}, None
    drawn, now = form.form_values(base, policy), form.form_values(run_settings, policy)
    weights = run_settings.categories.weights
    return (
        {k: v for k, v in now.items() if v != drawn[k]},
        dict(weights) if weights != base.categories.weights else None,
    )


def export_dir(run: WebRun, trial: int, kind: str) -> Path:
    """Where the UI saves a trial: OUTPUT/exports/trial-N-adapter or -model."""
    return run.output_dir / "exports" / f"trial-{trial}-{kind}"


def _quantization(load_in_4bit: bool) -> str:
    return next(label for label, on in QUANTIZATION.items() if on == bool(load_in_4bit))


def _raw(f: form.FormField, value: Any) -> Any:
    """A component value as the form module takes it (the quantization dropdown is a bool setting)."""
    return QUANTIZATION.get(value, value) if f.key == "model.load_in_4bit" else value


def _shown(f: form.FormField, value: Any) -> Any:
    return _quantization(value) if f.key == "model.load_in_4bit" else value


def _clicked(text: str) -> int | None:
    try:
        return int(str(text).split("@")[0])
    except ValueError:
        return None
