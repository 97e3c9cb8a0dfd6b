"""Saved results: the PEFT adapter, the merged model, the model card and the reproduction record.

The model that is saved, merged or chatted with is the base weights plus the adapter's B A, added
in the weights' dtype as `peft`'s `merge_and_unload` adds it, so a merged model, the adapter merged
by hand and `clawly --reproduce` give the same weights.

Every saved directory carries `clawly_reproduction.json` (settings, model and prompt-set
fingerprints, the trial and its ablation plan, package versions) and
`clawly_directions.safetensors` (the directions the plan ablates); from the two, `reproduce`
rebuilds the same weights without probing or optimizing again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from clawly import __version__
from clawly.ablate.ablation import AblationPlan, InputEditor, WeightDelta, weight_deltas
from clawly.ablate.directions import AblationBasis, AblationDirections, write_ablation_directions
from clawly.ablate.distill import read_factors, write_factors
from clawly.ablate.edits import RecordedInputs, read_recorded_rows, write_recorded_rows
from clawly.ablate.lora import LoraFactors, adapter_problem, lora_factors, save_adapter
from clawly.errors import ClawlyError
from clawly.io import write_json
from clawly.model.architecture import holds_quantized
from clawly.model.checkpoint import save_sharded, source_weight_map
from clawly.model.loading import DEFAULT_MODEL, DEFAULT_MODEL_DESCRIPTION, model_provenance
from clawly.redact import masked, shown_path
from clawly.settings import DataSettings, ExportSettings, Settings

RECORD = "clawly_reproduction.json"
RECORD_FORMAT = 2  # 2: the directions file holds removed and protected directions too
DIRECTIONS = "clawly_directions.safetensors"
EDIT = "clawly_edit.safetensors"  # an input-conditional edit's A rows per writer (beside the record)
DISTILLED = "clawly_distilled.safetensors"  # a distilled adapter's trained factors (beside the record)


@dataclass
class SavedChange:
    """A trial's weight change as it is saved: the change itself (float64), the adapter's factors
    (exact for low rank, truncated SVD for dense), and what the saved (merged) model adds to the
    base weights: the adapter as peft merges it, or, for a norm-preserving plan (whose full-rank
    change no adapter holds exactly) or a model no adapter can hold at all, the change the trials scored."""

    deltas: dict[str, WeightDelta]
    factors: dict[str, LoraFactors]
    norm_preserve: bool
    no_adapter: str | None = None  # why no adapter can hold it (lora.adapter_problem): then it is exact too

    @property
    def exact(self) -> bool:
        """No adapter holds the change exactly, so the merged model gets the change itself."""
        return bool(self.norm_preserve or self.no_adapter)

    @property
    def model_deltas(self) -> dict[str, WeightDelta]:
        return self.deltas if self.exact else merged_deltas(self.factors)


def saved_change(
    model,
    basis: AblationBasis,
    plan: AblationPlan,
    strengths: torch.Tensor | None,
    export: ExportSettings,
    inputs: InputEditor | None = None,
) -> SavedChange:
    """The plan's change as it is saved (see `SavedChange`). `model` must hold the base weights;
    `inputs` the writers' input statistics when the plan has an input-conditional edit."""
    deltas = weight_deltas(model, basis, plan, strengths, inputs)
    factors = lora_factors(deltas, export.energy, export.max_rank)
    return SavedChange(deltas, factors, plan.norm_preserve, adapter_problem(model, factors))


