"""The optimizer's choice (optimize -> export-lora, evaluate).

- `optimize/chosen_trial.json` (`ChosenTrial`): the trial the choice rule picked, its Optuna values
  (refusals, KL[, kept refusals]) and parameters, its ablation plan, and the response prefix
  answers were scored after.
- `optimize/prompts.parquet`: the prompts the optimizer scored trials on (id, set, category), so
  `evaluate` can hold them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from clawly.ablate.ablation import AblationPlan
from clawly.errors import reading
from clawly.io import atomic_path, read_json, write_json


@dataclass
class ChosenTrial:
    trial: int
    values: list[float]
    params: dict
    plan: AblationPlan
    response_prefix: str = ""

    @property
    def record(self) -> dict:
        """The trial as the reproduction record stores it."""
        return {
            "index": self.trial,
            "parameters": self.params,
            "refusals": int(self.values[0]),
            "kl_divergence": self.values[1],
        }


def write_chosen_trial(path: Path, chosen: ChosenTrial) -> None:
    write_json(
        path,
        {
            "trial": chosen.trial,
            "values": list(chosen.values),
            "params": chosen.params,
            "plan": chosen.plan.to_dict(),
            "response_prefix": chosen.response_prefix,
        },
    )


def read_chosen_trial(path: Path) -> ChosenTrial:
    with reading(path, "optimize"):
        d = read_json(path)
        return ChosenTrial(
            d["trial"], d["values"], d["params"], AblationPlan.from_dict(d["plan"]), d.get("response_prefix", "")
        )


def write_optimizer_prompts(path: Path, harmful: pd.DataFrame, harmless: pd.DataFrame) -> None:
    used = pd.concat([harmful.assign(set="harmful"), harmless.assign(set="harmless")])[["id", "set", "category"]]
    with atomic_path(path) as tmp:
        used.to_parquet(tmp, index=False)


def read_optimizer_prompt_ids(path: Path) -> set[str]:
    """Ids of every prompt the optimizer scored (harmful and harmless)."""
    with reading(path, "optimize"):
        return set(pd.read_parquet(path).id)
