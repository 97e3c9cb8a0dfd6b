"""The documentation: the site builds in strict mode, its settings reference is the settings' own, and
every command the README's quick start shows exists with the options it shows.

The site is built once per module (about two seconds): a broken internal link, a page missing from the
navigation or an anchor that no longer exists fails the build (mkdocs.yml's `validation:` block with
`strict: true`), and the generated settings page must hold every section and key with the default
`clawly.settings` has now, so a broken hook or a stale page fails here.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from clawly.settings import SECTIONS, Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out


def test_the_site_builds_in_strict_mode(site):
    assert (site / "index.html").is_file()
    assert (site / "architecture" / "index.html").is_file()


def _shown(value) -> str:
    """A default as the settings page shows it (YAML scalars)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_the_settings_reference_holds_every_key_with_its_current_default(site):
    page = (site / "reference" / "settings" / "index.html").read_text(encoding="utf-8")
    defaults = Settings()
    for section, cls in SECTIONS.items():
        assert f'<h2 id="{section}">' in page, f"no section {section} on the settings page"
        for f in dataclasses.fields(cls):
            assert f"<code>{section}.{f.name}</code>" in page, f"{section}.{f.name} missing from the settings page"
    for key in (
        "optimize.n_trials",
        "optimize.kl_cap",
        "model.name",
        "data.holdout",
        "edit.method",
        "distill.steps",
        "categories.min_retention",
        "model.system_prompt",
    ):
        section, name = key.split(".")
        value = html.escape(_shown(getattr(getattr(defaults, section), name)), quote=False)
        assert re.search(rf"<code>{re.escape(key)}</code></td>\s*<td><code>{re.escape(value)}</code></td>", page), (
            f"{key}: the settings page does not show the default {value!r}"
        )


# ---------------------------------------------------------------- the README's commands


def _section(text: str, title: str) -> str:
    """The README's section under `## title`, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[list[str]]:
    """Command lines of a shell block (continuations joined, comments dropped, `&&` chains split)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            tokens = shlex.split(part, comments=True)
            if tokens:
                out.append(tokens)
    return out


def quick_start_commands() -> list[list[str]]:
    """The set-up block at the top of the README and every shell block of its quick start."""
    text = README.read_text(encoding="utf-8")
    top = _code_blocks(text.split("\n## ", 1)[0], "bash")
    blocks = top + _code_blocks(_section(text, "Quick start"), "bash")
    return [c for block in blocks for c in _commands(block)]


def _options(script: str) -> set[str]:
    """The options `<script> --help` lists, run through the console entry point pyproject.toml declares
    for it: only the option lines count, not the usage line or the examples of the epilog."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][script]
    module, function = entry.split(":")
    code = f"import sys; sys.argv[0] = {script!r}; from {module} import {function}; sys.exit({function}())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-c", code, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (re.match(r"^ {2}(-\S.*?)(?: {2,}|$)", line) for line in proc.stdout.splitlines())
    return {o for m in lines if m for o in re.findall(r"--[\w.-]+", m.group(1))}


def test_the_quick_start_shows_each_door():
    programs = {c[0] for c in quick_start_commands()}
    assert {"dvc", "clawly", "clawly-web", "pytest"} <= programs, programs
    assert any(c[:2] == ["dvc", "repro"] for c in quick_start_commands())


@pytest.mark.parametrize("script", ["clawly", "clawly-web"])
def test_every_option_the_quick_start_shows_exists(script):
    commands = [c for c in quick_start_commands() if c[0] == script]
    assert commands, f"the README's quick start shows no {script} command"
    listed = _options(script)
    assert "--help" in listed and "--output" in listed, listed  # the help was read
    for command in commands:
        for option in (t.split("=", 1)[0] for t in command[1:] if t.startswith("--")):
            assert option in listed, (
                f"README: `{' '.join(command)}` uses {option}, which `{script} --help` does not list"
            )


def _stages() -> set[str]:
    return set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def _preset_exists(name: str) -> bool:
    return any((ROOT / conf / "preset" / f"{name}.yaml").is_file() for conf in ("clawly/conf",))


def _group_exists(group: str, option: str) -> bool:
    return any((ROOT / conf / group / f"{option}.yaml").is_file() for conf in ("clawly/conf",))


def test_every_dvc_command_of_the_quick_start_names_real_stages_and_settings():
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    stages = _stages()
    for command in (c for c in quick_start_commands() if c[0] == "dvc"):
        if command[1] == "repro":
            targets = [t for t in command[2:] if not t.startswith("-")]
            assert set(targets) <= stages, f"README: `{' '.join(command)}` names no stage of dvc.yaml"
        overrides = [command[i + 1] for i, t in enumerate(command[:-1]) if t in ("-S", "--set-param")]
        for override in overrides:
            key, value = override.split("=", 1)
            if key == "+preset":
                assert _preset_exists(value), f"README: no preset {value!r}"
            elif "." in key:
                assert key in fields, f"README: `{override}` sets no setting"
            else:
                assert _group_exists(key, value), f"README: no config group option {key}={value}"


def test_the_quick_start_python_calls_what_the_api_has():
    from clawly import Pipeline, TrialOutcome  # deferred: the engine (torch) loads for this test only

    text = _section(README.read_text(encoding="utf-8"), "Quick start")
    fields = {f.name for f in dataclasses.fields(TrialOutcome)}
    for block in _code_blocks(text, "python"):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Settings":
                Settings(**{k.arg: ast.literal_eval(k.value) for k in node.keywords})  # validates every key
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id == "pipe":
                    assert hasattr(Pipeline, node.attr), f"README: Pipeline has no {node.attr}"
                if node.value.id == "trial":
                    assert node.attr in fields, f"README: a trial has no {node.attr}"


# ---------------------------------------------------------------- the README's links


def _readme_links() -> list[str]:
    text = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_every_link_of_the_readme_reaches_a_file_and_its_anchor(site):
    """Relative links must name files of the repository; an anchor into a documentation page must be a
    heading of that page in the built site."""
    for link in _readme_links():
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor and path.startswith("docs/") and path.endswith(".md"):
            page = site / Path(path).relative_to("docs").with_suffix("") / "index.html"
            if page.name == "index.html" and Path(path).stem == "index":
                page = site / Path(path).relative_to("docs").parent / "index.html"
            assert f'id="{anchor}"' in page.read_text(encoding="utf-8"), (
                f"README links to {link}, but that page has no heading #{anchor}"
            )
