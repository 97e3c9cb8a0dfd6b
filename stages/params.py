"""Write clawly/conf/settings.yaml and config.default.toml from clawly/settings.py, then params.yaml from
clawly/conf/ exactly as DVC's Hydra composition does (for plain `dvc repro`).

    python -m stages.params                      # compose clawly/conf/config.yaml
    python -m stages.params optimize=full        # with overrides

`clawly/conf/settings.yaml` holds every setting's default and help text, generated from the typed
settings (the one source of defaults); the other files in clawly/conf/ hold only what the DVC demo
changes on purpose, each with a comment saying why. Tests fail when either file is stale.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clawly.settings import SECTIONS, Settings
from clawly.settings_docs import HELP
from clawly.settings_docs import SECTIONS as SECTION_DOCS

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_YAML = ROOT / "clawly" / "conf" / "settings.yaml"


def _value(value) -> str:
    return (
        "null"
        if value is None
        else yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    )


def settings_reference() -> Iterator[tuple[str, str, list[tuple[str, Any, str]]]]:
    """Every section of `Settings()` in order, with its help and, per key, (name, default, help): what
    conf/settings.yaml, config.default.toml and the documentation's configuration reference
    (docs/hooks/settings_reference.py) are all written from."""
    defaults = Settings()
    for section, cls in SECTIONS.items():
        values = getattr(defaults, section)
        yield (
            section,
            SECTION_DOCS[section],
            [(f.name, getattr(values, f.name), HELP[f"{section}.{f.name}"]) for f in dataclasses.fields(cls)],
        )


def settings_yaml() -> str:
    """clawly/conf/settings.yaml: every section and key of `Settings()` with its help text as a comment."""
    defaults = Settings()
    lines = [
        "# @package _global_",
        "# Every setting's default and help, generated from clawly/settings.py by `python -m stages.params`.",
        "# Do not edit: change a default in clawly/settings.py, or override it for the DVC demo in",
        "# config.yaml or a group file, with a comment saying why.",
        "",
        f"artifacts_dir: {_value(defaults.artifacts_dir)}",
    ]
    for section, section_help, keys in settings_reference():
        lines += ["", f"{section}:  # {section_help}"]
        for name, value, help_text in keys:
            lines += [f"  # {line}" for line in textwrap.wrap(help_text, 100)]
            lines.append(f"  {name}: {_value(value)}")
    return "\n".join(lines) + "\n"


CONFIG_DEFAULT_TOML = ROOT / "config.default.toml"


def _toml(value) -> str:
    """A settings value as TOML (no null in TOML: callers comment those keys out)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def config_default_toml() -> str:
    """config.default.toml: every key of `Settings()` by section, with its help; keys whose default
    is null are commented out (TOML has no null)."""
    lines = [
        "# Every clawly setting, its default and its help, generated from clawly/settings.py by",
        "# `python -m stages.params` (a test fails when it is stale). Copy it to config.toml: `clawly` and",
        "# `clawly-web` read config.toml from the working directory (`--config FILE` reads another).",
        "# Keep only what you change. Keys may also be given flat at the top where the name is in one",
        "# section only (n_trials = 50, orthogonalize_categories = true).",
        "",
        "# a category preset, as --category-preset NAME (clawly/conf/preset/NAME.yaml or a YAML file)",
        '# category_preset = "default"',
    ]
    for section, section_help, keys in settings_reference():
        lines += ["", f"[{section}]", *(f"# {line}" for line in textwrap.wrap(section_help, 100))]
        for name, value, help_text in keys:
            lines += [f"# {line}" for line in textwrap.wrap(help_text, 100)]
            lines.append(f"# {name} = (null by default)" if value is None else f"{name} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def composed_params(overrides: list[str] | None = None, config_dir: Path = ROOT / "clawly" / "conf") -> str:
    """The YAML text DVC writes to params.yaml for these overrides."""
    with initialize_config_dir(str(config_dir.resolve()), version_base=None):
        cfg = compose(config_name="config", overrides=overrides or [])
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


if __name__ == "__main__":
    SETTINGS_YAML.write_text(settings_yaml(), encoding="utf-8")
    CONFIG_DEFAULT_TOML.write_text(config_default_toml(), encoding="utf-8")
    (ROOT / "params.yaml").write_text(composed_params(sys.argv[1:]), encoding="utf-8")
    print(f"wrote {SETTINGS_YAML}, {CONFIG_DEFAULT_TOML} and {ROOT / 'params.yaml'}")
