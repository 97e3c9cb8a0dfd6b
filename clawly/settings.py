"""Typed settings for every stage: the one source of defaults and of validation.

Each section is a dataclass; what each key means is in `clawly.settings_docs` (kept apart so a
reworded help text reruns no DVC stage). `clawly/conf/settings.yaml` is generated from these defaults, and
``Settings.from_dict`` validates a composed config once, at the door: everything below trusts it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from clawly.errors import ClawlyError


class SettingsError(ClawlyError, ValueError):
    """An invalid setting: the message names the key, the value and what is allowed."""


def _f(default: Any) -> Any:
    """A field with this default (lists and dicts copied per instance); its help is in settings_docs."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d))
    return field(default=default)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """'500MB' -> 500_000_000 bytes; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"not a size: {size!r} (use e.g. 500MB or 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise SettingsError(f"invalid setting {key}={value!r}: {allowed}")


@dataclass
class ModelSettings:
    name: str = _f("default")
    gguf_file: str | None = _f(None)
    revision: str | None = _f(None)
    dtype: str = _f("auto")
    device: str = _f("auto")
    load_in_4bit: bool = _f(False)
    trust_remote_code: bool = _f(False)
    cache_dir: str | None = _f(None)
    system_prompt: str | None = _f("You are a helpful assistant.")

    def __post_init__(self) -> None:
        _check(
            self.dtype in {"auto", "float32", "bfloat16", "float16"},
            "model.dtype",
            self.dtype,
            "one of auto, float32, bfloat16, float16",
        )
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "model.device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )
        _check(bool(self.name), "model.name", self.name, "a hub id, a directory, a .gguf file or 'default'")


@dataclass
class DataSettings:
    templates: str = _f("clawly/data/templates.yaml")
    out_dir: str = _f("data/prompts")
    seed: int = _f(0)
    train_per_category: int = _f(100)
    eval_per_category: int = _f(50)
    tune_per_category: int = _f(0)
    harmless_train: int = _f(400)
    harmless_eval: int = _f(200)
    harmless_tune: int = _f(0)
    harmful_files: list[str] = _f([])
    harmless_files: list[str] = _f([])
    harmful_datasets: list[str] = _f([])
    harmless_datasets: list[str] = _f([])
    holdout: str = _f("template")

    def __post_init__(self) -> None:
        _check(self.holdout in {"template", "prompt"}, "data.holdout", self.holdout, "'template' or 'prompt'")
        for key in ("train_per_category", "eval_per_category", "harmless_train", "harmless_eval"):
            _check(getattr(self, key) >= 1, f"data.{key}", getattr(self, key), "an integer >= 1")
        for key in ("tune_per_category", "harmless_tune"):
            _check(getattr(self, key) >= 0, f"data.{key}", getattr(self, key), "an integer >= 0")


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
        named = [
            f"{section}.{k}"
            + (f" (did you mean {section}.{close[0]}?)" if (close := difflib.get_close_matches(k, fields, n=1)) else "")
            for k in unknown
        ]
        raise SettingsError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
            f"allowed keys in '{section}': {', '.join(sorted(fields))}"
        )
    for key, value in values.items():
        annotation = str(fields[key].type)
        _check(_matches(value, annotation), f"{section}.{key}", value, _describe(annotation))
    return cls(**values)


@dataclass
class ProbeSettings:
    position: str = _f("last")
    marker: str | None = _f(None)
    strip_newline: bool = _f(True)
    batch_size: int = _f(16)
    max_per_category: int | None = _f(None)

    def __post_init__(self) -> None:
        _check(
            self.position in {"last", "marker", "instruction"},
            "probe.position",
            self.position,
            "'last', 'marker' or 'instruction'",
        )
        _check(self.batch_size >= 1, "probe.batch_size", self.batch_size, "an integer >= 1")
        _check(
            self.max_per_category is None or self.max_per_category >= 1,
            "probe.max_per_category",
            self.max_per_category,
            "null or an integer >= 1",
        )


@dataclass
class DirectionSettings:
    projected: bool = _f(True)
    winsorize_quantile: float | None = _f(None)
    contrast: str = _f("general")
    method: str = _f("dim")
    rdo_steps: int = _f(30)
    rdo_lr: float = _f(0.01)
    rdo_prompts: int = _f(16)
    rdo_init_point: float = _f(0.6)
    rdo_kept_weight: float = _f(1.0)
    rdo_harmless_weight: float = _f(1.0)

    def __post_init__(self) -> None:
        _check(self.method in {"dim", "rdo"}, "directions.method", self.method, "'dim' or 'rdo'")
        for key in ("rdo_steps", "rdo_prompts"):
            _check(getattr(self, key) >= 1, f"directions.{key}", getattr(self, key), "an integer >= 1")
        _check(self.rdo_lr > 0, "directions.rdo_lr", self.rdo_lr, "a number > 0")
        _check(
            0.0 <= self.rdo_init_point <= 1.0, "directions.rdo_init_point", self.rdo_init_point, "a number in [0, 1]"
        )
        for key in ("rdo_kept_weight", "rdo_harmless_weight"):
            _check(getattr(self, key) >= 0, f"directions.{key}", getattr(self, key), "a number >= 0")
        _check(
            self.winsorize_quantile is None or 0.0 < self.winsorize_quantile < 0.5,
            "directions.winsorize_quantile",
            self.winsorize_quantile,
            "null or a number in (0, 0.5)",
        )
        _check(
            self.contrast in {"general", "topic_matched", "mixed"},
            "directions.contrast",
            self.contrast,
            "general, topic_matched or mixed",
        )


@dataclass
class OrthogonalizeSettings:
    against_harmless: bool = _f(False)
    orthogonalize_categories: bool = _f(True)
    warn_retained: float = _f(0.3)

    def __post_init__(self) -> None:
        _check(0 <= self.warn_retained <= 1, "orthogonalize.warn_retained", self.warn_retained, "a number in [0, 1]")


@dataclass
class CategorySettings:
    weights: dict[str, float] = _f({})
    keep_rule: str = _f("constraint")
    min_retention: float = _f(0.8)
    per_category_adapters: bool = _f(False)

    def __post_init__(self) -> None:
        for name, w in self.weights.items():
            _check(
                isinstance(w, (int, float)) and 0.0 <= float(w) <= 1.0,
                f"categories.weights.{name}",
                w,
                "a number in [0, 1] (1: uncensor, 0: keep refusals)",
            )
        self.weights = {str(k): float(v) for k, v in self.weights.items()}
        _check(
            not self.weights or any(w > 0 for w in self.weights.values()),
            "categories.weights",
            self.weights,
            "at least one category with weight > 0 (nothing to uncensor otherwise)",
        )
        _check(
            self.keep_rule in {"constraint", "objective"},
            "categories.keep_rule",
            self.keep_rule,
            "'constraint' or 'objective'",
        )
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


@dataclass
class EditSettings:
    method: str = _f("projection")
    kept_prompts: int = _f(32)
    targeted_prompts: int = _f(32)
    harmless_prompts: int = _f(0)
    answer_tokens: int = _f(48)
    rank: int = _f(256)
    energy_range: list[float] = _f([0.5, 0.99])
    ridge_range: list[float] = _f([0.001, 1.0])

    def __post_init__(self) -> None:
        _check(
            self.method in {"projection", "nullspace", "least_squares"},
            "edit.method",
            self.method,
            "'projection', 'nullspace' or 'least_squares'",
        )
        for key in ("kept_prompts", "targeted_prompts", "answer_tokens", "rank"):
            _check(getattr(self, key) >= 1, f"edit.{key}", getattr(self, key), "an integer >= 1")
        _check(self.harmless_prompts >= 0, "edit.harmless_prompts", self.harmless_prompts, "an integer >= 0")
        e = self.energy_range
        _check(len(e) == 2 and 0 < e[0] <= e[1] <= 1, "edit.energy_range", e, "[low, high] with 0 < low <= high <= 1")
        r = self.ridge_range
        _check(len(r) == 2 and 0 < r[0] <= r[1], "edit.ridge_range", r, "[low, high] with 0 < low <= high")

    @property
    def conditional(self) -> bool:
        """An input-conditional edit (needs the writers' input statistics, probe-writers)."""
        return self.method != "projection"


@dataclass
class DistillSettings:
    steps: int = _f(0)
    rank: int = _f(4)
    lr: float = _f(0.001)
    batch_size: int = _f(4)
    targeted_prompts: int = _f(16)
    kept_prompts: int = _f(16)
    harmless_prompts: int = _f(32)
    answer_tokens: int = _f(24)
    kl_tokens: int = _f(8)
    kept_weight: float = _f(1.0)
    harmless_weight: float = _f(1.0)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "distill.steps", self.steps, "an integer >= 0 (0: no distillation)")
        for key in ("rank", "batch_size", "targeted_prompts", "answer_tokens", "kl_tokens"):
            _check(getattr(self, key) >= 1, f"distill.{key}", getattr(self, key), "an integer >= 1")
        for key in ("kept_prompts", "harmless_prompts"):
            _check(getattr(self, key) >= 0, f"distill.{key}", getattr(self, key), "an integer >= 0")
        _check(self.lr > 0, "distill.lr", self.lr, "a number > 0")
        for key in ("kept_weight", "harmless_weight"):
            _check(getattr(self, key) >= 0, f"distill.{key}", getattr(self, key), "a number >= 0")

    @property
    def enabled(self) -> bool:
        return self.steps > 0


