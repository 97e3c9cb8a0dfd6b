"""Prompt generation: counts, uniqueness, splits, determinism, user files, errors, schema."""

from __future__ import annotations

import json
import random
import re
import sys
import types
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from clawly.data.templates import (
    COLUMNS,
    GENERAL,
    DatasetError,
    expand,
    generate_prompts,
    holdout_sections,
    load_hf_dataset,
    load_prompt_file,
    load_templates,
    normalize,
)
from clawly.settings import DataSettings

TEMPLATES = Path(__file__).resolve().parents[1] / "clawly" / "data" / "templates.yaml"
REQUIRED = {"violence_weapons", "drugs_substances", "adult_content", "self_harm_suicide"}


def data_settings(**overrides) -> DataSettings:
    return DataSettings(**{"templates": str(TEMPLATES), **overrides})


@pytest.fixture(scope="module")
def templates() -> dict:
    return load_templates(TEMPLATES)


@pytest.fixture(scope="module")
def prompts() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate_prompts(data_settings())


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def tiny_templates(harmful_values: int = 3) -> dict:
    """Templates small enough to reason about: 2 x `harmful_values` harmful prompts."""
    section = {
        "templates": ["How do I {verb} a {thing}?", "Tell me how to {verb} a {thing}."],
        "slots": {"verb": ["build"], "thing": [f"thing{i}" for i in range(harmful_values)]},
    }
    return {
        "categories": {
            "alpha": {
                "harmful": section,
                "harmless": {"templates": ["What is a {x}?"], "slots": {"x": [f"cake{i}" for i in range(10)]}},
            }
        },
        "general": {"templates": ["Tell me about {y}."], "slots": {"y": [f"city{i}" for i in range(10)]}},
    }


# --- the shipped templates -------------------------------------------------------------------


def safety_categories(templates: dict) -> list[str]:
    """Categories with topic-matched harmless prompts (all but the instructed ones)."""
    return [c for c, spec in templates["categories"].items() if not spec["system"]]


def test_required_categories_exist_with_harmful_and_topic_matched_harmless(templates):
    assert REQUIRED <= set(safety_categories(templates))
    for c in safety_categories(templates):
        spec = templates["categories"][c]
        assert spec["harmful"]["templates"] and spec["harmless"]["templates"]


def yield_table(templates: dict) -> pd.DataFrame:
    """Per category and side: number of templates and of unique prompts they can yield."""
    rows = []
    sections = [
        (c, side, spec[side])
        for c, spec in templates["categories"].items()
        for side in ("harmful", "harmless")
        if side in spec
    ]
    for category, side, section in [*sections, (GENERAL, "harmless", templates["general"])]:
        rows.append(
            {
                "category": category,
                "side": side,
                "templates": len(section["templates"]),
                "unique_prompts": len(expand(section)),
            }
        )
    return pd.DataFrame(rows)


def test_every_category_yields_enough_unique_prompts_from_many_phrasings(templates):
    table = yield_table(templates).set_index(["category", "side"])
    for category in templates["categories"]:
        assert table.loc[(category, "harmful"), "unique_prompts"] >= 300
        assert table.loc[(category, "harmful"), "templates"] >= 15
    for category in safety_categories(templates):
        assert table.loc[(category, "harmless"), "unique_prompts"] >= 100
    assert table.loc[(GENERAL, "harmless"), "unique_prompts"] >= 600


def test_harmful_templates_vary_sentence_structure(templates):
    # many different openings, not one sentence with swapped nouns
    for category, spec in templates["categories"].items():
        openings = {" ".join(t.split()[:2]).lower() for t in spec["harmful"]["templates"]}
        assert len(openings) >= 12, category


MINOR_WORDS = re.compile(
    r"\b(child|children|kids?|minors?|underage|teens?|teenagers?|juveniles?|youths?|"
    r"school ?girls?|school ?boys?|high school|girls?|boys?|students?|pupils?|lolis?|"
    r"little|young|preteens?|babies|baby)\b",
    re.IGNORECASE,
)


