"""export-lora: the chosen trial's weight change as a PEFT LoRA adapter, with its model card and record."""

from __future__ import annotations

import shutil

import torch

from clawly import export as ex
from clawly.artifacts.directions import check_fits, read_ablation_directions
from clawly.artifacts.optimize import read_chosen_trial
from clawly.artifacts.prompts import read_prompts
from clawly.io import atomic_dir, read_json, write_json, write_text
from clawly.log import StageLogger
from clawly.lora import AdapterUnsupportedError
from clawly.model import load_model, resolve_model_source
from clawly.paths import Paths
from clawly.settings import Settings


def run(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> dict:
    """Write artifacts/lora (and, with categories.per_category_adapters, one adapter per targeted
    category under lora/categories/NAME); report the adapter's ranks and SVD error."""
    p = Paths.of(settings)
    chosen = read_chosen_trial(p.chosen_trial)
    ablation = read_ablation_directions(p.orthogonalized)
    harmful, harmless = read_prompts(p)
    if model is None:
        model, tokenizer = load_model(settings.model, log)
    check_fits(ablation.directions, model, p.orthogonalized)
    source = str(resolve_model_source(settings.model))
    plan = chosen.plan
    factors = ex.saved_change(model, ablation.basis, plan, ablation.strengths, settings.export).factors
    if plan.norm_preserve and (warning := ex.adapter_warning(factors, settings.export)):
        log.event("warning", warning)
    per_category = settings.categories.per_category_adapters and ablation.mode == "category"
    summary = read_json(p.report("optimize")) if p.report("optimize").exists() else {}
    unsupported = None
    with atomic_dir(p.lora) as tmp:
        try:
            ex.write_adapter(model, factors, tmp, source)
            if per_category:
                for i, name in enumerate(ablation.names):
                    alone = torch.zeros_like(ablation.strengths)
                    alone[i] = ablation.strengths[i]  # this category's share of the combined change
                    one = ex.saved_change(model, ablation.basis, plan, alone, settings.export).factors
                    ex.write_adapter(model, one, tmp / "categories" / name, source)
            card = ex.model_card(settings, summary, kind="adapter")
        except AdapterUnsupportedError as e:  # the record still lets merge build the exact model
            unsupported = str(e)
            for leftover in [q for q in tmp.iterdir() if q.name != "README.md"]:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            log.event("warning", f"no LoRA adapter for this model: {unsupported}")
            card = (f"# No LoRA adapter\n\n{unsupported}.\n\nThis directory holds the reproduction record "
                    "(clawly_reproduction.json, clawly_directions.safetensors): the merge stage builds the merged "
                    "model from it exactly, and `clawly --reproduce` rebuilds it.\n")
        write_text(tmp / "README.md", card)
        ex.write_record(tmp, "adapter", settings, plan, ablation, {"harmful": harmful, "harmless": harmless},
                        chosen.record)
    report = {**ex.adapter_metrics(factors), "adapter": unsupported is None, "no_adapter_because": unsupported,
              "norm_preserve": plan.norm_preserve,
              "per_category_adapters": ablation.names if per_category else [],
              "per_category_sum_is_exact": per_category and not plan.norm_preserve}
    write_json(p.report("export"), report)
    log.event("adapter", **report)
    return report
