from pathlib import Path

import pytest
import yaml

from clawly.settings import OptimizeSettings, Settings, SettingsError
from stages.params import composed_params

ROOT = Path(__file__).resolve().parent.parent


def test_committed_params_yaml_equals_composition_of_conf():
    assert (ROOT / "params.yaml").read_text() == composed_params(), (
        "params.yaml is stale: run `python -m stages.params` after editing conf/")


@pytest.mark.parametrize("overrides", [[], ["optimize=full"], ["model=hub"],
                                       ["optimize.n_trials=5", "probe.position=marker"]])
def test_every_config_composes_into_valid_settings(overrides):
    settings = Settings.from_dict(yaml.safe_load(composed_params(overrides)))
    if "optimize=full" in overrides:
        assert settings.optimize.n_trials == 200 and settings.optimize.kl_cap == 0.5  # inherits demo
    if "optimize.n_trials=5" in overrides:
        assert settings.optimize.n_trials == 5 and settings.probe.position == "marker"
    if "model=hub" in overrides:
        assert "/" in settings.model.name and settings.model.trust_remote_code is False


def test_config_defaults_match_settings_defaults_where_not_overridden():
    composed = yaml.safe_load(composed_params())
    assert set(composed) == set(Settings().to_dict())
    for section, values in composed.items():
        if isinstance(values, dict):
            assert set(values) == set(Settings().to_dict()[section]), section


def test_invalid_values_name_key_value_and_what_is_allowed():
    with pytest.raises(SettingsError, match=r"optimize\.n_trials=0.*>= 1"):
        OptimizeSettings(n_trials=0)
    with pytest.raises(SettingsError, match=r"directions\.contrast='topical'.*general, topic_matched or mixed"):
        Settings.from_dict({"directions": {"contrast": "topical"}})
    with pytest.raises(SettingsError, match=r"unknown setting\(s\) optimize\.n_trail"):
        Settings.from_dict({"optimize": {"n_trail": 3}})
    with pytest.raises(SettingsError, match="unknown config section"):
        Settings.from_dict({"optimise": {}})
    with pytest.raises(SettingsError, match=r"merge\.max_shard_size"):
        Settings.from_dict({"merge": {"max_shard_size": "huge"}})


@pytest.mark.parametrize("preset", ["default", "full", "keep_self_harm_and_hate"])
def test_presets_compose_into_category_settings(preset):
    settings = Settings.from_dict(yaml.safe_load(composed_params([f"+preset={preset}"])))
    c = settings.categories
    assert c.enabled and c.targeted
    if preset == "default":
        assert c.targeted == ["violence_weapons", "drugs_substances", "adult_content"]
        assert c.kept == ["self_harm_suicide"]
    if preset == "full":
        assert c.kept == [] and len(c.targeted) == 8
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
    ok = Settings.from_dict({"optimize": {"kl_cap": 1, "peak_weight_range": [1, 1.5]},
                             "probe": {"max_per_category": None}})
    assert ok.optimize.kl_cap == 1 and ok.probe.max_per_category is None