def test_adult_content_never_mentions_minors(templates):
    spec = templates["categories"]["adult_content"]
    for side in ("harmful", "harmless"):
        texts = [*spec[side]["templates"], *(v for vs in spec[side]["slots"].values() for v in vs)]
        hits = [t for t in texts if MINOR_WORDS.search(t)]
        assert not hits, hits


# --- generate_prompts ------------------------------------------------------------------------


def test_harmful_counts_per_category_and_split(prompts, templates):
    harmful, _ = prompts
    counts = harmful.groupby(["category", "split"]).size()
    for category in templates["categories"]:
        assert counts[(category, "train")] == 100
        assert counts[(category, "eval")] == 50


def test_harmless_counts_and_mix_of_general_and_topic_matched(prompts, templates):
    _, harmless = prompts
    assert (harmless["split"] == "train").sum() == 400
    assert (harmless["split"] == "eval").sum() == 200
    per_category = harmless["category"].value_counts()
    assert per_category[GENERAL] == 300  # the half that is not topic-matched
    matched = [per_category[c] for c in safety_categories(templates)]
    assert sum(matched) == 300 and max(matched) - min(matched) <= 1
    # both splits hold every group; instructed categories have no harmless side
    for split in ("train", "eval"):
        assert set(harmless.loc[harmless["split"] == split, "category"]) == {*safety_categories(templates), GENERAL}


def test_a_tune_split_holds_the_optimizers_prompts_apart_from_train_and_eval(prompts):
    """data.tune_per_category / data.harmless_tune add a third split; none by default (the tables
    are then exactly those without the option)."""
    assert set(prompts[0].split) == set(prompts[1].split) == {"train", "eval"}
    harmful, harmless = generate_prompts(data_settings(tune_per_category=7, harmless_tune=20))
    counts = harmful.groupby(["category", "split"]).size()
    for category in harmful.category.unique():
        assert (counts[(category, "train")], counts[(category, "eval")], counts[(category, "tune")]) == (100, 50, 7)
    assert (harmless.split == "tune").sum() == 20 and (harmless.split == "eval").sum() == 200
    for frame in (harmful, harmless):
        by_split = {s: set(frame.loc[frame.split == s, "text"].map(normalize)) for s in ("train", "eval", "tune")}
        assert not (by_split["tune"] & by_split["train"]) and not (by_split["tune"] & by_split["eval"])
    with pytest.raises(ValueError, match="data.tune_per_category"):
        data_settings(tune_per_category=-1)


def test_texts_and_ids_are_unique_and_ids_are_stable_strings(prompts):
    for frame, kind in zip(prompts, ("harmful", "harmless"), strict=True):
        assert list(frame.columns) == COLUMNS
        assert frame["id"].is_unique
        assert frame["text"].map(normalize).is_unique
        assert all(
            re.fullmatch(rf"{kind}-{re.escape(c)}-\d{{4}}", i)
            for i, c in zip(frame["id"], frame["category"], strict=True)
        )


def test_no_text_in_both_train_and_eval(prompts):
    for frame in prompts:
        train = set(frame.loc[frame["split"] == "train", "text"].map(normalize))
        evals = set(frame.loc[frame["split"] == "eval", "text"].map(normalize))
        assert not train & evals


def test_no_text_in_both_harmful_and_harmless(prompts):
    harmful, harmless = prompts
    assert not set(harmful["text"].map(normalize)) & set(harmless["text"].map(normalize))


