"""Prompt sets: expand the category-labelled templates, add user prompts, split train/eval.

`generate_prompts` returns two tables, harmful and harmless, each with the columns
``id, text, category, split, system`` (all strings; split is "train", "eval" or "tune"; system is
empty except in instructed categories, see `clawly.data.prompts`).

- Harmful: every category in the templates gives exactly ``train_per_category`` train,
  ``eval_per_category`` eval and ``tune_per_category`` tune prompts (the optimizer's; none by
  default, and then the optimizer draws from eval).
- Instructed categories (a ``system`` prompt, or a list of them, in the category's spec) hold
  harmless requests that the system prompt forbids; each row draws its system prompt by seed.
  They have no harmless section.
- Harmless: ``harmless_train + harmless_eval + harmless_tune`` prompts. Half of them (rounded
  down) are topic-matched, spread evenly over the other harmful categories (the first categories
  in file order take the remainder) and labelled with that category; the rest are ``general``.
  Each of these groups is split train/eval in proportion, so both splits hold the same mix.
- User prompts (files, Hugging Face datasets) are appended after the generated ones. Rows without
  a split get one by seed, with the same eval fraction as the generated prompts.
- With ``holdout: template`` (the default) each section's templates are split first: eval
  prompts come from templates that no train or tune prompt of the section uses, and where a slot
  has 3 or more values, from values the train and tune prompts never use (`holdout_sections`).
  Combinatorial templates make a random split of their fillings (``holdout: prompt``) a split of
  near-copies: an eval prompt differs from a train one by a slot value, so a score on it says
  little about phrasings a user would type.

Invariants: no text (compared case- and whitespace-insensitively) appears twice, so none is in
both train and eval or in both harmful and harmless; everything is deterministic given the seed,
and each category draws from its own seeded generator, so editing one category's templates
leaves the other categories' samples unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from clawly.data.prompts import COLUMNS, GENERAL
from clawly.errors import ClawlyError
from clawly.paths import project_file
from clawly.settings import DataSettings

log = logging.getLogger(__name__)

SPLITS = ("train", "eval", "tune")
USER_HARMFUL_CATEGORY = "custom"  # category of user harmful prompts that carry none
PROMPT_FILE_SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet")
_CATEGORY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
MAX_EVAL_TEMPLATES = 0.4  # share of a section's templates the template-level hold-out may give to eval


class DatasetError(ClawlyError, ValueError):
    """Prompt data that cannot be used: the message names the file or dataset and the problem."""


def normalize(text: str) -> str:
    """Key under which two prompts count as the same: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


# --- templates -------------------------------------------------------------------------------


