"""DVC stage 'generate-datasets': see clawly.pipeline.generate_datasets."""

from clawly.pipeline import generate_datasets
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("generate-datasets", generate_datasets)