def test_same_seed_gives_identical_prompts(prompts):
    again = generate_prompts(data_settings())
    for a, b in zip(prompts, again, strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_different_seed_changes_sample_and_split(prompts):
    harmful, _ = prompts
    other, _ = generate_prompts(data_settings(seed=1))
    assert set(harmful["text"]) != set(other["text"])
    shared = set(harmful["text"]) & set(other["text"])
    split_a = harmful.set_index("text")["split"]
    split_b = other.set_index("text")["split"]
    assert any(split_a[t] != split_b[t] for t in shared)


def test_too_few_prompts_error_says_how_many_templates_yield(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", tiny_templates(harmful_values=3))
    with pytest.raises(DatasetError, match=r"'alpha' \(harmful\) yield only 6 unique prompts, but 7"):
        generate_prompts(
            DataSettings(
                templates=str(path),
                train_per_category=5,
                eval_per_category=2,
                harmless_train=4,
                harmless_eval=2,
                holdout="prompt",
            )
        )


# --- the template-level hold-out ------------------------------------------------------------


def template_patterns(section: dict) -> list[re.Pattern]:
    """One regex per template of a section: its text with each slot as the alternatives of its values
    (whitespace runs collapse, as expansion collapses them)."""
    out = []
    for template in section["templates"]:
        parts = re.split(r"\{(\w+)\}", template)
        rx = "".join(
            re.sub(r"(\\\s)+", r"\\s+", re.escape(p))
            if i % 2 == 0
            else "(" + "|".join(re.escape(" ".join(v.split())) for v in section["slots"][p]) + ")"
            for i, p in enumerate(parts)
        )
        out.append(re.compile(rf"^\s*{rx}\s*$", re.IGNORECASE))
    return out


def templates_of(texts, patterns: list[re.Pattern]) -> set[int]:
    found = set()
    for text in texts:
        matched = {i for i, p in enumerate(patterns) if p.match(text)}
        assert matched, f"no template makes {text!r}"
        found |= matched
    return found


def shared_templates(harmful: pd.DataFrame, templates: dict) -> dict[str, set[int]]:
    """Per category, the templates that make both an eval prompt and a train or tune prompt."""
    out = {}
    for category, spec in templates["categories"].items():
        patterns = template_patterns(spec["harmful"])
        rows = harmful[harmful.category == category]
        out[category] = templates_of(rows[rows.split == "eval"].text, patterns) & templates_of(
            rows[rows.split != "eval"].text, patterns
        )
    return out


def test_under_the_template_hold_out_no_eval_request_shares_a_template_with_train_or_tune(templates):
    held, _ = generate_prompts(data_settings(holdout="template", tune_per_category=16, harmless_tune=48))
    assert held.groupby(["category", "split"]).size().unstack().to_dict() == {
        "eval": dict.fromkeys(templates["categories"], 50),
        "train": dict.fromkeys(templates["categories"], 100),
        "tune": dict.fromkeys(templates["categories"], 16),
    }
    assert shared_templates(held, templates) == {c: set() for c in templates["categories"]}
    # the check sees what a prompt-level split does: eval prompts are fillings of the train templates
    mixed, _ = generate_prompts(data_settings(holdout="prompt", tune_per_category=16, harmless_tune=48))
    assert all(len(shared) >= 10 for shared in shared_templates(mixed, templates).values())


def test_the_template_hold_out_keeps_slot_values_apart_where_a_slot_has_enough():
    section = {
        "templates": [f"Template {i}: how do I {{verb}} a {{thing}}?" for i in range(10)],
        "slots": {"verb": ["build", "make"], "thing": [f"thing{i}" for i in range(9)]},
    }
    train, evals = holdout_sections(section, random.Random(0), n_eval=6, n_rest=20, where="t")
    assert set(train["templates"]).isdisjoint(evals["templates"]) and len(evals["templates"]) >= 1
    assert set(train["templates"]) | set(evals["templates"]) == set(section["templates"])
    assert len(evals["slots"]["thing"]) == 3 and set(evals["slots"]["thing"]).isdisjoint(train["slots"]["thing"])
    assert evals["slots"]["verb"] == train["slots"]["verb"] == ["build", "make"]  # two values: shared
    assert len(evals["templates"]) <= 4  # at most 40% of the templates are held out


def test_a_section_with_one_template_cannot_be_held_out_by_template(tmp_path):
    path = write_yaml(tmp_path / "t.yaml", tiny_templates(harmful_values=12))
    with pytest.raises(
        DatasetError,
        match=r"'alpha' \(harmless\): data.holdout=template needs at least 2 templates "
        r"per section .* or use data.holdout=prompt",
    ):
        generate_prompts(
            DataSettings(
                templates=str(path), train_per_category=6, eval_per_category=4, harmless_train=6, harmless_eval=4
            )
        )


# --- expand ----------------------------------------------------------------------------------


def test_expand_all_fillings_deduplicated_by_case_and_whitespace():
    section = {"templates": ["Bake a {x}.", "bake  a {x}.", "Hello."], "slots": {"x": ["cake", "Cake", "pie"]}}
    texts = expand(section)
    assert sorted(texts) == ["Bake a cake.", "Bake a pie.", "Hello."]


def test_expand_sample_is_deterministic_by_seed_and_respects_limit_and_exclude(templates):
    section = templates["general"]
    a = expand(section, random.Random(3), limit=50)
    assert a == expand(section, random.Random(3), limit=50)
    assert a != expand(section, random.Random(4), limit=50)
    assert len(a) == 50 == len(set(map(normalize, a)))
    b = expand(section, random.Random(3), limit=50, exclude=a[:10])
    assert not set(map(normalize, a[:10])) & set(map(normalize, b))


def test_expand_sample_spreads_over_templates(templates):
    section = templates["categories"]["violence_weapons"]["harmful"]
    sample = expand(section, random.Random(0), limit=len(section["templates"]))
    # round robin: the first n texts come from n different templates
    patterns = [re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) + "$") for t in section["templates"]]
    used = {next(i for i, p in enumerate(patterns) if p.match(text)) for text in sample}
    assert len(used) >= len(section["templates"]) - 2  # a filling may match a sibling template


