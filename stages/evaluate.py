"""DVC stage 'evaluate': clawly/steps/evaluate.py."""

from clawly.steps import evaluate
from stages._common import run_stage

if __name__ == "__main__":
    run_stage("evaluate", evaluate.run)