def load_templates(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a templates YAML file.

    Returns ``{"categories": {name: {"description", "system", "harmful", "harmless"}}, "general":
    section, "source": path}``; a section is ``{"templates": [str], "slots": {name: [str]}}``;
    "system" is a list of system prompts (empty but for instructed categories, which have no
    "harmless").
    """
    path = project_file(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: templates file not found") from e
    except yaml.YAMLError as e:
        raise DatasetError(f"{path}: not valid YAML: {e}") from e
    return validate_templates(data, source=str(path))


def validate_templates(data: Any, source: str = "templates") -> dict[str, Any]:
    """Check the structure of parsed templates; see `load_templates` for the result."""
    if not isinstance(data, Mapping):
        raise DatasetError(f"{source}: expected a mapping with keys 'categories' and 'general'")
    unknown = sorted(set(data) - {"categories", "general"})
    if unknown:
        raise DatasetError(f"{source}: unknown top-level key(s) {unknown}; allowed: categories, general")
    for key in ("categories", "general"):
        if key not in data:
            raise DatasetError(f"{source}: missing top-level key '{key}'")
    if not isinstance(data["categories"], Mapping) or not data["categories"]:
        raise DatasetError(f"{source}: 'categories' must be a non-empty mapping of category name -> spec")

    categories: dict[str, Any] = {}
    for name, spec in data["categories"].items():
        if not isinstance(name, str) or not _CATEGORY_NAME.match(name) or name == GENERAL:
            raise DatasetError(
                f"{source}: invalid category name {name!r}: use lowercase letters, digits and '_' "
                f"(and not '{GENERAL}', which labels general harmless prompts)"
            )
        if not isinstance(spec, Mapping):
            raise DatasetError(f"{source}: categories.{name} must be a mapping with 'harmful' and 'harmless'")
        systems = _validate_systems(spec.get("system"), f"{source}: categories.{name}.system")
        sides = ("harmful",) if systems else ("harmful", "harmless")
        for side in sides:
            if side not in spec:
                raise DatasetError(f"{source}: categories.{name} is missing '{side}'")
        if systems and "harmless" in spec:
            raise DatasetError(
                f"{source}: categories.{name} has a system prompt, so its requests are harmless "
                f"ones the system prompt forbids; remove its 'harmless' section (the general "
                f"prompts are its contrast)"
            )
        categories[name] = {
            "description": str(spec.get("description", "")),
            "system": systems,
            "harmful": _validate_section(spec["harmful"], f"{source}: categories.{name}.harmful"),
        }
        if not systems:
            categories[name]["harmless"] = _validate_section(spec["harmless"], f"{source}: categories.{name}.harmless")
    general = _validate_section(data["general"], f"{source}: general")
    return {"categories": categories, "general": general, "source": source}


def _validate_systems(value: Any, where: str) -> list[str]:
    """A category's own system prompt(s): none, one string, or a list (each row draws one)."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise DatasetError(f"{where}: expected a non-empty string or a non-empty list of non-empty strings")
    return [" ".join(v.split()) for v in values]


def _validate_section(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, Mapping):
        raise DatasetError(f"{where}: expected a mapping with 'templates' and 'slots'")
    templates = section.get("templates")
    if not isinstance(templates, list) or not templates:
        raise DatasetError(f"{where}: 'templates' must be a non-empty list of strings")
    slots_in = section.get("slots") or {}
    if not isinstance(slots_in, Mapping):
        raise DatasetError(f"{where}: 'slots' must be a mapping of slot name -> list of values")
    slots: dict[str, list[str]] = {}
    for name, values in slots_in.items():
        if not isinstance(values, list) or not values:
            raise DatasetError(f"{where}: slot '{name}' must be a non-empty list of values")
        if not all(isinstance(v, (str, int, float)) and str(v).strip() for v in values):
            raise DatasetError(f"{where}: slot '{name}' has an empty or non-text value")
        slots[str(name)] = _unique(str(v) for v in values)
    for template in templates:
        if not isinstance(template, str) or not template.strip():
            raise DatasetError(f"{where}: template {template!r} is not a non-empty string")
        for slot in _slot_names(template, where):
            if slot not in slots:
                raise DatasetError(
                    f"{where}: template {template!r} uses unknown slot '{{{slot}}}'; "
                    f"known slots: {', '.join(sorted(slots)) or '(none)'}"
                )
    return {"templates": _unique(templates), "slots": slots}


def _slot_names(template: str, where: str = "template") -> list[str]:
    """Slot names a template uses, in order of first use."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # unbalanced braces
        raise DatasetError(f"{where}: template {template!r} is malformed: {e}") from e
    bad = [f"{{{name}}}" for name, spec, conv in fields if spec or conv or not name.isidentifier()]
    if bad:
        raise DatasetError(
            f"{where}: template {template!r} has invalid placeholder(s) {', '.join(bad)}; use {{slot_name}}"
        )
    return list(dict.fromkeys(name for name, _, _ in fields))


def _unique(texts: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for text in texts:
        if normalize(text) not in seen:
            seen.add(normalize(text))
            out.append(text)
    return out


def _fill(template: str, names: Sequence[str], slots: Mapping[str, Sequence[str]], index: int) -> str:
    """The `index`-th combination of slot values (mixed-radix over `names`)."""
    values = {}
    for name in reversed(names):
        index, r = divmod(index, len(slots[name]))
        values[name] = slots[name][r]
    return " ".join(template.format(**values).split())


def expand(
    templates: Mapping[str, Any],
    rng: random.Random | None = None,
    limit: int | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Fill a section's templates with slot values; unique texts, `limit` at most.

    `templates` is one section, ``{"templates": [...], "slots": {...}}``. Templates take turns
    (round robin), so a sample spreads evenly over phrasings. Without `rng` the order is fixed;
    with it, both the template order and each template's fillings are shuffled (deterministic
    given the generator's seed). Texts equal to one in `exclude` (after `normalize`) are skipped.
    With no `limit`, every unique filling is returned.
    """
    slots = templates.get("slots") or {}
    excluded = {normalize(t) for t in exclude}
    plans = []  # (template, slot names, chosen combination indices)
    for template in templates["templates"]:
        names = _slot_names(template)
        size = math.prod(len(slots[n]) for n in names)
        take = size if limit is None else min(size, limit + len(excluded))
        chosen = rng.sample(range(size), take) if rng is not None else range(take)
        plans.append((template, names, chosen))
    if rng is not None:
        rng.shuffle(plans)

    out: list[str] = []
    seen = set(excluded)
    for rank in range(max((len(p[2]) for p in plans), default=0)):
        for template, names, chosen in plans:
            if rank >= len(chosen):
                continue
            text = _fill(template, names, slots, chosen[rank])
            if normalize(text) in seen:
                continue
            seen.add(normalize(text))
            out.append(text)
            if limit is not None and len(out) >= limit:
                return out
    return out


# --- the template-level hold-out ------------------------------------------------------------


def _capacity(templates: Sequence[str], slots: Mapping[str, Sequence[str]]) -> int:
    """How many fillings the templates have (before removing duplicates)."""
    return sum(math.prod(len(slots[n]) for n in _slot_names(t)) for t in templates)


def holdout_sections(
    section: Mapping[str, Any], rng: random.Random, n_eval: int, n_rest: int, where: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(train section, eval section) of one section for a template-level hold-out. Every slot with 3
    or more values gives a third of them (at least one) to eval only; templates go to eval in a
    seeded order, as few as give `n_eval` eval fillings while the rest give `n_rest` (train and
    tune), at least one and at most MAX_EVAL_TEMPLATES of them (and one left for train), so the
    directions still learn from most phrasings. Deterministic given `rng`."""
    templates = list(section["templates"])
    if len(templates) < 2:
        raise DatasetError(
            f"{where}: data.holdout=template needs at least 2 templates per section (one for eval, "
            "one for train); add templates, or use data.holdout=prompt"
        )
    train_slots, eval_slots = {}, {}
    for name, values in (section.get("slots") or {}).items():
        if len(values) >= 3:
            picked = set(rng.sample(range(len(values)), max(1, len(values) // 3)))
            eval_slots[name] = [v for i, v in enumerate(values) if i in picked]
            train_slots[name] = [v for i, v in enumerate(values) if i not in picked]
        else:
            eval_slots[name] = train_slots[name] = list(values)
    order = [templates[i] for i in rng.sample(range(len(templates)), len(templates))]
    most = min(len(templates) - 1, max(1, math.ceil(len(templates) * MAX_EVAL_TEMPLATES)))
    k = 1
    while k < most and _capacity(order[:k], eval_slots) < n_eval and _capacity(order[k + 1 :], train_slots) >= n_rest:
        k += 1
    return ({"templates": order[k:], "slots": train_slots}, {"templates": order[:k], "slots": eval_slots})


def _held_out(
    section: Mapping[str, Any],
    rng: random.Random,
    n_train: int,
    n_eval: int,
    n_tune: int,
    taken: list[str],
    what: str,
    source: str,
) -> tuple[list[str], list[str], list[str]]:
    """(train, eval, tune) texts of one section under the template-level hold-out. When the held-out
    slot values leave the eval templates too few fillings, the rest of the eval prompts fill the
    held-out templates with any value (the templates stay held out)."""
    train_part, eval_part = holdout_sections(section, rng, n_eval, n_train + n_tune, f"{source}: {what}")
    evals = expand(eval_part, rng, limit=n_eval, exclude=taken)
    if len(evals) < n_eval:
        log.info(
            "%s: the held-out slot values give only %d eval prompts; the rest fill the held-out templates "
            "with every value",
            what,
            len(evals),
        )
        evals += _sample(
            {**eval_part, "slots": section.get("slots") or {}},
            rng,
            n_eval - len(evals),
            [*taken, *evals],
            f"{what}, held-out templates",
            source,
            f"data.holdout=template and {n_eval} eval prompts",
        )
    rest = _sample(
        train_part,
        rng,
        n_train + n_tune,
        [*taken, *evals],
        f"{what}, train and tune templates",
        source,
        f"data.holdout=template and {n_train} train + {n_tune} tune prompts",
    )
    rng.shuffle(rest)
    return rest[n_tune:], evals, rest[:n_tune]


def _frame(train: list[str], evals: list[str], tune: list[str], category: str) -> pd.DataFrame:
    """Rows ordered train, then eval, then tune (as `_split_frame` orders them)."""
    return pd.DataFrame(
        {
            "text": [*train, *evals, *tune],
            "category": category,
            "split": ["train"] * len(train) + ["eval"] * len(evals) + ["tune"] * len(tune),
            "system": "",
        }
    )


# --- generation ------------------------------------------------------------------------------


def generate_prompts(settings: DataSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the (harmful, harmless) prompt tables described in the module docstring."""
    templates = load_templates(settings.templates)
    harmful = _generate_harmful(templates, settings)
    harmless = _generate_harmless(templates, settings, exclude=harmful["text"])

    harmful = _append_user_prompts(
        harmful,
        _user_prompts(settings.harmful_files, settings.harmful_datasets, USER_HARMFUL_CATEGORY),
        exclude=harmless["text"],
        eval_fraction=settings.eval_per_category / (settings.train_per_category + settings.eval_per_category),
        rng=random.Random(f"{settings.seed}:user:harmful"),
    )
    harmless = _append_user_prompts(
        harmless,
        _user_prompts(settings.harmless_files, settings.harmless_datasets, GENERAL),
        exclude=harmful["text"],
        eval_fraction=settings.harmless_eval / (settings.harmless_train + settings.harmless_eval),
        rng=random.Random(f"{settings.seed}:user:harmless"),
    )
    _check_user_categories(harmful, templates, settings.harmful_files + settings.harmful_datasets)
    return _with_ids(harmful, "harmful"), _with_ids(harmless, "harmless")


def _check_user_categories(harmful: pd.DataFrame, templates: Mapping[str, Any], sources: Sequence[str]) -> None:
    """A category only user prompts bring needs a train prompt (for its direction) and an eval or
    tune prompt (to score it)."""
    for category, rows in harmful[~harmful["category"].isin(list(templates["categories"]))].groupby("category"):
        counts = rows["split"].value_counts()
        if not counts.get("train", 0) or not counts.get("eval", 0) + counts.get("tune", 0):
            raise DatasetError(
                f"category '{category}' of {', '.join(sources)} has {len(rows)} prompt(s) ({counts.get('train', 0)} "
                f"train, {counts.get('eval', 0) + counts.get('tune', 0)} eval/tune): it needs at least one train "
                "prompt (for its direction) and one eval prompt (to score it); add prompts or a 'split' column"
            )


def _generate_harmful(templates: Mapping[str, Any], settings: DataSettings) -> pd.DataFrame:
    need = settings.train_per_category + settings.eval_per_category + settings.tune_per_category
    frames, taken = [], []
    for category, spec in templates["categories"].items():
        rng = random.Random(f"{settings.seed}:harmful:{category}")
        if settings.holdout == "template":
            parts = _held_out(
                spec["harmful"],
                rng,
                settings.train_per_category,
                settings.eval_per_category,
                settings.tune_per_category,
                taken,
                f"category '{category}' (harmful)",
                templates["source"],
            )
            taken += [t for part in parts for t in part]
            frame = _frame(*parts, category)
        else:
            texts = _sample(
                spec["harmful"],
                rng,
                need,
                taken,
                f"category '{category}' (harmful)",
                templates["source"],
                f"data.train_per_category={settings.train_per_category} + "
                f"data.eval_per_category={settings.eval_per_category} + "
                f"data.tune_per_category={settings.tune_per_category}",
            )
            taken += texts
            frame = _split_frame(texts, category, settings.eval_per_category, rng, settings.tune_per_category)
        if spec["system"]:  # its own generator: the texts drawn do not depend on the system prompts
            pick = random.Random(f"{settings.seed}:system:{category}")
            frame["system"] = [pick.choice(spec["system"]) for _ in range(len(frame))]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _generate_harmless(templates: Mapping[str, Any], settings: DataSettings, exclude: Iterable[str]) -> pd.DataFrame:
    total = settings.harmless_train + settings.harmless_eval + settings.harmless_tune
    categories = [c for c, spec in templates["categories"].items() if not spec["system"]]
    counts = _largest_remainder(total // 2, {c: 1 for c in categories})
    counts[GENERAL] = total - total // 2
    evals = _largest_remainder(settings.harmless_eval, counts)
    tunes = _largest_remainder(settings.harmless_tune, counts)

    frames, taken = [], list(exclude)
    for group, n in counts.items():
        if n == 0:
            continue
        section = templates["general"] if group == GENERAL else templates["categories"][group]["harmless"]
        rng = random.Random(f"{settings.seed}:harmless:{group}")
        if settings.holdout == "template" and evals[group]:
            parts = _held_out(
                section,
                rng,
                n - evals[group] - tunes[group],
                evals[group],
                tunes[group],
                taken,
                f"'{group}' (harmless)",
                templates["source"],
            )
            taken += [t for part in parts for t in part]
            frames.append(_frame(*parts, group))
            continue
        texts = _sample(
            section,
            rng,
            n,
            taken,
            f"'{group}' (harmless)",
            templates["source"],
            f"its share of data.harmless_train + data.harmless_eval + data.harmless_tune = {total}",
        )
        taken += texts
        frames.append(_split_frame(texts, group, evals[group], rng, tunes[group]))
    return pd.concat(frames, ignore_index=True)


def _sample(
    section: Mapping[str, Any], rng: random.Random, need: int, exclude: Iterable[str], what: str, source: str, why: str
) -> list[str]:
    texts = expand(section, rng, limit=need, exclude=exclude)
    if len(texts) < need:
        raise DatasetError(
            f"{source}: templates for {what} yield only {len(texts)} unique prompts, but {need} are "
            f"needed ({why}); add templates or slot values, or ask for fewer prompts"
        )
    return texts


def _split_frame(texts: list[str], category: str, n_eval: int, rng: random.Random, n_tune: int = 0) -> pd.DataFrame:
    """Shuffle, take the first `n_eval` as eval and the next `n_tune` as tune; rows ordered train,
    then eval, then tune."""
    texts = list(texts)
    rng.shuffle(texts)
    splits = ["eval"] * n_eval + ["tune"] * n_tune + ["train"] * (len(texts) - n_eval - n_tune)
    frame = pd.DataFrame({"text": texts, "category": category, "split": splits, "system": ""})
    order = {"train": 0, "eval": 1, "tune": 2}
    return frame.sort_values("split", key=lambda col: col.map(order), kind="stable", ignore_index=True)


def _largest_remainder(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Split `total` in proportion to `weights`; leftover units go to the largest remainders,
    ties to the earlier key."""
    weight_sum = sum(weights.values())
    exact = {k: total * w / weight_sum for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: (-(exact[k] - counts[k]), list(weights).index(k)))
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def _with_ids(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Add ``{kind}-{category}-{NNNN}`` ids, numbered per category in row order."""
    number = frame.groupby("category", sort=False).cumcount()
    ids = [f"{kind}-{c}-{n:04d}" for c, n in zip(frame["category"], number, strict=True)]
    out = frame.assign(id=ids)[COLUMNS].reset_index(drop=True)
    if out["id"].duplicated().any():
        raise DatasetError(f"{kind} prompt ids are not unique; rename categories that end in '-<digits>'")
    return out.astype(dict.fromkeys(COLUMNS, str))


# --- user prompts ----------------------------------------------------------------------------


def load_prompt_file(path: str | os.PathLike[str], default_category: str) -> pd.DataFrame:
    """Read user prompts: columns ``text, category, split, system`` (split is None where not given).

    .txt holds one prompt per line (blank lines skipped); .csv, .jsonl and .parquet need a
    ``text`` or ``prompt`` column and may have ``category``, ``split`` ("train"/"eval"/"tune") and
    ``system`` (the row's own system prompt: its category becomes an instructed one).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise DatasetError(
            f"{path}: unsupported prompt file type '{suffix or '(none)'}'; use one of {', '.join(PROMPT_FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise DatasetError(f"{path}: prompt file not found")
    if suffix != ".parquet":
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DatasetError(
                f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}): save the file as UTF-8"
            ) from e
    try:
        if suffix == ".txt":
            frame = pd.DataFrame({"text": path.read_text(encoding="utf-8").splitlines()})
        elif suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False)
        else:
            frame = pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except (ValueError, OSError) as e:  # malformed CSV, JSON or Parquet: one line, from the parser
        raise DatasetError(f"{path}: could not read prompts: {' '.join(str(e).split())}") from e
    out = _standardize(frame, str(path), default_category) if len(frame.columns) or len(frame) else frame
    if not len(out):
        raise DatasetError(
            f"{path}: holds no prompts (an empty file, or a header and no rows): add prompts, or "
            "leave the file out of data.harmful_files / data.harmless_files"
        )
    keys = out["text"].map(normalize)
    repeated = keys.duplicated()
    if repeated.any():
        first = int(repeated.idxmax())
        same = int(keys[keys == keys[first]].index[0])
        raise DatasetError(
            f"{path}: {int(repeated.sum())} prompt(s) repeat another prompt of the file (prompt "
            f"{first + 1} repeats prompt {same + 1}: {out['text'][first][:60]!r}): remove the repeats"
        )
    return out


def load_hf_dataset(spec: str, default_category: str) -> pd.DataFrame:
    """Read prompts from a Hugging Face dataset: ``id`` or ``id:split:column``.

    The split defaults to "train" and the column to ``text`` or ``prompt``; an optional
    ``category`` column is kept. Our train/eval split is assigned later, by seed. Needs the
    optional package ``datasets`` and access to the hub.
    """
    parts = spec.split(":")
    if len(parts) not in (1, 3) or not all(parts):
        raise DatasetError(f"dataset {spec!r}: expected 'id' or 'id:split:column'")
    dataset_id, split, column = (parts[0], "train", "") if len(parts) == 1 else parts
    try:
        import datasets  # optional; imported here so clawly works without it
    except ImportError as e:
        raise DatasetError(
            f"dataset {spec!r}: loading Hugging Face datasets needs the optional "
            "package 'datasets' (pip install datasets)"
        ) from e
    try:
        frame = datasets.load_dataset(dataset_id, split=split).to_pandas()
    except Exception as e:  # network, auth, missing dataset: all mean "cannot use this spec"
        raise DatasetError(
            f"dataset {spec!r}: could not load split '{split}' of {dataset_id!r} from "
            f"the Hugging Face Hub (is it reachable?): {type(e).__name__}: {e}"
        ) from e
    frame = frame.drop(columns=["split"], errors="ignore")
    if column:
        if column not in frame.columns:
            raise DatasetError(
                f"dataset {spec!r}: no column '{column}' (columns: {', '.join(map(str, frame.columns))})"
            )
        frame = frame.drop(columns=["text", "prompt"], errors="ignore").rename(columns={column: "text"})
    return _standardize(frame, f"dataset {spec!r}", default_category)


def _standardize(frame: pd.DataFrame, source: str, default_category: str) -> pd.DataFrame:
    """Columns text, category, split, system; blank texts dropped; split values checked."""
    text_column = next((c for c in ("text", "prompt") if c in frame.columns), None)
    if text_column is None:
        raise DatasetError(
            f"{source}: no 'text' or 'prompt' column (columns: {', '.join(map(str, frame.columns)) or 'none'})"
        )
    out = pd.DataFrame({"text": frame[text_column].map(_clean)})
    out["category"] = frame["category"].map(_clean) if "category" in frame.columns else ""
    out.loc[out["category"] == "", "category"] = default_category
    out["split"] = frame["split"].map(_clean).str.lower() if "split" in frame.columns else ""
    bad = sorted(set(out["split"]) - {"", *SPLITS})
    if bad:
        raise DatasetError(f"{source}: invalid split value(s) {bad}; use 'train', 'eval' or 'tune', or leave empty")
    out["split"] = out["split"].where(out["split"] != "", None)
    out["system"] = frame["system"].map(_clean) if "system" in frame.columns else ""
    return out[out["text"] != ""].reset_index(drop=True)


def _clean(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else " ".join(str(value).split())


def _user_prompts(files: Sequence[str], dataset_specs: Sequence[str], default_category: str) -> pd.DataFrame:
    frames = [load_prompt_file(f, default_category) for f in files]
    frames += [load_hf_dataset(s, default_category) for s in dataset_specs]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["text", "category", "split", "system"])
    return pd.concat(frames, ignore_index=True)


def _append_user_prompts(
    base: pd.DataFrame, extra: pd.DataFrame, exclude: Iterable[str], eval_fraction: float, rng: random.Random
) -> pd.DataFrame:
    """Append user rows, dropping duplicates of any existing or excluded text; assign missing
    splits by `rng` so that round(eval_fraction * n) of them are eval."""
    if extra.empty:
        return base
    taken = {normalize(t) for t in [*base["text"], *exclude]}
    keys = extra["text"].map(normalize)
    keep = ~keys.isin(taken) & ~keys.duplicated()
    if (~keep).sum():
        log.warning("dropped %d user prompt(s) that repeat another prompt", int((~keep).sum()))
    extra = extra[keep].reset_index(drop=True)
    missing = list(extra.index[extra["split"].isna()])
    rng.shuffle(missing)
    n_eval = round(eval_fraction * len(missing))
    extra.loc[missing[:n_eval], "split"] = "eval"
    extra.loc[missing[n_eval:], "split"] = "train"
    return pd.concat([base, extra], ignore_index=True)
