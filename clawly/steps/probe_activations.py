"""probe-activations: the residual stream at the probe position of every train prompt, every probe point."""

from __future__ import annotations

import time

import pandas as pd
import torch

from clawly.ablate.activations import (
    ActivationWriter,
    ResidualMeans,
    RunningMean,
    generation_marker,
    instruction_suffix,
    probe_residuals,
    write_means,
)
from clawly.data.prompts import read_prompts, row_systems
from clawly.errors import ClawlyError
from clawly.io import atomic_path
from clawly.log import StageLogger
from clawly.measure.templating import chat_prompts
from clawly.model.architecture import hidden_size, num_layers
from clawly.model.loading import load_model
from clawly.paths import Paths
from clawly.settings import Settings


def capped(df: pd.DataFrame, cap: int | None) -> pd.DataFrame:
    """At most `cap` rows per category, in table order (all with None)."""
    if cap is None:
        return df
    return df.groupby("category", sort=True, group_keys=False).head(cap)


def check_finite(residuals: torch.Tensor, ids: list[str], dtype: torch.dtype) -> None:
    """Residuals `[b, P, d]` with NaN or inf would poison every mean and direction: one clear error instead."""
    bad = ~torch.isfinite(residuals).all(dim=-1)  # [b, P]
    if bad.any():
        row, point = (int(i) for i in bad.nonzero()[0])
        raise ClawlyError(
            f"the residual stream holds NaN or inf ({int(bad.any(-1).sum())} of {len(ids)} prompts in "
            f"this batch; first: {ids[row]} at probe point {point}): the model overflows in {dtype} or "
            "its weights hold NaN; load it in float32 (model.dtype=float32) or check its weights"
        )


def run(settings: Settings, log: StageLogger, model=None, tokenizer=None) -> None:
    """Residuals of every train prompt (probe.max_per_category per category) streamed to Parquet,
    and the mean residual per set and category (Welford, float64)."""
    p = Paths.of(settings)
    harmful, harmless = read_prompts(p)
    if model is None:
        model, tokenizer = load_model(settings.model, log)
    marker = None
    if settings.probe.position == "marker":
        marker = settings.probe.marker or generation_marker(
            tokenizer, settings.model.system_prompt, settings.probe.strip_newline
        )
        log.event("probe_marker", marker=marker)
    suffix = (
        instruction_suffix(tokenizer, settings.model.system_prompt)
        if settings.probe.position == "instruction"
        else None
    )
    hidden = hidden_size(model)
    means: dict[str, RunningMean] = {}
    p.activations.mkdir(parents=True, exist_ok=True)
    for name, df, out in (("harmful", harmful, p.harmful_activations), ("harmless", harmless, p.harmless_activations)):
        rows = capped(df[df.split == "train"], settings.probe.max_per_category).reset_index(drop=True)
        prompts = chat_prompts(tokenizer, rows.text.tolist(), row_systems(rows, settings.model.system_prompt))
        t0 = time.perf_counter()
        with atomic_path(out) as tmp:
            writer = ActivationWriter(tmp, hidden)
            for idx, residuals in probe_residuals(
                model, tokenizer, prompts, settings.probe.batch_size, marker, suffix=suffix, progress=log.progress
            ):
                cats = rows.category.iloc[idx].tolist()
                check_finite(residuals, rows.id.iloc[idx].tolist(), model.dtype)
                writer.write(rows.id.iloc[idx].tolist(), cats, residuals)
                for j, cat in enumerate(cats):
                    means.setdefault(f"{name}_mean.{cat}", RunningMean()).update(residuals[j : j + 1])
            writer.close()
        seconds = time.perf_counter() - t0
        log.event(
            "probed",
            set=name,
            prompts=len(rows),
            seconds=round(seconds, 1),
            prompts_per_second=round(len(rows) / max(seconds, 1e-9), 2),
        )
    meta = {
        "model": settings.model.name,
        "probe_points": str(num_layers(model) + 1),
        "hidden_size": str(hidden),
        "position": settings.probe.position,
        "marker": marker or "",
    }
    write_means(
        p.means, ResidualMeans({k: m.mean for k, m in means.items()}, {k: m.count for k, m in means.items()}, meta)
    )
