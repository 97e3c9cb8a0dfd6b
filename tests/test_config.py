import dataclasses
from pathlib import Path

import pytest
import yaml

from clawly.settings import SECTIONS, OptimizeSettings, Settings, SettingsError
from stages.params import composed_params

ROOT = Path(__file__).resolve().parent.parent


def test_committed_params_yaml_equals_composition_of_conf():
    assert (ROOT / "params.yaml").read_text() == composed_params(), (
        "params.yaml is stale: run `python -m stages.params` after editing clawly/conf/"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optimize=full"],
        ["optimize=fast"],
        ["optimize=fast", "+preset=least_squares"],
        ["model=hub"],
        ["optimize.n_trials=5", "probe.position=marker"],
    ],
)
def test_every_config_composes_into_valid_settings(overrides):
    settings = Settings.from_dict(yaml.safe_load(composed_params(overrides)))
    if "optimize=full" in overrides:
        assert settings.optimize.n_trials == 200 and settings.optimize.kl_cap == 0.5  # inherits demo
    if "optimize=fast" in overrides:  # the benchmark's quickest settings, on top of the demo's
        o = settings.optimize
        assert (o.harmful_choice, o.harmful_prompts, o.harmful_pool, o.max_new_tokens) == ("base_refusals", 34, 136, 8)
        assert o.n_trials == 24 and o.harmless_prompts == 100
    if "+preset=least_squares" in overrides:  # the benchmark's clawly-lsq: the edit keeps harmless writes
        e = settings.edit
        assert (e.method, e.harmless_prompts, e.targeted_prompts) == ("least_squares", 64, 8)
        assert settings.categories.weights == {} and settings.edit.conditional  # global mode, inputs probed
    if "optimize.n_trials=5" in overrides:
        assert settings.optimize.n_trials == 5 and settings.probe.position == "marker"
    if "model=hub" in overrides:
        assert "/" in settings.model.name and settings.model.trust_remote_code is False


def test_config_default_toml_lists_every_key_and_loads_to_the_defaults():
    import tomllib

    from clawly.cli import config_keys
    from stages.params import CONFIG_DEFAULT_TOML, config_default_toml

    assert CONFIG_DEFAULT_TOML.read_text() == config_default_toml(), (
        "config.default.toml is stale: run `python -m stages.params` after changing clawly/settings.py"
    )
    values = config_keys(tomllib.loads(CONFIG_DEFAULT_TOML.read_text()))
    assert Settings(**values) == Settings()
    nulls = {
        f"{s}.{f.name}"
        for s, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if getattr(getattr(Settings(), s), f.name) is None
    }
    every = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(values) == every - nulls  # every key; the null ones commented out (TOML has no null)
    assert all(f"# {k.split('.')[1]} = (null by default)" in CONFIG_DEFAULT_TOML.read_text() for k in nulls)


def test_conf_settings_yaml_is_generated_from_the_typed_settings():
    from stages.params import SETTINGS_YAML, settings_yaml

    assert SETTINGS_YAML.read_text() == settings_yaml(), (
        "clawly/conf/settings.yaml is stale: run `python -m stages.params` after changing clawly/settings.py"
    )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "weights":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# the group files the default composition selects (clawly/conf/config.yaml's defaults list), by section
DEFAULT_GROUPS = {
    "model": "clawly/conf/model/default.yaml",
    "data": "clawly/conf/data/default.yaml",
    "optimize": "clawly/conf/optimize/demo.yaml",
}


def _demo_overrides() -> dict[str, str]:
    """Every key the default composition sets on top of clawly/conf/settings.yaml -> its line in clawly/conf/."""
    out = {}
    files = [("", ROOT / "clawly" / "conf" / "config.yaml")] + [
        (f"{sec}.", ROOT / f) for sec, f in DEFAULT_GROUPS.items()
    ]
    for prefix, path in files:
        data = yaml.safe_load(path.read_text()) or {}
        data = {k: v for k, v in data.items() if k not in ("defaults", "hydra")}
        lines = path.read_text().splitlines()
        for key in _flat(data, prefix):
            name = key.rsplit(".", 1)[-1]
            out[key] = next(line for line in lines if line.strip().startswith(f"{name}:"))
    return out


