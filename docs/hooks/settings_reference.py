"""MkDocs hook: the configuration reference, rendered at build time from the typed settings.

The page `reference/settings.md` holds only prose and a marker; this hook replaces the marker with one
table per settings section. Defaults come from `clawly/settings.py` and help texts from
`clawly/settings_docs.py`, through `stages.params.settings_reference` (the walk that also writes
conf/settings.yaml and config.default.toml), and the `clawly` options from the CLI's own parser, so
the documentation never holds a second copy of a default or of an option name.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # mkdocs imports hooks by file path; the project's packages sit at the root
    sys.path.insert(0, str(ROOT))

from clawly.cli import KEY, build_parser  # noqa: E402
from clawly.settings import Settings  # noqa: E402
from stages.params import _value, settings_reference  # noqa: E402

MARKER = "<!-- settings-reference -->"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped, and `<`, `>`, `&` as text outside code
    spans (inside them Markdown shows them as they are)."""
    parts = " ".join(text.split()).split("`")
    parts[::2] = [html.escape(part, quote=False) for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def _code(text: str) -> str:
    """A code span whatever backticks the text holds."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def cli_flags() -> dict[str, list[str]]:
    """Dotted key -> the `clawly` options that set it (bool keys: the `--no-...` forms left out)."""
    flags: dict[str, list[str]] = {}
    for action in build_parser()._actions:
        if action.dest.startswith(KEY):
            flags[action.dest[len(KEY) :]] = [o for o in action.option_strings if not o.startswith("--no-")]
    return flags


def reference_markdown() -> str:
    """Every section and key: its default, its `clawly` options and its help, as Markdown."""
    flags = cli_flags()
    lines = [
        "## Top level",
        "",
        "| key | default | `clawly` option | what it sets |",
        "| --- | --- | --- | --- |",
        f"| {_code('artifacts_dir')} | {_code(_value(Settings().artifacts_dir))} | "
        f"{', '.join(_code(f) for f in flags.get('artifacts_dir', []))} | "
        "where the stages write their work files (the CLI and the web UI: OUTPUT/work) |",
        "",
    ]
    for section, section_help, keys in settings_reference():
        lines += [
            f"## {section}",
            "",
            _cell(section_help),
            "",
            "| key | default | `clawly` option | what it sets |",
            "| --- | --- | --- | --- |",
        ]
        for name, value, help_text in keys:
            key = f"{section}.{name}"
            options = ", ".join(_code(f) for f in flags.get(key, []))
            lines.append(f"| {_code(key)} | {_code(_value(value))} | {options} | {_cell(help_text)} |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference_markdown())