# What the first objective counts, by optimize.refusal_measure: a label and what it means.
REFUSAL_MEASURES = {
    "keywords": (
        "keyword refusals",
        "answers with a refusal marker (a marker list: it misses soft refusals and counts gibberish as compliance)",
    ),
    "classifier": (
        "not compliant (classifier)",
        "answers the response classifier does not call compliance: refusals, off-topic and degenerate ones",
    ),
}


@dataclass
class OptimizeSettings:
    n_trials: int = _f(16)
    n_startup_trials: int = _f(6)
    seed: int = _f(0)
    storage: str | None = _f(None)
    study_name: str = _f("clawly")
    workers: int = _f(1)
    harmful_prompts: int = _f(48)
    harmful_choice: str = _f("sample")
    harmful_pool: int | None = _f(None)
    harmless_prompts: int = _f(48)
    max_new_tokens: int = _f(16)
    kept_max_new_tokens: int = _f(48)
    batch_size: int | str = _f(48)
    prefix_cache: bool = _f(True)
    response_prefix: str | None = _f("auto")
    prune_kl: float | None = _f(None)
    kl_cap: float = _f(0.5)
    components: list[str] = _f(["attn_out", "mlp_down"])
    direction_scopes: list[str] = _f(["global", "per_layer"])
    direction_index_range: list[float] = _f([0.4, 0.9])
    peak_weight_range: list[float] = _f([0.8, 1.5])
    peak_position_range: list[float] = _f([0.4, 1.0])
    floor_fraction_range: list[float] = _f([0.0, 1.0])
    reach_range: list[float] = _f([0.1, 0.6])
    kernels: str = _f("shared")
    norm_preserve: bool = _f(False)
    refusal_markers: list[str] | None = _f(None)
    refusal_measure: str = _f("keywords")

    def __post_init__(self) -> None:
        _check(
            self.refusal_measure in REFUSAL_MEASURES,
            "optimize.refusal_measure",
            self.refusal_measure,
            "'keywords' or 'classifier'",
        )
        _check(
            self.refusal_markers is None or any(m.strip() for m in self.refusal_markers),
            "optimize.refusal_markers",
            self.refusal_markers,
            "null (the built-in markers) or a list of markers",
        )
        _check(
            self.harmful_choice in {"sample", "base_refusals"},
            "optimize.harmful_choice",
            self.harmful_choice,
            "'sample' or 'base_refusals'",
        )
        _check(
            self.harmful_pool is None or self.harmful_pool >= 1,
            "optimize.harmful_pool",
            self.harmful_pool,
            "null (every train and tune request) or an integer >= 1",
        )
        _check(self.n_trials >= 1, "optimize.n_trials", self.n_trials, "an integer >= 1")
        _check(self.workers >= 1, "optimize.workers", self.workers, "an integer >= 1")
        _check(self.n_startup_trials >= 0, "optimize.n_startup_trials", self.n_startup_trials, "an integer >= 0")
        for key in ("harmful_prompts", "harmless_prompts", "max_new_tokens", "kept_max_new_tokens"):
            _check(getattr(self, key) >= 1, f"optimize.{key}", getattr(self, key), "an integer >= 1")
        _check(
            self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
            "optimize.batch_size",
            self.batch_size,
            "an integer >= 1 or 'auto'",
        )
        _check(
            self.kernels in {"shared", "per_category"}, "optimize.kernels", self.kernels, "'shared' or 'per_category'"
        )
        _check(self.kl_cap > 0, "optimize.kl_cap", self.kl_cap, "a number > 0")
        _check(self.prune_kl is None or self.prune_kl > 0, "optimize.prune_kl", self.prune_kl, "null or a number > 0")
        _check(
            bool(self.components) and set(self.components) <= {"attn_out", "mlp_down"},
            "optimize.components",
            self.components,
            "a non-empty subset of [attn_out, mlp_down]",
        )
        _check(
            bool(self.direction_scopes) and set(self.direction_scopes) <= {"global", "per_layer"},
            "optimize.direction_scopes",
            self.direction_scopes,
            "a non-empty subset of [global, per_layer]",
        )
        for key in (
            "direction_index_range",
            "peak_weight_range",
            "peak_position_range",
            "floor_fraction_range",
            "reach_range",
        ):
            r = getattr(self, key)
            _check(len(r) == 2 and 0 <= r[0] <= r[1], f"optimize.{key}", r, "[low, high] with 0 <= low <= high")


