"""export-lora: the chosen trial's weight change as a PEFT LoRA adapter, with its model card and record."""

from __future__ import annotations

import shutil

import torch

from clawly.ablate.ablation import AblationPlan, weight_deltas
from clawly.ablate.directions import check_fits, read_ablation_directions
from clawly.ablate.distill import read_factors
from clawly.ablate.edits import WriterInputs, load_writer_inputs, retained_writes
from clawly.ablate.lora import AdapterUnsupportedError
from clawly.data.prompts import read_prompts
from clawly.io import atomic_dir, read_json, write_json, write_text
from clawly.log import StageLogger
from clawly.model.loading import load_model, resolve_model_source
from clawly.paths import Paths
from clawly.save import export as ex
from clawly.search.chosen import read_chosen_trial
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
    inputs = load_writer_inputs(settings) if plan.edit else None
    trained = read_factors(p.distilled)[0] if settings.distill.enabled else None
    if trained:  # the distilled adapter replaces the trial's change
        change = ex.distilled_change(model, trained)
    else:
        change = ex.saved_change(model, ablation.basis, plan, ablation.strengths, settings.export, inputs)
    factors = change.factors
    if plan.norm_preserve and (warning := ex.adapter_warning(factors, settings.export)):
        log.event("warning", warning)
    per_category = settings.categories.per_category_adapters and ablation.mode == "category" and not trained
    summary = read_json(p.report("optimize")) if p.report("optimize").exists() else {}
    unsupported = None
    with atomic_dir(p.lora) as tmp:
        try:
            ex.write_adapter(model, factors, tmp, source)
            if per_category:
                for i, name in enumerate(ablation.names):
                    alone = torch.zeros_like(ablation.strengths)
                    alone[i] = ablation.strengths[i]  # this category's share of the combined change
                    one = ex.saved_change(model, ablation.basis, plan, alone, settings.export, inputs).factors
                    ex.write_adapter(model, one, tmp / "categories" / name, source)
            card = ex.model_card(settings, summary, kind="adapter")
        except AdapterUnsupportedError as e:  # the record still lets merge build the exact model
            unsupported = str(e)
            for leftover in [q for q in tmp.iterdir() if q.name != "README.md"]:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            log.event("warning", f"no LoRA adapter for this model: {unsupported}")
            card = (
                f"# No LoRA adapter\n\n{unsupported}.\n\nThis directory holds the reproduction record "
                "(clawly_reproduction.json, clawly_directions.safetensors): the merge stage builds the merged "
                "model from it exactly, and `clawly --reproduce` rebuilds it.\n"
            )
        write_text(tmp / "README.md", card)
        ex.write_record(
            tmp,
            "adapter",
            settings,
            plan,
            ablation,
            {"harmful": harmful, "harmless": harmless},
            chosen.record,
            change,
            trained,
        )
    report = {
        **ex.adapter_metrics(factors),
        "adapter": unsupported is None,
        "no_adapter_because": unsupported,
        "norm_preserve": plan.norm_preserve,
        "per_category_adapters": ablation.names if per_category else [],
        "per_category_sum_is_exact": per_category and not plan.norm_preserve,
        **({"edit": edit_report(model, ablation, plan, inputs)} if plan.edit else {}),
        "distilled": bool(trained),
    }
    write_json(p.report("export"), report)
    log.event("adapter", **report)
    return report


def edit_report(model, ablation, plan: AblationPlan, inputs: WriterInputs) -> dict:
    """What the input-conditional edit leaves, per writer of the chosen plan: the share of the targeted
    requests' write along the ablated directions that it still removes, and the share of the kept
    requests' write it still changes (plain ablation: 1 and 1), with the edit's parameter."""
    plain = weight_deltas(
        model, ablation.basis, AblationPlan.from_dict({**plan.to_dict(), "edit": {}}), ablation.strengths
    )
    writers = {}
    for name, delta in plain.items():
        targeted, kept = retained_writes(plan.edit, inputs, delta.a, name)
        writers[name] = {"targeted_removed_share": round(targeted, 4), "kept_changed_share": round(kept, 4)}
    shares = [w["targeted_removed_share"] for w in writers.values()]
    kept = [w["kept_changed_share"] for w in writers.values()]
    return {
        **plan.edit,
        "writers": writers,
        "mean_targeted_removed_share": round(sum(shares) / len(shares), 4) if shares else None,
        "mean_kept_changed_share": round(sum(kept) / len(kept), 4) if kept else None,
    }
