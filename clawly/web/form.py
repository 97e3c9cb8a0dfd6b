"""The configuration form: every settings field as a form field, generated from the settings' own
fields, defaults and help (like `clawly --help`), and form values back to validated `Settings`.

A field is a checkbox (bool), a number (int, float), a dropdown (a key with a fixed set of values)
or a text box holding YAML (everything else: `null`, lists, mappings), parsed as the CLI parses an
option. A field is validated alone by its own section's rules, so its message can stand next to it;
rules across fields are checked when the whole form becomes `Settings`.

Category weights are a row per category of the templates: "in the run" and a weight in [0, 1]
(1: uncensor, 0: keep its refusals). A category not in the run is neither, as in a preset.

With a `PagePolicy` (what the web app always passes), fields the operator did not open are left out
and every value is checked against it (`clawly.web.guard`): the page's values are untrusted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from clawly.cli import parse_value, read_preset
from clawly.data.templates import load_templates
from clawly.paths import project_file
from clawly.settings import REFUSAL_MEASURES, SECTIONS, Settings, SettingsError, from_mapping
from clawly.settings_docs import HELP
from clawly.web.guard import PagePolicy

WEIGHTS = "categories.weights"
TOP = ("model.name", "model.load_in_4bit", "optimize.n_trials", "optimize.refusal_measure")  # above the categories
CHOICES = {  # keys whose values are a fixed set (a test checks each against the settings' validation)
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "probe.position": ("last", "marker", "instruction"),
    "data.holdout": ("template", "prompt"),
    "directions.contrast": ("general", "topic_matched", "mixed"),
    "directions.method": ("dim", "rdo"),
    "categories.keep_rule": ("constraint", "objective"),
    "edit.method": ("projection", "nullspace", "least_squares"),
    "optimize.kernels": ("shared", "per_category"),
    "optimize.harmful_choice": ("sample", "base_refusals"),
    "optimize.refusal_measure": tuple(REFUSAL_MEASURES),
}
NO_PRESET = "(none: global mode)"


@dataclass(frozen=True)
class FormField:
    key: str  # "optimize.n_trials"
    section: str
    name: str
    annotation: str  # the dataclass annotation, e.g. "int | None"
    kind: str  # bool, int, float, choice or text
    default: Any
    help: str
    choices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.key


def _kind(key: str, annotation: str) -> str:
    if key in CHOICES:
        return "choice"
    return annotation if annotation in ("bool", "int", "float") else "text"


def all_fields(policy: PagePolicy | None = None) -> list[FormField]:
    """Every settings field but the category weights (they have their own rows) and the ones the
    policy hides, in section order."""
    hidden = policy.hidden if policy is not None else frozenset()
    out = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if key == WEIGHTS or key in hidden:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            out.append(
                FormField(
                    key, section, f.name, str(f.type), _kind(key, str(f.type)), default, HELP[key], CHOICES.get(key, ())
                )
            )
    return out


def top_fields(policy: PagePolicy | None = None) -> list[FormField]:
    by_key = {f.key: f for f in all_fields(policy)}
    return [by_key[k] for k in TOP]


def advanced_fields(policy: PagePolicy | None = None) -> dict[str, list[FormField]]:
    """The fields not at the top, by section."""
    out: dict[str, list[FormField]] = {}
    for f in all_fields(policy):
        if f.key not in TOP:
            out.setdefault(f.section, []).append(f)
    return out


def form_fields(policy: PagePolicy | None = None) -> list[FormField]:
    """The order the form's components are passed in: the top fields, then the advanced ones."""
    return [*top_fields(policy), *(f for fields in advanced_fields(policy).values() for f in fields)]


# ---------------------------------------------------------------- values


def to_text(value: Any) -> str:
    """A value as the text box shows it: YAML in flow style (`null`, `[a, b]`, `{k: v}`), strings as they are."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def display(field: FormField, value: Any) -> Any:
    """A settings value as the field's component holds it."""
    return to_text(value) if field.kind == "text" else value


def parse(field: FormField, raw: Any, policy: PagePolicy | None = None) -> Any:
    """A component's value as the settings value it stands for (not yet validated)."""
    if policy is not None:
        raw = policy.unshown(field.key, raw)
    if field.kind == "text":
        return parse_value("" if raw is None else str(raw), field.annotation, field.key)
    if field.kind in ("int", "float") and isinstance(raw, float) and math.isfinite(raw) and raw == int(raw):
        return int(raw) if field.kind == "int" else raw
    return raw