@dataclass
class ExportSettings:
    energy: float = _f(0.99)
    max_rank: int = _f(64)
    warn_relative_error: float = _f(0.01)

    def __post_init__(self) -> None:
        _check(0 < self.energy <= 1, "export.energy", self.energy, "a number in (0, 1]")
        _check(self.max_rank >= 1, "export.max_rank", self.max_rank, "an integer >= 1")
        _check(self.warn_relative_error >= 0, "export.warn_relative_error", self.warn_relative_error, "a number >= 0")


@dataclass
class MergeSettings:
    max_shard_size: str = _f("2GB")

    def __post_init__(self) -> None:
        try:
            parse_size(self.max_shard_size)
        except ValueError:
            _check(False, "merge.max_shard_size", self.max_shard_size, "a size such as 500MB or 2GB")


@dataclass
class EvaluateSettings:
    per_category: int = _f(12)
    harmless_prompts: int = _f(48)
    max_new_tokens: int = _f(48)
    batch_size: int = _f(48)
    save_responses: bool = _f(True)

    def __post_init__(self) -> None:
        for key in ("per_category", "harmless_prompts", "max_new_tokens", "batch_size"):
            _check(getattr(self, key) >= 1, f"evaluate.{key}", getattr(self, key), "an integer >= 1")


