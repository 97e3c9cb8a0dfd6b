"""DVC stage 'generate-datasets': clawly/steps/generate_datasets.py."""

from clawly.steps import generate_datasets
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("generate-datasets", generate_datasets.run)
