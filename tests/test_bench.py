"""The benchmarks' own machinery (bench/): what makes runs of different code comparable."""

from __future__ import annotations

import pandas as pd

from bench.heretic_vs_clawly import fixed_prompt_tables
from clawly.log import get_logger
from clawly.paths import Paths
from clawly.settings import Settings
from clawly.steps import generate_datasets


def test_the_side_by_side_benchmark_scores_its_committed_prompts_whatever_the_templates_make(tmp_path):
    """The first run keeps the tables it generated; a later run whose templates would make other
    prompts (here: another seed) still scores the kept ones, until it asks for new ones."""
    tables = tmp_path / "committed"

    def workspace(name: str, seed: int):
        s = Settings.from_dict(
            {"artifacts_dir": str(tmp_path / name / "a"), "data": {"out_dir": str(tmp_path / name / "p"), "seed": seed}}
        )
        return Paths.of(s), lambda: generate_datasets.run(s, get_logger("bench-test", quiet=True))

    first, make_first = workspace("first", seed=1)
    assert fixed_prompt_tables(tables, first, make_first) is True
    kept = pd.read_parquet(tables / "harmful.parquet")
    pd.testing.assert_frame_equal(kept, pd.read_parquet(first.harmful_prompts))

    later, make_later = workspace("later", seed=2)
    assert fixed_prompt_tables(tables, later, make_later) is False
    pd.testing.assert_frame_equal(pd.read_parquet(later.harmful_prompts), kept)
    pd.testing.assert_frame_equal(pd.read_parquet(later.harmless_prompts), pd.read_parquet(tables / "harmless.parquet"))

    fresh, make_fresh = workspace("fresh", seed=2)
    assert fixed_prompt_tables(tables, fresh, make_fresh, regenerate=True) is True
    renewed = pd.read_parquet(tables / "harmful.parquet")
    assert set(renewed.text) != set(kept.text)  # seed 2's own prompts, now the committed ones
    pd.testing.assert_frame_equal(renewed, pd.read_parquet(fresh.harmful_prompts))
