"""probe-writers: what every writer reads on kept and on targeted requests (input-conditional edits).

For `edit.method` nullspace or least_squares: the base model answers `edit.kept_prompts` train
requests of each kept category (plus `edit.harmless_prompts` harmless ones) and
`edit.targeted_prompts` of each targeted category (`edit.answer_tokens` tokens, greedy); a forward
over each request and its answer then streams every writer's input, every position, into its second
moment (`clawly.ablate.edits`). With `edit.method=projection` nothing is read and the file holds no
tensors (the stage stays in the pipeline, so changing the method reruns only what depends on it).
"""

from __future__ import annotations

import time

import pandas as pd

from clawly.ablate.edits import WriterInputs, read_inputs, write_writer_inputs
from clawly.data.prompts import instructed_categories, read_prompts, row_systems
from clawly.io import write_json
from clawly.log import StageLogger
from clawly.measure.decoding import PromptSet
from clawly.measure.templating import chat_prompts
from clawly.model.loading import load_model
from clawly.paths import Paths
from clawly.settings import Settings


def request_sets(
    settings: Settings, harmful: pd.DataFrame, harmless: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, targeted) train requests: kept categories' (and harmless ones), and targeted categories'
    (in global mode every safety category's), a seeded sample of each."""
    e, c = settings.edit, settings.categories
    train = harmful[harmful.split == "train"]
    instructed = instructed_categories(harmful)
    targeted_cats = c.targeted if c.enabled else sorted(set(train.category) - instructed)

    def sample(rows: pd.DataFrame, n: int) -> pd.DataFrame:
        parts = [g.sample(n=min(n, len(g)), random_state=settings.data.seed) for _, g in rows.groupby("category")]
        return pd.concat(parts) if parts else rows.iloc[:0]

    kept = sample(train[train.category.isin(c.kept)], e.kept_prompts)
    if e.harmless_prompts:
        calm = harmless[harmless.split == "train"]
        kept = pd.concat([kept, calm.sample(n=min(e.harmless_prompts, len(calm)), random_state=settings.data.seed)])
    targeted = sample(train[train.category.isin(targeted_cats)], e.targeted_prompts)
    return kept.reset_index(drop=True), targeted.reset_index(drop=True)


def conversations(settings: Settings, model, tokenizer, rows: pd.DataFrame, log: StageLogger) -> list[str]:
    """Each request rendered by the chat template, followed by the base model's own greedy answer."""
    prompts = chat_prompts(tokenizer, rows.text.tolist(), row_systems(rows, settings.model.system_prompt))
    answers, _ = PromptSet(tokenizer, prompts, settings.probe.batch_size).generate(
        model, settings.edit.answer_tokens, progress=log.progress
    )
    return [p + a for p, a in zip(prompts, answers, strict=True)]


def run(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> WriterInputs | None:
    p = Paths.of(settings)
    meta = {"method": settings.edit.method, "model": settings.model.name}
    if not settings.edit.conditional:
        write_writer_inputs(p.writer_inputs, WriterInputs({}, {}, meta))
        log.event("probe_writers", "edit.method=projection: no writer inputs needed")
        return None
    harmful, harmless = read_prompts(p)
    kept, targeted = request_sets(settings, harmful, harmless)
    if model is None:
        model, tokenizer = load_model(settings.model, log)
    t0 = time.perf_counter()
    spectra = {}
    for name, rows in (("kept", kept), ("targeted", targeted)):
        texts = conversations(settings, model, tokenizer, rows, log)
        spectra[name] = read_inputs(
            model,
            tokenizer,
            texts,
            settings.edit.rank,
            settings.probe.batch_size,
            progress=lambda it, name=name: log.progress(it, desc=f"{name} inputs"),
        )
    inputs = WriterInputs(
        spectra["kept"],
        spectra["targeted"],
        {**meta, "kept_requests": str(len(kept)), "targeted_requests": str(len(targeted))},
    )
    write_writer_inputs(p.writer_inputs, inputs)
    report = {
        "method": settings.edit.method,
        "kept_requests": {k: int(n) for k, n in kept.category.value_counts().sort_index().items()},
        "targeted_requests": {k: int(n) for k, n in targeted.category.value_counts().sort_index().items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "writers": writer_summary(inputs),
    }
    write_json(p.report("probe_writers"), report)
    log.event(
        "probe_writers",
        f"{len(inputs.kept)} writers: kept {len(kept)} requests "
        f"({next(iter(inputs.kept.values())).count} positions in the first), targeted {len(targeted)}",
        seconds=report["seconds"],
    )
    return inputs


def writer_summary(inputs: WriterInputs) -> dict:
    """Per writer: positions, and how many directions carry 50/90/99% of the kept inputs' energy."""
    out = {}
    for name, s in inputs.kept.items():
        out[name] = {
            "positions": s.count,
            "tracked_energy": round(float(s.energy.sum()) / s.trace, 4) if s.trace else None,
            **{f"rank_{int(100 * e)}": s.rank_for(e) for e in (0.5, 0.9, 0.99)},
        }
    return out
