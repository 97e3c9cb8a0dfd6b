"""Prompt tables (generate-datasets -> probe-activations, optimize, export-lora, evaluate).

`data/prompts/harmful.parquet` and `harmless.parquet`: one row per prompt, columns id, text,
category, split, system (all strings; split is "train", "eval" or "tune": the optimizer's, when there
is one; system is the row's own system prompt, empty for the run's `model.system_prompt`).

A category whose rows carry their own system prompt is an *instructed* one: harmless requests that
the system prompt forbids (a support bot told not to give medical advice, asked for it). Its
refusals are the operator's, not the model's safety training: global mode never targets them (they
are reported), category mode protects them like any kept category when the preset lists them at 0.
"""

from __future__ import annotations

import pandas as pd

from clawly.errors import reading
from clawly.io import atomic_path
from clawly.paths import Paths

COLUMNS = ["id", "text", "category", "split", "system"]
GENERAL = "general"  # category of harmless prompts unrelated to any harm category


def write_prompt_table(frame: pd.DataFrame, path) -> None:
    """One prompt table as Parquet (no index), written atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_prompts(paths: Paths, harmful: pd.DataFrame, harmless: pd.DataFrame) -> None:
    write_prompt_table(harmful, paths.harmful_prompts)
    write_prompt_table(harmless, paths.harmless_prompts)


def read_prompts(paths: Paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(harmful, harmless) prompt tables."""
    return read_prompt_table(paths.harmful_prompts), read_prompt_table(paths.harmless_prompts)


def read_prompt_table(path) -> pd.DataFrame:
    with reading(path, "generate-datasets"):
        frame = _with_system(pd.read_parquet(path))
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise KeyError(f"no column(s) {', '.join(missing)}")
    return frame


def _with_system(frame: pd.DataFrame) -> pd.DataFrame:
    """Tables written before the system column read as rows without their own system prompt."""
    return frame if "system" in frame.columns else frame.assign(system="")


def row_systems(frame: pd.DataFrame, default: str | None) -> list[str | None]:
    """Each row's system prompt: its own, else `default` (the run's model.system_prompt)."""
    own = frame["system"].tolist() if "system" in frame.columns else [""] * len(frame)
    return [s if s else default for s in own]


def instructed_categories(harmful: pd.DataFrame) -> set[str]:
    """Categories whose rows carry their own system prompt (see the module docstring)."""
    if "system" not in harmful.columns:
        return set()
    return set(harmful.category[harmful.system.astype(bool)])
