"""generate-datasets: the harmful and harmless prompt tables, from the templates and your own prompts."""

from __future__ import annotations

import pandas as pd

from clawly.data.prompts import write_prompts
from clawly.data.templates import generate_prompts
from clawly.log import StageLogger
from clawly.paths import Paths
from clawly.settings import Settings


def run(settings: Settings, log: StageLogger) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Expand clawly/data/templates.yaml (and data.harmful_files etc.) into prompt tables and write them."""
    harmful, harmless = generate_prompts(settings.data)
    write_prompts(Paths.of(settings), harmful, harmless)
    for name, df in (("harmful", harmful), ("harmless", harmless)):
        counts = df.groupby(["category", "split"]).size().unstack(fill_value=0)
        log.event(
            "prompts",
            f"{name}: {len(df)} prompts\n{counts.to_string()}",
            set=name,
            total=len(df),
            by_category=counts.to_dict(orient="index"),
        )
    return harmful, harmless