def checked(field: FormField, raw: Any, policy: PagePolicy | None = None) -> Any:
    """The settings value a component's value stands for, validated alone by its section's rules and
    by the policy (paths made absolute); SettingsError naming the key otherwise."""
    value = parse(field, raw, policy)
    from_mapping(SECTIONS[field.section], {field.name: value}, field.section)
    return policy.check(field.key, value) if policy is not None else value


def field_error(field: FormField, raw: Any, policy: PagePolicy | None = None) -> str | None:
    """The settings' (or the policy's) own message for this field's value, checked alone; None when
    it is valid."""
    try:
        checked(field, raw, policy)
    except SettingsError as e:
        return str(e)
    return None


def form_keys(settings: Settings) -> dict[str, Any]:
    """Every settings value by its dotted key (what a policy's start values are)."""
    return {
        f"{section}.{k}": v
        for section, values in settings.to_dict().items()
        if isinstance(values, dict)
        for k, v in values.items()
    }


def form_values(settings: Settings, policy: PagePolicy | None = None) -> dict[str, Any]:
    """Every field's component value for these settings (a URL's password masked under a policy)."""
    values = settings.to_dict()
    shown = {f.key: display(f, values[f.section][f.name]) for f in form_fields(policy)}
    return {k: policy.shown(k, v) for k, v in shown.items()} if policy is not None else shown


def settings_from_form(
    raw: dict[str, Any], weights: dict[str, float], base: Settings, policy: PagePolicy | None = None
) -> tuple[Settings | None, dict[str, str], str | None]:
    """(settings, errors by key, error across fields): settings only when every field is valid alone
    and together. `base` gives what the form does not show (artifacts_dir, the hidden fields)."""
    errors = {}
    values: dict[str, Any] = {}
    by_key = {f.key: f for f in form_fields(policy)}
    for key, value in raw.items():
        if key not in by_key:  # a hidden field sent anyway: the page cannot set it
            errors[key] = f"invalid setting {key}: this page cannot set it"
            continue
        try:
            values[key] = checked(by_key[key], value, policy)
        except SettingsError as e:
            errors[key] = str(e)
    if errors:
        return None, errors, None
    start = base.to_dict()
    hidden = {k: start[k.split(".")[0]][k.split(".")[1]] for k in (policy.hidden if policy is not None else ())}
    try:
        return Settings(artifacts_dir=base.artifacts_dir, **values, **hidden, **{WEIGHTS: weights}), {}, None
    except SettingsError as e:
        return None, {}, str(e)


def error_key(message: str) -> str | None:
    """The key an error across fields names ("invalid setting optimize.norm_preserve=..."), so the
    form can show it next to that field; category weights map to WEIGHTS."""
    m = re.search(r"setting ([a-z_]+\.[a-z_0-9]+)", message)
    if not m:
        return None
    return WEIGHTS if m.group(1).startswith(WEIGHTS) else m.group(1)


# ---------------------------------------------------------------- categories and presets


def categories(settings: Settings) -> list[tuple[str, str]]:
    """(name, description) of each category in the settings' templates file."""
    templates = load_templates(project_file(settings.data.templates))
    return [(name, spec.get("description") or "") for name, spec in templates["categories"].items()]


def weights_from_rows(names: list[str], included: list[bool], weights: list[float]) -> dict[str, float]:
    """The category weights of the rows that are in the run."""
    return {name: float(w) for name, on, w in zip(names, included, weights, strict=True) if on}


def rows_from_weights(names: list[str], weights: dict[str, float]) -> tuple[list[bool], list[float]]:
    """Each row's "in the run" and weight (a row not in the run shows weight 1)."""
    return [n in weights for n in names], [float(weights.get(n, 1.0)) for n in names]


def presets() -> dict[str, dict[str, Any]]:
    """The shipped presets (clawly/conf/preset/*.yaml) as dotted keys, by name."""
    folder = project_file("clawly/conf/preset")
    names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return {name: read_preset(name) for name in names}


def apply_preset(
    name: str, base: Settings, policy: PagePolicy | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """(weights, field values) a preset sets: every key any preset sets starts from `base` (the
    settings the UI started with), then the preset's own values, so switching presets leaves
    nothing of the previous one behind. NO_PRESET is global mode."""
    shipped = presets()
    if name != NO_PRESET and name not in shipped:
        raise SettingsError(f"no preset {name!r}; available: {', '.join(shipped)}")
    chosen = shipped.get(name, {})
    touched = {k for values in shipped.values() for k in values} - {WEIGHTS}
    start = form_values(base, policy)
    by_key = {f.key: f for f in form_fields(policy)}
    fields = {k: start[k] for k in touched if k in by_key}
    fields.update({k: display(by_key[k], v) for k, v in chosen.items() if k in by_key})
    return dict(chosen.get(WEIGHTS, {})), fields
