"""Prompt tables (generate-datasets -> probe-activations, optimize, export-lora, evaluate).

`data/prompts/harmful.parquet` and `harmless.parquet`: one row per prompt, columns id, text,
category, split (all strings; split is "train", "eval" or "tune": the optimizer's, when there is one).
"""

from __future__ import annotations

import pandas as pd

from clawly.errors import require
from clawly.io import atomic_path
from clawly.paths import Paths

COLUMNS = ["id", "text", "category", "split"]
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
    require(paths.harmful_prompts, "generate-datasets")
    require(paths.harmless_prompts, "generate-datasets")
    return pd.read_parquet(paths.harmful_prompts), pd.read_parquet(paths.harmless_prompts)