def distilled_change(model, trained: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> SavedChange:
    """A distilled adapter's factors (`clawly.ablate.distill`) as the change that is saved: exact low rank."""
    deltas = {name: WeightDelta(b=b.double(), a=a.double()) for name, (b, a) in trained.items()}
    factors = lora_factors(deltas)
    return SavedChange(deltas, factors, False, adapter_problem(model, factors))


def merged_deltas(factors: dict[str, LoraFactors]) -> dict[str, WeightDelta]:
    """What merging the adapter adds to the base weights, computed as `peft` computes it: the adapter
    holds float32 factors (peft upcasts half-precision adapters), `merge_and_unload` forms B A in
    float32 and adds it to the weight in place (`ablated` applies it the same way); a LoRA on a
    parameter (fused experts, their biases) is rounded to the weight's dtype before it is added, and
    stays low rank here (a fused stack's B A is formed per chunk of experts as it is added)."""
    out = {}
    for name, f in factors.items():
        if f.on_parameter:
            out[name] = WeightDelta(
                b=f.b.float().contiguous(), a=f.a.float().contiguous(), transposed=f.transposed, rounded=True
            )
        else:
            out[name] = WeightDelta(
                dense=f.b.float().contiguous() @ f.a.float().contiguous(),
                bias=None if f.bias is None else f.bias.float(),
                transposed=f.transposed,
            )
    return out


def adapter_warning(factors: dict[str, LoraFactors], export: ExportSettings) -> str | None:
    """A warning when the adapter is further from the change than export.warn_relative_error."""
    name, worst = max(((n, f) for n, f in factors.items()), key=lambda item: item[1].relative_error)
    if worst.relative_error <= export.warn_relative_error:
        return None
    return (
        f"the adapter approximates the norm-preserving change with up to {worst.relative_error:.1%} relative "
        f"error ({name}, rank {worst.rank}); the merged model holds the exact change. For a closer adapter, "
        f"raise export.max_rank (now {export.max_rank}) or export.energy (now {export.energy})"
    )


def adapter_metrics(factors: dict[str, LoraFactors]) -> dict:
    errors = [f.relative_error for f in factors.values()]
    return {
        "modules": len(factors),
        "ranks": sorted({f.rank for f in factors.values()}),
        "max_relative_error": round(max(errors), 8),
        "mean_relative_error": round(sum(errors) / len(errors), 8),
    }


def write_adapter(model, factors: dict[str, LoraFactors], out_dir: Path, source: str) -> None:
    """adapter_config.json + adapter_model.safetensors (peft); `model` may hold any weights."""
    save_adapter(model, factors, out_dir, base_model_name_or_path=source)
    config = Path(out_dir) / "adapter_config.json"  # peft writes target_modules in a set's order: per process
    values = json.loads(config.read_text())
    if isinstance(values.get("target_modules"), list):
        values["target_modules"] = sorted(values["target_modules"])
    config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def write_model(model, tokenizer, out_dir: Path, settings: Settings, source: str | Path) -> list[str]:
    """Safetensors shards (a sharded source keeps its layout) + config, generation config, tokenizer.
    A 4-bit model is refused: its packed weights cannot hold the change (merge into `model.full_precision`)."""
    if holds_quantized(model):
        raise ClawlyError(
            "cannot save a 4-bit model: its packed weights cannot hold the change. Load the base "
            "without model.load_in_4bit and add the change to it"
        )
    files = save_sharded(model.state_dict(), out_dir, settings.merge.max_shard_size, source_weight_map(source))
    model.config.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return files


def prompts_fingerprint(df: pd.DataFrame) -> str:
    """'sha256:<hex>' of a prompt table's rows (id, text, category, split, and system where any row has
    its own), independent of the file format."""
    own = "system" in df.columns and df.system.astype(bool).any()
    columns = ["id", "text", "category", "split"] + (["system"] if own else [])
    rows = df[[c for c in columns if c in df.columns]].to_dict(orient="records")
    return "sha256:" + hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for pkg in ("torch", "transformers", "peft", "optuna", "safetensors"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# Settings that say where this machine kept things, not what was done: a record sets them to null.
WHERE_KEYS = (("model", "cache_dir"), ("optimize", "storage"))
# Paths that only document the inputs (their prompts are fingerprinted in the record): file names only.
INPUT_PATH_KEYS = (
    ("data", "templates"),
    ("data", "harmful_files"),
    ("data", "harmless_files"),
    ("classifier", "train_file"),
    ("classifier", "test_file"),
    ("classifier", "embedder"),
    ("classifier", "judge_model"),
)


def _file_name(path: str) -> str:
    return Path(path).name if Path(path).is_absolute() or path.startswith("~") else path


def portable_settings(settings: Settings) -> dict:
    """The settings as a record keeps them, for `clawly --reproduce` and for whoever reads an uploaded
    record: URL passwords masked; where this machine kept things (model cache, study storage, work and
    prompt directories) left out; input files by name only. The one path a reproduction needs is the
    model's (model.name, a hub id or a local directory), kept with the home directory shown as `~`."""
    values = masked(settings.to_dict())
    values.pop("artifacts_dir", None)
    for section, key in WHERE_KEYS:
        values[section][key] = None
    values["data"]["out_dir"] = DataSettings().out_dir
    for section, key in INPUT_PATH_KEYS:
        value = values[section][key]
        if isinstance(value, list):
            values[section][key] = [_file_name(v) for v in value]
        elif isinstance(value, str):
            values[section][key] = _file_name(value)
    values["model"]["name"] = shown_path(values["model"]["name"])
    return values


def write_record(
    out_dir: Path,
    kind: str,
    settings: Settings,
    plan: AblationPlan,
    ablation: AblationDirections,
    prompts: dict,
    trial: dict | None,
    change: SavedChange | None = None,
    distilled: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict:
    """Write the reproduction record and the ablated directions into `out_dir`; with an
    input-conditional edit also its A rows per writer (`EDIT`, from `change`): rebuilding the change
    then needs no probing of the writers' inputs.

    prompts: name -> prompt table (fingerprinted); trial: {"index", "parameters", "refusals",
    "kl_divergence"} of the optimizer trial, None for a direct plan."""
    write_ablation_directions(out_dir / DIRECTIONS, ablation)
    edit = None
    if plan.edit:
        if change is None:
            raise ValueError("an input-conditional edit's record needs the saved change (its A rows)")
        write_recorded_rows(out_dir / EDIT, {name: d.a for name, d in change.deltas.items()})
        edit = {"file": EDIT, "sha256": file_sha256(out_dir / EDIT), **plan.edit}
    trained = None
    if distilled:  # the change is the trained factors; plan and directions are where training started
        write_factors(out_dir / DISTILLED, distilled, {"steps": str(settings.distill.steps)})
        trained = {"file": DISTILLED, "sha256": file_sha256(out_dir / DISTILLED), "steps": settings.distill.steps}
    record = {
        "format": RECORD_FORMAT,
        "clawly": __version__,
        "kind": kind,
        "settings": portable_settings(settings),
        "model": model_provenance(settings.model),
        "prompts": {name: {"rows": len(df), "fingerprint": prompts_fingerprint(df)} for name, df in prompts.items()},
        "directions": {
            "file": DIRECTIONS,
            "sha256": file_sha256(out_dir / DIRECTIONS),
            "mode": ablation.mode,
            "names": ablation.names,
            "weights": ablation.weights,
            "kept": ablation.kept,
        },
        "trial": trial,
        "plan": plan.to_dict(),
        **({"edit": edit} if edit else {}),
        **({"distilled": trained} if trained else {}),
        "python": platform.python_version(),
        "packages": package_versions(),
    }
    write_json(out_dir / RECORD, record)
    return record


def copy_record(src_dir: Path, out_dir: Path, kind: str) -> None:
    """Carry an adapter's record over to the model merged from it."""
    shutil.copyfile(src_dir / DIRECTIONS, out_dir / DIRECTIONS)
    for extra in (EDIT, DISTILLED):
        if (src_dir / extra).is_file():
            shutil.copyfile(src_dir / extra, out_dir / extra)
    record = json.loads((src_dir / RECORD).read_text())
    write_json(out_dir / RECORD, {**record, "kind": kind})


def read_record(path: str | Path) -> tuple[dict, Path]:
    """A reproduction record and the directions file beside it, checked against its hash."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ClawlyError(f"reproduction record not found: {path}") from e
    except json.JSONDecodeError as e:
        raise ClawlyError(f"{path} is not JSON ({e}): pass the clawly_reproduction.json of a saved result") from e
    if not isinstance(record, dict) or not {"settings", "plan", "directions"} <= set(record):
        raise ClawlyError(
            f"{path} is not a clawly reproduction record (no settings/plan/directions): pass the "
            f"{RECORD} of a saved result"
        )
    if record.get("format") != RECORD_FORMAT:
        raise ClawlyError(
            f"{path} is a format {record.get('format')} record; this clawly {__version__} reads format "
            f"{RECORD_FORMAT}: reproduce it with the clawly version named in it ({record.get('clawly')})"
        )
    directions = path.parent / record["directions"]["file"]
    if not directions.is_file():
        raise ClawlyError(f"{directions} is missing: keep it beside {path.name} (it holds the ablated directions)")
    if file_sha256(directions) != record["directions"]["sha256"]:
        raise ClawlyError(f"{directions} does not match the record's sha256: the file was changed or replaced")
    for part, what in (("edit", "the input-conditional edit"), ("distilled", "the distilled adapter's factors")):
        if record.get(part):
            extra = path.parent / record[part]["file"]
            if not extra.is_file() or file_sha256(extra) != record[part]["sha256"]:
                raise ClawlyError(
                    f"{extra} is missing or does not match the record's sha256: keep it beside "
                    f"{path.name} (it holds {what})"
                )
    return record, directions


def recorded_distillation(record_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The trained factors of a record whose adapter was distilled, else None."""
    record, _ = read_record(record_dir)
    return read_factors(Path(record_dir) / record["distilled"]["file"])[0] if record.get("distilled") else None


def recorded_inputs(record_dir: Path) -> RecordedInputs | None:
    """The A rows of the record in `record_dir` whose plan has an input-conditional edit, else None."""
    record, _ = read_record(record_dir)
    return read_recorded_rows(Path(record_dir) / record["edit"]["file"]) if record.get("edit") else None


def category_markdown(by_category: dict[str, dict], after: str = "after", label: str = "refusals") -> list[str]:
    """A markdown table of `categories.category_table` rows (counts of `label`)."""
    lines = [f"| category | role | prompts | base: {label} | {after} | retention |", "|---|---|---|---|---|---|"]
    for cat, r in by_category.items():
        lo, hi = r["after_rate_ci95"]
        retention = "" if r.get("retention") is None else f"{r['retention']:.0%}"
        lines.append(
            f"| {cat} | {r['role']} | {r['prompts']} | {r['base_refusals']} ({r['base_rate']:.0%}) "
            f"| {r['after_refusals']} ({r['after_rate']:.0%}, 95% CI {lo:.0%}-{hi:.0%}) | {retention} |"
        )
    return lines


def model_title(settings: Settings) -> str:
    """The base model as a model card names it: a local directory or file by its own name only."""
    name = settings.model.name
    if name == DEFAULT_MODEL:
        return DEFAULT_MODEL_DESCRIPTION
    return Path(name).name if Path(name).expanduser().exists() or Path(name).is_absolute() else name


def model_card(settings: Settings, metrics: dict, kind: str = "model") -> str:
    """README.md of a saved model or adapter: what was done, the optimizer's figures, the warning."""
    lines = [
        "---",
        f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
        "tags: [clawly, abliteration]",
        "---",
        "",
        f"# {model_title(settings)} — abliterated with clawly" + (" (LoRA adapter)" if kind == "adapter" else ""),
        "",
        f"Refusal directions were ablated from the weights (directional ablation) by clawly {__version__}.",
        "",
        "**Dual-use warning:** this model refuses fewer harmful requests than its base model.",
        "",
    ]
    if settings.categories.enabled:
        weights = ", ".join(f"{c} {w:g}" for c, w in settings.categories.weights.items())
        lines += [f"Category weights (1 uncensors, 0 keeps refusals): {weights}.", ""]
    if metrics:
        n, label = metrics["targeted_prompts"], metrics["refusal_label"]
        lines += [
            "## Optimizer figures",
            "",
            f"{label.capitalize()} ({metrics['refusal_meaning']}) on {n} "
            f"{'targeted-category' if metrics['mode'] == 'category' else 'harmful'} eval prompts, and "
            f"first-token KL divergence on {metrics['harmless_prompts']} harmless ones:",
            "",
            f"| | {label} | KL divergence |",
            "|---|---|---|",
            f"| base | {metrics['base']['refusals']}/{n} | 0 |",
            f"| this model | {metrics['chosen']['refusals']}/{n} | {metrics['chosen']['kl_divergence']} |",
            "",
            *category_markdown(metrics["by_category"], label=label),
            "",
            f"Chosen by: {metrics['rule']} (trial {metrics['chosen_trial']} of {metrics['trials']}).",
        ]
    if kind == "adapter":
        lines += ["", "Load it on its base model with `peft.PeftModel.from_pretrained(base_model, this_dir)`."]
        if settings.optimize.norm_preserve:
            lines += [
                "",
                "The norm-preserving change is full rank: this adapter is its truncated SVD (the relative "
                "error per module is in clawly's export metrics); the merged model holds the exact change.",
            ]
    lines += [
        "",
        f"Everything needed to reproduce this {kind} is in `{RECORD}` (with `{DIRECTIONS}`): "
        f"`clawly --reproduce {RECORD}`.",
        "",
    ]
    return "\n".join(lines)