@dataclass
class ClassifierSettings:
    train_file: str = _f("clawly/measure/responses/train.jsonl")
    test_file: str = _f("clawly/measure/responses/test.jsonl")
    embedder: str | None = _f(None)
    judge_model: str | None = _f(None)
    judge_trust_remote_code: bool = _f(False)


@dataclass
class ResearchSettings:
    sample_per_category: int = _f(100)
    projection_points: list[int] | None = _f(None)
    png_points: list[int] | None = _f(None)
    seed: int = _f(0)

    def __post_init__(self) -> None:
        _check(
            self.sample_per_category >= 2, "research.sample_per_category", self.sample_per_category, "an integer >= 2"
        )
        for key in ("projection_points", "png_points"):
            value = getattr(self, key)
            _check(
                value is None
                or (isinstance(value, list) and value and all(isinstance(i, int) and i >= 0 for i in value)),
                f"research.{key}",
                value,
                "null or a non-empty list of probe points (integers >= 0)",
            )


SECTIONS = {
    "model": ModelSettings,
    "data": DataSettings,
    "probe": ProbeSettings,
    "directions": DirectionSettings,
    "orthogonalize": OrthogonalizeSettings,
    "categories": CategorySettings,
    "edit": EditSettings,
    "optimize": OptimizeSettings,
    "distill": DistillSettings,
    "export": ExportSettings,
    "merge": MergeSettings,
    "evaluate": EvaluateSettings,
    "classifier": ClassifierSettings,
    "research": ResearchSettings,
}


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
                raise SettingsError(
                    f"invalid setting {key}={value!r}: a {SECTIONS[key].__name__} or a mapping "
                    "of its keys" + (" (or a model name)" if key == "model" else "")
                )
            out.update({f"{key}.{k}": v for k, v in value.items()})
            continue
        section, dot, _ = key.partition(".")
        if key == "artifacts_dir" or (dot and section in SECTIONS):
            out[key] = value
        elif not dot and len(owners.get(key, [])) == 1:
            out[f"{owners[key][0]}.{key}"] = value
        elif not dot and key in owners:
            raise SettingsError(
                f"ambiguous setting {key!r}: it is in {', '.join(owners[key])}; name the section, "
                f"e.g. {owners[key][-1]}.{key} or {owners[key][-1]}={{'{key}': ...}}"
            )
        else:
            known = [*SECTIONS, *owners, *(f"{s}.{k}" for k, ss in owners.items() for s in ss)]
            close = difflib.get_close_matches(key, known, n=1)
            raise SettingsError(
                f"unknown setting {key!r}"
                + (f"; did you mean {close[0]!r}?" if close else f"; sections: {', '.join(SECTIONS)}")
            )
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
    edit: EditSettings
    optimize: OptimizeSettings
    distill: DistillSettings
    export: ExportSettings
    merge: MergeSettings
    evaluate: EvaluateSettings
    classifier: ClassifierSettings
    research: ResearchSettings
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
        _check(
            not (self.optimize.norm_preserve and self.categories.kept),
            "optimize.norm_preserve",
            self.optimize.norm_preserve,
            "false while categories.weights keeps a category (weight 0): its column "
            f"rescale would change the kept categories' components ({', '.join(self.categories.kept)})",
        )
        _check(
            not (self.optimize.norm_preserve and self.edit.conditional),
            "optimize.norm_preserve",
            self.optimize.norm_preserve,
            f"false with edit.method={self.edit.method}: rescaling every column changes the kept inputs' writes too",
        )
        _check(
            not (self.distill.enabled and (self.optimize.norm_preserve or self.edit.conditional)),
            "distill.steps",
            self.distill.steps,
            "0 with optimize.norm_preserve or an input-conditional edit: distillation starts "
            "from a plain global change",
        )
        _check(
            not self.edit.conditional or bool(self.categories.kept) or self.edit.harmless_prompts > 0,
            "edit.method",
            self.edit.method,
            "'projection' unless something is kept: a kept category "
            "(categories.weights at 0) or edit.harmless_prompts > 0",
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Settings:
        """Validate a plain mapping (e.g. a composed Hydra config); unknown keys are errors."""
        values = dict(values)
        allowed = [*SECTIONS, "artifacts_dir"]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            named = [
                k + (f" (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, allowed, n=1)) else "")
                for k in unknown
            ]
            raise SettingsError(
                f"unknown config section{'s' if len(unknown) > 1 else ''} {', '.join(named)}; "
                f"allowed: {', '.join(allowed)}"
            )
        for name in SECTIONS:
            if name in values and not isinstance(values[name], (dict, type(None))):
                raise SettingsError(f"invalid config section {name}={values[name]!r}: a mapping of its keys")
        return cls(**{k: (v or {}) if k in SECTIONS else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