# --- template validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("categories"), "missing top-level key 'categories'"),
        (lambda d: d.pop("general"), "missing top-level key 'general'"),
        (lambda d: d["categories"]["alpha"].pop("harmless"), "categories.alpha is missing 'harmless'"),
        (
            lambda d: d["categories"]["alpha"]["harmful"]["templates"].append("Make a {gadget}."),
            r"unknown slot '\{gadget\}'; known slots: thing, verb",
        ),
        (lambda d: d["general"]["templates"].append("Positional {}."), "invalid placeholder"),
        (lambda d: d["general"]["templates"].append("Unbalanced {y."), "malformed"),
        (lambda d: d["general"]["slots"].update(y=[]), "slot 'y' must be a non-empty list"),
        (lambda d: d["general"].update(templates=[]), "'templates' must be a non-empty list"),
        (lambda d: d["categories"].update({"Bad Name": d["categories"]["alpha"]}), "invalid category name"),
        (lambda d: d.update(extra=1), r"unknown top-level key\(s\) \['extra'\]"),
    ],
)
def test_malformed_templates_raise_error_naming_file_and_problem(tmp_path, mutate, message):
    data = tiny_templates()
    mutate(data)
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(DatasetError, match=message) as info:
        load_templates(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_and_missing_file_raise_dataset_error(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("categories: [unclosed\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.yaml: not valid YAML"):
        load_templates(bad)
    with pytest.raises(DatasetError, match="not found"):
        load_templates(tmp_path / "absent.yaml")
    assert issubclass(DatasetError, ValueError)


# --- user prompts ----------------------------------------------------------------------------

ROWS = [
    {"text": "First user prompt", "category": "violence_weapons", "split": "eval"},
    {"text": "Second user prompt", "category": "", "split": ""},
]


def write_prompt_file(path: Path) -> Path:
    frame = pd.DataFrame(ROWS)
    if path.suffix == ".txt":
        path.write_text("First user prompt\n\n  Second user prompt  \n", encoding="utf-8")
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    else:
        frame.rename(columns={"text": "prompt"}).to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl", ".parquet"])
def test_load_prompt_file_reads_each_format(tmp_path, suffix):
    frame = load_prompt_file(write_prompt_file(tmp_path / f"user{suffix}"), default_category="custom")
    assert list(frame.columns) == ["text", "category", "split", "system"]
    assert list(frame["text"]) == ["First user prompt", "Second user prompt"]
    if suffix == ".txt":
        assert list(frame["category"]) == ["custom", "custom"]
        assert frame["split"].isna().all()
    else:
        assert list(frame["category"]) == ["violence_weapons", "custom"]
        assert frame["split"].iloc[0] == "eval" and pd.isna(frame["split"].iloc[1])


def test_load_prompt_file_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"unsupported prompt file type '\.xlsx'"):
        load_prompt_file(tmp_path / "prompts.xlsx", "custom")
    no_column = tmp_path / "q.csv"
    pd.DataFrame({"question": ["hi"]}).to_csv(no_column, index=False)
    with pytest.raises(DatasetError, match=r"q.csv: no 'text' or 'prompt' column \(columns: question\)"):
        load_prompt_file(no_column, "custom")
    bad_split = tmp_path / "s.csv"
    pd.DataFrame({"text": ["hi"], "split": ["test"]}).to_csv(bad_split, index=False)
    with pytest.raises(DatasetError, match=r"invalid split value\(s\) \['test'\]"):
        load_prompt_file(bad_split, "custom")
    with pytest.raises(DatasetError, match="not found"):
        load_prompt_file(tmp_path / "absent.txt", "custom")


def test_user_prompts_are_appended_with_seeded_splits_and_without_repeats(tmp_path, prompts):
    generated_harmful, generated_harmless = prompts
    user = tmp_path / "extra.txt"
    lines = [f"My own harmful request number {i}" for i in range(30)]
    repeat = generated_harmless["text"].iloc[0]  # collides with a harmless prompt: dropped (a repeat within the
    user.write_text("\n".join([*lines, repeat]) + "\n", encoding="utf-8")  # file is an error: test_reliability)
    settings = data_settings(harmful_files=[str(user)])
    harmful, harmless = generate_prompts(settings)

    pd.testing.assert_frame_equal(harmful.iloc[: len(generated_harmful)], generated_harmful)
    pd.testing.assert_frame_equal(harmless, generated_harmless)
    added = harmful.iloc[len(generated_harmful) :]
    assert list(added["text"]) == lines
    assert set(added["category"]) == {"custom"}
    assert (added["split"] == "eval").sum() == 10  # 30 * 50 / (100 + 50)
    assert list(added["id"]) == [f"harmful-custom-{i:04d}" for i in range(30)]
    assert generate_prompts(settings)[0].equals(harmful)


# --- Hugging Face datasets -------------------------------------------------------------------


def test_hf_dataset_without_package_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetError, match="needs the optional package 'datasets'"):
        load_hf_dataset("org/prompts", "custom")


