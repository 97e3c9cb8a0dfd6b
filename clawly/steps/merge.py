"""merge: the base model with the adapter merged in, as a Hugging Face model directory."""

from __future__ import annotations

import contextlib

from peft import PeftModel

from clawly.ablate.ablation import AblationPlan, ablated, weight_deltas
from clawly.ablate.directions import check_fits, read_ablation_directions
from clawly.errors import reading, require
from clawly.io import atomic_dir, read_json, write_text
from clawly.log import StageLogger
from clawly.model.loading import full_precision, load_model, resolve_model_source
from clawly.paths import Paths
from clawly.save import export as ex
from clawly.settings import Settings


def run(settings: Settings, log: StageLogger) -> None:
    """The adapter merged as peft merges it, or, for a norm-preserving plan or a model no adapter can
    hold (export-lora then writes only the record), the exact change the trials scored, rebuilt from
    the record; safetensors shards, config, tokenizer, model card and the reproduction record."""
    p = Paths.of(settings)
    require(p.lora / ex.RECORD, "export-lora")
    model, tokenizer = load_model(full_precision(settings.model), log)  # never merged into 4-bit weights
    record, directions = ex.read_record(p.lora)
    plan = AblationPlan.from_dict(record["plan"])
    summary = read_json(p.report("optimize")) if p.report("optimize").exists() else {}
    from_record = plan.norm_preserve or not (p.lora / "adapter_config.json").exists()  # no adapter holds it exactly
    with contextlib.ExitStack() as applied, atomic_dir(p.model) as tmp:
        if from_record:
            ablation = read_ablation_directions(directions)
            check_fits(ablation.directions, model, directions)
            inputs = ex.recorded_inputs(p.lora)  # an input-conditional edit's rows, as export-lora wrote them
            applied.enter_context(
                ablated(model, weight_deltas(model, ablation.basis, plan, ablation.strengths, inputs))
            )
        else:
            with reading(p.lora / "adapter_model.safetensors", "export-lora"):
                adapted = PeftModel.from_pretrained(model, str(p.lora))
            model = adapted.merge_and_unload()  # outside: its errors (memory, peft) are not the adapter's damage
        files = ex.write_model(model, tokenizer, tmp, settings, resolve_model_source(settings.model))
        write_text(tmp / "README.md", ex.model_card(settings, summary))
        ex.copy_record(p.lora, tmp, "model")
    log.event("merged", files=files, out=str(p.model), exact_change_from_record=from_record)
