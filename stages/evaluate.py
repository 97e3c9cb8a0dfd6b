"""DVC stage 'evaluate': see clawly.pipeline.evaluate."""

from clawly.pipeline import evaluate
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("evaluate", evaluate)