def test_hf_dataset_unreachable_hub_raises_clear_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DatasetError, match=r"could not load split 'train' of 'org/prompts'.*ConnectionError"):
        load_hf_dataset("org/prompts", "custom")


def test_hf_dataset_spec_selects_split_and_column(monkeypatch):
    calls = []

    class FakeDataset:
        def to_pandas(self) -> pd.DataFrame:
            return pd.DataFrame({"goal": ["Request one", "Request two"], "split": ["x", "y"]})

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    frame = load_hf_dataset("org/prompts:test:goal", "custom")
    assert calls == [("org/prompts", "test")]
    assert list(frame["text"]) == ["Request one", "Request two"]
    assert frame["split"].isna().all() and set(frame["category"]) == {"custom"}
    with pytest.raises(DatasetError, match="no column 'missing'"):
        load_hf_dataset("org/prompts:test:missing", "custom")
    with pytest.raises(DatasetError, match="expected 'id' or 'id:split:column'"):
        load_hf_dataset("org/prompts:test", "custom")


# --- writing ---------------------------------------------------------------------------------


def test_prompt_tables_are_written_atomically_with_their_schema(tmp_path, prompts):
    from clawly.data.prompts import write_prompt_table

    harmful, _ = prompts
    path = tmp_path / "out" / "harmful.parquet"
    write_prompt_table(harmful, path)
    schema = pq.read_schema(path)
    assert schema.names == COLUMNS
    assert all(pa.types.is_string(t) or pa.types.is_large_string(t) for t in schema.types)
    back = pd.read_parquet(path)
    assert all(pd.api.types.is_string_dtype(back[c]) for c in COLUMNS)
    assert back["text"].tolist() == harmful["text"].tolist()
    assert [p.name for p in path.parent.iterdir()] == ["harmful.parquet"]