def test_a_default_dvc_run_differs_from_a_default_cli_or_api_run_only_by_commented_demo_overrides():
    """The typed settings are the one source of defaults; clawly/conf/ changes only what the demo needs,
    each change commented with why. A difference that is not such an override fails, by name."""
    typed = _flat(Settings().to_dict())
    composed = _flat(yaml.safe_load(composed_params()))
    assert set(composed) == set(typed)
    differences = {k: (typed[k], composed[k]) for k in typed if typed[k] != composed[k]}
    overrides = _demo_overrides()
    undeclared = {k: v for k, v in differences.items() if k not in overrides}
    redundant = sorted(set(overrides) - set(differences))
    assert not undeclared, "default DVC run differs from the CLI/API default (settings, params.yaml): " + ", ".join(
        f"{k}: {a!r} vs {b!r}" for k, (a, b) in undeclared.items()
    )
    assert not redundant, f"clawly/conf/ repeats defaults of clawly/settings.py: {redundant}"
    uncommented = [line for line in overrides.values() if "#" not in line]
    assert not uncommented, f"say why in a comment: {uncommented}"
    assert sorted(differences) == ["evaluate.max_new_tokens", "optimize.n_trials", "probe.max_per_category"]


def test_invalid_values_name_key_value_and_what_is_allowed():
    with pytest.raises(SettingsError, match=r"optimize\.n_trials=0.*>= 1"):
        OptimizeSettings(n_trials=0)
    with pytest.raises(SettingsError, match=r"directions\.contrast='topical'.*general, topic_matched or mixed"):
        Settings.from_dict({"directions": {"contrast": "topical"}})
    with pytest.raises(SettingsError, match=r"unknown setting optimize\.n_trail \(did you mean optimize\.n_trials\?\)"):
        Settings.from_dict({"optimize": {"n_trail": 3}})
    with pytest.raises(SettingsError, match="unknown config section"):
        Settings.from_dict({"optimise": {}})
    with pytest.raises(SettingsError, match=r"merge\.max_shard_size"):
        Settings.from_dict({"merge": {"max_shard_size": "huge"}})


@pytest.mark.parametrize("preset", ["default", "full", "keep_self_harm_and_hate", "keep_instructed"])
def test_presets_compose_into_category_settings(preset):
    settings = Settings.from_dict(yaml.safe_load(composed_params([f"+preset={preset}"])))
    c = settings.categories
    assert c.enabled and c.targeted
    if preset == "default":
        assert c.targeted == ["violence_weapons", "drugs_substances", "adult_content"]
        assert c.kept == ["self_harm_suicide"]
    if preset == "full":
        assert c.kept == [] and len(c.targeted) == 8
    if preset == "keep_instructed":
        assert c.kept == ["self_harm_suicide", "instructed_refusal"]
    if preset in ("default", "keep_instructed"):  # the method measured closest to the selectivity target
        assert settings.directions.method == "rdo" and settings.data.tune_per_category == 16
    assert not Settings.from_dict(yaml.safe_load(composed_params())).categories.enabled  # no preset: global


def test_category_weights_are_validated():
    with pytest.raises(SettingsError, match=r"categories\.weights\.drugs_substances=1\.5"):
        Settings.from_dict({"categories": {"weights": {"drugs_substances": 1.5}}})
    with pytest.raises(SettingsError, match="at least one category with weight > 0"):
        Settings.from_dict({"categories": {"weights": {"self_harm_suicide": 0.0}}})


def test_wrong_types_are_one_clear_error_not_a_crash():
    with pytest.raises(SettingsError, match=r"optimize\.n_trials='abc'.*an integer"):
        Settings.from_dict({"optimize": {"n_trials": "abc"}})
    with pytest.raises(SettingsError, match=r"probe\.max_per_category=2\.5.*an integer or null"):
        Settings.from_dict({"probe": {"max_per_category": 2.5}})
    with pytest.raises(SettingsError, match=r"optimize\.components=\[1\].*a list of strings"):
        Settings.from_dict({"optimize": {"components": [1]}})
    with pytest.raises(SettingsError, match=r"categories\.weights=.*a mapping"):
        Settings.from_dict({"categories": {"weights": {"violence_weapons": "lots"}}})
    with pytest.raises(SettingsError, match=r"model\.trust_remote_code='yes'.*true or false"):
        Settings.from_dict({"model": {"trust_remote_code": "yes"}})
    ok = Settings.from_dict(
        {"optimize": {"kl_cap": 1, "peak_weight_range": [1, 1.5]}, "probe": {"max_per_category": None}}
    )
    assert ok.optimize.kl_cap == 1 and ok.probe.max_per_category is None


def test_every_setting_and_section_has_its_help_text_and_no_other():
    import dataclasses

    from clawly.settings import SECTIONS
    from clawly.settings_docs import HELP
    from clawly.settings_docs import SECTIONS as SECTION_DOCS

    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(HELP) == keys and set(SECTION_DOCS) == set(SECTIONS)
    assert all(len(text) > 10 for text in [*HELP.values(), *SECTION_DOCS.values()])
