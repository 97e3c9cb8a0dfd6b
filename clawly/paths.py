"""Where each stage reads and writes, relative to the artifacts and prompts directories."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only
    from clawly.settings import Settings

# The directory that holds the `clawly` package: the checkout (pip install -e) or site-packages (a
# wheel). Shipped files (templates, presets, labelled responses) live inside the package, so a
# path such as clawly/data/templates.yaml names the same file in both.
PROJECT_ROOT = Path(str(files("clawly"))).resolve().parent


def project_file(path: str | Path) -> Path:
    """A shipped file (templates, labelled responses, presets) by its repository path, e.g.
    `clawly/conf/preset/default.yaml`: relative to the working directory when it exists there (a
    checkout, or the user's own copy), else inside the installed package, so `clawly MODEL` and the
    Pipeline API work from any directory and from a wheel. Absolute and missing paths come back
    unchanged."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


@dataclass(frozen=True)
class Paths:
    artifacts: Path
    prompts: Path

    @classmethod
    def of(cls, settings: Settings) -> Paths:
        """The files of a run with these settings (artifacts_dir, data.out_dir)."""
        return cls(Path(settings.artifacts_dir), Path(settings.data.out_dir))

    # generate-datasets
    @property
    def harmful_prompts(self) -> Path:
        return self.prompts / "harmful.parquet"

    @property
    def harmless_prompts(self) -> Path:
        return self.prompts / "harmless.parquet"

    # probe-activations
    @property
    def activations(self) -> Path:
        return self.artifacts / "activations"

    @property
    def harmful_activations(self) -> Path:
        return self.activations / "harmful.parquet"

    @property
    def harmless_activations(self) -> Path:
        return self.activations / "harmless.parquet"

    @property
    def means(self) -> Path:
        return self.activations / "means.safetensors"

    # compute-directions, orthogonalize-categories
    @property
    def directions(self) -> Path:
        return self.artifacts / "directions" / "directions.safetensors"

    @property
    def directions_by_layer(self) -> Path:
        return self.artifacts / "directions" / "by_layer.csv"

    @property
    def orthogonalized(self) -> Path:
        return self.artifacts / "directions" / "orthogonalized.safetensors"

    @property
    def direction_inputs(self) -> Path:
        return self.artifacts / "directions" / "inputs.json"

    # probe-writers
    @property
    def writer_inputs(self) -> Path:
        return self.artifacts / "writers" / "inputs.safetensors"

    # optimize
    @property
    def study(self) -> Path:
        return self.artifacts / "study"

    @property
    def journal(self) -> Path:
        return self.study / "journal.log"

    @property
    def optimize(self) -> Path:
        return self.artifacts / "optimize"

    @property
    def trials_parquet(self) -> Path:
        return self.optimize / "trials.parquet"

    @property
    def trials_csv(self) -> Path:
        return self.optimize / "trials.csv"

    @property
    def pareto_html(self) -> Path:
        return self.optimize / "pareto.html"

    @property
    def chosen_trial(self) -> Path:
        return self.optimize / "chosen_trial.json"

    @property
    def optimizer_prompts(self) -> Path:
        return self.optimize / "prompts.parquet"

    # distill
    @property
    def distilled(self) -> Path:
        return self.artifacts / "distill" / "factors.safetensors"

    # export-lora, merge, evaluate
    @property
    def lora(self) -> Path:
        return self.artifacts / "lora"

    @property
    def model(self) -> Path:
        return self.artifacts / "model"

    @property
    def evaluate(self) -> Path:
        return self.artifacts / "evaluate"

    @property
    def responses(self) -> Path:
        return self.evaluate / "responses.parquet"

    @property
    def evaluation_table(self) -> Path:
        return self.evaluate / "by_category.csv"

    # analyze (research views)
    @property
    def research(self) -> Path:
        return self.artifacts / "research"

    @property
    def geometry(self) -> Path:
        return self.research / "geometry.parquet"

    @property
    def geometry_csv(self) -> Path:
        return self.research / "geometry.csv"

    @property
    def category_cosines(self) -> Path:
        return self.research / "category_cosines.parquet"

    @property
    def category_cosines_csv(self) -> Path:
        return self.research / "category_cosines.csv"

    @property
    def projections(self) -> Path:
        return self.research / "projections"

    # metrics (the headline figures: optimize, evaluate), reports (every stage's details) and logs
    @property
    def metrics(self) -> Path:
        return self.artifacts / "metrics"

    def metric(self, stage: str) -> Path:
        return self.metrics / f"{stage}.json"

    def report(self, stage: str) -> Path:
        return self.artifacts / "reports" / f"{stage}.json"

    @property
    def logs(self) -> Path:
        return self.artifacts / "logs"