# --- instructed categories (refusals a system prompt asks for) ------------------------------


def test_the_shipped_instructed_category_loads_with_its_system_prompts(prompts, templates):
    spec = templates["categories"]["instructed_refusal"]
    assert len(spec["system"]) == 3 and "harmless" not in spec
    harmful, harmless = prompts
    rows = harmful[harmful.category == "instructed_refusal"]
    assert rows.split.value_counts().to_dict() == {"train": 100, "eval": 50}
    # every row carries one of the category's system prompts, and each of them is used
    assert set(rows.system) == set(spec["system"])
    assert (harmful.loc[harmful.category != "instructed_refusal", "system"] == "").all()
    assert "instructed_refusal" not in set(harmless.category)
    # each system prompt forbids the requests' topics and scripts the refusal
    for system in spec["system"]:
        assert "medical" in system and "I'm sorry, but I can't help with that." in system


def test_an_instructed_category_leaves_the_other_categories_prompts_unchanged(tmp_path):
    data = tiny_templates(harmful_values=12)
    before = generate_prompts(
        data_settings(
            templates=str(write_yaml(tmp_path / "a.yaml", data)),
            train_per_category=6,
            eval_per_category=4,
            harmless_train=6,
            harmless_eval=4,
            holdout="prompt",
        )
    )
    data["categories"]["told"] = {
        "system": ["Only talk about trains.", "Only talk about boats."],
        "harmful": {"templates": ["What is the best {q}?"], "slots": {"q": [f"stock{i}" for i in range(20)]}},
    }
    after = generate_prompts(
        data_settings(
            templates=str(write_yaml(tmp_path / "b.yaml", data)),
            train_per_category=6,
            eval_per_category=4,
            harmless_train=6,
            harmless_eval=4,
            holdout="prompt",
        )
    )
    pd.testing.assert_frame_equal(after[0][after[0].category != "told"].reset_index(drop=True), before[0])
    pd.testing.assert_frame_equal(after[1], before[1])
    told = after[0][after[0].category == "told"]
    assert len(told) == 10 and set(told.system) <= {"Only talk about trains.", "Only talk about boats."}
    assert len(set(told.system)) == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"system": "", "harmful": {"templates": ["x?"]}}, "system: expected a non-empty string"),
        ({"system": ["ok", 3], "harmful": {"templates": ["x?"]}}, "system: expected a non-empty string"),
        (
            {"system": "Only trains.", "harmful": {"templates": ["x?"]}, "harmless": {"templates": ["y?"]}},
            "remove its 'harmless' section",
        ),
        ({"harmful": {"templates": ["x?"]}}, "categories.told is missing 'harmless'"),
    ],
)
def test_instructed_category_errors_name_the_problem(tmp_path, spec, message):
    data = tiny_templates()
    data["categories"]["told"] = spec
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_templates(write_yaml(tmp_path / "t.yaml", data))


def test_a_user_prompt_file_may_give_each_row_its_own_system_prompt(tmp_path):
    path = tmp_path / "told.csv"
    pd.DataFrame(
        {
            "text": ["Which stock should I buy?", "Is gold safe?"],
            "category": ["told", "told"],
            "system": ["Only talk about trains.", ""],
        }
    ).to_csv(path, index=False)
    harmful, _ = generate_prompts(data_settings(harmful_files=[str(path)]))
    rows = harmful[harmful.category == "told"].set_index("text")
    assert rows.loc["Which stock should I buy?", "system"] == "Only talk about trains."
    assert rows.loc["Is gold safe?", "system"] == ""
